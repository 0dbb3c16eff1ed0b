"""`clipkit bench loss` at a small size: both methods run as real 2-rank jobs and agree with each other.

The time figures are the benchmark's business (docs/benchmarks.md); here we check that the report is
complete, that clipkit's tiled loss and OpenCLIP's ClipLoss, each run as shipped, computed the same loss
and gradients on every rank (OpenCLIP is the independent reference), and that the peak memory figures
measure the step rather than noise. `--curve` runs the same jobs over global batches; its memory guard is
checked on the arithmetic it plans with, and on real jobs: one held to a per-rank limit it cannot fit in (a
measured out-of-memory), one stopped by the watchdog, one past its time."""
import argparse
import json
import subprocess
import sys

import pytest
from PIL import Image

from clipkit.bench import loss as bench_loss
from clipkit.bench import loss_jobs
from clipkit.bench.loss_curve import GIB, Tracker, arithmetic_peak, predict_peak

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


def test_bench_loss_curve_measures_both_and_records_the_point_openclip_cannot_fit(tmp_path):
    # 2 x 8,192 rows: OpenCLIP's two 8,192 x 16,384 fp32 logit matrices alone are 1 GiB per rank, over the
    # 1.25 GiB per-rank limit once a rank's ~0.7 GiB of torch is counted; the tiled loss needs ~0.1 GiB there.
    out = tmp_path / "curve.json"
    proc = subprocess.run([sys.executable, "-m", "clipkit", "bench", "loss", "--curve", "--global-batches", "256,16384",
                           "--dim", str(DIM), "--tile-size", "1024", "--repeats", "1", "--threads", "1",
                           "--memory-limit", "2.5", "--attempt-unfit", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    points = {(p["method"], p["global_batch"]): p for p in report["points"]}
    assert len(report["points"]) == len(points) == 4  # one entry per point per method
    for key in [("openclip", 256), ("tiled", 256), ("tiled", 16384)]:
        p = points[key]
        assert p["status"] == "measured" and p["repeats_completed"] == 1, p
        assert p["peak_bytes_per_rank_median"] > 0 and p["seconds_median"] > 0 and p["flops_per_rank"] > 0
        assert p["peak_bytes_per_rank_median"] < p["rank_memory_limit_bytes"]
    # OpenCLIP holds at least one B_local x B_global fp32 logit matrix where it does run
    assert points[("openclip", 256)]["peak_bytes_per_rank_median"] >= 4 * 128 * 256
    oom = points[("openclip", 16384)]
    assert oom["status"] == "oom" and "ran out of memory" in oom["reason"] and oom["repeats_completed"] == 0
    assert oom["rank_memory_limit_bytes"] == int(2.5 * GIB) // 2
    assert report["summary"]["openclip_first_unfit"]["global_batch"] == 16384
    assert report["summary"]["tiled_largest_measured_global_batch"] == 16384
    png = tmp_path / "curve.png"
    assert report["plot"] == "curve.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.info["Software"].startswith("Matplotlib")


def _curve_args(**kw):
    return argparse.Namespace(**({"world": 2, "dim": 64, "tile_size": 1024, "memory_limit": 3.0,
                                  "attempt_unfit": False} | kw))


def test_curve_plan_skips_what_its_arithmetic_says_cannot_fit():
    # Hand arithmetic, 2 ranks x 8,192 rows, dim 64: OpenCLIP 4 fp32 8,192 x 16,384 matrices = 2 GiB per rank;
    # the tiled loss 4 x (4 x 16,384 x 64 + 2 x 1,024 x 16,384) bytes = 84 MiB per rank.
    assert arithmetic_peak("openclip", 8192, 2, 64, 1024) == 2 * GIB
    assert arithmetic_peak("tiled", 8192, 2, 64, 1024) == 4 * (4 * 16384 * 64 + 2 * 1024 * 16384)
    # A measured point scales with the square of the batch for OpenCLIP, linearly for the tiled loss.
    assert predict_peak("openclip", 4096, 2, 64, 1024, (1024, 100 * 2**20)) == 1600 * 2**20
    assert predict_peak("tiled", 4096, 2, 64, 1024, (1024, 100 * 2**20)) == 400 * 2**20
    tracker = Tracker()  # nothing measured: a rank's baseline is taken as 1 GiB plus its inputs
    oc, tiled = (tracker.plan(m, 16384, _curve_args()) for m in ("openclip", "tiled"))
    assert oc["status"] == "skipped" and "predicted 6.0 GiB for 2 ranks" in oc["reason"], oc["reason"]
    assert "--memory-limit 3 GiB" in oc["reason"] and oc["allowed_job_bytes"] <= 3 * GIB
    assert tiled["status"] == "run" and tiled["predicted_job_bytes"] < 3 * GIB
    assert tracker.plan("openclip", 16384, _curve_args(attempt_unfit=True))["status"] == "run"
    # Once a method ran out of memory, its larger points are not tried.
    tracker.record(oc | {"status": "oom"}, [])
    later = tracker.plan("openclip", 32768, _curve_args(attempt_unfit=True))
    assert later["status"] == "skipped" and "(16384) already ended in oom" in later["reason"]


def _job_args(timeout=600):
    return argparse.Namespace(world=WORLD, dim=DIM, tile_size=TILE, seed=0, threads=1, timeout=timeout)


def test_a_job_past_its_time_or_under_the_memory_floor_is_stopped_whole(tmp_path, monkeypatch):
    job = bench_loss.run_job("tiled", _job_args(timeout=1), str(tmp_path), BATCH_PER_RANK)
    assert job.status == "timeout" and "--timeout 1 s" in job.reason
    # A floor above any machine's available memory: the watchdog stops the job at once.
    monkeypatch.setattr(loss_jobs, "WATCHDOG_FLOOR_BYTES", 1 << 60)
    job = bench_loss.run_job("tiled", _job_args(), str(tmp_path), BATCH_PER_RANK)
    assert job.status == "oom" and "stopped by the benchmark" in job.reason
    assert not list(tmp_path.glob("*_rank*.json"))  # no rank got as far as a result
