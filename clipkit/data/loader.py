"""The training loader: a DataLoader over a rank's ShardStream (stream.py), whose workers make whole
batches, with the empty-pass screen that turns data with nothing usable in it into NoUsableSamples
instead of an endless loop; and the build and elastic-resume entry points the trainer calls.
"""
from __future__ import annotations

from typing import Callable

from torch.utils.data import DataLoader

from .order import ShardPlan
from .sample import Tokenize, keep_batch
from .shards import ShardSpecError, expand_sources
from .state import repartition
from .stream import EmptyPass, ShardStream, no_usable_samples

__all__ = ["StreamLoader", "build_train_loader", "make_loader", "repartition_train_states"]


class StreamLoader(DataLoader):
    """The DataLoader of a ShardStream (batches made in the workers). It takes the workers' EmptyPass
    reports out of the stream: their skip counts and positions go with the next batch (Batch.skipped,
    Batch.empty_passes), and once every worker of the rank has reported a whole epoch without a usable
    sample, with no batch in between (or the stream ends with no batch at all), iterating raises
    NoUsableSamples in the process that iterates (the training process)."""

    def __init__(self, stream: ShardStream, workers: int, prefetch: int = 2) -> None:
        stream.report_empty_passes = True
        super().__init__(stream, batch_size=None, num_workers=workers, collate_fn=keep_batch,
                         persistent_workers=workers > 0,
                         prefetch_factor=prefetch if workers > 0 else None)

    def __iter__(self):
        return _Screened(super().__iter__(), self.dataset, max(1, self.num_workers))


class _Screened:
    def __init__(self, batches, stream: ShardStream, workers: int) -> None:
        self.batches, self.stream, self.workers = batches, stream, workers
        self.pending: list[EmptyPass] = []
        self.delivered = False

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            try:
                item = next(self.batches)
            except StopIteration:
                if self.pending and not self.delivered:
                    raise no_usable_samples(self.stream, self.pending) from None
                raise
            if isinstance(item, EmptyPass):
                self.pending.append(item)
                if len({p.worker for p in self.pending}) >= self.workers:
                    raise no_usable_samples(self.stream, self.pending)
                continue
            if self.pending:
                skipped = dict(item.skipped)
                for p in self.pending:
                    for reason, n in p.skipped.items():
                        skipped[reason] = skipped.get(reason, 0) + n
                item.skipped = skipped
                item.empty_passes = [p.position for p in self.pending if p.position is not None]
                self.pending = []
            self.delivered = True
            return item


def make_loader(stream: ShardStream, workers: int, prefetch: int = 2) -> DataLoader:
    return StreamLoader(stream, workers, prefetch)


def build_train_loader(cfg, *, transform: Callable, tokenizer: Callable, local_batch_size: int,
                       rank: int = 0, world_size: int = 1, seed: int = 0, resume_state: dict | None = None,
                       epochs: int | None = None) -> DataLoader:
    """A loader of this rank's (images, caption tokens) batches of local_batch_size, from cfg.train.

    cfg is the run config's `data` section (a clipkit.config.DataConfig; data does not import the config
    module, which sits above it): the spec, its upsampling factors (train_weights), resampled or epoch
    mode, workers, shuffle buffer, caption-length buckets, member keys, image size limit and
    normalize_on_device. The rest are runtime facts: where this rank stands, the seed, the stream state from
    this rank's checkpoint (same spec, seed, ranks and workers), and epochs (None streams forever). With normalize_on_device, batches
    hold uint8 images: apply `loader.dataset.normalize` to them where they arrive (on the GPU), which moves
    a quarter of the bytes between processes and to the device.

    A checkpoint of another number of ranks or workers: pass states[rank] of repartition_train_states.
    Data with no usable sample raises NoUsableSamples from the loader's iterator (see StreamLoader)."""
    if cfg.train is None:
        raise ShardSpecError("data.train names no shards")
    urls, factors = expand_sources(cfg.train, cfg.train_weights)
    workers = cfg.workers
    plan = ShardPlan(tuple(urls), tuple(factors) if factors else None, seed, cfg.resampled, True, rank, world_size,
                     max(1, workers))
    if not cfg.resampled and plan.epoch_length() < world_size * max(1, workers):
        raise ShardSpecError(f"{plan.epoch_length()} shards per epoch cannot be dealt to {world_size} ranks x "
                             f"{max(1, workers)} loader workers without leaving some idle: use more shards, "
                             f"fewer data.workers, or data.resampled=true")
    stream = ShardStream(urls, transform, Tokenize(tokenizer), local_batch_size, rank=rank, world_size=world_size,
                         seed=seed, shuffle_buffer=cfg.shuffle_buffer, image_keys=cfg.image_key,
                         text_key=cfg.caption_key, epochs=epochs, factors=factors, resampled=cfg.resampled,
                         num_workers=workers, max_image_pixels=cfg.max_image_pixels, resume_state=resume_state,
                         normalize_on_device=cfg.normalize_on_device, length_buckets=cfg.length_buckets)
    return make_loader(stream, workers, cfg.prefetch)


def repartition_train_states(cfg, states: list[dict], *, world_size: int) -> list[dict]:
    """The data stream states for `world_size` ranks with cfg.workers loader workers each, from the saved
    states of all ranks of a checkpoint (rank order), for build_train_loader(resume_state=states[rank]).
    cfg is the run config's `data` section, as for build_train_loader. Unchanged when the checkpoint had
    this layout (an exact resume); see state.repartition for another one."""
    urls, factors = expand_sources(cfg.train, cfg.train_weights)
    return repartition(states, world_size, cfg.workers, urls, factors)

