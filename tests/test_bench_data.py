"""`clipkit bench data`'s parts: the realistic shards it builds, and its clipkit measurement process.
(OpenCLIP's side needs its own webdataset version installed from the package index, so it runs in the
benchmark itself, not in the test suite; docs/benchmarks.md records both.)"""
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from PIL import Image

from clipkit.bench.data import write_bench_shards
from clipkit.data import expand_shards


def test_bench_shards_are_large_varied_photos_in_img2dataset_layout(tmp_path):
    spec = write_bench_shards(tmp_path / "shards", images=24, per_shard=10)
    paths = expand_shards(spec)
    assert len(paths) == 3
    sizes, digests = [], set()
    for path in paths:
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".jpg"):
                key = name[:-4]
                im = Image.open(io.BytesIO(data))
                assert im.format == "JPEG" and im.mode == "RGB"
                sizes.append(im.size)
                digests.add(hash(data))
                assert members[f"{key}.txt"].decode().startswith("a ")
                assert json.loads(members[f"{key}.json"])["key"] == key
    assert len(sizes) == 24 and len(digests) == 24  # no two photos alike
    assert all(640 <= w <= 1280 and 480 <= h <= 960 for w, h in sizes)
    # cached: a second call with the same parameters does not rewrite the shards
    before = [p.stat().st_mtime_ns for p in map(Path, paths)]
    assert write_bench_shards(tmp_path / "shards", images=24, per_shard=10) == spec
    assert [p.stat().st_mtime_ns for p in map(Path, paths)] == before


def test_clipkit_measurement_process_reports_augmented_224px_batches(tmp_path):
    spec = write_bench_shards(tmp_path / "shards", images=30, per_shard=10)
    proc = subprocess.run([sys.executable, "-m", "clipkit.bench.data", "--worker", "clipkit", "--spec", spec,
                           "--images", "30", "--per-shard", "10", "--batch-size", "8", "--batches", "2",
                           "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    assert result["samples"] == 16 and result["samples_per_s"] > 0
    assert result["image_shape"] == [3, 224, 224] and result["image_dtype"] == "torch.float32"
    assert -1.5 < result["pixel_mean"] < 1.5 and 0.2 < result["pixel_std"] < 2.0  # normalised pixels
