"""One sample decoder for every shard stream: the training stream and the embed stream (which no longer
derives from it) skip the same bad samples for the same reasons, and keep the same good ones in tar order.
Expected: the hand-made shard's own list of good keys and one skip per bad sample's reason."""
import pytest

from clipkit.data import ShardStream
from clipkit.data.embed_stream import EmbedStream
from clipkit.data.sample import Tokenize
from data_shards import tokenizer, transforms
from data_shards import good_samples, samples_shard
from test_bad_input import LIMIT, SAMPLE_CASES


@pytest.fixture(scope="module")
def bad_shard(tmp_path_factory):
    good = good_samples("g", 8)
    bad = [(f"bad_{reason}", image, caption) for reason, (image, caption) in sorted(SAMPLE_CASES.items())]
    samples = [s for pair in zip(good, bad + [None] * len(good)) for s in pair if s is not None]
    path = samples_shard(tmp_path_factory.mktemp("decoder") / "s.tar", samples)
    return path, [k for k, _, _ in good]


def _add(total, counts):
    for reason, n in counts.items():
        total[reason] = total.get(reason, 0) + n


def test_training_and_embed_streams_skip_and_keep_the_same_samples(bad_shard):
    path, good_keys = bad_shard
    expected_skips = {reason: 1 for reason in SAMPLE_CASES}
    _, val_tf = transforms(16)
    train = ShardStream([path], val_tf, Tokenize(tokenizer()), batch_size=3, shuffle=False, epochs=1,
                        max_image_pixels=LIMIT)
    keys, skipped = [], {}
    for batch in train:
        keys += batch.keys
        _add(skipped, batch.skipped)
    assert keys == good_keys and skipped == expected_skips

    embed = EmbedStream([path], val_tf, tokenizer(), 3, shards=[0], chunk_size=5, max_image_pixels=LIMIT)
    assert not isinstance(embed, ShardStream)
    keys, captions, skipped = [], [], {}
    for batch in embed:
        keys += batch.keys
        captions += batch.captions
        for _, _, counts in batch.closed_chunks:
            _add(skipped, counts)
        for _, counts in batch.closed_shards:
            _add(skipped, counts)
    assert keys == good_keys and skipped == expected_skips
    assert captions == [f"picture {k}" for k in good_keys]
