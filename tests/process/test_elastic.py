"""Elastic resume: a run checkpointed on W ranks x K loader workers continues on W' x K' (train.resume=latest,
the same global batch). Every run is a real `clipkit train` process (under torchrun for 2 ranks); the audit
reads the sample keys each rank recorded (run.record_sample_keys) and the shards themselves (plain tarfile).
DeepSpeed checkpoints on another world size are checked against DeepSpeed's own consolidation of the
original checkpoint (deepspeed.utils.zero_to_fp32), parameter by parameter, and against a resume on the
original world size, loss for loss; those runs and resumes go through tests/dist/ds_resume.py, which runs
several of them in turn in one launch (Trainer.fit, as `clipkit train` calls it, for the runs), and the one
resume users run by hand is the real `clipkit train train.resume=latest`.
"""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from data_shards import tar_keys
from safetensors.torch import load_file

from clipkit.data import expand_shards
from helpers import DIST, process_env

FIRST, STEPS, BATCH = 13, 37, 16  # 37 x 16 = 592 of the epoch's 600 samples: no sample may come twice
TOL = 2e-4  # as tests/test_faults.py: fp32 on CPU, the reduction order differs between layouts


FAULT_TRAIN = DIST / "fault_train.py"  # `clipkit train` with a fault injected
DS_RESUME = DIST / "ds_resume.py"  # a DeepSpeed resume: its state, then fixed batches


def _launch(run_dir: Path, synth, nproc: int, workers: int, steps: int, *extra,
            faults: str = "") -> subprocess.CompletedProcess:
    args = [f"run.dir={run_dir}", f"data.train={synth.train_spec}", "model.name=clipkit-nano",
            f"train.global_batch_size={BATCH}", f"train.steps={steps}", "train.warmup_steps=3", "train.lr=2e-3",
            f"train.checkpoint_every={FIRST}", "run.progress=false", "run.log_every=1", f"data.workers={workers}",
            "data.shuffle_buffer=40", "run.record_sample_keys=true", "eval.zeroshot_at_end=false",
            "export.at_end=false", "run.report=false", *extra]
    command = [str(FAULT_TRAIN)] if faults else ["-m", "clipkit", "train"]
    if nproc > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *command]
    return subprocess.run([sys.executable, *command, *args], env=process_env(CLIPKIT_TEST_FAULTS=faults),
                          capture_output=True, text=True, timeout=300)


def _train(*args) -> subprocess.CompletedProcess:
    proc = _launch(*args)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _keys_by_step(run_dir: Path) -> dict[int, list[str]]:
    """Every rank's recorded keys, per step (rank files of a layout the run no longer has included)."""
    steps: dict[int, list[str]] = {}
    for path in sorted((run_dir / "sample_keys").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            steps.setdefault(entry["step"], []).extend(entry["keys"])
    return steps


@pytest.fixture(scope="module")
def reference_lrs(synth_small, tmp_path_factory):
    """The learning rates of the uninterrupted single-process run, step by step."""
    run_dir = tmp_path_factory.mktemp("elastic_reference") / "run"
    _train(run_dir, synth_small, 1, 0, STEPS)
    return [r["lr"] for r in _records(run_dir) if "loss" in r]


@pytest.mark.parametrize("before,after", [((2, 1), (1, 1)), ((1, 1), (2, 1)), ((1, 1), (1, 2))],
                         ids=["2x1-to-1x1", "1x1-to-2x1", "1x1-to-1x2"])
def test_resume_on_another_layout_sees_every_sample_once(before, after, synth_small, reference_lrs, tmp_path):
    """Killed in step FIRST + 1 on the first layout (SIGKILL, every rank), resumed on the second from the
    checkpoint of step FIRST: the data stream continues with what was not delivered, each sample of the
    epoch once; the step count and the LR schedule continue as in the uninterrupted run."""
    run_dir = tmp_path / "run"
    killed = _launch(run_dir, synth_small, *before, STEPS, faults=f"crash:{FIRST + 1}")
    assert killed.returncode != 0 and (run_dir / "checkpoints" / f"step_{FIRST:08d}").is_dir(), killed.stderr[-3000:]
    resumed = _train(run_dir, synth_small, *after, STEPS, "train.resume=latest")
    assert f"step_{FIRST:08d} at step {FIRST}" in resumed.stdout
    assert (f"the checkpoint was written by {before[0]} ranks x data.workers={before[1]}; this run has "
            f"{after[0]} x {after[1]}: the data stream is repartitioned") in resumed.stdout

    steps = _keys_by_step(run_dir)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert all(len(keys) == BATCH for keys in steps.values())  # the same global batch on both layouts
    seen = Counter(k for keys in steps.values() for k in keys)
    assert max(seen.values()) == 1, [k for k, n in seen.items() if n > 1][:5]  # once within the epoch
    assert sum(seen.values()) == STEPS * BATCH
    assert set(seen) <= set(tar_keys(expand_shards(synth_small.train_spec)))

    records = [r for r in _records(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # the step count continues
    assert [r["lr"] for r in records] == reference_lrs  # and so does the schedule
    assert all(r["loss"] is not None for r in records)


def _ds_overrides(run_dir: Path, synth, stage: int) -> list[str]:
    return [f"run.dir={run_dir}", f"data.train={synth.train_spec}", "model.name=clipkit-nano",
            f"train.global_batch_size={BATCH}", "train.steps=6", "train.warmup_steps=1", "train.lr=2e-3",
            "train.checkpoint_every=3", "run.progress=false", "data.workers=0", "data.shuffle_buffer=40",
            "eval.zeroshot_at_end=false", "export.at_end=false", "deepspeed.enabled=true",
            f"deepspeed.zero_stage={stage}"]


def _run_ok(nproc: int, *args: str) -> None:
    if nproc > 1:
        args = ("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args)
    proc = subprocess.run([sys.executable, *args], env=process_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


CASES = {"zero2-2to1": (2, 2, 1), "zero3-2to1": (3, 2, 1), "zero3-1to2": (3, 1, 2), "zero1-2to1": (1, 2, 1),
         "zero0-2to1": (0, 2, 1)}  # (stage, ranks before, ranks after)


def _ds_job(nproc: int, jobs: list[list[str]]) -> None:
    """Run `jobs` (ds_resume.py's `fit ...` / `resume OUT STEPS ...`) in turn in one launch of nproc ranks."""
    args = [str(DS_RESUME)]
    for job in jobs:
        args += [*(["then"] if len(args) > 1 else []), *job]
    _run_ok(nproc, *args)


@pytest.fixture(scope="module")
def ds_resumes(synth_small, tmp_path_factory):
    """Every case's run checkpointed at steps 3 and 6 on `before` ranks, and its checkpoint of step 3 resumed on
    `after` ranks ("moved") and on `before` ranks ("same"); each launch runs its jobs one after another in the same
    processes (DeepSpeed builds one engine per job), so the five cases take three launches: 2 ranks (the runs
    of 2, then the resumes on 2), 1 rank (the run of 1, then the resumes on 1), 2 ranks (what resumes the run of 1)."""
    root = tmp_path_factory.mktemp("ds_resumes")

    def overrides(name):
        return _ds_overrides(root / name / "run", synth_small, CASES[name][0])

    def resume(name, which):
        return ["resume", str(root / name / which), "2", *overrides(name),
                f"train.resume={root / name / 'run' / 'checkpoints' / 'step_00000003'}"]

    def on(nproc, role):  # the cases whose `role` ("before", "after") is nproc ranks
        return [name for name, case in CASES.items() if case[1 if role == "before" else 2] == nproc]

    _ds_job(2, [*(["fit", *overrides(n)] for n in on(2, "before")), *(resume(n, "same") for n in on(2, "before"))])
    _ds_job(1, [*(["fit", *overrides(n)] for n in on(1, "before")), *(resume(n, "same") for n in on(1, "before")),
                *(resume(n, "moved") for n in on(1, "after"))])
    _ds_job(2, [resume(n, "moved") for n in on(2, "after")])
    return root


def _resumed(root: Path, name: str, which: str) -> tuple[dict, dict]:
    """(the state the engine held right after loading, resumed.json) of one case's resume."""
    out = root / name / which
    return load_file(str(out / "state.safetensors")), json.loads((out / "resumed.json").read_text())


def _zero_consolidated(checkpoint: Path) -> dict[str, dict]:
    """DeepSpeed's zero_to_fp32 on the original ZeRO checkpoint: the fp32 weights, and the Adam moments merged
    from the per-rank flat partitions the same way (its ZeRO-1/2 or ZeRO-3 merge applied to exp_avg and
    exp_avg_sq in place of the fp32 master weights). Test code on a checkpoint this test wrote: it unpickles."""
    from deepspeed.utils import zero_to_fp32 as z

    state_dir = checkpoint / "deepspeed" / "state"
    out = {"weight": z.get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / "deepspeed"), tag="state")}
    model_states = z.parse_model_states(z.get_model_state_files(str(state_dir)))
    ranks = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
             for f in z.get_optim_files(str(state_dir))]
    for key in ("exp_avg", "exp_avg_sq"):
        if ranks[0]["zero_stage"] <= 2:
            flat = [[r["base_optimizer_state"]["state"][g][key] for g in range(len(r["single_partition_of_fp32_groups"]))]
                    for r in ranks]
            merged = z._get_fp32_state_dict_from_zero2_checkpoint(len(ranks), flat, model_states, False,
                                                                 ranks[0].get("param_alignment_paddings"))
        else:
            flat = [[r["optimizer_state_dict"]["state"][g][key] for g in range(len(r["fp32_flat_groups"]))]
                    for r in ranks]
            merged = z.to_torch_tensor(z._get_fp32_state_dict_from_zero3_checkpoint(len(ranks), flat, model_states,
                                                                                    False))
        out[key] = merged
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_deepspeed_resumes_on_another_world_size_with_weights_and_moments(case, ds_resumes):
    """A DeepSpeed run checkpointed at step 3 on `before` ranks, resumed on `after` (ZeRO 1-3: converted to
    DeepSpeed's universal checkpoint outside the sealed checkpoint and re-partitioned; stage 0: the state is
    whole): right after loading, every weight and both Adam moments of every parameter equal DeepSpeed's own
    consolidation of the original checkpoint exactly, and equal what a resume on `before` ranks holds; the
    next steps on the same global batches give that resume's losses, and the step count and LR continue."""
    stage = CASES[case][0]
    run_dir = ds_resumes / case / "run"  # checkpoints at 3 and 6
    checkpoint = run_dir / "checkpoints" / "step_00000003"
    moved, moved_info = _resumed(ds_resumes, case, "moved")
    same, same_info = _resumed(ds_resumes, case, "same")
    assert sorted(moved) == sorted(same)
    params = sorted(k.split("/", 1)[1] for k in moved if k.startswith("exp_avg/"))
    assert len(params) == 62 and all(f"weight/{k}" in moved for k in params)
    for key in moved:  # the two layouts hold the same state, bit for bit
        assert torch.equal(moved[key], same[key]), key
    if stage > 0:  # and it is the original checkpoint's, as DeepSpeed consolidates it
        reference = _zero_consolidated(checkpoint)
        for kind in ("weight", "exp_avg", "exp_avg_sq"):
            for name in params:
                assert torch.equal(moved[f"{kind}/{name}"], reference[kind][name].float()), (kind, name)
        assert max(moved[f"exp_avg_sq/{k}"].abs().max().item() for k in params) > 0  # real moments, not zeros
    assert moved_info["step"] == same_info["step"] == 3 and moved_info["lr"] == same_info["lr"] > 0
    worst = max(abs(a - b) for a, b in zip(moved_info["losses"], same_info["losses"]))
    assert worst < TOL, (moved_info, same_info)
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # cleaned up


def test_deepspeed_zero2_run_continues_on_fewer_ranks(synth_small, tmp_path):
    """`clipkit train train.resume=latest` on 1 rank continues a ZeRO-2 run of 2 (the command users run): the log
    says what was converted, the step count continues, the converted copy is gone, the sealed checkpoint is
    untouched, and the checkpoints it writes are the new world size's (a second resume on 1 rank loads natively)."""
    from clipkit.checkpoint import verify

    run_dir = tmp_path / "run"
    zero = ["deepspeed.enabled=true", "deepspeed.zero_stage=2"]
    _train(run_dir, synth_small, 2, 0, 2, *zero)
    sealed = run_dir / "checkpoints" / "step_00000002"
    before = sorted(p.relative_to(sealed) for p in sealed.rglob("*"))
    resumed = _train(run_dir, synth_small, 1, 0, 4, "train.resume=latest", "train.checkpoint_every=3",
                     "train.keep_checkpoints=0", *zero)
    assert ("the deepspeed-zero2 checkpoint of 2 ranks was converted to DeepSpeed's universal checkpoint and "
            "re-partitioned over 1") in resumed.stdout, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    assert [r["step"] for r in _records(run_dir) if "loss" in r] == [1, 2, 3, 4]
    assert sorted(p.relative_to(sealed) for p in sealed.rglob("*")) == before
    verify(sealed, signed=True)
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    again = _train(run_dir, synth_small, 1, 0, 5, "train.resume=latest", "train.checkpoint_every=3",
                   "train.keep_checkpoints=0", *zero)
    assert "converted" not in again.stdout and "at step 4" in again.stdout
