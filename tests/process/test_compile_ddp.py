"""train.compile=model under DDP and FSDP2 (2 gloo ranks): the compiled DDP run, stopped at step 10 and resumed,
gives the losses of the eager single-process run on the same global batches over 20 fp32 steps, and the resumed
processes load their graphs from the run's compile cache (run.dir/compile_cache) instead of compiling them; a
compiled FSDP2 run (every block compiled, then sharded) with gradient checkpointing (the blocks recomputed in the
backward, compiled as in the forward) gives the same losses over the same 20 steps.

The cost is one compile of clipkit-nano's blocks per rank with an empty cache (the run.dir cache is the
point of the DDP test), about a minute of CPU per rank. The FSDP2 run reads the DDP run's cache: its blocks
compile to the same kernels, so it only traces them again (seconds) and loads every kernel from there."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DIST, process_env

SCRIPT = DIST / "train_curve.py"
STEPS = 20
# As for the eager DDP runs (test_distributed_training.py): fp32 reduction order differs between one process
# and two ranks, and the compiled blocks fuse and reorder their own; over 20 steps both stay below this.
TOL = 2e-4


def _overrides(run_dir, shards, *extra):
    return [f"run.dir={run_dir}", f"data.train={shards}", "model.name=clipkit-nano", "train.global_batch_size=16",
            f"train.steps={STEPS}", "train.lr=2e-3", "train.warmup_steps=3", "train.checkpoint_every=10",
            "run.progress=false", *extra]


def _run(cmd, cache=None):
    env = process_env()
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the run's own cache, in run.dir, unless `cache` names one
    if cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    proc = subprocess.run(cmd, env=env, timeout=900, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _fit(out, steps, nproc, overrides, cache=None):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    _run([*launcher, str(SCRIPT), "fit", str(out), str(steps), *overrides], cache)
    return json.loads(out.read_text())


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _kernels(cache: Path) -> set[str]:
    """What inductor compiled into a cache folder: every file but AOTAutograd's entries and lock files."""
    return {str(f.relative_to(cache)) for f in cache.rglob("*")
            if f.is_file() and f.relative_to(cache).parts[0] not in ("aotautograd", "locks")}


@pytest.fixture(scope="module")
def golden_and_ddp(synth_small, tmp_path_factory):
    """(the eager single-process losses, the compiled DDP run's folder, its losses from the run and the resume)."""
    root = tmp_path_factory.mktemp("compile_ddp")
    shards = synth_small.train_spec
    reference = root / "reference.json"
    _run([sys.executable, str(SCRIPT), "reference", str(reference), str(STEPS), "2",
          *_overrides(root / "reference", shards)])
    golden = json.loads(reference.read_text())["losses"]
    run = root / "compiled"
    compiled = _overrides(run, shards, "train.compile=model")
    first = _fit(root / "first.json", 10, 2, compiled)
    second = _fit(root / "second.json", STEPS, 2, [*compiled, "train.resume=latest"])
    return golden, run, first, second


def test_ddp_compiled_and_resumed_matches_the_eager_single_process_run(golden_and_ddp):
    golden, run, first, second = golden_and_ddp
    assert first["first_step"] == 0 and second["first_step"] == 10
    curve = first["losses"] + second["losses"]
    assert len(curve) == len(golden) == STEPS and golden[-1] < golden[0]
    worst = max(abs(a - b) for a, b in zip(curve, golden))
    assert worst < TOL, f"max |compiled DDP loss - eager single-process loss| = {worst:.2e}\n{curve}\n{golden}"

    # compile time is logged apart from step time; the resumed run's graphs come from run.dir's cache
    records = _records(run)
    before, after = [r["compile"] for r in records if r["step"] <= 10], [r["compile"] for r in records if r["step"] > 10]
    assert before[-1]["graphs"] >= 2 and before[-1]["cache_misses"] >= 1  # a fresh run.dir: compiled
    assert after[-1]["graphs"] == after[-1]["cache_hits"] >= 2 and after[-1]["cache_misses"] == 0
    assert os.listdir(run / "compile_cache")


def test_fsdp2_compiled_matches_the_eager_single_process_run(golden_and_ddp, synth_small, tmp_path):
    """Every block compiled, then sharded by fully_shard, and recomputed in the backward (gradient checkpointing,
    exact): the same 20 losses as the eager single process, within the DDP run's tolerance, a bounded number of
    graphs, and every kernel loaded from the DDP run's cache."""
    golden, ddp_run, _, _ = golden_and_ddp
    cache = ddp_run / "compile_cache"
    kernels = _kernels(cache)
    run = tmp_path / "fsdp2"
    curve = _fit(tmp_path / "fsdp2.json", STEPS, 2,
                 _overrides(run, synth_small.train_spec, "train.compile=model", "fsdp.enabled=true",
                            "model.grad_checkpointing=true"), cache)["losses"]
    assert len(curve) == len(golden) == STEPS
    worst = max(abs(a - b) for a, b in zip(curve, golden))
    assert worst < TOL, f"max |compiled FSDP2 loss - eager single-process loss| = {worst:.2e}\n{curve}\n{golden}"

    # compile stats as for the torch engine: one graph per tower (one image shape, one padded text length, 16),
    # all compiled in the first step, none after; every graph went through the on-disk cache
    stats = [r["compile"] for r in _records(run)]
    assert stats[0]["graphs"] == stats[-1]["graphs"] == 2 and stats[-1]["recompiles"] == 0
    assert stats[-1]["cache_hits"] + stats[-1]["cache_misses"] == 2 and stats[0]["window_seconds"] > 0
    # the FSDP2 blocks compiled to the DDP run's kernels: it generated none of its own
    assert kernels and _kernels(cache) == kernels
    assert not (run / "compile_cache").exists()  # TORCHINDUCTOR_CACHE_DIR named the folder: run.dir's is unused
