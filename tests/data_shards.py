"""Helpers for the data tests: small shards written with plain tarfile, and plain-tarfile reads of
their keys (the independent reference the loaders are checked against)."""
from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import open_clip
import torch
from PIL import Image


def jpeg(colour=(200, 10, 10), size=(24, 20), quality=90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(directory: Path, prefix: str, shards: int, per_shard: int, size=(24, 20)) -> str:
    """Shards PREFIX-00.tar ... with samples KEY.jpg + KEY.txt + KEY.json; returns the brace spec."""
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(directory / f"{prefix}-{s:02d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{prefix}{s:02d}{i:03d}"
                add(tar, f"{key}.jpg", jpeg(((s * 37 + i * 11) % 256, (i * 53) % 256, 90), size))
                add(tar, f"{key}.txt", f"sample {key}".encode())
                add(tar, f"{key}.json", b'{"key": "%s"}' % key.encode())
    return str(directory / f"{prefix}-{{00..{shards - 1:02d}}}.tar")


def tar_keys(paths) -> Counter:
    """Keys of complete (jpg + txt) samples, read with plain tarfile."""
    keys: Counter = Counter()
    for path in paths:
        with tarfile.open(path) as tar:
            names = tar.getnames()
        stems = Counter(n.split(".", 1)[0] for n in names if n.endswith((".jpg", ".txt")))
        keys.update(k for k, n in stems.items() if n == 2)
    return keys


def transforms(size: int = 16):
    return open_clip.image_transform(size, is_train=True), open_clip.image_transform(size, is_train=False)


def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b.keys]


def take(iterator, n: int, state=None) -> list:
    out = []
    for _ in range(n):
        batch = next(iterator)
        if state is not None:
            state.observe(batch)
        out.append(batch)
    return out


def same_images(a, b) -> bool:
    return all(torch.equal(x.images, y.images) for x, y in zip(a, b, strict=True))


def samples_shard(path, samples) -> str:
    """A shard of (key, image bytes or None, caption bytes or None) samples, written with plain tarfile."""
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            if image is not None:
                add(tar, f"{key}.jpg", image)
            if caption is not None:
                add(tar, f"{key}.txt", caption)
    return str(path)


def good_samples(prefix: str, n: int) -> list:
    """n decodable samples keyed PREFIX0..: a JPEG of its own colour and a caption naming its key."""
    return [(f"{prefix}{i}", jpeg((i * 40 % 256, 90, 200)), f"picture {prefix}{i}".encode()) for i in range(n)]
