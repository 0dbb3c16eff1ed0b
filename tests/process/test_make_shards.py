"""`clipkit data make-shards`: image folders and CSV/parquet tables into img2dataset-style shards, checked
with plain tarfile, PIL and pyarrow reads, and read back by clipkit's own loader."""
import csv
import io
import json
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipkit.data import ShardStream, expand_shards
from clipkit.data.make_shards import MakeShardsError, make_shards, resized_size
from clipkit.data.sample import Tokenize
from data_shards import tokenizer, transforms

SIZES = [(800, 600), (300, 900), (120, 80), (640, 640), (1000, 250)]


def _photos(folder, captions=True):
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(SIZES):
        Image.new("RGB", size, (i * 50, 100, 200 - i * 30)).save(folder / f"img{i}.png" if i == 2 else folder / f"img{i}.jpg")
        if captions:
            (folder / f"img{i}.txt").write_text(f"photo number {i}\n")
    return folder


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_resized_size_keeps_aspect_and_never_enlarges():
    assert resized_size(800, 600, 400) == (400, 300)
    assert resized_size(300, 900, 450) == (150, 450)
    assert resized_size(120, 80, 400) == (120, 80)
    assert resized_size(5000, 3, 100) == (100, 1)
    assert resized_size(800, 600, None) == (800, 600)


def test_folder_to_shards_in_img2dataset_layout(tmp_path):
    src = _photos(tmp_path / "photos")
    (src / "img1.txt").unlink()  # one image without a caption: skipped and counted
    Image.new("RGB", (10, 10)).save(src / "broken.jpg")
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    (src / "broken.txt").write_text("a broken file")
    summary = make_shards(src, tmp_path / "out", samples_per_shard=2, max_side=400)
    assert summary["samples"] == 4 and summary["failures"] == {"missing_caption": 1, "image_decode_error": 1}
    assert summary["shards"] == 3 and summary["spec"].endswith("{00000..00002}.tar")

    members = {}
    for path in expand_shards(summary["spec"]):
        members.update(_members(path))
    keys = sorted({name.split(".")[0] for name in members})
    assert all(len(k) == 9 for k in keys)  # shard (5 digits) + index (4), as img2dataset names them
    captions, sizes = {}, {}
    for key in keys:
        meta = json.loads(members[f"{key}.json"])
        image = Image.open(io.BytesIO(members[f"{key}.jpg"]))
        assert image.format == "JPEG" and image.size == (meta["width"], meta["height"])
        assert meta["key"] == key and meta["status"] == "success"
        assert members[f"{key}.txt"].decode() == meta["caption"]
        captions[meta["caption"]] = (meta["original_width"], meta["original_height"])
        sizes[meta["caption"]] = image.size
    want = {f"photo number {i}": SIZES[i] for i in (0, 2, 3, 4)}
    assert captions == want
    for caption, original in want.items():
        assert sizes[caption] == resized_size(*original, 400)
        assert max(sizes[caption]) <= 400
        w, h = sizes[caption]
        assert abs(w / h - original[0] / original[1]) < 0.02  # aspect kept

    table = pq.read_table(tmp_path / "out" / "00000.parquet").to_pydict()
    stats = json.loads((tmp_path / "out" / "00000_stats.json").read_text())
    assert table["key"] == sorted({n.split(".")[0] for n in _members(tmp_path / "out" / "00000.tar")})
    assert stats["successes"] == len(table["key"]) and stats["count"] == 2


def test_csv_and_parquet_tables_and_the_loader_reads_the_result(tmp_path):
    src = _photos(tmp_path / "photos", captions=False)
    rows = [{"file": f"photos/img{i}.{'png' if i == 2 else 'jpg'}", "text": f"row {i}"} for i in range(len(SIZES))]
    rows.append({"file": "photos/missing.jpg", "text": "gone"})
    rows.append({"file": "photos/img0.jpg", "text": "   "})
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["file", "text"])
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.table({"file": [r["file"] for r in rows], "text": [r["text"] for r in rows]}),
                   tmp_path / "pairs.parquet")
    (tmp_path / "pairs.tsv").write_text("file\ttext\n" + "".join(f"{r['file']}\t{r['text']}\n" for r in rows))
    assert src.is_dir()
    for table in ("pairs.csv", "pairs.tsv", "pairs.parquet"):
        out = tmp_path / f"out_{table}"
        summary = make_shards(tmp_path / table, out, samples_per_shard=100, max_side=256, path_col="file",
                              caption_col="text")
        assert summary["failures"] == {"missing_image": 1, "empty_caption": 1} and summary["samples"] == 5
        _, val_tf = transforms(16)
        stream = ShardStream(expand_shards(summary["spec"]), val_tf, Tokenize(tokenizer()), batch_size=8,
                             shuffle=False, epochs=1)
        batches = list(stream)
        assert sum(len(b.keys) for b in batches) == 5 and batches[0].images.shape[1:] == (3, 16, 16)


def test_cli_and_clear_errors(tmp_path):
    src = _photos(tmp_path / "photos")
    proc = subprocess.run([sys.executable, "-m", "clipkit", "data", "make-shards", "--data", str(src), "--out",
                           str(tmp_path / "out"), "--max-side", "0"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 5 samples in 1 shards" in proc.stdout
    sizes = sorted(json.loads(v)["width"] for k, v in _members(tmp_path / "out" / "00000.tar").items()
                   if k.endswith(".json"))
    assert sizes == sorted(w for w, _ in SIZES)  # --max-side 0: no resizing
    with pytest.raises(MakeShardsError, match="input not found"):
        make_shards(tmp_path / "nowhere", tmp_path / "o")
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    with pytest.raises(MakeShardsError, match="no column 'path'"):
        make_shards(tmp_path / "t.csv", tmp_path / "o")
    proc = subprocess.run([sys.executable, "-m", "clipkit", "data", "make-shards", "--data",
                           str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "input not found" in proc.stderr


def test_paths_are_recorded_as_given_never_resolved(tmp_path):
    """A table's relative paths stay relative in the shards (read from beside the table, not from the working
    folder), an absolute one stays as written, and a folder's images are recorded below the folder: nothing
    of the converting machine's file system goes into the shards unless the input says it."""
    src = _photos(tmp_path / "data" / "photos")
    table = tmp_path / "data" / "pairs.csv"
    given = ["photos/img0.jpg", "./photos/../photos/img1.jpg", str(src / "img3.jpg")]
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        w.writerows([[p, f"row {i}"] for i, p in enumerate(given)])
    out = tmp_path / "out"
    assert make_shards(table, out, max_side=256)["samples"] == 3
    recorded = {json.loads(v)["caption"]: json.loads(v)["path"] for k, v in _members(out / "00000.tar").items()
                if k.endswith(".json")}
    assert recorded == {f"row {i}": p for i, p in enumerate(given)}
    assert pq.read_table(out / "00000.parquet").column("path").to_pylist() == given

    folder_out = tmp_path / "folder_out"
    make_shards(src, folder_out, max_side=256)
    recorded = sorted(json.loads(v)["path"] for k, v in _members(folder_out / "00000.tar").items()
                      if k.endswith(".json"))
    assert recorded == ["img0.jpg", "img1.jpg", "img2.png", "img3.jpg", "img4.jpg"]
