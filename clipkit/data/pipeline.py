"""Streaming (image, caption) pairs from webdataset tar shards into batches of (images, tokens).

    shards (per epoch: shuffled with seed+epoch, split by rank, then by loader worker)
      -> tar members grouped into samples (webdataset's tar iterators)
      -> shuffle buffer -> decode + open_clip transform + tokenize -> batches

Bad samples never stop a run and never vanish silently: every skipped sample or shard is counted by
reason in the worker that met it, and the counts travel to the trainer with the next batch.
"""
from __future__ import annotations

import io
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from .shards import expand_shards, open_shard

log = logging.getLogger(__name__)


@dataclass
class Batch:
    images: torch.Tensor
    targets: torch.Tensor  # caption tokens [B, context] for training; class indices [B] for evaluation
    keys: list[str]
    skipped: dict[str, int] = field(default_factory=dict)  # skips counted since the previous batch


class SkipCounter:
    """Counts skipped samples by reason; used as webdataset's exception handler too."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def skip(self, reason: str, where: str, detail: object = "") -> None:
        self.counts[reason] += 1
        log.warning("skipped %s (%s): %s", where, reason, detail)

    def handler(self, exn: Exception) -> bool:
        # Errors raised while reading a tar (truncated file, unreadable shard) reach us here.
        where = " ".join(str(a) for a in exn.args[1:] if isinstance(a, str)) or "shard"
        self.skip("tar_read_error", where, repr(exn))
        return True

    def take(self) -> dict[str, int]:
        out = dict(self.counts)
        self.counts.clear()
        return out


def _first_key(sample: dict, keys: list[str]) -> str | None:
    return next((k for k in keys if k in sample), None)


class ShardStream(IterableDataset):
    """An endless, deterministic stream of batches for one rank; each DataLoader worker reads a
    disjoint subset of that rank's shards."""

    def __init__(self, urls: list[str], transform: Callable, target: Callable[[str], torch.Tensor],
                 batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 1000, image_keys: str = "jpg;png;webp;jpeg", text_key: str = "txt",
                 shuffle: bool = True, epochs: int | None = None) -> None:
        super().__init__()
        self.urls = list(urls)
        self.transform = transform
        self.target = target  # text of the sample's text_key member -> tensor (tokens or a label)
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.image_keys = image_keys.split(";")
        self.text_key = text_key
        self.shuffle = shuffle
        self.epochs = epochs  # None: loop over epochs forever

    # -- stages -------------------------------------------------------------------------------------

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _shards(self) -> Iterator[dict]:
        worker, num_workers = self._worker()
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            urls = list(self.urls)
            if self.shuffle:
                random.Random(f"{self.seed}/shards/{epoch}").shuffle(urls)
            mine = urls[self.rank::self.world_size][worker::num_workers]
            if not mine and epoch == 0:
                log.warning("rank %d worker %d has no shards (%d shards for %d ranks x %d workers)",
                            self.rank, worker, len(urls), self.world_size, num_workers)
                return
            for url in mine:
                yield {"url": url}
            epoch += 1

    def _open(self, sources: Iterator[dict], counter: SkipCounter) -> Iterator[dict]:
        for source in sources:
            try:
                yield {"url": source["url"], "stream": open_shard(source["url"])}
            except Exception as exn:  # unreachable or unreadable shard: skip it, count it
                counter.skip("shard_open_error", source["url"], repr(exn))

    def _shuffled(self, samples: Iterator[dict]) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        worker, _ = self._worker()
        rng = random.Random(f"{self.seed}/samples/{self.rank}/{worker}")
        buf: list[dict] = []
        for sample in samples:
            buf.append(sample)
            if len(buf) >= self.shuffle_buffer:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def _decode(self, samples: Iterator[dict], counter: SkipCounter) -> Iterator[tuple]:
        for sample in samples:
            where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
            img_key = _first_key(sample, self.image_keys)
            if img_key is None:
                counter.skip("missing_image", where, f"no {'/'.join(self.image_keys)} member")
                continue
            if self.text_key not in sample:
                counter.skip("missing_caption", where, f"no .{self.text_key} member")
                continue
            try:
                text = sample[self.text_key].decode("utf-8").strip()
            except UnicodeDecodeError as e:
                counter.skip("caption_not_utf8", where, e)
                continue
            if not text:
                counter.skip("empty_caption", where)
                continue
            try:
                with Image.open(io.BytesIO(sample[img_key])) as im:
                    image = self.transform(im.convert("RGB"))
            except Image.DecompressionBombError as e:
                counter.skip("image_too_large", where, e)
                continue
            except Exception as e:  # corrupt or truncated image data
                counter.skip("image_decode_error", where, repr(e))
                continue
            try:
                target = self.target(text)
            except ValueError as e:
                counter.skip("bad_label", where, e)
                continue
            yield image, target, sample["__key__"]

    def _batches(self, items: Iterator[tuple], counter: SkipCounter) -> Iterator[Batch]:
        buf: list[tuple] = []
        for item in items:
            buf.append(item)
            if len(buf) == self.batch_size:
                yield self._collate(buf, counter)
                buf = []
        if buf and self.epochs is not None:  # a finite pass keeps its last partial batch
            yield self._collate(buf, counter)

    @staticmethod
    def _collate(items: list[tuple], counter: SkipCounter) -> Batch:
        images, targets, keys = zip(*items)
        return Batch(torch.stack(images), torch.stack(targets), list(keys), counter.take())

    def __iter__(self) -> Iterator[Batch]:
        counter = SkipCounter()
        streams = self._open(self._shards(), counter)
        files = tar_file_expander(streams, handler=counter.handler)
        samples = group_by_keys(files, handler=counter.handler)
        yield from self._batches(self._decode(self._shuffled(samples), counter), counter)


class Tokenize:
    """Caption -> token ids at the model's context length (picklable, for loader workers)."""

    def __init__(self, tokenizer: Callable) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> torch.Tensor:
        return self.tokenizer([text])[0]


def parse_label(text: str) -> torch.Tensor:
    """CLIP_benchmark's KEY.cls member: the class index as text."""
    return torch.tensor(int(text))


def _keep_batch(batch: Batch) -> Batch:
    return batch


def make_loader(stream: ShardStream, workers: int) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_keep_batch,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)


def build_train_loader(spec: str, transform: Callable, tokenizer: Callable, batch_size: int, *,
                       rank: int = 0, world_size: int = 1, workers: int = 2, seed: int = 0,
                       shuffle_buffer: int = 1000, image_keys: str = "jpg;png;webp;jpeg",
                       caption_key: str = "txt") -> DataLoader:
    """An endless loader of per-rank (images, caption tokens) batches; batch_size is per rank."""
    urls = expand_shards(spec)
    stream = ShardStream(urls, transform, Tokenize(tokenizer), batch_size, rank=rank, world_size=world_size,
                         seed=seed, shuffle_buffer=shuffle_buffer, image_keys=image_keys, text_key=caption_key)
    return make_loader(stream, workers)


def build_labelled_loader(spec: str, transform: Callable, batch_size: int, *, workers: int = 1,
                          image_keys: str = "jpg;png;webp;jpeg", label_key: str = "cls") -> DataLoader:
    """One ordered pass over a classification set (CLIP_benchmark layout): (images, labels) batches."""
    stream = ShardStream(expand_shards(spec), transform, parse_label, batch_size, shuffle=False, epochs=1,
                         image_keys=image_keys, text_key=label_key)
    return make_loader(stream, workers)
