"""`clipkit embed`: clip-retrieval's embedding layout, checked against open_clip itself (its own preprocessing,
encode_image and encode_text), against the shards as plain tarfile reads them, and read back the way
clip-retrieval's tools (embedding-reader, autofaiss) read it: numpy headers, pyarrow tables, file pairs by
sorted position."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors.torch import load_file

from clipkit import cli
from clipkit.errors import UserError
from clipkit.models import create_model, get_model_config, save_weights
from clipkit.retrieval.embed import embed_shards
from data_shards import add

PART = 7  # rows per part: shards of 10 samples give parts of 7 and 3
SIZES = [(48, 40), (40, 56), (150, 130), (300, 200), (90, 260), (33, 32), (640, 480)]  # some decoded at 1/2-1/8


def _jpeg(w, h, rng, fmt="JPEG") -> bytes:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + 60], -1) + rng.normal(0, 25, (h, w, 3))
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    if fmt == "PNG":  # with an alpha channel, which both pipelines drop
        im.putalpha(200)
        im.save(buf, format="PNG")
    else:
        im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _sample(tar, key, jpg=None, txt=None, meta=None, png=None):
    for ext, payload in (("jpg", jpg), ("png", png), ("txt", txt), ("json", meta)):
        if payload is not None:
            add(tar, f"{key}.{ext}", payload)


def _good_shard(path, s, rng):
    with tarfile.open(path, "w") as tar:
        for i in range(10):
            w, h = SIZES[(s * 10 + i) % len(SIZES)]
            key = f"{s:02d}{i:03d}"
            caption = f"photo {key} " + "with many words " * (i % 5)  # some past the 16-token context
            meta = {"key": key, "url": f"http://example.com/{key}.jpg", "width": w, "height": h,
                    "exif": {"Make": "cam", "ISO": 100 + i}, "caption": "json captions are not ours"}
            if i == 9:  # one PNG (RGBA) per shard
                _sample(tar, key, None, caption.encode(), json.dumps(meta).encode(), png=_jpeg(w, h, rng, "PNG"))
            else:
                _sample(tar, key, _jpeg(w, h, rng), caption.encode(), json.dumps(meta).encode())


def _bad_shard(path, rng):
    """Six bad samples among three good ones; the reasons are the expected skip counts."""
    good = lambda: _jpeg(64, 48, rng)  # noqa: E731
    with tarfile.open(path, "w") as tar:
        _sample(tar, "b0", good(), b"fine one", b'{"url": "u0", "width": 64}')
        _sample(tar, "b1", b"not a jpeg at all", b"corrupt image")
        _sample(tar, "b2", good())  # missing_caption
        _sample(tar, "b3", good(), b"\xff\xfe not utf-8")
        _sample(tar, "b4", good(), b"broken json", b"{not json")
        _sample(tar, "b5", None, b"caption without image")
        _sample(tar, "b6", good(), b"   ")  # empty_caption
        _sample(tar, "b7", good(), b"no json is fine")
        _sample(tar, "b8", good(), b"fine again", b'{"url": "u8", "width": "wide"}')


BAD_REASONS = {"image_decode_error": 1, "missing_caption": 1, "caption_not_utf8": 1, "bad_json": 1,
               "missing_image": 1, "empty_caption": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for s in range(3):
        _good_shard(d / f"g-{s:02d}.tar", s, rng)
    _bad_shard(d / "bad.tar", rng)
    return d


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "nano.safetensors"
    save_weights(create_model("clipkit-nano").state_dict(), path, "clipkit-nano", get_model_config("clipkit-nano"))
    return path


@pytest.fixture(scope="module")
def embedded(data, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "out"
    result = embed_shards(checkpoint, str(data / "g-{00..02}.tar"), out, batch_size=8, part_size=PART, workers=2,
                          progress=False)
    return out, result


# ------------------------------------------------------------------------------------- independent reads

def tar_samples(path):
    """(key, image bytes, caption) of the complete samples, in tar order, read with plain tarfile."""
    members = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return [(k, v.get("jpg", v.get("png")), v["txt"].decode()) for k, v in members.items()]


def read_layout(out):
    """What clip-retrieval's tools see: the sorted files of each folder, paired by position."""
    imgs = sorted((out / "img_emb").glob("*.npy"))
    txts = sorted((out / "text_emb").glob("*.npy"))
    metas = sorted((out / "metadata").glob("*.parquet"))
    ids = [[re.fullmatch(r"[a-z_]+_(\d+)\.(npy|parquet)", p.name).group(1) for p in ps] for ps in (imgs, txts, metas)]
    assert ids[0] == ids[1] == ids[2] and ids[0]
    return ids[0], imgs, txts, metas


def npy_header(path):
    """embedding-reader's (autofaiss's) reading of a .npy header: shape and dtype from its first line."""
    first = path.read_bytes()[:300].split(b"\n")[0]
    shape = re.search(r"'shape': \(([0-9]+), ([0-9]+)\)", str(first))
    return (int(shape.group(1)), int(shape.group(2))), re.search(r"'descr': '([<f0-9]+)'", str(first)).group(1)


def concat(out):
    _, imgs, txts, metas = read_layout(out)
    img = np.concatenate([np.load(p) for p in imgs]).astype(np.float32)
    txt = np.concatenate([np.load(p) for p in txts]).astype(np.float32)
    keys = [k for p in metas for k in pq.read_table(p).column("key").to_pylist()]
    return keys, img, txt


def reference(checkpoint, samples):
    """open_clip's own preprocessing and encoders on the same weights."""
    model = open_clip.create_model("clipkit-nano", pretrained=None)
    model.load_state_dict(load_file(str(checkpoint)))
    model.eval()
    val = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    images = torch.stack([val(Image.open(io.BytesIO(jpg))) for _, jpg, _ in samples])
    tokens = open_clip.get_tokenizer("clipkit-nano")([c for _, _, c in samples])
    with torch.no_grad():
        return (F.normalize(model.encode_image(images), dim=-1).numpy(),
                F.normalize(model.encode_text(tokens), dim=-1).numpy())


# ------------------------------------------------------------------------------------------------ tests

def test_embeddings_equal_open_clip_and_rows_follow_tar_order(data, checkpoint, embedded, tmp_path):
    out, result = embedded
    samples = [s for i in range(3) for s in tar_samples(data / f"g-{i:02d}.tar")]
    keys, img, txt = concat(out)
    assert keys == [k for k, _, _ in samples]  # every sample, in shard then tar order
    ref_img, ref_txt = reference(checkpoint, samples)
    # Text: float16 storage is the only difference (the tower runs only up to the longest caption: exact).
    np.testing.assert_allclose(txt, ref_txt, atol=3e-4)
    # Images, decoded at reduced scale where 2x the model's input remains (the default): resampling noise only.
    np.testing.assert_allclose(img, ref_img, atol=4e-3)
    cosine = np.sum(img * ref_img, axis=1) / np.linalg.norm(img, axis=1)  # stored norms are 1 within float16
    assert (cosine > 0.9999).all()
    # A full decode (--draft-margin 0) differs from open_clip's Pillow resize by at most a grey level here and there.
    full = embed_shards(checkpoint, str(data / "g-{00..02}.tar"), tmp_path / "full", batch_size=16, part_size=PART,
                        workers=0, progress=False, draft_margin=0)
    _, img_full, _ = concat(full.out)
    np.testing.assert_allclose(img_full, ref_img, atol=1.5e-3)
    assert result.rows == result.info["count"] == 30 and result.parts_written == 6


def test_layout_reads_back_as_clip_retrieval_reads_it(data, embedded, checkpoint):
    out, _ = embedded
    ids, imgs, txts, metas = read_layout(out)
    assert ids == ["000000000", "000000001", "000010000", "000010001", "000020000", "000020001"]
    for img_path, txt_path, meta_path in zip(imgs, txts, metas):
        table = pq.read_table(meta_path)
        for path in (img_path, txt_path):
            (rows, dim), dtype = npy_header(path)
            arr = np.load(path)
            assert (rows, dim, dtype) == (table.num_rows, 32, "<f2") and arr.shape == (rows, dim)
            np.testing.assert_allclose(np.linalg.norm(arr.astype(np.float32), axis=1), 1.0, atol=2e-3)
        assert table.column_names[:3] == ["key", "image_path", "caption"]
        assert {"url", "width", "height", "exif.Make", "exif.ISO"} <= set(table.column_names)
    first = pq.read_table(metas[0]).to_pylist()[0]
    _, jpg, caption = tar_samples(data / "g-00.tar")[0]
    w, h = Image.open(io.BytesIO(jpg)).size
    assert first["key"] == first["image_path"] == "00000" and first["caption"] == caption.strip()  # not json's
    assert (first["url"], first["width"], first["height"]) == ("http://example.com/00000.jpg", w, h)
    assert (first["exif.Make"], first["exif.ISO"]) == ("cam", 100)
    info = json.loads((out / "clipkit_embed.json").read_text())
    assert info["checkpoint"] == str(checkpoint.resolve()) and info["model_name"] == "clipkit-nano"
    assert (info["dim"], info["count"], info["parts"], info["complete"], info["skipped"]) == (32, 30, 6, True, {})


def test_bad_samples_are_skipped_counted_and_printed(data, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    spec = f"{data / 'bad.tar'}::pipe:exit 3"  # the second shard: a command that fails
    assert cli.main(["embed", "--checkpoint", str(checkpoint), "--data", spec, "--out", str(out),
                     "--workers", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    info = json.loads((out / "clipkit_embed.json").read_text())
    assert info["skipped"] == {**BAD_REASONS, "shard_open_error": 1}
    assert (info["count"], info["shards_complete"], info["complete"]) == (3, 1, False)
    for reason, n in info["skipped"].items():
        assert f"{reason} {n}" in printed
    keys, _, _ = concat(out)
    assert keys == ["b0", "b7", "b8"]
    table = pq.read_table(next((out / "metadata").glob("*.parquet")))
    assert table.column("url").to_pylist() == ["u0", None, "u8"]
    assert table.column("width").to_pylist() == ["64", None, '"wide"']  # a mixed-type field stays, as JSON text


def test_resume_recomputes_only_unfinished_parts(data, checkpoint, embedded, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(embedded[0], out, copy_function=shutil.copy2)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    originals = {p: p.read_bytes() for p in before if p.suffix == ".npy"}
    # A finished part loses a file (as if deleted), and a crash left another one without its metadata and its
    # shard without its record, with a temporary file half written.
    (out / "img_emb" / "img_emb_000000001.npy").unlink()
    (out / "metadata" / "metadata_000020000.parquet").unlink()
    (out / ".clipkit_embed" / "shards" / "00002.json").unlink()
    (out / "metadata" / ".metadata_000020000.parquet.tmp").write_bytes(b"PAR1 half")
    result = embed_shards(checkpoint, str(data / "g-{00..02}.tar"), out, batch_size=8, part_size=PART, workers=2,
                          progress=False)
    redone = {out / "img_emb" / "img_emb_000000001.npy", out / "text_emb" / "text_emb_000000001.npy",
              out / "metadata" / "metadata_000000001.parquet", out / "img_emb" / "img_emb_000020000.npy",
              out / "text_emb" / "text_emb_000020000.npy", out / "metadata" / "metadata_000020000.parquet"}
    for path, mtime in before.items():
        if path not in redone and ".clipkit_embed" not in path.parts and path.name != "clipkit_embed.json":
            assert path.stat().st_mtime_ns == mtime, path
    assert all(p.stat().st_mtime_ns != before.get(p) for p in redone)
    assert (result.parts_written, result.parts_reused, result.rows_embedded) == (2, 4, 3 + PART)
    for path, content in originals.items():  # recomputed rows met other batch neighbours: float16 rounding at most
        np.testing.assert_allclose(np.load(path), np.load(io.BytesIO(content)), atol=1e-3)
        assert path in redone or path.read_bytes() == content
    assert result.info["count"] == 30 and result.info["complete"]
    assert not list(out.rglob("*.tmp"))  # the half-written file was replaced by the part's own, then renamed


def test_two_ranks_write_the_rows_of_one(data, checkpoint, embedded, tmp_path):
    out = tmp_path / "out2"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "clipkit", "embed", "--checkpoint", str(checkpoint), "--data",
                           str(data / "g-{00..02}.tar"), "--out", str(out), "--part-size", str(PART),
                           "--batch-size", "4", "--workers", "1", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [json.loads(p.read_text())["url"] for p in (out / ".clipkit_embed" / "shards").glob("*.json")]
    assert len(records) == 3
    assert read_layout(out)[0] == read_layout(embedded[0])[0]
    keys2, img2, txt2 = concat(out)
    keys1, img1, txt1 = concat(embedded[0])
    assert keys2 == keys1
    np.testing.assert_allclose(img2, img1, atol=1e-3)  # other batch compositions: float16 rounding at most
    np.testing.assert_allclose(txt2, txt1, atol=1e-3)
    info = json.loads((out / "clipkit_embed.json").read_text())
    assert (info["count"], info["complete"]) == (30, True)


def test_pipe_spec_and_clear_errors(data, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    result = embed_shards(checkpoint, f"pipe:cat {data / 'g-01.tar'}", out, workers=0, progress=False)
    assert concat(out)[0] == [k for k, _, _ in tar_samples(data / "g-01.tar")]
    assert result.info["count"] == 10
    with pytest.raises(UserError, match="other settings.*part_size"):
        embed_shards(checkpoint, f"pipe:cat {data / 'g-01.tar'}", out, part_size=5, workers=0, progress=False)
    for args, message in [(["--checkpoint", str(tmp_path / "none.safetensors")], "checkpoint not found"),
                          (["--data", str(tmp_path / "missing-{0..1}.tar")], "shard not found"),
                          (["--out", str(data / "bad.tar")], "is not a folder")]:
        argv = {"--checkpoint": str(checkpoint), "--data": str(data / "g-00.tar"), "--out": str(tmp_path / "o")}
        argv.update(dict(zip(args[::2], args[1::2])))
        assert cli.main(["embed", *[x for kv in argv.items() for x in kv], "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
