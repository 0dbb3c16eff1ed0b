"""train.compile=model under DDP (2 gloo ranks): the compiled run, stopped at step 10 and resumed, gives the
losses of the eager single-process run on the same global batches over 20 fp32 steps, and the resumed
processes load their graphs from the run's compile cache (run.dir/compile_cache) instead of compiling them.

The cost is one compile of clipkit-nano's blocks per rank with an empty cache (the run.dir cache is the
point of the test), about a minute of CPU per rank."""
import json
import os
import subprocess
import sys

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


def _run(cmd):
    env = process_env()
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the run's own cache, in run.dir
    proc = subprocess.run(cmd, env=env, timeout=900, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _fit(out, steps, nproc, overrides):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    _run([*launcher, str(SCRIPT), "fit", str(out), str(steps), *overrides])
    return json.loads(out.read_text())


def test_ddp_compiled_and_resumed_matches_the_eager_single_process_run(tmp_path, synth_small):
    shards = synth_small.train_spec
    reference = tmp_path / "reference.json"
    _run([sys.executable, str(SCRIPT), "reference", str(reference), str(STEPS), "2",
          *_overrides(tmp_path / "reference", shards)])
    golden = json.loads(reference.read_text())["losses"]

    run = tmp_path / "compiled"
    compiled = _overrides(run, shards, "train.compile=model")
    first = _fit(tmp_path / "first.json", 10, 2, compiled)
    second = _fit(tmp_path / "second.json", STEPS, 2, [*compiled, "train.resume=latest"])
    assert first["first_step"] == 0 and second["first_step"] == 10
    curve = first["losses"] + second["losses"]
    assert len(curve) == len(golden) == STEPS and golden[-1] < golden[0]
    worst = max(abs(a - b) for a, b in zip(curve, golden))
    assert worst < TOL, f"max |compiled DDP loss - eager single-process loss| = {worst:.2e}\n{curve}\n{golden}"

    # compile time is logged apart from step time; the resumed run's graphs come from run.dir's cache
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    before, after = [r["compile"] for r in records if r["step"] <= 10], [r["compile"] for r in records if r["step"] > 10]
    assert before[-1]["graphs"] >= 2 and before[-1]["cache_misses"] >= 1  # a fresh run.dir: compiled
    assert after[-1]["graphs"] == after[-1]["cache_hits"] >= 2 and after[-1]["cache_misses"] == 0
    assert os.listdir(run / "compile_cache")
