"""Elastic resume: a run checkpointed on W ranks x K loader workers continues on W' x K' (train.resume=latest,
the same global batch). Every run is a real `clipkit train` process (under torchrun for 2 ranks); the audit
reads the sample keys each rank recorded (run.record_sample_keys) and the shards themselves (plain tarfile).
"""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from data_shards import tar_keys

from clipkit.data import expand_shards

FIRST, STEPS, BATCH = 13, 37, 16  # 37 x 16 = 592 of the epoch's 600 samples: no sample may come twice


FAULT_TRAIN = Path(__file__).parent / "dist" / "fault_train.py"  # `clipkit train` with a fault injected


def _env(faults: str = "") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CLIPKIT_TEST_FAULTS=faults)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(key, None)
    return env


def _launch(run_dir: Path, synth, nproc: int, workers: int, steps: int, *extra,
            faults: str = "") -> subprocess.CompletedProcess:
    args = [f"run.dir={run_dir}", f"data.train={synth.train_spec}", "model.name=clipkit-nano",
            f"train.global_batch_size={BATCH}", f"train.steps={steps}", "train.warmup_steps=3", "train.lr=2e-3",
            f"train.checkpoint_every={FIRST}", "run.progress=false", "run.log_every=1", f"data.workers={workers}",
            "data.shuffle_buffer=40", "run.record_sample_keys=true", "eval.zeroshot_at_end=false",
            "export.at_end=false", *extra]
    command = [str(FAULT_TRAIN)] if faults else ["-m", "clipkit", "train"]
    if nproc > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *command]
    return subprocess.run([sys.executable, *command, *args], env=_env(faults), capture_output=True, text=True,
                          timeout=300)


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


def test_deepspeed_on_another_world_size_is_refused_with_one_line(synth_small, tmp_path):
    run_dir = tmp_path / "run"
    zero = ["deepspeed.enabled=true", "deepspeed.zero_stage=2"]
    _train(run_dir, synth_small, 2, 0, 2, *zero)
    proc = _launch(run_dir, synth_small, 1, 0, 4, "train.resume=latest", *zero)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("clipkit: error:")]
    assert len(errors) == 1 and "written by 2 ranks; this run has 1" in errors[0], proc.stderr[-3000:]
