"""The evaluation loaders: one ordered pass over a set's shards (shuffle off, one epoch, bad samples
counted, an empty set allowed), run by the same ShardStream as training with another target per sample:
a class index (CLIP_benchmark's KEY.cls) or the image's captions (KEY.txt).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader

from ..config.schema import DEFAULT_IMAGE_KEY
from .loader import make_loader
from .shards import expand_sources
from .stream import ShardStream

__all__ = ["build_captioned_loader", "build_labelled_loader", "caption_lines", "one_caption", "parse_label"]


def parse_label(text: str) -> torch.Tensor:
    """CLIP_benchmark's KEY.cls member: the class index as text."""
    return torch.tensor(int(text))


def build_labelled_loader(spec: str, transform: Callable, batch_size: int, *, workers: int = 1,
                          image_keys: str = DEFAULT_IMAGE_KEY, label_key: str = "cls") -> DataLoader:
    """One ordered pass over a classification set (CLIP_benchmark layout): (images, labels) batches."""
    urls, _ = expand_sources(spec)
    stream = ShardStream(urls, transform, parse_label, batch_size, shuffle=False, epochs=1,
                         image_keys=image_keys, text_key=label_key, require_samples=False)
    return make_loader(stream, workers)


def caption_lines(text: str) -> list[str]:
    """CLIP_benchmark's retrieval KEY.txt: one caption per line."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def one_caption(text: str) -> list[str]:
    """A training shard's KEY.txt: the whole text is one caption, line breaks included."""
    return [text]


def build_captioned_loader(spec: str, transform: Callable, batch_size: int, *, workers: int = 1,
                           image_keys: str = DEFAULT_IMAGE_KEY, text_key: str = "txt",
                           several_per_sample: bool = True) -> DataLoader:
    """One ordered pass over (image, captions) samples: batches whose targets list each image's captions.
    `several_per_sample`: KEY.txt holds one caption per line (CLIP_benchmark's retrieval layout), else
    the whole text is one caption (training shards)."""
    urls, _ = expand_sources(spec)
    stream = ShardStream(urls, transform, caption_lines if several_per_sample else one_caption, batch_size,
                         shuffle=False, epochs=1, image_keys=image_keys, text_key=text_key, require_samples=False)
    return make_loader(stream, workers)

