"""The embed stream: one ordered pass over some shards of a spec for `clipkit embed`, in tar order and in
chunks of fixed sample ranges, so that an interrupted export resumes chunk by chunk (retrieval/embed.py).
Samples decode through the shared SampleDecoder (sample.py) with the evaluation transform (fast decode).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config.schema import DEFAULT_IMAGE_KEY
from .decode import DEFAULT_MAX_IMAGE_PIXELS, eval_pipeline
from .sample import SampleDecoder, keep_batch
from .skips import SkipCounter
from .tario import read_shard

__all__ = ["EmbedBatch", "EmbedStream", "build_embed_loader"]


@dataclass
class EmbedBatch:
    """Rows in shard order, each tagged with its (shard, chunk); `closed` chunks and shards are complete
    once this batch's rows are in. A chunk is a fixed range of sample indices in its shard (`chunk_size`
    samples, bad ones included), so where a sample belongs never depends on what else was skipped."""
    images: torch.Tensor | None  # None when the batch only carries closing events
    tokens: torch.Tensor | None
    keys: list[str]
    captions: list[str]
    meta: list[dict]  # the sample's json member ({} when it has none)
    chunks: list[tuple[int, int]]
    closed_chunks: list[tuple[int, int, dict[str, int]]] = field(default_factory=list)  # (shard, chunk, skips)
    closed_shards: list[tuple[int, dict[str, int]]] = field(default_factory=list)  # (shard, skips outside chunks)


class _EmbedRows:
    """A worker's rows and events not yet sent."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []
        self.chunks: list[tuple[int, int]] = []
        self.closed_chunks: list = []
        self.closed_shards: list = []

    def take(self, stream: "EmbedStream") -> EmbedBatch:
        images = tokens = None
        if self.rows:
            pixels, captions, keys, meta = zip(*self.rows)
            images = stream.images.collate(list(pixels), get_worker_info() is not None)
            tokens = stream.tokenizer(list(captions))  # one call per batch, not per caption
        else:
            captions = keys = meta = ()
        batch = EmbedBatch(images, tokens, list(keys), list(captions), list(meta), self.chunks,
                           self.closed_chunks, self.closed_shards)
        self.__init__()
        return batch


class EmbedStream(IterableDataset):
    """One ordered pass over some shards of a spec with the evaluation transform (fast decode), for
    embedding: each loader worker reads whole shards, in order, so every chunk comes from one worker and
    its rows keep the tar order. Chunks listed in `finished` (shard -> chunk indices) are stepped over
    without decoding. Skips are counted per chunk (and per shard, for what happens outside any chunk)."""

    def __init__(self, urls: list[str], transform: Callable, tokenizer: Callable, batch_size: int,
                 shards: list[int], chunk_size: int, finished: dict[int, set[int]] | None = None, *,
                 image_keys: str = DEFAULT_IMAGE_KEY, text_key: str = "txt",
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, draft_margin: int = 2) -> None:
        super().__init__()
        self.urls, self.batch_size = list(urls), batch_size
        # the caption stays text: it is tokenized once per batch (see _EmbedRows.take)
        self.decoder = SampleDecoder(eval_pipeline(transform, max_image_pixels, draft_margin), str, image_keys,
                                     text_key)
        self.images = self.decoder.images
        self.tokenizer = tokenizer
        self.shards, self.chunk_size = list(shards), chunk_size
        self.finished = {s: set(c) for s, c in (finished or {}).items()}

    def __iter__(self) -> Iterator[EmbedBatch]:
        info = get_worker_info()
        worker, count = (info.id, info.num_workers) if info is not None else (0, 1)
        counter, out = SkipCounter(), _EmbedRows()
        for shard in self.shards[worker::count]:
            yield from self._shard(shard, counter, out)
        if out.rows or out.closed_chunks or out.closed_shards:
            yield out.take(self)

    def _shard(self, shard: int, counter: SkipCounter, out: _EmbedRows) -> Iterator[EmbedBatch]:
        done, size = self.finished.get(shard, set()), self.chunk_size
        want = (lambda i: i // size not in done) if done else None
        current = None
        for index, sample in read_shard(self.urls[shard], counter, want):
            chunk = index // size
            if chunk != current:
                if current is not None:
                    out.closed_chunks.append((shard, current, counter.take()))
                current = chunk
            row = self._row(sample, counter)
            if row is not None:
                out.rows.append(row)
                out.chunks.append((shard, chunk))
                if len(out.rows) == self.batch_size:
                    yield out.take(self)
        if current is not None:  # damage found at the end of the shard is counted with its last chunk
            out.closed_chunks.append((shard, current, counter.take()))
        out.closed_shards.append((shard, counter.take()))

    def _row(self, sample: dict, counter: SkipCounter) -> tuple | None:
        sample["__aug__"] = 0  # evaluation transforms draw nothing at random
        item = self.decoder(sample, counter)
        if item is None:
            return None
        meta = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (UnicodeDecodeError, ValueError) as e:
                return counter.skip("bad_json", f"{sample['__url__']}:{sample['__key__']}", e)
            if not isinstance(meta, dict):
                return counter.skip("bad_json", f"{sample['__url__']}:{sample['__key__']}", "not a JSON object")
        image, caption, key = item
        return image, caption, key, meta


def build_embed_loader(urls: list[str], transform: Callable, tokenizer: Callable, batch_size: int, shards: list[int],
                       chunk_size: int, finished: dict[int, set[int]] | None = None, *, workers: int = 1,
                       draft_margin: int = 2, **keys) -> DataLoader:
    """A loader of EmbedBatch for `shards` (indices into `urls`), read by `workers` processes."""
    stream = EmbedStream(urls, transform, tokenizer, batch_size, shards, chunk_size, finished,
                         draft_margin=draft_margin, **keys)
    # One pass: the workers end (and are joined) with it, instead of living on with the loader.
    return DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=keep_batch,
                      prefetch_factor=2 if workers > 0 else None)
