"""Checkpoints are safe to load (nothing in them runs), verified (damage is found and skipped), atomic
(a full disk or a crash leaves the earlier ones intact) and managed for every engine."""
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from clipkit.checkpoint import CheckpointError, verify
from clipkit.config import ConfigError, load_config
from clipkit.export import export_checkpoint
from clipkit.models import load_model
from clipkit.training import Trainer


def _overrides(run_dir, synth, *extra):
    return [f"run.dir={run_dir}", f"data.train={synth.train_spec}", f"data.zeroshot={synth.eval_root}",
            "model.name=clipkit-nano", "train.global_batch_size=8", "train.steps=6", "train.warmup_steps=1",
            "train.checkpoint_every=1", "train.keep_checkpoints=0", "run.progress=false", "data.workers=0",
            "data.shuffle_buffer=20", "run.report=false", *extra]


def _train(run_dir, synth, until, *extra):
    trainer = Trainer(load_config(None, _overrides(run_dir, synth, *extra)))
    trainer.fit(until=until)
    return trainer


class Payload:
    """Unpickling this runs a shell command that leaves a marker file: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _reseal(checkpoint: Path, key: bytes) -> None:
    """What an attacker can do: recompute every checksum of a tampered checkpoint and sign with a key."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != "manifest.json"):
        files[path.relative_to(checkpoint).as_posix()] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                                          "bytes": path.stat().st_size}
    manifest["files"] = files
    body = json.dumps({k: v for k, v in manifest.items() if k != "hmac"}, sort_keys=True).encode()
    manifest["hmac"] = hmac.new(key, body, hashlib.sha256).hexdigest()
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "clipkit", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def trained(synth_small, tmp_path_factory):
    """A torch-engine run with checkpoints at steps 1 and 2."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    _train(run_dir, synth_small, 2)
    return run_dir


def test_manifest_lists_every_file_with_its_sha256(trained):
    checkpoint = trained / "checkpoints" / "step_00000002"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    on_disk = sorted(p.name for p in checkpoint.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk == ["model.safetensors", "optimizer.pt", "ranks.json", "trainer.json"]
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
    assert manifest["step"] == 2 and manifest["engine"] == "torch"
    assert (trained / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    # everything in it reads with the safe loaders alone
    torch.load(checkpoint / "optimizer.pt", weights_only=True)
    json.loads((checkpoint / "ranks.json").read_text())


def test_crafted_checkpoint_never_runs_its_code_on_any_path(trained, synth_small, tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil" / "checkpoints"
    shutil.copytree(trained / "checkpoints", evil)
    for step in ("step_00000001", "step_00000002"):
        torch.save({"optimizer": Payload(marker)}, evil / step / "optimizer.pt")
        _reseal(evil / step, key=os.urandom(32))  # checksums match: only the loader stands in the way
    legacy = tmp_path / "legacy.pt"  # a pickled checkpoint file, as older tools write them
    torch.save({"model": Payload(marker), "step": 1}, legacy)
    fake_weights = tmp_path / "weights.safetensors"
    fake_weights.write_bytes(legacy.read_bytes())

    # train.resume=PATH and train.resume=latest: refused with the file named
    for resume, run_dir in ((evil / "step_00000002", tmp_path / "fresh"), ("latest", evil.parent)):
        with pytest.raises(CheckpointError, match="optimizer.pt was refused"):
            Trainer(load_config(None, _overrides(run_dir, synth_small, f"train.resume={resume}")))
    # zeroshot and export (the commands, and the loader under them): a pickle is refused unread
    for command in (["zeroshot", "--data", synth_small.eval_root], ["export", "--out", tmp_path / "e"]):
        proc = _cli(command[0], "--checkpoint", legacy, *command[1:])
        assert proc.returncode == 2 and str(legacy) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    for path in (legacy, fake_weights):
        with pytest.raises(CheckpointError, match=str(path)):
            load_model(path)
    # the checkpoint directories themselves: only their safetensors weights are read
    export_checkpoint(evil / "step_00000002", tmp_path / "e2")
    assert not marker.exists()


def test_resume_latest_skips_damaged_checkpoints_and_says_why(trained, synth_small, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    checkpoints = run_dir / "checkpoints"
    weights = checkpoints / "step_00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 16])
    weights.write_bytes(bytes(data))  # 16 flipped bytes inside a weight record
    (checkpoints / "step_00000003.tmp").mkdir()  # left by a save that was interrupted
    (checkpoints / "step_00000003.tmp" / "model.safetensors").write_bytes(b"partial")

    with pytest.raises(CheckpointError, match="model.safetensors is damaged"):
        verify(checkpoints / "step_00000002")
    with pytest.raises(CheckpointError, match="model.safetensors is damaged"):
        Trainer(load_config(None, _overrides(tmp_path / "other", synth_small,
                                             f"train.resume={checkpoints / 'step_00000002'}")))
    proc = _cli("zeroshot", "--checkpoint", checkpoints / "step_00000002", "--data", synth_small.eval_root)
    assert proc.returncode == 2 and "damaged" in proc.stderr

    trainer = Trainer(load_config(None, _overrides(run_dir, synth_small, "train.resume=latest")))
    assert trainer.step == 1 and trainer.resumed_from == checkpoints / "step_00000001"
    assert "skipping checkpoint" in capsys.readouterr().out
    assert not (checkpoints / "step_00000003.tmp").exists()

    # a truncated newest checkpoint is skipped the same way
    (checkpoints / "step_00000001" / "optimizer.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies"):
        Trainer(load_config(None, _overrides(run_dir, synth_small, "train.resume=latest")))


def test_retention_and_a_finished_run(synth_small, tmp_path):
    run_dir = tmp_path / "run"
    trainer = _train(run_dir, synth_small, None, "train.keep_checkpoints=2", "train.steps=4")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert trainer.step == 4
    again = Trainer(load_config(None, _overrides(run_dir, synth_small, "train.keep_checkpoints=2", "train.steps=4",
                                                 "train.resume=latest")))
    assert again.fit() == run_dir / "checkpoints" / "step_00000004"  # nothing left to train: no new save
    with pytest.raises(ConfigError, match="'train.global_batch_size' differs from the checkpoint's run"):
        Trainer(load_config(None, _overrides(run_dir, synth_small, "train.steps=4", "train.resume=latest",
                                             "train.global_batch_size=16")))


DISK_FULL = textwrap.dedent("""
    import json, os, shutil, sys
    from pathlib import Path
    from clipkit.checkpoint import CheckpointError, verify
    from clipkit.config import load_config
    from clipkit.training import Trainer

    mount, out, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    trainer = Trainer(load_config(None, overrides))
    trainer.fit(until=1)
    free = shutil.disk_usage(mount).free
    with open(mount / "filler", "wb") as f:  # leave 2 MB: less than one checkpoint
        f.write(b"\\0" * (free - 2_000_000))
    result = {"error": None}
    try:
        trainer.fit(until=2)
    except CheckpointError as e:
        result["error"] = str(e)
    checkpoints = mount / "run" / "checkpoints"
    result["entries"] = sorted(os.listdir(checkpoints))
    result["step1_verifies"] = verify(checkpoints / "step_00000001")["step"] == 1
    Path(out).write_text(json.dumps(result))
""")


def test_full_disk_is_a_clear_error_and_keeps_earlier_checkpoints(synth_small, tmp_path):
    """A real full disk: a 64 MB tmpfs, mounted in a private user and mount namespace."""
    mount = tmp_path / "disk"
    mount.mkdir()
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL)
    out = tmp_path / "result.json"
    overrides = _overrides(mount / "run", synth_small)
    if subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("this kernel does not allow unprivileged mount namespaces")
    inner = f"mount -t tmpfs -o size=64m tmpfs {mount} && exec {sys.executable} {script} {mount} {out} " + \
        " ".join(f"'{o}'" for o in overrides)
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", inner],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["error"].startswith("disk full: no space left on the device of ")
    assert str(mount / "run" / "checkpoints") in result["error"]
    assert result["entries"] == ["latest", "step_00000001"]  # no partial step_2, no temporary left
    assert result["step1_verifies"]


DS_SWAP = textwrap.dedent("""
    import os, shutil, sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file
    from clipkit.config import load_config
    from clipkit.training import Trainer
    from clipkit.training.engine import DeepSpeedEngine

    checkpoint, older, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    real_load_state = DeepSpeedEngine.load_state

    def swap_then_load(engine, directory, *args, **kwargs):
        # after verification, before DeepSpeed reads: the checkpoint's DeepSpeed files become an older step's
        state = checkpoint / "deepspeed" / "state"
        for path in (older / "deepspeed" / "state").iterdir():
            shutil.copy(path, state / f"{path.name}.new")
            os.replace(state / f"{path.name}.new", state / path.name)
        return real_load_state(engine, directory, *args, **kwargs)

    DeepSpeedEngine.load_state = swap_then_load
    trainer = Trainer(load_config(None, overrides))
    loaded, verified = trainer.engine.full_state_dict(), load_file(str(checkpoint / "model.safetensors"))
    differ = [k for k in verified if not torch.equal(loaded[k].reshape(verified[k].shape), verified[k])]
    print("resumed at", trainer.step, "; weights that differ from the verified checkpoint's:", differ)
    sys.exit(0 if trainer.step == 3 and sorted(loaded) == sorted(verified) and not differ else 1)
""")


def test_deepspeed_checkpoints_are_signed_retained_consolidated_and_engine_checked(synth_small, tmp_path):
    """One-process DeepSpeed through the CLI (no torchrun variables set): retention applies, the final
    checkpoint carries consolidated weights, resuming with another engine is refused, and a checkpoint
    this installation did not sign never reaches DeepSpeed's unpickling loader."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    run_dir = tmp_path / "ds"
    common = ["train.steps=3", "train.keep_checkpoints=2", "eval.zeroshot_at_end=false"]
    proc = _cli("train", *_overrides(run_dir, synth_small, "deepspeed.enabled=true", *common), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    assert verify(checkpoints / "step_00000003", signed=True)["engine"] == "deepspeed-zero2"
    assert (checkpoints / "step_00000003" / "model.safetensors").is_file()  # consolidated at the end
    assert not (checkpoints / "step_00000002" / "model.safetensors").exists()
    exported = load_model(run_dir / "export")  # the run's open_clip export holds the final weights
    final = load_model(checkpoints / "step_00000003")
    for name, value in final.model.state_dict().items():
        assert torch.equal(exported.model.state_dict()[name], value), name
    with pytest.raises(CheckpointError, match="without full weights"):
        load_model(checkpoints / "step_00000002")

    proc = _cli("train", *_overrides(run_dir, synth_small, "train.resume=latest", *common), env=env)
    assert proc.returncode == 2 and "written by the deepspeed-zero2 engine; this run uses torch" in proc.stderr

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil" / "step_00000002"
    shutil.copytree(checkpoints / "step_00000002", evil)
    states = next(evil.glob("deepspeed/state/*model_states.pt"))
    torch.save({"module": Payload(marker)}, states)
    _reseal(evil, key=os.urandom(32))
    proc = _cli("train", *_overrides(tmp_path / "other", synth_small, "deepspeed.enabled=true",
                                     f"train.resume={evil}", *common), env=env)
    assert proc.returncode == 2 and "was not written by this clipkit installation" in proc.stderr, proc.stderr
    assert not marker.exists()

    # DeepSpeed reads the files that were verified: its files swapped for an older step's after verification
    # (in the window before DeepSpeed's loader runs) do not reach it; it resumes step 3's consolidated weights
    victim = tmp_path / "victim" / "step_00000003"
    shutil.copytree(checkpoints / "step_00000003", victim)
    script = tmp_path / "ds_swap.py"
    script.write_text(DS_SWAP)
    resumed = tmp_path / "resumed"
    proc = subprocess.run([sys.executable, str(script), str(victim), str(checkpoints / "step_00000002"),
                           *_overrides(resumed, synth_small, "deepspeed.enabled=true", f"train.resume={victim}",
                                       *common)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert list((resumed / "checkpoints").iterdir()) == []  # the private copy it loaded is removed
