import dataclasses
import io
import logging

import pytest
import torch
import webdataset as wds
from PIL import Image

from clipkit.config import DataConfig
from clipkit.data import ShardSpecError, ShardStream, build_labelled_loader, build_train_loader, expand_shards
from clipkit.data.sample import Tokenize
from clipkit.models import create_model, create_transforms, get_tokenizer


@pytest.fixture(scope="module")
def nano_parts():
    model = create_model("clipkit-nano")
    train_tf, val_tf = create_transforms(model)
    return train_tf, val_tf, get_tokenizer("clipkit-nano")


def _jpeg(colour=(200, 10, 10), size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_expand_shards_braces_lists_and_missing(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:03d}.tar").write_bytes(b"")
    (tmp_path / "x.tar").write_bytes(b"")
    urls = expand_shards(f"{tmp_path}/{{000..002}}.tar::{tmp_path}/x.tar")
    assert urls == [f"{tmp_path}/{i:03d}.tar" for i in range(3)] + [f"{tmp_path}/x.tar"]
    with pytest.raises(ShardSpecError, match="003.tar"):
        expand_shards(f"{tmp_path}/{{000..003}}.tar")
    assert expand_shards("s3://bucket/{0..1}.tar") == ["s3://bucket/0.tar", "s3://bucket/1.tar"]


def test_train_loader_batches(synth_small, nano_parts):
    train_tf, _, tok = nano_parts
    loader = build_train_loader(DataConfig(train=synth_small.train_spec, workers=2, shuffle_buffer=50),
                                transform=train_tf, tokenizer=tok, local_batch_size=16, seed=0)
    it = iter(loader)
    for _ in range(3):
        batch = next(it)
        assert batch.images.shape == (16, 3, 32, 32) and batch.images.dtype == torch.float32
        assert batch.targets.shape == (16, 16) and batch.targets.dtype == torch.long
        assert len(set(batch.keys)) == 16


def test_ranks_and_workers_read_disjoint_shards_covering_the_epoch(synth_small, nano_parts):
    _, val_tf, tok = nano_parts
    urls = expand_shards(synth_small.train_spec)
    seen = []
    for rank in range(2):
        stream = ShardStream(urls, val_tf, Tokenize(tok), batch_size=50, rank=rank, world_size=2, seed=1,
                             shuffle_buffer=10, epochs=1)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        keys = [k for b in loader for k in b.keys]
        seen.append(keys)
    assert len(seen[0]) == len(seen[1]) == 300
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 600


def test_shuffle_is_deterministic_for_a_seed(synth_small, nano_parts):
    _, val_tf, tok = nano_parts
    urls = expand_shards(synth_small.train_spec)

    def keys(seed):
        s = ShardStream(urls, val_tf, Tokenize(tok), batch_size=600, seed=seed, shuffle_buffer=100, epochs=1)
        return next(iter(s)).keys

    assert keys(5) == keys(5)
    assert keys(5) != keys(6)
    assert sorted(keys(5)) == sorted(keys(6))


def test_bad_samples_are_skipped_and_counted(tmp_path, nano_parts, caplog):
    _, val_tf, tok = nano_parts
    path = str(tmp_path / "bad.tar")
    with wds.TarWriter(path) as w:
        w.write({"__key__": "good0", "jpg": _jpeg(), "txt": "a red square"})
        w.write({"__key__": "corrupt", "jpg": _jpeg()[:60], "txt": "broken image"})
        w.write({"__key__": "nocaption", "jpg": _jpeg()})
        w.write({"__key__": "latin1", "jpg": _jpeg(), "txt": "caf\xe9".encode("latin-1")})
        w.write({"__key__": "empty", "jpg": _jpeg(), "txt": "   "})
        w.write({"__key__": "noimage", "txt": "where is the image"})
        w.write({"__key__": "good1", "jpg": _jpeg((0, 0, 250)), "txt": "a blue square"})
    stream = ShardStream([path], val_tf, Tokenize(tok), batch_size=8, shuffle=False, epochs=1)
    with caplog.at_level(logging.WARNING):
        batches = list(stream)
    assert [k for b in batches for k in b.keys] == ["good0", "good1"]
    skipped = {}
    for b in batches:
        for k, v in b.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    assert skipped == {"image_decode_error": 1, "missing_caption": 1, "caption_not_utf8": 1,
                       "empty_caption": 1, "missing_image": 1}
    assert "corrupt" in caplog.text and "latin1" in caplog.text


def test_labelled_loader_reads_clip_benchmark_set(synth_small, nano_parts):
    _, val_tf, _ = nano_parts
    batches = list(build_labelled_loader(str(synth_small.eval_root / "test" / "0.tar"), val_tf, 50, workers=0))
    assert [b.images.shape[0] for b in batches] == [50, 50, 20]
    labels = torch.cat([b.targets for b in batches])
    assert labels.dtype == torch.long and labels.min() >= 0 and labels.max() < 30


def test_uint8_batches_normalised_on_device_equal_the_float_batches(synth_small):
    """data.normalize_on_device: the loader ships uint8 images, a quarter of the bytes; normalising them
    where they arrive gives the float batches of the default path."""
    import open_clip

    train_tf = open_clip.image_transform(32, is_train=True)
    tok = get_tokenizer("clipkit-nano")
    kw = dict(transform=train_tf, tokenizer=tok, local_batch_size=8, seed=3, epochs=1)
    data = DataConfig(train=synth_small.train_spec, workers=1, shuffle_buffer=50)
    plain = build_train_loader(data, **kw)
    small = build_train_loader(dataclasses.replace(data, normalize_on_device=True), **kw)
    for a, b, _ in zip(plain, small, range(5)):
        assert a.images.dtype == torch.float32 and b.images.dtype == torch.uint8
        assert b.images.shape == a.images.shape and a.keys == b.keys
        torch.testing.assert_close(small.dataset.normalize(b.images), a.images, rtol=0, atol=1e-5)
        assert torch.equal(a.targets, b.targets)


def test_normalize_on_device_needs_the_standard_train_transform(synth_small, nano_parts):
    _, val_tf, tok = nano_parts
    with pytest.raises(ShardSpecError, match="normalize_on_device"):
        build_train_loader(DataConfig(train=synth_small.train_spec, normalize_on_device=True), transform=val_tf,
                           tokenizer=tok, local_batch_size=8)
