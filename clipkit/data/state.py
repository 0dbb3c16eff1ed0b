"""Where a rank's training stream stands, for checkpoints: resume continues the epoch exactly.

Each batch carries a StreamPosition: which loader worker made it and how far that worker is into
its epoch (samples released by its shuffle buffer, samples read from each of its shards). The
trainer folds the batches it actually consumes into a StreamState:

    state = StreamState(resume_state)          # None on a fresh start
    loader = build_train_loader(..., resume_state=resume_state)
    for batch in loader:
        state.observe(batch)
        ...
        checkpoint["data"] = state.state_dict()  # plain, picklable data; one per rank

Batches a worker prefetched but the trainer never consumed are not in the state, so a resumed
stream delivers them again; batches consumed are never delivered again.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field

from .shards import ShardSpecError

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


def fingerprint(urls: list[str], factors: list[float] | None, *, seed: int, resampled: bool,
                shuffle_buffer: int, rank: int, world_size: int, num_workers: int) -> dict:
    """What must stay the same for a saved position to mean the same samples."""
    digest = hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]
    weights = hashlib.sha256(json.dumps(factors).encode()).hexdigest()[:16] if factors else None
    return {"shards": len(urls), "shard_list": digest, "weights": weights, "seed": seed,
            "resampled": resampled, "shuffle_buffer": shuffle_buffer, "rank": rank,
            "world_size": world_size, "workers": num_workers}


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
}


def state_token(resume_state: dict | None) -> str | None:
    if resume_state is None:
        return None
    return hashlib.sha256(json.dumps(resume_state, sort_keys=True).encode()).hexdigest()[:16]


def check_resume_state(resume_state: dict, current: dict) -> None:
    """Raise StreamStateError naming every setting that differs from the checkpoint's."""
    if not isinstance(resume_state, dict) or resume_state.get("format") != FORMAT:
        raise StreamStateError(f"resume_state is not a {FORMAT} state (got {type(resume_state).__name__}); "
                               f"pass the dict StreamState.state_dict() returned")
    saved = resume_state["fingerprint"]
    if not saved:  # saved before any batch was consumed: nothing to continue
        return
    changed = [f"{_WHAT.get(k, k)}: {saved.get(k)!r} at the checkpoint, {current[k]!r} now"
               for k in current if saved.get(k) != current[k]]
    if changed:
        raise StreamStateError("cannot continue the data stream of the checkpoint, because " + "; ".join(changed)
                               + ". Resume with the settings of the checkpointed run, or start the data "
                               "stream afresh without its resume state.")


class StreamState:
    """One rank's position in its training stream, built from the batches the trainer consumed."""

    def __init__(self, resume_state: dict | None = None) -> None:
        self._token = state_token(resume_state)
        self.fingerprint: dict | None = None
        self.workers: list[dict | None] = []
        self.next_worker = 0
        if resume_state is not None:
            check_resume_state(resume_state, resume_state.get("fingerprint", {}))
            self.fingerprint = dict(resume_state["fingerprint"])
            self.workers = copy.deepcopy(resume_state["workers"])
            self.next_worker = resume_state["next_worker"]

    def observe(self, batch) -> None:
        pos: StreamPosition | None = getattr(batch, "position", None)
        if pos is None:
            raise StreamStateError("this batch carries no stream position (it does not come from "
                                   "build_train_loader)")
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
        self.next_worker = (pos.worker + 1) % len(self.workers)

    def state_dict(self) -> dict:
        return {"format": FORMAT, "fingerprint": dict(self.fingerprint or {}),
                "workers": copy.deepcopy(self.workers), "next_worker": self.next_worker}

    def load_state_dict(self, state: dict) -> None:
        self.__init__(state)
