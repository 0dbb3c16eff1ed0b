"""Bad input, one test per class: the sample (or shard) is skipped, counted by reason and logged with its
key or URL, and the good samples around it all arrive. Shards are written with plain tarfile, and the
expected keys are what plain tarfile reads of the good samples."""
import io
import json
import logging
import socket
import tarfile

import pytest
from PIL import Image

from clipkit.config import load_config
from clipkit.data import ShardStream
from clipkit.data.sample import Tokenize
from clipkit.run import run
from data_shards import add, jpeg, tokenizer, transforms

LIMIT = 10_000  # pixels: the decompression-bomb limit used here


@pytest.fixture(scope="module")
def parts():
    _, val_tf = transforms(16)
    return val_tf, Tokenize(tokenizer())


def _sample(tar, key, image=None, caption=None):
    if image is not None:
        add(tar, f"{key}.jpg", image)
    if caption is not None:
        add(tar, f"{key}.txt", caption)


def _shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            _sample(tar, key, image, caption)
    return str(path)


def _good(prefix, n):
    return [(f"{prefix}{i}", jpeg((i * 40 % 256, 90, 200)), f"picture {prefix}{i}".encode()) for i in range(n)]


def _read(urls, parts):
    stream = ShardStream(urls, parts[0], parts[1], batch_size=4, shuffle=False, epochs=1, max_image_pixels=LIMIT)
    keys, skipped = [], {}
    for batch in stream:
        keys += batch.keys
        for reason, n in batch.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    return keys, skipped


def _big_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (200, 120), (10, 10, 10)).save(buf, format="PNG")  # 24,000 pixels > LIMIT
    return buf.getvalue()


SAMPLE_CASES = {  # reason -> (image bytes, caption bytes) of the one bad sample
    "image_decode_error": (b"\xff\xd8\xff\xe0 this is not a jpeg at all", b"garbage image"),
    "missing_caption": (jpeg(), None),
    "caption_not_utf8": (jpeg(), "caf\xe9 au lait".encode("latin-1")),
    "empty_caption": (jpeg(), b" \n\t "),
    "missing_image": (None, b"a caption with no picture"),
    "image_too_large": (_big_png(), b"a decompression bomb"),
}


@pytest.mark.parametrize("reason", sorted(SAMPLE_CASES))
def test_bad_sample_is_skipped_counted_and_logged(tmp_path, parts, caplog, reason):
    image, caption = SAMPLE_CASES[reason]
    good = _good("g", 6)
    path = _shard(tmp_path / "s.tar", good[:3] + [("bad", image, caption)] + good[3:])
    with caplog.at_level(logging.WARNING, logger="clipkit.data"):
        keys, skipped = _read([path], parts)
    assert keys == [k for k, _, _ in good]
    assert skipped == {reason: 1}
    assert f"{path}:bad" in caplog.text and reason in caplog.text


def test_truncated_jpeg_is_an_image_decode_error(tmp_path, parts):
    whole = jpeg(size=(64, 48), quality=95)
    good = _good("g", 4)
    path = _shard(tmp_path / "s.tar", good[:2] + [("cut", whole[: len(whole) // 2], b"half a picture")] + good[2:])
    keys, skipped = _read([path], parts)
    assert keys == [k for k, _, _ in good] and skipped == {"image_decode_error": 1}


def test_truncated_tar_keeps_the_samples_before_the_damage(tmp_path, parts, caplog):
    first = _shard(tmp_path / "a.tar", _good("a", 3))
    whole = _shard(tmp_path / "b_whole.tar", _good("b", 5))
    with tarfile.open(whole) as tar:  # plain tarfile: where the 4th sample's image data lies
        members = tar.getmembers()
    target = next(m for m in members if m.name == "b3.jpg")
    cut_at = target.offset_data + target.size // 2
    cut = tmp_path / "b.tar"
    cut.write_bytes(open(whole, "rb").read()[:cut_at])
    complete = [m.name.split(".")[0] for m in members if m.name.endswith(".txt") and m.offset_data + m.size <= cut_at]
    last = _shard(tmp_path / "c.tar", _good("c", 2))
    with caplog.at_level(logging.WARNING, logger="clipkit.data"):
        keys, skipped = _read([first, str(cut), last], parts)
    assert complete == ["b0", "b1", "b2"]
    assert keys == ["a0", "a1", "a2", *complete, "c0", "c1"]
    assert skipped == {"tar_read_error": 1} and str(cut) in caplog.text


@pytest.mark.parametrize("content", [b"", b"\0" * 10240], ids=["zero_bytes", "tar_without_members"])
def test_empty_shard_is_counted(tmp_path, parts, content):
    empty = tmp_path / "empty.tar"
    empty.write_bytes(content)
    keys, skipped = _read([_shard(tmp_path / "a.tar", _good("a", 2)), str(empty),
                           _shard(tmp_path / "c.tar", _good("c", 2))], parts)
    assert keys == ["a0", "a1", "c0", "c1"] and skipped == {"empty_shard": 1}


def test_unreachable_remote_shard_is_counted_with_its_url(tmp_path, parts, caplog):
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/shards/00001.tar"
    with caplog.at_level(logging.WARNING, logger="clipkit.data"):
        keys, skipped = _read([_shard(tmp_path / "a.tar", _good("a", 2)), url,
                               _shard(tmp_path / "c.tar", _good("c", 2))], parts)
    assert keys == ["a0", "a1", "c0", "c1"] and skipped == {"shard_open_error": 1}
    assert url in caplog.text


def test_training_run_reports_skips_in_metrics_and_summary(tmp_path):
    """A run over shards with bad samples trains on, and the counts reach metrics.jsonl and summary.json."""
    good = _good("g", 30)
    bad = [("corrupt", b"not an image", b"x"), ("latin1", jpeg(), b"caf\xe9")]
    spec = _shard(tmp_path / "s.tar", good[:10] + bad[:1] + good[10:20] + bad[1:] + good[20:])
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", "model.name=clipkit-nano", f"data.train={spec}",
                             "data.workers=0", "train.global_batch_size=8", "train.steps=4", "run.log_every=2",
                             "run.progress=false", "eval.zeroshot_at_end=false", "export.at_end=false"])
    summary = run(cfg)
    assert summary["steps"] == 4
    # 4 steps x 8 = 32 of the 30 good samples per pass: the pass over the shard completed once at least.
    assert summary["skipped_samples"]["image_decode_error"] >= 1
    assert summary["skipped_samples"]["caption_not_utf8"] >= 1
    assert set(summary["skipped_samples"]) == {"image_decode_error", "caption_not_utf8"}
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["skipped"] == summary["skipped_samples"]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["skipped_samples"] == summary["skipped_samples"]


def test_file_url_and_pipe_specs_read_like_local_paths(tmp_path, parts):
    """OpenCLIP users' spec forms: file:// URLs and `pipe:CMD` (the shard on CMD's stdout)."""
    a = _shard(tmp_path / "a.tar", _good("a", 3))
    b = _shard(tmp_path / "b.tar", _good("b", 2))
    keys, skipped = _read([f"file://{a}", f"pipe:cat {b}"], parts)
    assert keys == ["a0", "a1", "a2", "b0", "b1"] and skipped == {}


def test_failing_pipe_command_is_a_counted_shard_error(tmp_path, parts):
    a = _shard(tmp_path / "a.tar", _good("a", 2))
    keys, skipped = _read([f"pipe:cat {tmp_path}/does-not-exist.tar", a], parts)
    assert keys == ["a0", "a1"] and skipped == {"shard_open_error": 1}
