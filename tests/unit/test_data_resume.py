"""Resume: a stream stopped and resumed mid-epoch sees every sample of the epoch exactly once, with
2 ranks x 2 loader workers, checked against plain tarfile reads and the uninterrupted run."""
import json
import pickle
from collections import Counter

import pytest

from clipkit.config import DataConfig
from clipkit.data import StreamState, StreamStateError, build_train_loader, expand_shards
from data_shards import keys_of, same_images, take, tar_keys, tokenizer, transforms, write_shards


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    # 10 shards of uneven length: ranks and workers get different amounts, shards end mid-batch
    root = tmp_path_factory.mktemp("resume")
    spec_a = write_shards(root, "a", 6, 23)
    spec_b = write_shards(root, "b", 4, 17)
    return f"{spec_a}::{spec_b}"


@pytest.fixture(scope="module")
def parts():
    train_tf, _ = transforms(16)
    return train_tf, tokenizer()


def _loader(spec, parts, rank, resume=None, epochs=1, **kw):
    data = DataConfig(**{"train": spec, "workers": 2, "shuffle_buffer": 30, **kw})
    return build_train_loader(data, transform=parts[0], tokenizer=parts[1], local_batch_size=8, rank=rank,
                              world_size=2, seed=7, resume_state=resume, epochs=epochs)


def _stop_and_resume(spec, parts, rank, stop_after, **kw):
    """Consume `stop_after` batches, checkpoint the state (through pickle and JSON, as a checkpoint
    would store it), then continue in a new loader until the stream ends."""
    state = StreamState()
    first = take(iter(_loader(spec, parts, rank, **kw)), stop_after, state)
    saved = json.loads(json.dumps(pickle.loads(pickle.dumps(state.state_dict()))))
    resumed_state = StreamState(saved)
    rest = list(_loader(spec, parts, rank, saved, **kw))
    for batch in rest:
        resumed_state.observe(batch)
    return first, rest


def test_resumed_epoch_sees_every_sample_exactly_once(spec, parts):
    expected = tar_keys(expand_shards(spec))
    assert sum(expected.values()) == 6 * 23 + 4 * 17
    seen, uninterrupted = Counter(), Counter()
    for rank, stop_after in [(0, 3), (1, 5)]:
        first, rest = _stop_and_resume(spec, parts, rank, stop_after)
        seen.update(keys_of(first) + keys_of(rest))
        uninterrupted.update(keys_of(_loader(spec, parts, rank)))
    assert seen == expected  # no repeats, no gaps, over both ranks
    assert uninterrupted == expected


def test_resume_right_at_the_start_and_after_one_worker_only(spec, parts):
    # after one batch, worker 1 has delivered nothing yet: it must start from its beginning
    first, rest = _stop_and_resume(spec, parts, 0, 1)
    assert Counter(keys_of(first) + keys_of(rest)) == Counter(keys_of(_loader(spec, parts, 0)))


def test_endless_stream_resumes_in_the_same_order_with_the_same_augmentation(spec, parts):
    """Across an epoch boundary: the resumed stream is batch for batch the uninterrupted one."""
    kw = {"epochs": None}
    whole = take(iter(_loader(spec, parts, 1, **kw)), 20)
    state = StreamState()
    first = take(iter(_loader(spec, parts, 1, **kw)), 7, state)
    rest = take(iter(_loader(spec, parts, 1, state.state_dict(), **kw)), 13)
    assert keys_of(first + rest) == keys_of(whole)
    assert same_images(first + rest, whole)
    epochs = {b.position.epoch for b in whole}
    assert epochs == {0, 1}  # the 20 batches do cross into the second epoch


def test_resampled_mixture_resumes_exactly(spec, parts):
    kw = {"epochs": 2, "resampled": True, "train_weights": "1::3"}
    whole = keys_of(_loader(spec, parts, 0, **kw))
    first, rest = _stop_and_resume(spec, parts, 0, 4, **kw)
    assert Counter(keys_of(first) + keys_of(rest)) == Counter(whole)


def test_resume_refuses_changed_workers_or_shards(spec, parts):
    state = StreamState()
    take(iter(_loader(spec, parts, 0)), 2, state)
    saved = state.state_dict()
    with pytest.raises(StreamStateError, match="loader workers.*2 at the checkpoint, 1 now"):
        _loader(spec, parts, 0, saved, workers=1)
    fewer = spec.replace("{00..03}", "{00..02}")
    with pytest.raises(StreamStateError, match="number of shards.*10 at the checkpoint, 9 now"):
        _loader(fewer, parts, 0, saved)
    with pytest.raises(StreamStateError, match="rank"):
        _loader(spec, parts, 1, saved)


def test_state_must_come_from_the_same_checkpoint(spec, parts):
    state = StreamState()
    take(iter(_loader(spec, parts, 0)), 2, state)
    loader = _loader(spec, parts, 0, state.state_dict())
    with pytest.raises(StreamStateError, match="another resume_state"):
        StreamState().observe(next(iter(loader)))


class _CountingTransform:
    """A transform clipkit cannot speed up: it runs as given, once per decoded image."""

    def __init__(self, transform):
        self.transform, self.calls = transform, 0

    def __call__(self, image):
        self.calls += 1
        return self.transform(image)


def test_fast_forward_decodes_nothing_before_the_resume_point(spec, parts):
    from clipkit.data import ShardStream, expand_sources
    from clipkit.data.sample import Tokenize

    urls, _ = expand_sources(spec)

    def stream(transform, resume=None):
        return ShardStream(urls, transform, Tokenize(parts[1]), 8, seed=3, shuffle_buffer=30, epochs=1,
                           num_workers=0, resume_state=resume)

    state = StreamState()
    batches = iter(stream(parts[0]))
    take(batches, 20, state)
    counting = _CountingTransform(parts[0])
    rest = list(stream(counting, state.state_dict()))
    assert counting.calls == len(keys_of(rest)) == 6 * 23 + 4 * 17 - 20 * 8
