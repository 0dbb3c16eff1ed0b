"""`clipkit bench embed` at a small size: both methods run in their own processes on the same photo shards,
embed every image, agree on the embeddings (matched by key), and the report holds every figure it promises.
The speed itself is measured by the benchmark, not asserted here."""
import json
import os
import subprocess
import sys
import tarfile

from clipkit.data import expand_shards


def test_bench_embed_reports_both_methods_on_the_same_images(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, CLIPKIT_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "clipkit", "bench", "embed", "--model", "clipkit-nano", "--images",
                           "24", "--per-shard", "12", "--batch-size", "8", "--workers", "1", "--repeats", "1",
                           "--cache", str(tmp_path / "shards"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    shards = expand_shards(report["config"]["shards"])
    with tarfile.open(shards[0]) as tar:
        per_shard = sum(name.endswith(".jpg") for name in tar.getnames())
    assert len(shards) == 2 and per_shard == 12
    for name in ("clipkit", "openclip"):
        m = report["methods"][name]
        assert m["images"] == 24 and m["cores"] == 2 and len(m["images_per_s"]) == 1
        assert m["images_per_s_median"] > 0 and m["images_per_s_per_core"] == m["images_per_s_median"] / 2
        assert m["image_tower_gflop_per_s_per_core"] > 0 and 0 < m["image_tower_mfu"]
    assert report["agreement"]["images"] == 24 and report["agreement"]["cosine_min"] > 0.999
    ours, theirs = report["methods"]["clipkit"], report["methods"]["openclip"]
    ratio = ours["images_per_s_per_core"] / theirs["images_per_s_per_core"]
    assert report["ratio_clipkit_over_openclip_per_core"] == ratio
    assert report["target"] == {"ratio_min": 2.0, "met": ratio >= 2.0}
    assert report["ratio_clipkit_over_openclip_per_cpu_second"] == \
        ours["images_per_cpu_second_median"] / theirs["images_per_cpu_second_median"]
    assert report["image_tower_gflop_per_image"] > 0
    assert report["machine"]["fp32_matmul_peak_gflop_per_s_one_thread"] > 0
    assert "clipkit bench embed --model clipkit-nano" in report["command"] and "per core" in proc.stdout
