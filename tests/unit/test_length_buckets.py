"""Caption-length bucketing (data.length_buckets): batches of similar caption length, every sample still once per
epoch (checked against plain tarfile reads), full-size batches, and a resume anywhere -- in the middle of an
epoch with samples waiting in the buckets, or while an epoch's leftovers leave -- that continues batch for batch
as the uninterrupted stream, with the same images."""
import json
import math
import pickle
import random
import tarfile
from collections import Counter

import pytest

from clipkit.config import DataConfig
from clipkit.data import StreamState, StreamStateError, build_train_loader, expand_shards, repartition_train_states
from data_shards import add, jpeg, keys_of, same_images, take, tar_keys, tokenizer, transforms

EDGES = [10, 14, 20, 32]
BATCH = 8
WORDS = ("a the dog cat red blue photo of on in with small large old new wooden house tree river car street man "
         "woman child sitting standing near under over bright dark").split()


def _caption(rng: random.Random) -> str:
    """Web-like lengths: median 11 words, a long tail (up to 60)."""
    words = max(1, min(60, round(rng.lognormvariate(math.log(11), 0.7))))
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    # 6 shards of uneven length, captions of long-tailed length
    root = tmp_path_factory.mktemp("buckets")
    rng = random.Random(0)
    for s, count in enumerate([41, 37, 40, 29, 44, 33]):
        with tarfile.open(root / f"c-{s:02d}.tar", "w") as tar:
            for i in range(count):
                key = f"c{s:02d}{i:03d}"
                add(tar, f"{key}.jpg", jpeg(((s * 37 + i * 11) % 256, (i * 53) % 256, 90)))
                add(tar, f"{key}.txt", _caption(rng).encode())
    return str(root / "c-{00..05}.tar")


@pytest.fixture(scope="module")
def parts():
    train_tf, _ = transforms(16)
    return train_tf, tokenizer()


def _loader(spec, parts, resume=None, *, rank=0, world_size=1, workers=0, epochs=None, **kw):
    data = DataConfig(**{"train": spec, "workers": workers, "shuffle_buffer": 30, "length_buckets": EDGES, **kw})
    return build_train_loader(data, transform=parts[0], tokenizer=parts[1], local_batch_size=BATCH, rank=rank,
                              world_size=world_size, seed=5, resume_state=resume, epochs=epochs)


def _checkpointed(state: StreamState) -> dict:
    """Through pickle and JSON, as a checkpoint stores it."""
    return json.loads(json.dumps(pickle.loads(pickle.dumps(state.state_dict()))))


def _longest(batch) -> int:
    return int(batch.targets.argmax(dim=-1).max()) + 1  # open_clip's eot has the highest id: one past it


def test_every_sample_once_per_epoch_in_full_batches(spec, parts):
    expected = tar_keys(expand_shards(spec))
    seen = Counter()
    for rank in range(2):
        batches = list(_loader(spec, parts, rank=rank, world_size=2, workers=2, epochs=2))
        assert sum(len(b.keys) < BATCH for b in batches) <= 2  # only each worker's very last one may be short
        seen.update(keys_of(batches))
    assert seen == Counter({k: 2 * n for k, n in expected.items()})


def test_batches_are_more_homogeneous_in_caption_length(spec, parts):
    epoch = sum(tar_keys(expand_shards(spec)).values()) // BATCH
    bucketed = take(iter(_loader(spec, parts)), epoch)
    plain = take(iter(_loader(spec, parts, length_buckets=[])), epoch)
    assert Counter(keys_of(bucketed)) == Counter(keys_of(plain))  # the same samples, grouped otherwise
    mean = {name: sum(map(_longest, batches)) / len(batches) for name, batches in
            [("bucketed", bucketed), ("plain", plain)]}
    # the text tower runs to each batch's longest caption: bucketing cuts that by more than a third here
    # (19.3 vs 31.5 tokens; captions of median 13 tokens, 95th percentile 34, longest 59)
    assert mean["bucketed"] < 0.67 * mean["plain"], mean


def test_two_runs_group_alike(spec, parts):
    a, b = (take(iter(_loader(spec, parts)), 12) for _ in range(2))
    assert keys_of(a) == keys_of(b) and same_images(a, b)


def test_resume_anywhere_continues_batch_for_batch(spec, parts):
    """Stopped after each of the first 40 batches (two epochs: mid-epoch with samples waiting in the buckets,
    while an epoch's leftovers leave, right after a carried batch), checkpointed and resumed, the stream goes on
    as the uninterrupted one, with the same augmentation."""
    total = 40
    whole = take(iter(_loader(spec, parts)), total)
    assert {b.position.epoch for b in whole} == {0, 1}
    per_epoch = sum(tar_keys(expand_shards(spec)).values())
    kinds = Counter()
    for stop in range(1, total):
        state = StreamState()
        first = take(iter(_loader(spec, parts)), stop, state)
        saved = _checkpointed(state)
        worker = saved["workers"][0]
        kinds["waiting"] += bool(worker.get("pool"))
        kinds["leftovers"] += bool(worker.get("pool")) and worker["emitted"] == per_epoch
        rest = take(iter(_loader(spec, parts, saved)), total - stop)
        assert keys_of(first + rest) == keys_of(whole), stop
        assert same_images(rest, whole[stop:]), stop
    assert kinds["waiting"] >= 30 and kinds["leftovers"] >= 2, kinds  # the states the test is about did occur


def test_resume_with_two_ranks_of_two_workers(spec, parts):
    expected = tar_keys(expand_shards(spec))
    seen = Counter()
    for rank, stop in [(0, 4), (1, 7)]:
        whole = list(_loader(spec, parts, rank=rank, world_size=2, workers=2, epochs=1))
        state = StreamState()
        first = take(iter(_loader(spec, parts, rank=rank, world_size=2, workers=2, epochs=1)), stop, state)
        saved = _checkpointed(state)
        assert any(w and w.get("pool") for w in saved["workers"])
        rest = list(_loader(spec, parts, saved, rank=rank, world_size=2, workers=2, epochs=1))
        assert keys_of(first + rest) == keys_of(whole) and same_images(first + rest, whole)
        seen.update(keys_of(first + rest))
    assert seen == expected


def test_elastic_resume_delivers_the_waiting_samples(spec, parts):
    """1 rank x 2 workers -> 2 ranks x 1 worker: the samples waiting in the buckets are not lost."""
    expected = tar_keys(expand_shards(spec))
    state = StreamState()
    first = take(iter(_loader(spec, parts, workers=2, epochs=1)), 9, state)
    saved = _checkpointed(state)
    assert any(w and w.get("pool") for w in saved["workers"])
    data = DataConfig(train=spec, workers=1, shuffle_buffer=30, length_buckets=EDGES)
    states = repartition_train_states(data, [saved], world_size=2)
    seen = Counter(keys_of(first))
    for rank in range(2):
        seen.update(keys_of(_loader(spec, parts, states[rank], rank=rank, world_size=2, workers=1, epochs=1)))
    assert seen == expected


def test_resume_refuses_other_buckets(spec, parts):
    state = StreamState()
    take(iter(_loader(spec, parts)), 3, state)
    saved = state.state_dict()
    with pytest.raises(StreamStateError, match=r"data.length_buckets: \[10, 14, 20, 32\] at the checkpoint, None now"):
        _loader(spec, parts, saved, length_buckets=[])
    with pytest.raises(StreamStateError, match=r"data.length_buckets: \[10, 14, 20, 32\] at the checkpoint, \[8, 16\]"):
        _loader(spec, parts, saved, length_buckets=[8, 16])
