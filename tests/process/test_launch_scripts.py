"""The documented launch scripts, run as users run them (on CPU here: gloo, tiny model, few steps)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, process_env


def _env(**extra):
    # CLIPKIT_NO_ENV: use the environment the tests run in; its python3 and torchrun first on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return process_env(CLIPKIT_NO_ENV="1", PATH=path, **extra)


def _tiny(run_dir, synth):
    return [f"run.dir={run_dir}", "model.name=clipkit-nano", f"data.train={synth.train_spec}",
            f"data.zeroshot={synth.eval_root}", "train.global_batch_size=16", "train.steps=4", "train.warmup_steps=1",
            "run.log_every=2", "run.progress=false", "data.workers=1"]


def test_single_node_script_trains_on_two_processes(tmp_path, synth_small):
    run_dir = tmp_path / "run"
    proc = subprocess.run(["bash", str(ROOT / "launch" / "single_node.sh"), *_tiny(run_dir, synth_small)],
                          env=_env(NPROC="2"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and "zeroshot" in summary and "export" in summary


def test_gpu_check_script_runs_both_engines(tmp_path):
    """launch/gpu_check.sh is meant for GPUs; on CPU it runs the same two engines with a tiny model."""
    out = tmp_path / "gc"
    proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh"), "model.name=clipkit-nano",
                           "data.synth.train_samples=600", "data.synth.samples_per_shard=150",
                           "data.synth.eval_samples=60", "data.synth.image_size=32",
                           "data.synth.downstream_train_samples=40", "data.synth.downstream_test_samples=20"],
                          env=_env(OUT_DIR=str(out), STEPS="20", PER_GPU_BATCH="16", WORKERS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((out / "gpu_check.json").read_text())
    assert [r["run"] for r in rows] == ["ddp", "zero2"]
    assert all(r["steps"] == 20 and r["samples_per_s"] > 0 and r["last_loss"] < r["first_loss"] for r in rows)


def test_multi_node_script_two_nodes_on_localhost(tmp_path, synth_small):
    """launch/multi_node.sh started once per "node" (here two on localhost), meeting at a c10d rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    procs = [subprocess.Popen(["bash", str(ROOT / "launch" / "multi_node.sh"), *_tiny(run_dir, synth_small)],
                              env=_env(NNODES="2", NODE_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                       NPROC="1", RDZV_ID=f"test-{port}"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
