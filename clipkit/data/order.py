"""The order in which one loader worker reads samples: which shards in which epoch, and the shuffle
buffer over their samples. Everything is a pure function of (seed, epoch, rank, worker), which is
what lets a resumed run rebuild a worker's exact position from a few integers.

Epoch mode: every epoch lists each shard round(factor) times (factor 1 without weights; a fractional
part picks that share of the source's shards at random, per epoch), shuffles the list with a seed
shared by all ranks, and deals it out: rank r takes list[r::ranks], its worker w takes [w::workers].
No two workers of the run read the same list entry.

Resampled mode (OpenCLIP's --dataset-resampled): each worker draws shards with replacement, with
probability proportional to their factor, as many per epoch as epoch mode would give it.

A worker's epoch is a list of Pieces: normally whole shards; after an elastic resume (state.py's
repartition) also parts of shards that other workers of another layout had started: the samples of a
shard from some index on, and single samples that were waiting in a shuffle buffer.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Hashable, Iterator


@dataclass(frozen=True)
class ShardPlan:
    urls: tuple[str, ...]
    factors: tuple[float, ...] | None  # per-shard upsampling factor; None: all 1
    seed: int
    resampled: bool
    shuffle: bool
    rank: int
    world_size: int
    num_workers: int

    def epoch_list(self, epoch: int) -> list[int]:
        """Indices into urls making up one epoch of the whole run (all ranks and workers)."""
        if self.factors is None:
            order = list(range(len(self.urls)))
        else:
            order = self._upsampled(epoch)
        if self.shuffle:
            random.Random(f"{self.seed}/shards/{epoch}").shuffle(order)
        return order

    def _upsampled(self, epoch: int) -> list[int]:
        rng = random.Random(f"{self.seed}/upsample/{epoch}")
        order: list[int] = []
        for factor, members in self._sources():
            whole, frac = divmod(factor, 1.0)
            order.extend(members * int(whole))
            order.extend(sorted(rng.sample(members, round(frac * len(members)))))
        return order

    def _sources(self) -> list[tuple[float, list[int]]]:
        """Shards grouped by factor (all shards of one "::" source share their factor)."""
        groups: dict[float, list[int]] = {}
        for i, f in enumerate(self.factors or ()):
            groups.setdefault(f, []).append(i)
        return list(groups.items())

    def epoch_length(self) -> int:
        return len(self.epoch_list(0)) if not self.resampled else self._resampled_total()

    def _resampled_total(self) -> int:
        total = sum(self.factors) if self.factors else len(self.urls)
        return max(1, round(total))

    def worker_shards(self, epoch: int, worker: int) -> list[str]:
        """The shard URLs (repeats possible) worker `worker` of this rank reads in `epoch`."""
        return [self.urls[i] for i in self.worker_shard_indices(epoch, worker)]

    def worker_shard_indices(self, epoch: int, worker: int) -> list[int]:
        """Indices into urls of the shards (repeats possible) worker `worker` of this rank reads in `epoch`."""
        if not self.resampled:
            return self.epoch_list(epoch)[self.rank::self.world_size][worker::self.num_workers]
        draws = math.ceil(self._resampled_total() / (self.world_size * self.num_workers))
        rng = random.Random(f"{self.seed}/resample/{epoch}/{self.rank}/{worker}")
        # choices draws the same way from any population of this length: these are worker_shards' picks
        return rng.choices(range(len(self.urls)), weights=self.factors, k=draws)

    def worker_pieces(self, epoch: int, worker: int) -> list["Piece"]:
        return [Piece(i) for i in self.worker_shard_indices(epoch, worker)]


def buffer_rng(seed: int, epoch: int, rank: int, worker: int) -> random.Random:
    """The shuffle buffer's RNG of one worker in one epoch."""
    return random.Random(f"{seed}/samples/{epoch}/{rank}/{worker}")


@dataclass(frozen=True)
class Piece:
    """What a worker reads of one shard in an epoch: the samples from index `start` on (None: none of
    them), and the samples listed in `extra` (all below `start`). A whole shard is Piece(shard)."""
    shard: int  # index into the run's shard list
    start: int | None = 0
    extra: tuple[int, ...] = ()

    @property
    def whole(self) -> bool:
        return self.start == 0 and not self.extra

    def ids(self, count: int) -> Iterator[int]:
        """The sample indices of this piece below `count`, in reading order."""
        for j in self.extra:
            if j >= count:
                return
            yield j
        if self.start is not None:
            yield from range(self.start, count)

    def to_json(self) -> list:
        return [self.shard, self.start, list(self.extra)]

    @classmethod
    def from_json(cls, value) -> "Piece":
        shard, start, extra = value
        return cls(int(shard), None if start is None else int(start), tuple(sorted(int(j) for j in extra)))


class ShuffleBuffer:
    """The sample shuffle: once `size` items are held, each new item releases a random held one;
    the rest leave in random order at the end of the epoch. Items here are sample ids; the
    samples themselves wait beside the buffer, so replaying the shuffle needs no sample data."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size = size
        self.rng = rng
        self.items: list[Hashable] = []

    def push(self, item: Hashable) -> Hashable | None:
        if self.size <= 1:
            return item
        self.items.append(item)
        if len(self.items) < self.size:
            return None
        i = self.rng.randrange(len(self.items))
        self.items[i], self.items[-1] = self.items[-1], self.items[i]
        return self.items.pop()

    def drain(self) -> list[Hashable]:
        self.rng.shuffle(self.items)
        out, self.items = self.items, []
        return out


@dataclass
class Replay:
    """Where a worker stands after `emitted` samples of an epoch: the ids still held by the shuffle
    buffer (or, past the last shard, still to be released in order), and the next sample to read."""
    held: list[tuple[int, int]]
    next_shard: int
    next_sample: int
    draining: bool


def replay(counts: list[int], emitted: int, buffer: ShuffleBuffer, pieces: list[Piece] | None = None) -> Replay:
    """Re-run the shuffle on sample ids (shard i has counts[i] samples, as recorded when the
    checkpointed batch was made; with `pieces`, those of pieces[i] below counts[i]) until `emitted` ids
    have left it; leaves `buffer` (its held ids and its RNG) in the state the original run had then."""
    out = 0
    if emitted == 0:
        return Replay([], 0, 0, False)
    for i, n in enumerate(counts):
        for j in (range(n) if pieces is None or pieces[i].whole else pieces[i].ids(n)):
            if buffer.push((i, j)) is not None:
                out += 1
                if out == emitted:
                    return Replay(list(buffer.items), i, j + 1, False)
    rest = buffer.drain()
    left = emitted - out
    if left > len(rest):
        raise ValueError(f"the resume state says {emitted} samples were delivered, but its shards only "
                         f"held {out + len(rest)}")
    return Replay(rest[left:], len(counts), 0, True)


def remainder(pieces: list[Piece], counts: list[int], emitted: int, buffer: ShuffleBuffer,
              waiting: list[tuple[int, int]] = ()) -> list[Piece]:
    """What a worker with these pieces has not yet delivered of its epoch, after `emitted` samples had
    left its shuffle buffer (counts as in replay): the samples still held by the buffer, those `waiting`
    (released but not yet batched: the (piece, index) ids of a length bucket's samples), the rest of the
    shard it was reading, and the shards it had not started."""
    rep = replay(counts, emitted, buffer, pieces)
    held: dict[int, list[int]] = {}
    for i, j in list(rep.held) + list(waiting):
        held.setdefault(i, []).append(j)
    out = []
    done = len(pieces) if rep.draining else rep.next_shard
    for i, piece in enumerate(pieces):
        if i < done:  # read to its end: only what the buffer still holds is left
            if i in held:
                out.append(Piece(piece.shard, None, tuple(sorted(held[i]))))
        elif i == rep.next_shard and rep.next_sample > 0:  # read up to next_sample
            cut = rep.next_sample
            extra = tuple(sorted(set(held.get(i, ())) | {j for j in piece.extra if j >= cut}))
            start = None if piece.start is None else max(piece.start, cut)
            if start is not None or extra:
                out.append(Piece(piece.shard, start, extra))
        else:
            out.append(piece)
    return out
