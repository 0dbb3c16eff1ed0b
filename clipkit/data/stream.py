"""The training stream: (image, caption) samples from webdataset tar shards, as batches made in the loader
workers (loader.py runs it for training; eval_loaders.py runs it as one ordered pass).

    shards (per epoch: weighted, shuffled with seed+epoch, dealt to ranks, then to loader workers;
            or drawn with replacement in resampled mode)
      -> tar members grouped into samples -> shuffle buffer -> decode + augment + tokenize (sample.py)
      -> batches (of consecutive samples, or of similar caption length with data.length_buckets: buckets.py)

Every batch records where its worker stands in its stream (Batch.position); see state.py for how a
checkpoint turns those into an exact resume, and into an elastic one on another number of ranks or
workers. Bad samples never stop a run and never vanish silently: every skipped sample or shard is
counted by reason in the worker that met it (skips.py), and the counts travel to the trainer with the
next batch.

Data with nothing usable in it does stop a training stream, instead of looping over its epochs for
ever: a worker that reads a whole epoch of its shards without one usable sample reports it (an
EmptyPass item, which the StreamLoader of loader.py takes out of the stream; a worker in a plain
DataLoader stops, or raises when it is the only one), and when every worker of the rank has reported
one with no batch in between, the loader raises NoUsableSamples: one line with the skip counts and
the setting most likely at fault. One worker with only bad shards among good ones delays its rank by
its reads, never hangs it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..config.schema import DEFAULT_IMAGE_KEY
from .buckets import Consecutive, LengthBuckets, caption_length
from .decode import DEFAULT_MAX_IMAGE_PIXELS, image_pipeline
from .order import Piece, Replay, ShardPlan, ShuffleBuffer, buffer_rng, replay
from .sample import Batch, SampleDecoder
from .shards import ShardSpecError
from .skips import SkipCounter
from .state import StreamPosition, StreamStateError, check_resume_state, fingerprint, state_token
from .tario import read_shard

log = logging.getLogger("clipkit.data")

__all__ = ["EmptyPass", "NoUsableSamples", "ShardStream", "no_usable_samples"]


@dataclass
class EmptyPass:
    """A worker's report, in place of a batch, that it read a whole epoch of its shards without one
    usable sample. make_loader's loader takes it out of the stream (see StreamLoader)."""
    worker: int
    epoch: int
    shards: int  # shards (or pieces of shards) the worker read in that epoch
    skipped: dict[str, int]  # skips counted since the worker's previous batch or report
    members: tuple[str, ...]  # the member extensions its samples had
    position: StreamPosition | None  # the worker's position after the epoch (None: a batch is half made)


@dataclass(frozen=True)
class _EpochEnd:
    epoch: int
    pieces: int
    whole: bool  # a full epoch was read (not the rest of one after a resume, nor an elastic remainder)


class NoUsableSamples(ShardSpecError):
    """The data has nothing to train on: every worker of a rank read a whole epoch without a usable sample.
    `skipped`: what that pass skipped, by reason (empty when re-raised from a plain DataLoader's worker)."""

    def __init__(self, message: str, skipped: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.skipped = dict(skipped or {})


# The most likely fix for each way a pass can come out empty, by the reason counted most.
_HINTS = {
    "missing_caption": lambda s: f"no sample had a '{s.text_key}' caption (data.caption_key)",
    "missing_image": lambda s: f"no sample had an image member {'/'.join(s.image_keys)} (data.image_key)",
    "image_too_large": lambda s: f"every image was larger than data.max_image_pixels={s.max_image_pixels}",
    "image_decode_error": lambda s: "no image could be decoded",
    "caption_not_utf8": lambda s: f"the '{s.text_key}' captions are not UTF-8 text (data.caption_key)",
    "empty_caption": lambda s: f"the '{s.text_key}' captions are empty (data.caption_key)",
    "bad_label": lambda s: f"the '{s.text_key}' members are not integer labels",
    "shard_open_error": lambda s: "no shard could be opened (check the URLs, credentials or pipe commands)",
    "tar_read_error": lambda s: "the shards are damaged or truncated",
    "empty_shard": lambda s: "the shards hold no samples",
    "lost_on_resume": lambda s: "the shards could not be read again after the resume",
}


def no_usable_samples(stream: "ShardStream", passes: list[EmptyPass]) -> NoUsableSamples:
    skipped: dict[str, int] = {}
    members: set[str] = set()
    for p in passes:
        for reason, n in p.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
        members.update(p.members)
    shards = sum(p.shards for p in passes)
    epochs = sorted({p.epoch for p in passes})
    counts = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    where = f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}-{epochs[-1]}"
    text = (f"no usable sample in a whole pass over the {shards} shards of rank {stream.rank} ({where}; skipped: "
            f"{counts or 'nothing'})")
    ranked = sorted((k for k in skipped if k in _HINTS), key=lambda k: -skipped[k])
    if ranked:
        text += ": " + _HINTS[ranked[0]](stream)
        if ranked[0] in ("missing_caption", "missing_image") and members:
            text += f"; the samples have {', '.join(sorted(members)[:12])} members"
    return NoUsableSamples(text, skipped)


class _Tracker:
    """A worker's live position; read when a batch is closed, right after its last sample was read."""

    def __init__(self) -> None:
        self.epoch, self.emitted, self.counts = 0, 0, []
        self.members: set[str] = set()  # member extensions seen in this epoch (for NoUsableSamples)

    def begin(self, epoch: int, emitted: int = 0, counts: list[int] | None = None) -> None:
        self.epoch, self.emitted, self.counts = epoch, emitted, list(counts or [])

    def read(self, shard: int, index: int) -> None:
        while len(self.counts) <= shard:
            self.counts.append(0)
        self.counts[shard] = index + 1


class ShardStream(IterableDataset):
    """A deterministic stream of batches for one rank; each DataLoader worker reads its own share
    of the rank's shards. `epochs=None` streams forever (epoch after epoch)."""

    def __init__(self, urls: list[str], transform: Callable, target: Callable[[str], torch.Tensor],
                 batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 0, image_keys: str = DEFAULT_IMAGE_KEY, text_key: str = "txt",
                 shuffle: bool = True, epochs: int | None = None, *, factors: list[float] | None = None,
                 resampled: bool = False, num_workers: int | None = None,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, resume_state: dict | None = None,
                 normalize_on_device: bool = False, require_samples: bool = True,
                 length_buckets: tuple[int, ...] | list[int] = ()) -> None:
        super().__init__()
        self.urls, self.factors = list(urls), factors
        self.max_image_pixels = max_image_pixels
        # decode + augment + target (tokens or a label) of each sample; uint8 batches when normalize_on_device,
        # normalised by the consumer with self.normalize (see build_train_loader)
        self.decoder = SampleDecoder(image_pipeline(transform, max_image_pixels), target, image_keys, text_key)
        self.normalize = self._defer_normalization() if normalize_on_device else None
        self.batch_size = batch_size
        self.length_buckets = tuple(length_buckets)  # caption-length bucket edges (tokens); () batches in order
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.shuffle, self.resampled, self.epochs = shuffle, resampled, epochs
        self.num_workers = num_workers  # None: whatever the DataLoader runs (no resume then)
        # A whole epoch without a usable sample is an error (see the module doc); reported as EmptyPass items
        # when report_empty_passes (set by StreamLoader, which takes them out of the stream)
        self.require_samples = require_samples
        self.report_empty_passes = False
        self.resume_state = resume_state
        self.resume_token = state_token(resume_state)
        if resume_state is not None:
            if num_workers is None:
                raise StreamStateError("resuming a stream needs its num_workers")
            check_resume_state(resume_state, self.fingerprint(max(1, num_workers)))

    @property
    def images(self):
        """The image pipeline: decodes each sample, collates a batch (decode.image_pipeline)."""
        return self.decoder.images

    @property
    def image_keys(self) -> list[str]:
        return self.decoder.image_keys

    @property
    def text_key(self) -> str:
        return self.decoder.text_key

    def _defer_normalization(self):
        if not hasattr(self.images, "defer_normalization"):
            raise ShardSpecError("data.normalize_on_device needs open_clip's standard training transform "
                                 "(RandomResizedCrop, ToTensor, Normalize); this model's transform is another")
        return self.images.defer_normalization()

    def fingerprint(self, num_workers: int) -> dict:
        return fingerprint(self.urls, self.factors, seed=self.seed, resampled=self.resampled,
                           shuffle_buffer=self.shuffle_buffer, rank=self.rank, world_size=self.world_size,
                           num_workers=num_workers, length_buckets=self.length_buckets)

    def plan(self, num_workers: int) -> ShardPlan:
        return ShardPlan(tuple(self.urls), tuple(self.factors) if self.factors else None, self.seed,
                         self.resampled, self.shuffle, self.rank, self.world_size, num_workers)

    # -- which logical worker this process is -------------------------------------------------------

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, count = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.num_workers is not None and max(1, self.num_workers) != count:
            raise StreamStateError(f"stream built for {self.num_workers} loader workers runs in {count}")
        # DataLoader asks its workers for batches in turn, starting with worker 0. A resumed stream
        # rotates the roles so that its first batch comes from the worker whose turn was next.
        rotation = self.resume_state["next_worker"] if self.resume_state else 0
        return (worker + rotation) % count, count

    # -- stages -------------------------------------------------------------------------------------

    def _samples(self, worker: int, num_workers: int, counter: SkipCounter,
                 tracker: _Tracker) -> Iterator[dict | None | _EpochEnd]:
        plan = self.plan(num_workers)
        state = self.resume_state or {}
        saved = (state.get("workers") or [None] * num_workers)[worker]
        # after an elastic resume: the pieces of shards this worker reads in the epochs the old layout had begun
        residual = {entry["epoch"]: entry["workers"][worker] for entry in state.get("residual", ())}
        epoch = saved["epoch"] if saved else 0
        while self.epochs is None or epoch < self.epochs:
            if epoch in residual:
                pieces = [Piece.from_json(p) for p in residual[epoch]]
            else:
                pieces = plan.worker_pieces(epoch, worker)
                if not pieces:
                    log.warning("rank %d worker %d has no shards in epoch %d (%d shards for %d ranks x %d workers)",
                                self.rank, worker, epoch, len(self.urls), self.world_size, num_workers)
                    return
            resume = saved if saved and saved["epoch"] == epoch and saved["emitted"] else None
            if pieces:
                yield from self._epoch(epoch, worker, pieces, counter, tracker, resume)
            yield _EpochEnd(epoch, len(pieces), whole=resume is None and epoch not in residual)
            epoch += 1

    def _epoch(self, epoch: int, worker: int, pieces: list[Piece], counter: SkipCounter, tracker: _Tracker,
               saved: dict | None) -> Iterator[dict | None]:
        buffer = ShuffleBuffer(self.shuffle_buffer, buffer_rng(self.seed, epoch, self.rank, worker))
        if saved is None:
            rep = Replay([], 0, 0, False)
            tracker.begin(epoch)
        else:  # rebuild the buffer from ids only; no sample before the resume point is decoded
            rep = replay(saved["shard_counts"], saved["emitted"], buffer, pieces)
            counts = saved["shard_counts"] if rep.draining else saved["shard_counts"][:rep.next_shard] + [rep.next_sample]
            tracker.begin(epoch, saved["emitted"], counts)
        # released before the checkpoint but still waiting in a length bucket: (shard, index, release number)
        waiting = [tuple(w) for w in saved.get("pool", ())] if saved else []
        payload: dict[tuple[int, int], dict] = {}
        held = set(rep.held) | {(s, j) for s, j, _ in waiting}
        for shard, index, sample in self._read(pieces, rep, counter, [(s, j) for s, j, _ in waiting]):
            sid = (shard, index)
            payload[sid] = sample
            tracker.members.update(k for k in sample if not k.startswith("__"))
            if sid in held:  # was in the shuffle buffer or a length bucket at the checkpoint
                continue
            if waiting:  # all read before any new sample: they go back into their buckets first
                yield from self._restore(waiting, payload, epoch, worker, counter)
                waiting = []
            tracker.read(shard, index)
            out = buffer.push(sid)
            if out is not None:
                yield self._release(out, payload, epoch, worker, tracker, counter)
        yield from self._restore(waiting, payload, epoch, worker, counter)
        for sid in (rep.held if rep.draining else buffer.drain()):
            yield self._release(sid, payload, epoch, worker, tracker, counter)

    def _read(self, pieces: list[Piece], rep: Replay, counter: SkipCounter,
              waiting: list[tuple[int, int]] = ()) -> Iterator[tuple[int, int, dict]]:
        """(piece, index, sample) in reading order; after a resume, only what is still to come (and the samples
        the shuffle buffer held or that waited in a length bucket)."""
        need: dict[int, set[int]] = {}
        for s, j in list(rep.held) + list(waiting):
            need.setdefault(s, set()).add(j)
        first = len(pieces) if rep.draining else rep.next_shard
        for shard in sorted(set(need) | set(range(first, len(pieces)))):
            piece, wanted = pieces[shard], need.get(shard, set())
            if shard < first:  # only re-fetching held samples: read no further than they go
                want, last = wanted.__contains__, max(wanted)
            else:
                begin = rep.next_sample if shard == first else 0
                extra = wanted | {j for j in piece.extra if j >= begin}
                if piece.start is None:  # single samples of the shard: read no further than they go
                    if not extra:
                        continue
                    want, last = extra.__contains__, max(extra)
                else:
                    start = max(begin, piece.start)
                    want, last = (lambda j, w=extra, s=start: j >= s or j in w), None
            counter.muted = shard < first  # its damage, if any, was counted the first time
            try:
                for index, sample in read_shard(self.urls[piece.shard], counter, want, last):
                    yield shard, index, sample
            finally:
                counter.muted = False

    def _release(self, sid: tuple[int, int], payload: dict, epoch: int, worker: int, tracker: _Tracker,
                 counter: SkipCounter) -> dict | None:
        sample = payload.pop(sid, None)
        if sample is None:  # held at the checkpoint, but its shard cannot be read again now
            counter.skip("lost_on_resume", f"shard #{sid[0]} sample #{sid[1]} of worker {worker}")
        else:
            self._tag(sample, sid, epoch, worker, tracker.emitted)
        tracker.emitted += 1
        return sample

    def _restore(self, waiting: list[tuple[int, int, int]], payload: dict, epoch: int, worker: int,
                 counter: SkipCounter) -> Iterator[dict]:
        """The samples that waited in length buckets at the checkpoint, in their order, as they were released."""
        for shard, index, n in waiting:
            sample = payload.pop((shard, index), None)
            if sample is None:
                counter.skip("lost_on_resume", f"shard #{shard} sample #{index} of worker {worker}")
            else:
                yield self._tag(sample, (shard, index), epoch, worker, n)

    def _tag(self, sample: dict, sid: tuple[int, int], epoch: int, worker: int, n: int) -> dict:
        """The n-th sample its worker released in the epoch: its augmentation seed and where it comes from."""
        sample["__aug__"] = f"{self.seed}/aug/{epoch}/{self.rank}/{worker}/{n}"
        sample["__sid__"], sample["__n__"] = sid, n
        return sample

    def _decode(self, samples: Iterator[dict | None | _EpochEnd], counter: SkipCounter) -> Iterator[tuple | _EpochEnd]:
        for sample in samples:
            if isinstance(sample, _EpochEnd):
                yield sample
            elif sample is not None:
                item = self.decoder(sample, counter)
                if item is not None:
                    yield item + (sample.get("__sid__"), sample.get("__n__"))

    def _batches(self, items: Iterator[tuple | _EpochEnd], counter: SkipCounter, tracker: _Tracker, worker: int,
                 num_workers: int) -> Iterator[Batch | EmptyPass]:
        group = self._grouper()
        usable = 0  # samples decoded in the current epoch
        for item in items:
            if isinstance(item, _EpochEnd):
                for batch in group.end_epoch():
                    yield self._collate(batch, group, counter, tracker, worker)
                if not usable and item.whole and self.require_samples:
                    report = self._empty_pass(item, group.holding(), counter, tracker, worker, num_workers)
                    if report is None:
                        return
                    yield report
                usable = 0
                tracker.members.clear()
                continue
            usable += 1
            batch = group.add(item)
            if batch is not None:
                yield self._collate(batch, group, counter, tracker, worker)
        rest = group.rest()
        if rest and self.epochs is not None:  # a finite pass keeps its last partial batch
            yield self._collate(rest, group, counter, tracker, worker)

    def _grouper(self) -> Consecutive | LengthBuckets:
        if not self.length_buckets:
            return Consecutive(self.batch_size)
        return LengthBuckets(self.length_buckets, self.batch_size, lambda item: caption_length(item[1]))

    def _collate(self, items: list[tuple], group: Consecutive | LengthBuckets, counter: SkipCounter,
                 tracker: _Tracker, worker: int) -> Batch:
        images, targets, keys = list(zip(*items))[:3]
        # samples released but waiting in a length bucket: a resume reads them again (by id) and puts them back
        pool = tuple((sid[0], sid[1], n) for *_, sid, n in group.waiting())
        position = StreamPosition(worker, tracker.epoch, tracker.emitted, tuple(tracker.counts),
                                  self._fingerprint, self.resume_token, pool)
        in_worker = get_worker_info() is not None
        targets = torch.stack(targets) if isinstance(targets[0], torch.Tensor) else list(targets)
        return Batch(self.images.collate(list(images), in_worker), targets, list(keys), counter.take(), position)

    def _empty_pass(self, end: _EpochEnd, holding: bool, counter: SkipCounter, tracker: _Tracker, worker: int,
                    num_workers: int) -> EmptyPass | None:
        """The report of a whole epoch without a usable sample; raises NoUsableSamples where no loader takes
        reports and this is the rank's only worker; None: stop this worker (one of several in a plain
        DataLoader, which would otherwise wait on it for ever)."""
        position = None
        if not holding:  # on resume, start from the next epoch (a half-made batch would be lost: then don't move)
            position = StreamPosition(worker, end.epoch + 1, 0, (), self._fingerprint, self.resume_token)
        report = EmptyPass(worker, end.epoch, end.pieces, counter.take(), tuple(sorted(tracker.members)), position)
        if self.report_empty_passes:
            return report
        if num_workers == 1:
            raise no_usable_samples(self, [report])
        log.error("rank %d loader worker %d stops: %s", self.rank, worker, no_usable_samples(self, [report]))
        return None

    def __iter__(self) -> Iterator[Batch | EmptyPass]:
        worker, num_workers = self._worker()
        self._fingerprint = self.fingerprint(num_workers)
        counter, tracker = SkipCounter(), _Tracker()
        samples = self._samples(worker, num_workers, counter, tracker)
        yield from self._batches(self._decode(samples, counter), counter, tracker, worker, num_workers)
