"""`clipkit bench data`'s parts: the realistic shards it builds, its clipkit measurement process, a run on a
user's shard spec, and the one-line refusal of a spec that names nothing. (OpenCLIP's side needs its own
webdataset version installed from the package index: the run of both methods is skipped where the benchmark
has not installed it yet; docs/benchmarks.md records both.)"""
import io
import json
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from clipkit.bench.data import main
from clipkit.bench.harness import CACHE
from clipkit.bench.shards import write_bench_shards
from clipkit.data import expand_shards

PEER_READY = (CACHE / "bench_peer" / ".complete").is_file()
SMALL = ["--batch-size", "8", "--batches", "2", "--workers", "1"]


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


def _bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "clipkit", "bench", "data", *args, *SMALL, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_bench_data_on_a_shard_spec_reports_every_repeat_and_their_median(tmp_path):
    write_bench_shards(tmp_path / "shards", images=30, per_shard=10)
    spec = f"file://{tmp_path}/shards/{{00000..00002}}.tar"
    report, stdout = _bench(tmp_path, "--data", spec, "--methods", "clipkit", "--repeats", "3")
    assert report["config"]["data"] == spec and report["config"]["shard_files"] == 3
    m = report["methods"]["clipkit"]
    assert len(m["samples_per_s"]) == 3 and all(r > 0 for r in m["samples_per_s"])
    assert m["samples_per_s_median"] == statistics.median(m["samples_per_s"])
    assert m["samples_per_s_per_core"] == m["samples_per_s_median"]  # one worker = one core
    assert m["image_shape"] == [3, 224, 224]
    assert report["ratio_clipkit_over_openclip"] is None and report["target"]["met"] is None
    assert "median of" in stdout


@pytest.mark.skipif(not PEER_READY, reason="OpenCLIP's webdataset 0.2.86 environment is not installed "
                                           "(the first `clipkit bench data` run installs it)")
def test_bench_data_on_a_folder_runs_openclip_on_the_same_shards(tmp_path):
    write_bench_shards(tmp_path / "shards", images=30, per_shard=10)
    report, _ = _bench(tmp_path, "--data", str(tmp_path / "shards"), "--repeats", "1")
    clipkit, openclip = report["methods"]["clipkit"], report["methods"]["openclip"]
    for m in (clipkit, openclip):
        assert len(m["samples_per_s"]) == 1 and m["samples_per_s_per_core"] > 0
        assert m["image_shape"] == [3, 224, 224] and -1.5 < m["pixel_mean"] < 1.5 and 0.2 < m["pixel_std"] < 2.0
    assert report["ratio_clipkit_over_openclip"] == \
        clipkit["samples_per_s_per_core"] / openclip["samples_per_s_per_core"]
    assert report["target"]["met"] is None  # one repeat: not judged


@pytest.mark.parametrize("spec, message", [
    ("{tmp}/missing/{{000..003}}.tar", "shard not found: {tmp}/missing/000.tar (and 3 more)"),
    ("{tmp}/empty", "the folder holds no .tar shards"),
    ("", "names no shards"),
    ("nosuchscheme://bucket/{{0..3}}.tar", "cannot read nosuchscheme:// shards here"),
])
def test_bench_data_refuses_a_spec_that_names_no_shards_in_one_line(tmp_path, capsys, spec, message):
    (tmp_path / "empty").mkdir()
    assert main(["--data", spec.format(tmp=tmp_path), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipkit bench data: error: ") and message.format(tmp=tmp_path) in err
    assert err.count("\n") == 1 and not (tmp_path / "x.json").exists()


def test_bench_data_refuses_keys_openclip_cannot_read_unless_clipkit_runs_alone(tmp_path, capsys):
    write_bench_shards(tmp_path / "shards", images=10, per_shard=10)
    assert main(["--data", str(tmp_path / "shards"), "--caption-key", "json", "--out", str(tmp_path / "x.json")]) == 2
    assert "OpenCLIP's pipeline reads only" in capsys.readouterr().err
