"""`clipkit bench train` at a tiny size: clipkit's trainer and OpenCLIP's own trainer (open_clip_train.main, in its
own environment) train the same tiny architecture on the same photo shards, the same number of samples, with
finite losses read from each trainer's own log; the report holds every figure it promises. The speed itself is
measured by the benchmark (docs/benchmarks.md), not asserted here."""
import json
import math
import os
import random
import statistics
import subprocess
import sys

from clipkit.bench.shards import web_caption
from clipkit.bench.train import steady_state
from clipkit.data import expand_shards


def test_web_captions_have_a_long_tailed_length():
    rng = random.Random(0)
    words = [len(web_caption(rng, "coffee").split()) for _ in range(4000)]
    assert statistics.median(words) == 11
    assert 0.03 < sum(w > 29 for w in words) / len(words) < 0.07
    assert max(words) == 63 and min(words) >= 2
    assert web_caption(random.Random(5), "rocket") == web_caption(random.Random(5), "rocket")  # seeded


def test_steady_state_times_the_steps_after_the_skipped_ones():
    # 5 steps of 8 samples. Step k asks for its batch at asked[k-1] and gets it at got[k-1]; it computes until
    # step k+1 asks. Skipping 1 step leaves steps 2, 3, 4 (step 5's end is not observed): from 1.0 s to 4.0 s.
    # The training process used 4.5 CPU-seconds meanwhile (cpu: its process time when each step asked).
    clock = {"asked": [0.0, 1.0, 2.0, 3.0, 4.0], "got": [0.5, 1.25, 2.0, 3.5, 4.0], "sizes": [8] * 5,
             "cpu": [0.0, 1.0, 2.5, 4.0, 5.5]}
    r = steady_state(clock, skip=1, threads=2)
    assert r["steps_timed"] == 3 and r["samples_timed"] == 24 and r["seconds"] == 3.0
    assert r["samples_per_s"] == 8.0
    assert math.isclose(r["data_wait_s_per_step"], 0.75 / 3) and math.isclose(r["data_wait_fraction"], 0.25)
    assert math.isclose(r["compute_s_per_step"], 2.25 / 3)
    assert math.isclose(r["cpu_s_per_sample"], 4.5 / 24) and math.isclose(r["cpu_utilisation"], 4.5 / (3.0 * 2))
    assert r["batches"] == 5 and r["samples_trained"] == 40


def test_bench_train_runs_every_trainer_on_the_same_samples(tmp_path):
    out = tmp_path / "bench.json"
    steps, batch = 4, 8
    proc = subprocess.run([sys.executable, "-m", "clipkit", "bench", "train", "--model", "clipkit-nano",
                           "--images", "32", "--per-shard", "8", "--batch-size", str(batch), "--steps", str(steps),
                           "--skip-steps", "1", "--workers", "1", "--threads", "1", "--repeats", "1",
                           "--cache", str(tmp_path / "shards"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert len(expand_shards(os.path.expanduser(report["config"]["data"]))) == 4
    assert report["config"]["precision"] == "fp32" and report["config"]["openclip_precision"] == "fp32"
    flops = report["model_flops_per_sample"]
    assert flops["gflop"] > 0 and math.isclose(
        flops["gflop"], flops["image_tower_gflop"] + flops["text_tower_gflop"] + flops["loss_gflop"])
    assert "context 16" in flops["counted_at"]  # clipkit-nano's full context
    peak = report["machine"]["fp32_matmul_peak_gflop_per_s"] * 1e9
    assert peak / 1e9 == max(report["machine"]["fp32_matmul_peak_measurements_gflop_per_s"])  # before + each repeat
    assert len(report["machine"]["fp32_matmul_peak_measurements_gflop_per_s"]) == 2
    assert report["methods"]["clipkit"]["settings"] == {"model.trim_text": True, "data.length_buckets": []}
    assert report["methods"]["clipkit_buckets"]["settings"] == {"model.trim_text": True,
                                                                "data.length_buckets": [12, 16, 24, 32, 48]}
    for name in ("clipkit", "clipkit_buckets", "openclip"):
        m = report["methods"][name]
        assert m["samples_trained"] == steps * batch  # both trained the same samples: the whole 32
        assert m["steps_timed"] == steps - 2 and m["samples_timed"] == (steps - 2) * batch
        assert m["losses_finite"] and all(math.isfinite(x) for x in m["loss_first"] + m["loss_last"])
        assert len(m["samples_per_s"]) == 1 and m["samples_per_s_median"] > 0
        assert m["own_log_samples_per_s_median"] > 0  # the trainer's own per-step times were read
        assert 0 <= m["data_wait_fraction"] < 1 and m["compute_s_per_step"] > 0
        assert m["cpu_s_per_sample"] > 0 and len(m["cpu_utilisation"]) == len(m["load_average_1min"]) == 1
        assert math.isclose(m["mfu_model_flops"], m["samples_per_s_median"] * flops["gflop"] * 1e9 / peak)
    peer = report["methods"]["openclip"]["samples_per_s_median"]
    ratios = {m: report["methods"][m]["samples_per_s_median"] / peer for m in ("clipkit", "clipkit_buckets")}
    assert report["ratio_clipkit_over_openclip"] == ratios["clipkit"] and report["ratios_over_openclip"] == ratios
    assert report["target"] == {"ratio_min": 1.5, "met": {m: r >= 1.5 for m, r in ratios.items()}}
    assert report["captions_tokens"]["captions"] == steps * batch
    assert not (tmp_path / "none").exists()  # OpenCLIP's log folder stays in the run's own temporary folder


def test_bench_train_options_reach_clipkits_command(tmp_path):
    from clipkit.bench.train import clipkit_command, parse_args

    args = parse_args(["model.trim_text=false", "--buckets", "10, 20"])
    assert args.methods == ("clipkit", "clipkit_buckets", "openclip")
    plain = clipkit_command(args, "s.tar", tmp_path)
    bucketed = clipkit_command(args, "s.tar", tmp_path, buckets=True)
    assert plain[-1] == "model.trim_text=false" and not any("length_buckets" in a for a in plain)
    assert bucketed[-2:] == ["data.length_buckets=[10,20]", "model.trim_text=false"]
    assert parse_args(["--buckets", ""]).methods == ("clipkit", "openclip")
