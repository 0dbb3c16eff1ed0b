"""What a checkpoint directory may hold and who may change it: only regular files, loaded from a private copy
made as they are verified; a signing key that is whole, long and private; saves that survive a crash at any
instant; a `latest` pointer that names a checkpoint beside it and nothing else."""
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clipkit.checkpoint import CheckpointError, verify
from clipkit.config import load_config
from clipkit.models import load_model
from clipkit.training import Trainer
from clipkit.training.engine import TorchEngine
from test_checkpoints import _reseal

STEP = "step_00000040"  # trained_nano's checkpoint


def _key() -> bytes:
    return Path(os.environ["CLIPKIT_CHECKPOINT_KEY"]).read_bytes()


def _resume_overrides(run_dir, synth, resume):
    """trained_nano's run config, in another run.dir, resuming from `resume`."""
    return [f"run.dir={run_dir}", f"data.train={synth.train_spec}", "model.name=clipkit-nano",
            "train.global_batch_size=32", "train.steps=40", "train.warmup_steps=2", "train.checkpoint_every=1000",
            "run.progress=false", "data.workers=0", "data.shuffle_buffer=50", f"train.resume={resume}"]


def _with_deepspeed_files(trained_nano, where: Path) -> Path:
    """A copy of trained_nano's checkpoint that also lists DeepSpeed's files, signed with this user's key."""
    checkpoint = where / STEP
    shutil.copytree(trained_nano[0], checkpoint)
    state = checkpoint / "deepspeed" / "state"
    state.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}}, state / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {}}, state / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    _reseal(checkpoint, _key())
    return checkpoint


# -- item: checkpoints hold only regular files, and a loader reads what was verified -------------------


def test_symlinked_deepspeed_folder_is_refused(trained_nano, tmp_path):
    checkpoint = _with_deepspeed_files(trained_nano, tmp_path / "run")
    assert verify(checkpoint, signed=True)["step"] == 40  # signed by this installation: it would be loaded
    # the attack: deepspeed/ moved elsewhere, one more optimizer partition added there (DeepSpeed finds those
    # by pattern and unpickles them), a link left in its place; every listed file still matches its sha256
    elsewhere = tmp_path / "elsewhere"
    shutil.move(checkpoint / "deepspeed", elsewhere)
    torch.save({"optimizer_state_dict": {}}, elsewhere / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    (checkpoint / "deepspeed").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(CheckpointError, match="holds a symbolic link, deepspeed: a checkpoint holds regular files"):
        verify(checkpoint, signed=True)
    from clipkit.checkpoint import stage_verified  # what a resume runs before DeepSpeed's loader

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(CheckpointError, match="holds a symbolic link, deepspeed: a checkpoint holds regular files"):
        stage_verified(checkpoint, private, signed=True)
    assert list(private.iterdir()) == []


def test_symlinked_file_and_fifo_are_refused_by_verify_and_by_every_loader(trained_nano, synth_small, tmp_path):
    linked = tmp_path / "linked" / STEP  # optimizer.pt a link to a file of the same bytes elsewhere
    shutil.copytree(trained_nano[0], linked)
    shutil.move(linked / "optimizer.pt", tmp_path / "optimizer.pt")
    (linked / "optimizer.pt").symlink_to(tmp_path / "optimizer.pt")
    weights_linked = tmp_path / "weights_linked" / STEP  # the weights a link, for the weights readers
    shutil.copytree(trained_nano[0], weights_linked)
    shutil.move(weights_linked / "model.safetensors", tmp_path / "model.safetensors")
    (weights_linked / "model.safetensors").symlink_to(tmp_path / "model.safetensors")
    fifo = _with_deepspeed_files(trained_nano, tmp_path / "fifo")
    os.mkfifo(fifo / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")

    with pytest.raises(CheckpointError, match="holds a symbolic link, optimizer.pt"):
        verify(linked)
    with pytest.raises(CheckpointError, match="holds a symbolic link, model.safetensors"):
        verify(weights_linked, only=["model.safetensors"])
    with pytest.raises(CheckpointError, match="holds a FIFO, deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states"):
        verify(fifo, signed=True)
    with pytest.raises(CheckpointError, match="holds a symbolic link, model.safetensors"):
        load_model(weights_linked)
    with pytest.raises(CheckpointError, match="holds a symbolic link, optimizer.pt"):
        Trainer(load_config(None, _resume_overrides(tmp_path / "resumed", synth_small, linked)))


def test_resume_loads_what_was_verified_not_a_file_swapped_after(trained_nano, synth_small, tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt" / STEP
    shutil.copytree(trained_nano[0], checkpoint)
    verified = load_file(str(checkpoint / "model.safetensors"))
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        header = f.metadata()
    swapped = tmp_path / "swapped.safetensors"  # valid weights, other values: what an attacker swaps in
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in verified.items()}, str(swapped), metadata=header)

    real_load_state, seen = TorchEngine.load_state, []

    def swap_then_load(engine, directory, *args, **kwargs):
        """The swap, in the window between verification and the loader's read."""
        os.replace(swapped, checkpoint / "model.safetensors")
        seen.append(Path(directory))
        return real_load_state(engine, directory, *args, **kwargs)

    monkeypatch.setattr(TorchEngine, "load_state", swap_then_load)
    trainer = Trainer(load_config(None, _resume_overrides(tmp_path / "resumed", synth_small, checkpoint)))
    assert seen and trainer.step == 40 and trainer.resumed_from == checkpoint
    loaded = trainer.module.state_dict()
    assert sorted(loaded) == sorted(verified)
    for name, value in verified.items():
        assert torch.equal(loaded[name], value), name
    # the private copy it read is gone, and it was no one else's to read
    assert not seen[0].exists() and seen[0].parent == tmp_path / "resumed" / "checkpoints"
    assert [p.name for p in seen[0].parent.iterdir()] == []


def test_private_copy_holds_the_listed_files_verified_and_unreachable(trained_nano, tmp_path):
    from clipkit.checkpoint import stage_verified

    checkpoint = _with_deepspeed_files(trained_nano, tmp_path / "run")
    shared = checkpoint / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    shared.chmod(0o664)  # writable by the group: its contents could change after the copy is checked
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    manifest = stage_verified(checkpoint, private, signed=True)
    copied = sorted(p.relative_to(private).as_posix() for p in private.rglob("*") if p.is_file())
    assert copied == sorted(manifest["files"])
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((private / name).read_bytes()).hexdigest() == entry["sha256"]
    before = (private / shared.relative_to(checkpoint)).read_bytes()
    assert os.stat(private / shared.relative_to(checkpoint)).st_ino != shared.stat().st_ino
    with open(shared, "r+b") as f:  # the group member rewrites it in place
        f.write(b"\0" * 16)
    assert (private / shared.relative_to(checkpoint)).read_bytes() == before

    damaged = tmp_path / "damaged"
    damaged.mkdir(mode=0o700)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt is damaged"):
        stage_verified(checkpoint, damaged, signed=True)


# -- item: the signing key ----------------------------------------------------------------------------


def _first_uses(paths: list[str], barrier, results) -> None:
    """Ask for the key at each path in turn, all processes at once (the barrier) for each."""
    from clipkit.checkpoint import signing_key

    keys = []
    for path in paths:
        os.environ["CLIPKIT_CHECKPOINT_KEY"] = path
        barrier.wait()
        try:
            keys.append(signing_key().hex())
        except Exception as e:  # reported, so that the test names it
            keys.append(f"error: {type(e).__name__}: {e}")
    results.put(keys)


def test_concurrent_first_use_makes_one_full_key(tmp_path):
    """8 processes ask for a key that does not exist yet at the same instant, 300 times over (each time in a
    new directory): each time every one of them gets the same key of at least 32 bytes, the one on disk, mode
    0600. (Creating the file and then writing it, as before, gave a process an empty or other key in about 1 to
    6 trials of 200 on this test's machine.)"""
    context = multiprocessing.get_context("fork")
    paths = [tmp_path / f"trial{trial}" / "config" / "checkpoint.key" for trial in range(300)]
    barrier, results = context.Barrier(8), context.Queue()
    workers = [context.Process(target=_first_uses, args=([str(p) for p in paths], barrier, results))
               for _ in range(8)]
    for w in workers:
        w.start()
    keys = [results.get(timeout=300) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    assert all(w.exitcode == 0 for w in workers)
    for trial, path in enumerate(paths):
        seen = {k[trial] for k in keys}
        assert seen == {path.read_bytes().hex()} and len(path.read_bytes()) >= 32, (trial, seen)
        assert path.stat().st_mode & 0o777 == 0o600
        assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.key"]  # no temporary left


@pytest.mark.parametrize("content, mode, fix", [(b"", 0o600, "delete it to have a new one made"),
                                               (b"k", 0o600, "delete it to have a new one made"),
                                               (b"k" * 31, 0o600, "delete it to have a new one made"),
                                               (os.urandom(32).hex().encode(), 0o644, "run chmod 600 {path}"),
                                               (os.urandom(32).hex().encode(), 0o640, "run chmod 600 {path}")],
                         ids=["empty", "one-byte", "31-bytes", "readable-by-all", "readable-by-group"])
def test_weak_keys_are_refused_with_the_fix(tmp_path, monkeypatch, content, mode, fix):
    from clipkit.checkpoint import commit, signing_key

    path = tmp_path / "checkpoint.key"
    path.write_bytes(content)
    path.chmod(mode)
    monkeypatch.setenv("CLIPKIT_CHECKPOINT_KEY", str(path))
    with pytest.raises(CheckpointError) as refused:
        signing_key()
    message = str(refused.value)
    assert str(path) in message and fix.format(path=path) in message and "\n" not in message, message
    tmp = tmp_path / "step_00000001.tmp"  # nothing is signed with it either
    tmp.mkdir()
    (tmp / "a.json").write_text("{}")
    with pytest.raises(CheckpointError, match="checkpoint key"):
        commit(tmp, {"step": 1})
    assert not (tmp_path / "step_00000001").exists()


def test_a_readable_key_stops_training_with_one_line(synth_small, tmp_path):
    key = tmp_path / "checkpoint.key"
    key.write_bytes(os.urandom(32).hex().encode())
    key.chmod(0o644)
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")},
           "CLIPKIT_CHECKPOINT_KEY": str(key)}
    overrides = _resume_overrides(tmp_path / "run", synth_small, "latest")[:-1] + ["train.steps=2"]
    proc = subprocess.run([sys.executable, "-m", "clipkit", "train", *overrides], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"clipkit: error: checkpoint key {key} is accessible by group "
                                                    f"or others (mode 0644): run chmod 600 {key}"), proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any step


# -- item: crash-safe checkpoint writes ----------------------------------------------------------------


def _variant(trained_nano, where: Path, label: str) -> Path:
    """A complete checkpoint of step 40 whose trainer.json carries `label`: which one survives shows."""
    shutil.copytree(trained_nano[0], where)
    info = json.loads((where / "trainer.json").read_text())
    (where / "trainer.json").write_text(json.dumps({**info, "label": label}))
    _reseal(where, _key())
    return where


def _label(checkpoint: Path) -> str:
    verify(checkpoint)
    return json.loads((checkpoint / "trainer.json").read_text())["label"]


def test_a_crash_while_replacing_a_checkpoint_loses_nothing(trained_nano, synth_small, tmp_path):
    # The window of the save that replaced step_N by deleting it first: the old one gone, the new one sealed
    # but not yet renamed. The next start must complete that save, not delete it.
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    _variant(trained_nano, checkpoints / f"{STEP}.tmp", "new")
    (checkpoints / "latest").write_text("step_00000020\n")  # the pointer written by the save before
    trainer = Trainer(load_config(None, _resume_overrides(run_dir, synth_small, "latest")))
    assert trainer.step == 40 and trainer.resumed_from == checkpoints / STEP
    assert _label(checkpoints / STEP) == "new" and (checkpoints / "latest").read_text().strip() == STEP
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", STEP]

    from clipkit.checkpoint import recover_interrupted

    # every other instant of a save that replaces a checkpoint: (what is on disk) -> the label that remains
    instants = {
        "old moved aside, new sealed": ({".old": "old", ".tmp": "new"}, "new"),
        "old moved aside, new not sealed": ({".old": "old", ".tmp": None}, "old"),
        "new renamed in, old not yet deleted": ({"": "new", ".old": "old"}, "new"),
        "new sealed, old not yet moved aside": ({"": "old", ".tmp": "new"}, "old"),
        "new not sealed, nothing else": ({".tmp": None}, None),
    }
    for instant, (entries, survivor) in instants.items():
        directory = tmp_path / instant.replace(" ", "_").replace(",", "") / "checkpoints"
        for suffix, label in entries.items():
            if label is None:  # a save cut short: some files, no manifest
                (directory / f"{STEP}{suffix}").mkdir(parents=True)
                (directory / f"{STEP}{suffix}" / "model.safetensors").write_bytes(b"partial")
            else:
                _variant(trained_nano, directory / f"{STEP}{suffix}", label)
        recover_interrupted(directory)
        assert sorted(p.name for p in directory.iterdir() if p.name != "latest") == ([STEP] if survivor else []), \
            instant
        if survivor:
            assert _label(directory / STEP) == survivor, instant


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    from clipkit.checkpoint import commit

    for content in ("first", "second"):
        tmp = tmp_path / "step_00000003.tmp"
        tmp.mkdir()
        (tmp / "trainer.json").write_text(json.dumps({"content": content}))
        commit(tmp, {"step": 3})
    assert json.loads((tmp_path / "step_00000003" / "trainer.json").read_text()) == {"content": "second"}
    assert verify(tmp_path / "step_00000003", signed=True)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003"]


# -- item: the latest pointer --------------------------------------------------------------------------


def test_latest_pointer_names_only_a_checkpoint_beside_it(trained_nano, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_nano[0], run_dir / "checkpoints" / STEP)
    shutil.copytree(trained_nano[0], tmp_path / "elsewhere")  # a checkpoint outside the run
    latest = run_dir / "checkpoints" / "latest"
    for named in ("../../elsewhere", str(tmp_path / "elsewhere"), "step_00000040/../../../elsewhere"):
        latest.write_text(named + "\n")
        with pytest.raises(CheckpointError, match=f"names '{named}'; a latest pointer may only name a checkpoint"):
            load_model(run_dir)
    latest.unlink()
    (tmp_path / "pointer").write_text(STEP + "\n")
    latest.symlink_to(tmp_path / "pointer")
    with pytest.raises(CheckpointError, match="latest is not a plain file"):
        load_model(run_dir)
    latest.unlink()
    latest.write_text(STEP + "\n")
    assert load_model(run_dir).source == run_dir
