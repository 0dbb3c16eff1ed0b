"""`clipkit bench loss` at a small size: both methods run as real 2-rank jobs and agree with each other.

The time figures are the benchmark's business (docs/benchmarks.md); here we check that the report is
complete, that clipkit's tiled loss and OpenCLIP's ClipLoss, each run as shipped, computed the same loss
and gradients on every rank (OpenCLIP is the independent reference), and that the peak memory figures
measure the step rather than noise."""
import json
import subprocess
import sys

import pytest

# Big enough that each method's resident-set growth is hundreds of pages, well clear of the kernel's RSS
# counting slack (at 2 x 96 rows, dim 16, the tiled step was ~40 pages); the step stays well under a second.
BATCH_PER_RANK, DIM, TILE, WORLD = 512, 64, 100, 2  # TILE divides neither the local nor the global batch


def test_bench_loss_small_run_reports_both_methods_in_agreement(tmp_path):
    out = tmp_path / "bench_loss.json"
    proc = subprocess.run([sys.executable, "-m", "clipkit", "bench", "loss", "--batch-per-rank", str(BATCH_PER_RANK),
                           "--dim", str(DIM), "--tile-size", str(TILE), "--repeats", "1", "--threads", "1",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiled/openclip: memory" in proc.stdout
    report = json.loads(out.read_text())
    assert report["config"]["global_batch"] == WORLD * BATCH_PER_RANK and report["config"]["world"] == WORLD
    oc, tiled = report["methods"]["openclip"], report["methods"]["tiled"]
    assert len(oc["loss_per_rank"]) == len(tiled["loss_per_rank"]) == WORLD
    assert report["loss_max_abs_diff"] < 1e-5
    # Read per rank, not through the report's own summary.
    assert tiled["loss_per_rank"] == pytest.approx(oc["loss_per_rank"], rel=0, abs=1e-5)
    assert tiled["image_grad_norm_per_rank"] == pytest.approx(oc["image_grad_norm_per_rank"], rel=1e-4)
    assert tiled["log_scale_grad_per_rank"] == pytest.approx(oc["log_scale_grad_per_rank"], rel=1e-4, abs=1e-6)
    for m in (oc, tiled):
        assert m["peak_bytes_per_rank_median"] > 0 and m["seconds_median"] > 0 and m["flops_per_rank"] > 0
        assert "free heap trimmed" in m["memory_baseline"]  # else reused heap pages hide part of the peak
    # OpenCLIP holds at least one B_local x B_global fp32 logit matrix; the tiled loss never does.
    assert oc["peak_bytes_per_rank_median"] >= 4 * BATCH_PER_RANK * WORLD * BATCH_PER_RANK, oc["peak_bytes_per_rank"]
    assert tiled["peak_bytes_per_rank_median"] < oc["peak_bytes_per_rank_median"]
    assert set(report["targets"]) >= {"memory_met", "time_met"}
