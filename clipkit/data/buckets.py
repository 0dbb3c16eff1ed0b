"""How a loader worker groups its decoded samples into batches.

Consecutive (the default): batches of consecutive samples, running on across epoch boundaries.

LengthBuckets (data.length_buckets): samples wait in one bucket per caption-length range; a bucket that
reaches the batch size leaves as a batch. At the end of an epoch what still waits leaves bucket by bucket,
shortest first, in batches of the batch size, and the last, partial batch is completed by the next epoch's
first samples, as consecutive batches are. So every batch has the batch size, every sample leaves once, and
nothing is random: the grouping is a function of the order the samples come in, which the seed fixes.

The samples still waiting when a batch leaves are what a checkpoint must hold to continue exactly:
`waiting()` lists them in an order that, added back into empty buckets, rebuilds the same buckets (state.py
records their ids, stream.py reads them again on resume). At most (buckets) x (batch size - 1) samples
wait, decoded.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Callable, Iterator

import torch


def caption_length(tokens: torch.Tensor) -> int:
    """Token ids up to and including the last non-padding one (the end-of-text token; padding is 0)."""
    ids = tokens.nonzero()
    return int(ids[-1]) + 1 if len(ids) else 0


class Consecutive:
    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.items: list = []

    def add(self, item) -> list | None:
        self.items.append(item)
        if len(self.items) < self.batch_size:
            return None
        batch, self.items = self.items, []
        return batch

    def end_epoch(self) -> Iterator[list]:
        return iter(())

    def waiting(self) -> list:
        return []  # a batch leaves with every sample that was waiting

    def holding(self) -> bool:
        return bool(self.items)

    def rest(self) -> list:
        rest, self.items = self.items, []
        return rest


class LengthBuckets:
    """`edges`: increasing upper bounds of caption length; longer captions share one last bucket."""

    def __init__(self, edges: tuple[int, ...], batch_size: int, length: Callable[[object], int]) -> None:
        self.edges, self.batch_size, self.length = tuple(edges), batch_size, length
        self.buckets: list[list] = [[] for _ in range(len(self.edges) + 1)]
        self.flushing: list = []  # what still waits while an epoch's leftovers leave
        self.carry: list = []  # a partial batch from an epoch's end, completed by the next samples

    def add(self, item) -> list | None:
        if self.carry:
            self.carry.append(item)
            if len(self.carry) < self.batch_size:
                return None
            batch, self.carry = self.carry, []
            return batch
        i = bisect_left(self.edges, self.length(item))
        self.buckets[i].append(item)
        if len(self.buckets[i]) < self.batch_size:
            return None
        batch, self.buckets[i] = self.buckets[i], []
        return batch

    def end_epoch(self) -> Iterator[list]:
        left = [item for bucket in self.buckets for item in bucket]  # empty while a carry is being filled
        self.buckets = [[] for _ in self.buckets]
        while len(left) >= self.batch_size:
            batch, self.flushing = left[:self.batch_size], left[self.batch_size:]
            yield batch
            left = self.flushing
        self.flushing = []
        self.carry += left

    def waiting(self) -> list:
        """The samples left behind by the batch that just left, bucket by bucket, each bucket in arrival order.
        (No carry then: a carry only forms after an epoch's last batch and leaves as the next batch.)"""
        assert not self.carry, "a batch left while a carried partial batch was waiting"
        return list(self.flushing) + [item for bucket in self.buckets for item in bucket]

    def holding(self) -> bool:
        return bool(self.carry or self.flushing or any(self.buckets))

    def rest(self) -> list:
        rest = self.carry + [item for bucket in self.buckets for item in bucket]
        self.__init__(self.edges, self.batch_size, self.length)
        return rest
