"""`python -m clipkit curate` end to end on a small set: decisions agree with the shards, output members are the
sources' bytes, the manifest lists them in order, a re-run keeps finished shards and refuses changed feature
settings, a corrupt sample is skipped and counted, and two torchrun ranks decide as one process does."""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_shards import add
from helpers import ROOT, process_env

from clipkit.data import write_synth_dataset


def _members(path) -> dict[str, dict[str, bytes]]:
    """key -> ext -> bytes, read with plain tarfile (the reference)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def _comparable(rows: list[dict]) -> list[dict]:
    """Rows with NaN scores as None (NaN != NaN)."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]


def _curate(*args: str, torchrun: int = 0) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
                 "-m", "clipkit"] if torchrun else [sys.executable, "-m", "clipkit"])
    return subprocess.run([*launcher, "curate", *args], capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env=process_env())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    ds = write_synth_dataset(root / "synth", train_samples=40, eval_samples=10, samples_per_shard=20,
                             downstream_train_samples=4, downstream_test_samples=4, workers=1)
    train = root / "synth" / "train"
    first = _members(train / "00000.tar")
    keys = sorted(first)
    # A third shard: a byte-identical copy of a sample, a mirrored copy of another, a corrupt JPEG, a boilerplate
    # caption, then a good sample after the corrupt one.
    mirrored = io.BytesIO()
    Image.open(io.BytesIO(first[keys[1]]["jpg"])).transpose(Image.FLIP_LEFT_RIGHT).save(mirrored, "JPEG", quality=95)
    with tarfile.open(train / "00002.tar", "w") as tar:
        for key, image, caption in [("x_copy", first[keys[0]]["jpg"], first[keys[0]]["txt"]),
                                    ("x_mirror", mirrored.getvalue(), first[keys[1]]["txt"]),
                                    ("x_corrupt", b"\xff\xd8\xff not a jpeg", b"a red circle on grey"),
                                    ("x_plate", first[keys[2]]["jpg"][:-2] + b"\xff\xd9", b"image may contain: a red circle on a grey background"),
                                    ("x_last", first[keys[3]]["jpg"], b"a blue square at the top")]:
            add(tar, f"{key}.jpg", image)
            add(tar, f"{key}.txt", caption)
    return ds, str(train / "{00000..00002}.tar"), keys, root


def test_curate_end_to_end_resume_and_torchrun(dataset):
    ds, spec, keys, root = dataset
    out = root / "out1"
    proc = _curate("--data", spec, "--out", str(out), "curate.samples_per_shard=7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    dec = pq.read_table(out / "decisions.parquet").to_pylist()
    summary = json.loads((out / "curate_summary.json").read_text())
    assert summary["counts"]["skipped"] == {"image_decode_error": 1}
    assert len(dec) == 40 + 4 and "x_corrupt" not in {d["key"] for d in dec}
    by_key = {d["key"]: d for d in dec}
    assert (by_key["x_copy"]["stage"], by_key["x_copy"]["reason"], by_key["x_copy"]["detail"]) == \
        ("exact_dedup", "exact_duplicate", keys[0])
    assert (by_key["x_mirror"]["reason"], by_key["x_mirror"]["detail"]) == ("near_duplicate", keys[1])
    assert by_key["x_plate"]["reason"] == "boilerplate"
    # decisions agree with the shards: every row names a sample at its index in its source shard
    sources = {}
    for d in dec:
        if d["shard"] not in sources:
            with tarfile.open(d["shard"]) as tar:
                sources[d["shard"]] = list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))
        assert sources[d["shard"]][d["index"]] == d["key"]
    kept = [d for d in dec if d["kept"]]
    assert all(d["stage"] == "" for d in kept) and all(d["stage"] for d in dec if not d["kept"])
    # output shards: fixed size, in set order, members byte for byte the sources'
    manifest = json.loads((out / "manifest.json").read_text())
    listed = [(s["source"], s["key"]) for shard in manifest["shards"] for s in shard["samples"]]
    assert listed == [(d["shard"], d["key"]) for d in kept]
    assert [len(shard["samples"]) for shard in manifest["shards"]][:-1] == [7] * (len(manifest["shards"]) - 1)
    assert manifest["config"]["samples_per_shard"] == 7 and manifest["counts"]["kept"] == len(kept)
    src_members = {url: _members(url) for url in sources}
    written = []
    for shard in manifest["shards"]:
        got = _members(out / "shards" / shard["name"])
        assert list(got) == [s["key"] for s in shard["samples"]]
        for s in shard["samples"]:
            assert got[s["key"]] == src_members[s["source"]][s["key"]]
        written += list(got)
    assert len(written) == len(kept)
    assert "near_dedup" in (out / "curate_report.html").read_text()

    # resume (into the first run's folder; its output is rewritten): finished shards are kept when only stage settings change ...
    feature_files = sorted((out / "work").glob("*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in feature_files]
    proc = _curate("--data", spec, "--out", str(out), "curate.samples_per_shard=7", "curate.filters.min_words=50")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in feature_files] == stamps
    dec2 = pq.read_table(out / "decisions.parquet").to_pylist()
    assert {d["reason"] for d in dec2 if d["stage"] == "filters"} == {"too_few_words"}
    # ... and a change to what the features are made of is refused in one line
    proc = _curate("--data", spec, "--out", str(out), "curate.filters.detector_languages=en,de")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "detector_languages" in proc.stderr

    # two ranks: the same decisions and the same output shards
    out2 = root / "out2"
    proc = _curate("--data", spec, "--out", str(out2), "curate.samples_per_shard=7", torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _comparable(pq.read_table(out2 / "decisions.parquet").to_pylist()) == _comparable(dec)
    manifest2 = json.loads((out2 / "manifest.json").read_text())
    assert manifest2["shards"] == manifest["shards"]
    for shard in manifest["shards"]:
        got = _members(out2 / "shards" / shard["name"])
        assert got == {s["key"]: src_members[s["source"]][s["key"]] for s in shard["samples"]}
