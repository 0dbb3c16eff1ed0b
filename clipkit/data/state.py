"""Where a rank's training stream stands, for checkpoints: resume continues the epoch exactly.

Each batch carries a StreamPosition: which loader worker made it and how far that worker is into
its epoch (samples released by its shuffle buffer, samples read from each of its shards, and, with
data.length_buckets, the ids of the released samples still waiting in a length bucket). The
trainer folds the batches it actually consumes into a StreamState:

    state = StreamState(resume_state)          # None on a fresh start
    loader = build_train_loader(..., resume_state=resume_state)
    for batch in loader:
        state.observe(batch)
        ...
        checkpoint["data"] = state.state_dict()  # plain, picklable data; one per rank

Batches a worker prefetched but the trainer never consumed are not in the state, so a resumed
stream delivers them again; batches consumed are never delivered again.

Elastic resume: the states of all W ranks (each with K loader workers) of a checkpoint, in rank order,
become W' states for a run with W' ranks and K' workers:

    states = repartition([rank0_state, ..., rank{W-1}_state], world_size=W', workers=K', urls=urls,
                         factors=factors)   # or loader.repartition_train_states(cfg.data, ...)
    state = states[new_rank]                # then StreamState(state) and build_train_loader(resume_state=state)

What the old workers had not delivered of the epochs they were in (samples waiting in their shuffle
buffers, the rest of the shard each was reading, the shards each had not started; a worker ahead of
another has finished epochs the other has not) is dealt out to the new workers as lists of shard pieces,
which they read as their first epochs; then every epoch is dealt by the new layout as usual. Over each
epoch every sample is still delivered exactly once; the batches differ from an uninterrupted run.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Callable

from .order import Piece, ShardPlan, ShuffleBuffer, buffer_rng, remainder
from .shards import ShardSpecError
from .tario import count_samples

FORMAT = "clipkit-stream-v1"


class StreamStateError(ShardSpecError):
    """A resume state that does not fit the loader it is given to; the message says what changed."""


@dataclass(frozen=True)
class StreamPosition:
    worker: int  # the logical worker whose stream made the batch
    epoch: int  # of the batch's last sample
    emitted: int  # samples the worker's shuffle buffer had released in that epoch
    shard_counts: tuple[int, ...]  # samples read so far from each of the worker's shards of the epoch
    fingerprint: dict = field(default_factory=dict)
    resume_token: str | None = None  # identifies the resume state the loader was built with
    # released samples waiting in a length bucket, as (shard, index, release number), in bucket order
    pool: tuple[tuple[int, int, int], ...] = ()


def fingerprint(urls: list[str], factors: list[float] | None, *, seed: int, resampled: bool,
                shuffle_buffer: int, rank: int, world_size: int, num_workers: int,
                length_buckets: tuple[int, ...] | list[int] | None = ()) -> dict:
    """What must stay the same for a saved position to mean the same samples."""
    digest = hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]
    weights = hashlib.sha256(json.dumps(factors).encode()).hexdigest()[:16] if factors else None
    out = {"shards": len(urls), "shard_list": digest, "weights": weights, "seed": seed,
           "resampled": resampled, "shuffle_buffer": shuffle_buffer, "rank": rank,
           "world_size": world_size, "workers": num_workers}
    if length_buckets:  # only then: states saved without bucketing keep their fingerprint
        out["length_buckets"] = list(length_buckets)
    return out


_WHAT = {
    "shards": "the number of shards (data.train)",
    "shard_list": "the shard list (data.train: same count, other URLs or order)",
    "weights": "the source weights (data.train_weights)",
    "seed": "the data seed (run.seed)",
    "resampled": "data.resampled",
    "shuffle_buffer": "data.shuffle_buffer",
    "rank": "the rank this state belongs to",
    "world_size": "the number of ranks",
    "workers": "the number of loader workers (data.workers)",
    "length_buckets": "data.length_buckets",
}


def state_token(resume_state: dict | None) -> str | None:
    if resume_state is None:
        return None
    return hashlib.sha256(json.dumps(resume_state, sort_keys=True).encode()).hexdigest()[:16]


def _check_format(resume_state) -> None:
    if not isinstance(resume_state, dict) or resume_state.get("format") != FORMAT:
        raise StreamStateError(f"resume_state is not a {FORMAT} state (got {type(resume_state).__name__}); "
                               f"pass the dict StreamState.state_dict() returned")


def check_resume_state(resume_state: dict, current: dict) -> None:
    """Raise StreamStateError naming every setting that differs from the checkpoint's."""
    _check_format(resume_state)
    saved = resume_state["fingerprint"]
    if not saved:  # saved before any batch was consumed: nothing to continue
        return
    keys = list(current) + [k for k in saved if k not in current]
    changed = [f"{_WHAT.get(k, k)}: {saved.get(k)!r} at the checkpoint, {current.get(k)!r} now"
               for k in keys if saved.get(k) != current.get(k)]
    if changed:
        relayout = any(saved.get(k) != current.get(k) for k in ("world_size", "workers"))
        hint = (" A checkpoint can continue on another number of ranks or loader workers once all its ranks' "
                "states are passed through clipkit.data.repartition." if relayout else "")
        raise StreamStateError("cannot continue the data stream of the checkpoint, because " + "; ".join(changed)
                               + ". Resume with the settings of the checkpointed run, or start the data "
                               "stream afresh without its resume state." + hint)
    for entry in resume_state.get("residual", ()):
        if len(entry["workers"]) != saved["workers"]:
            raise StreamStateError(f"the resume state's epoch {entry['epoch']} lists pieces for "
                                   f"{len(entry['workers'])} workers, not {saved['workers']}")


class StreamState:
    """One rank's position in its training stream, built from the batches the trainer consumed."""

    def __init__(self, resume_state: dict | None = None) -> None:
        self._token = state_token(resume_state)
        self.fingerprint: dict | None = None
        self.workers: list[dict | None] = []
        self.next_worker = 0
        # After an elastic resume: per epoch, the shard pieces each of this rank's workers reads in it
        self.residual: list[dict] = []
        if resume_state is not None:
            check_resume_state(resume_state, resume_state.get("fingerprint", {}))
            self.fingerprint = dict(resume_state["fingerprint"])
            self.workers = copy.deepcopy(resume_state["workers"])
            self.next_worker = resume_state["next_worker"]
            self.residual = copy.deepcopy(resume_state.get("residual", []))

    def observe(self, batch) -> None:
        pos: StreamPosition | None = getattr(batch, "position", None)
        if pos is None:
            raise StreamStateError("this batch carries no stream position (it does not come from "
                                   "build_train_loader)")
        # Workers that passed a whole epoch without a usable sample, in loader order before this batch
        for passed in getattr(batch, "empty_passes", ()):
            self._record(passed)
        self._record(pos)
        self.next_worker = (pos.worker + 1) % len(self.workers)

    def _record(self, pos: StreamPosition) -> None:
        if pos.resume_token != self._token:
            raise StreamStateError("the loader was built with another resume_state than this StreamState: "
                                   "create both from the same checkpointed state (StreamState(state) and "
                                   "build_train_loader(..., resume_state=state))")
        if self.fingerprint is None:
            self.fingerprint = dict(pos.fingerprint)
            self.workers = [None] * pos.fingerprint["workers"]
        elif pos.fingerprint != self.fingerprint:
            raise StreamStateError("batches from two different loaders were observed by one StreamState")
        self.workers[pos.worker] = {"epoch": pos.epoch, "emitted": pos.emitted,
                                    "shard_counts": list(pos.shard_counts)}
        if pos.pool:
            self.workers[pos.worker]["pool"] = [list(p) for p in pos.pool]

    def state_dict(self) -> dict:
        state = {"format": FORMAT, "fingerprint": dict(self.fingerprint or {}),
                 "workers": copy.deepcopy(self.workers), "next_worker": self.next_worker}
        oldest = min((w["epoch"] if w else 0 for w in self.workers), default=0)
        residual = [copy.deepcopy(e) for e in self.residual if e["epoch"] >= oldest]  # epochs all workers left: done
        if residual:
            state["residual"] = residual
        return state

    def load_state_dict(self, state: dict) -> None:
        self.__init__(state)


# -- elastic resume ---------------------------------------------------------------------------------


def fresh_state() -> dict:
    """The state of a stream nothing has been consumed from."""
    return {"format": FORMAT, "fingerprint": {}, "workers": [], "next_worker": 0}


def repartition(states: list[dict], world_size: int, workers: int, urls: list[str],
                factors: list[float] | None = None) -> list[dict]:
    """The resume states for `world_size` ranks of `workers` loader workers each (0 counts as 1, as in
    data.workers=0), from the saved states of every rank of a checkpoint (StreamState.state_dict() of
    ranks 0..W-1, in rank order). `urls` and `factors` are the run's shards and per-shard upsampling
    factors (shards.expand_sources of data.train and data.train_weights); they must be those of the
    checkpoint. The same layout gets its states back unchanged (an exact resume, batch for batch).

    Another layout continues each epoch the old workers were in with what they had not delivered, dealt
    to the new workers, so that over the epoch every sample is delivered exactly once; the following
    epochs are dealt by the new layout. Returns one state per new rank, in rank order."""
    new_workers = max(1, workers)
    if world_size < 1:
        raise StreamStateError(f"cannot repartition a data stream to {world_size} ranks")
    if not isinstance(states, (list, tuple)) or not states:
        raise StreamStateError("repartition needs the saved data states of every rank of the checkpoint, in "
                               "rank order (a list of StreamState.state_dict() results)")
    for state in states:
        _check_format(state)
    prints = [state["fingerprint"] for state in states]
    if not any(prints):  # nothing was consumed anywhere: every new rank starts afresh
        return [fresh_state() for _ in range(world_size)]
    ref = next(fp for fp in prints if fp)
    old_ranks, old_workers = ref["world_size"], ref["workers"]
    if len(states) != old_ranks:
        raise StreamStateError(f"{len(states)} data states given for a checkpoint of {old_ranks} ranks: pass the "
                               f"saved data state of every rank, in rank order")
    for rank, fp in enumerate(prints):
        if not fp:
            continue
        if fp.get("rank") != rank:
            raise StreamStateError(f"data state #{rank} belongs to rank {fp.get('rank')}: pass every rank's "
                                   f"state in rank order")
        other = [k for k in ref if k != "rank" and fp.get(k) != ref[k]]
        if other:
            raise StreamStateError(f"the data states of ranks 0 and {rank} come from different runs "
                                   f"({', '.join(_WHAT.get(k, k) for k in other)} differ)")
    current = fingerprint(urls, factors, seed=ref["seed"], resampled=ref["resampled"],
                          shuffle_buffer=ref["shuffle_buffer"], rank=0, world_size=old_ranks, num_workers=old_workers,
                          length_buckets=ref.get("length_buckets"))
    check_resume_state({"format": FORMAT, "fingerprint": {**ref, "rank": 0}}, current)
    if (old_ranks, old_workers) == (world_size, new_workers):
        return copy.deepcopy(list(states))

    def plan(rank: int, ranks: int, count: int) -> ShardPlan:
        return ShardPlan(tuple(urls), tuple(factors) if factors else None, ref["seed"], ref["resampled"], True,
                         rank, ranks, count)

    # Each old worker: its epoch, and per epoch from there on what it still has to deliver.
    left: list[tuple[int, dict[int, list[Piece]], Callable[[int], list[Piece]]]] = []
    for rank, state in enumerate(states):
        residual = {e["epoch"]: e["workers"] for e in state.get("residual", ())}
        saved = state["workers"] if state["fingerprint"] else []
        saved = list(saved) + [None] * (old_workers - len(saved))
        rank_plan = plan(rank, old_ranks, old_workers)
        for worker in range(old_workers):
            def pieces(epoch: int, worker=worker, residual=residual, rank_plan=rank_plan) -> list[Piece]:
                if epoch in residual:
                    return [Piece.from_json(p) for p in residual[epoch][worker]]
                return rank_plan.worker_pieces(epoch, worker)
            pos = saved[worker]
            if pos is None:
                left.append((0, {}, pieces))
                continue
            buffer = ShuffleBuffer(ref["shuffle_buffer"], buffer_rng(ref["seed"], pos["epoch"], rank, worker))
            try:
                waiting = [(s, j) for s, j, _ in pos.get("pool", ())]  # released, not yet in a batch
                rest = remainder(pieces(pos["epoch"]), pos["shard_counts"], pos["emitted"], buffer, waiting)
            except ValueError as e:
                raise StreamStateError(f"the data state of rank {rank} worker {worker} does not fit its shards: {e}")
            left.append((pos["epoch"], {pos["epoch"]: rest}, pieces))

    first = min(epoch for epoch, _, _ in left)
    last = max(epoch for epoch, _, _ in left)
    residual_epochs = []
    for epoch in range(first, last + 1):
        per_worker = []
        for at, rest, pieces in left:
            if epoch < at:
                per_worker.append([])
            else:
                per_worker.append(rest[epoch] if epoch in rest else pieces(epoch))
        # interleave the old workers' pieces, then deal them as epoch lists are dealt: rank, then worker
        order = [p for group in itertools.zip_longest(*per_worker) for p in group if p is not None]
        residual_epochs.append((epoch, order))

    counts: dict[int, int] = {}

    def size(piece: Piece) -> int:
        if piece.start is None:
            return len(piece.extra)
        if piece.shard not in counts:
            counts[piece.shard] = count_samples(urls[piece.shard])
        return len(piece.extra) + max(0, counts[piece.shard] - piece.start)

    # the new workers of rank r are r, r + W', r + 2W', ...: every one gets an equal share (to one sample)
    dealt = [(epoch, _deal(order, world_size * new_workers, size)) for epoch, order in residual_epochs]
    out = []
    for rank in range(world_size):
        fp = {**ref, "rank": rank, "world_size": world_size, "workers": new_workers}
        residual = [{"epoch": epoch, "workers": [[p.to_json() for p in shares[w * world_size + rank]]
                                                 for w in range(new_workers)]}
                    for epoch, shares in dealt]
        start = {"epoch": first, "emitted": 0, "shard_counts": []}
        out.append({"format": FORMAT, "fingerprint": fp, "workers": [dict(start) for _ in range(new_workers)],
                    "next_worker": 0, "residual": residual})
    return out


def _deal(order: list[Piece], n: int, size: Callable[[Piece], int]) -> list[list[Piece]]:
    """`order`'s samples in n shares of equal size (to one sample), each a run of `order` in its order:
    ranks that step together then reach the epoch's end together, so no rank starts the next epoch (and
    sees a sample again) while another still delivers this one. A piece is cut where a share ends."""
    sizes = [size(p) for p in order]
    total = sum(sizes)
    room = [total // n + (1 if g < total % n else 0) for g in range(n)]
    shares: list[list[Piece]] = [[] for _ in range(n)]
    g = 0
    for piece, left in zip(order, sizes):
        if left == 0:  # nothing to deliver (or a shard that cannot be read: its reader counts that)
            shares[g].append(piece)
            continue
        while left > 0:
            while room[g] == 0 and g < n - 1:
                g += 1
            take = min(left, room[g]) if g < n - 1 else left
            if take == left:
                shares[g].append(piece)
            else:
                head, piece = _cut(piece, take)
                shares[g].append(head)
            room[g] -= take
            left -= take
    return shares


def _cut(piece: Piece, k: int) -> tuple[Piece, Piece]:
    """The first k samples of a piece (in reading order: its listed samples, then from `start` on), and the rest."""
    if k <= len(piece.extra):
        return Piece(piece.shard, None, piece.extra[:k]), Piece(piece.shard, piece.start, piece.extra[k:])
    cut = piece.start + k - len(piece.extra)
    return Piece(piece.shard, None, piece.extra + tuple(range(piece.start, cut))), Piece(piece.shard, cut, ())
