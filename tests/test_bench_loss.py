"""`clipkit bench loss` at a small size: both methods run as real 2-rank jobs and agree with each other.

The memory and time figures are the benchmark's business (docs/benchmarks.md); here we check that the
report is complete and that clipkit's tiled loss and OpenCLIP's ClipLoss, each run as shipped, computed
the same loss and gradients on every rank (OpenCLIP is the independent reference)."""
import json
import subprocess
import sys

import pytest


def test_bench_loss_small_run_reports_both_methods_in_agreement(tmp_path):
    out = tmp_path / "bench_loss.json"
    proc = subprocess.run([sys.executable, "-m", "clipkit", "bench", "loss", "--batch-per-rank", "96", "--dim", "16",
                           "--tile-size", "40", "--repeats", "1", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiled/openclip: memory" in proc.stdout
    report = json.loads(out.read_text())
    assert report["config"]["global_batch"] == 192 and report["config"]["world"] == 2
    oc, tiled = report["methods"]["openclip"], report["methods"]["tiled"]
    assert len(oc["loss_per_rank"]) == len(tiled["loss_per_rank"]) == 2
    assert report["loss_max_abs_diff"] < 1e-5
    assert tiled["image_grad_norm_per_rank"] == pytest.approx(oc["image_grad_norm_per_rank"], rel=1e-4)
    assert tiled["log_scale_grad_per_rank"] == pytest.approx(oc["log_scale_grad_per_rank"], rel=1e-4, abs=1e-6)
    for m in (oc, tiled):
        # at this size the resident-set growth is within the kernel's counting slack: only its sign is checked
        assert m["peak_bytes_per_rank_median"] >= 0 and m["seconds_median"] > 0 and m["flops_per_rank"] > 0
    assert set(report["targets"]) >= {"memory_met", "time_met"}
