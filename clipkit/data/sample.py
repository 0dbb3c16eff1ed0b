"""One webdataset sample -> (image tensor, target, key), the decode every shard stream shares.

A sample is the dict of a tar's members for one key (tario.read_shard); the decoder picks its image member
(the first of the image keys it has) and its text member, decodes the image through the stream's image
pipeline and turns the text into the stream's target: caption tokens for training (Tokenize), a class index
for a labelled set, the caption lines for retrieval, the raw caption for embedding. A sample that cannot be
used never stops a stream: it is counted by reason in the worker's SkipCounter (skips.py) and dropped.
Batch is the record every shard stream and labelled loader hands to its consumer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config.schema import DEFAULT_IMAGE_KEY
from .decode import ImageTooLarge
from .skips import SkipCounter
from .state import StreamPosition

__all__ = ["Batch", "SampleDecoder", "Tokenize", "keep_batch"]


@dataclass
class Batch:
    images: torch.Tensor
    # caption tokens [B, context] for training; class indices [B] for classification; for retrieval, a
    # list of each image's captions (targets that are not tensors are kept as a list)
    targets: torch.Tensor | list
    keys: list[str]
    skipped: dict[str, int] = field(default_factory=dict)  # skips counted since the previous batch
    position: StreamPosition | None = None  # where the worker that made it stands (after its last sample)
    # Where workers stand that, in loader order since the previous batch, passed a whole epoch without a
    # usable sample (StreamState.observe records them with the batch)
    empty_passes: list[StreamPosition] = field(default_factory=list)


def keep_batch(batch):
    """The collate_fn of a loader whose workers already make whole batches."""
    return batch


class SampleDecoder:
    """Decodes samples for one stream: `images` is its image pipeline (decode.image_pipeline or
    eval_pipeline), `target` turns the text of the `text_key` member into the target. Picklable, for loader
    workers. The sample's "__aug__" entry seeds its augmentation."""

    def __init__(self, images, target: Callable[[str], object], image_keys: str = DEFAULT_IMAGE_KEY,
                 text_key: str = "txt") -> None:
        self.images, self.target = images, target
        self.image_keys = image_keys.split(";")
        self.text_key = text_key

    def __call__(self, sample: dict, counter: SkipCounter) -> tuple | None:
        """(image, target, key), or None when the sample is skipped (counted by reason in `counter`)."""
        where = f"{sample['__url__']}:{sample['__key__']}"
        img_key = next((k for k in self.image_keys if k in sample), None)
        if img_key is None:
            return counter.skip("missing_image", where, f"no {'/'.join(self.image_keys)} member")
        if self.text_key not in sample:
            return counter.skip("missing_caption", where, f"no .{self.text_key} member")
        try:
            text = sample[self.text_key].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            return counter.skip("caption_not_utf8", where, e)
        if not text:
            return counter.skip("empty_caption", where)
        try:
            image = self.images(sample[img_key], random.Random(sample["__aug__"]))
        except ImageTooLarge as e:
            return counter.skip("image_too_large", where, e)
        except Exception as e:  # corrupt or truncated image data
            return counter.skip("image_decode_error", where, repr(e))
        try:
            target = self.target(text)
        except ValueError as e:
            return counter.skip("bad_label", where, e)
        return image, target, sample["__key__"]


class Tokenize:
    """Caption -> token ids at the model's context length (picklable, for loader workers)."""

    def __init__(self, tokenizer: Callable) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> torch.Tensor:
        return self.tokenizer([text])[0]
