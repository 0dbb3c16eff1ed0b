"""Sources: brace patterns and lists, mixtures with OpenCLIP-style upsampling factors, epoch mode
(each sample once per epoch, split across ranks and workers) and resampled mode (with replacement),
deterministic per seed and epoch."""
from collections import Counter

import pytest

from clipkit.config import DataConfig
from clipkit.data import ShardSpecError, build_train_loader, expand_sources
from clipkit.data.order import ShardPlan
from data_shards import keys_of, tar_keys, tokenizer, transforms, write_shards


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return write_shards(root, "a", 4, 12), write_shards(root, "b", 2, 9)


@pytest.fixture(scope="module")
def parts():
    return transforms(16)[1], tokenizer()


def _loader(spec, parts, local_batch_size, rank=0, world_size=1, epochs=None, seed=0, **data):
    return build_train_loader(DataConfig(train=spec, **data), transform=parts[0], tokenizer=parts[1],
                              local_batch_size=local_batch_size, rank=rank, world_size=world_size, seed=seed,
                              epochs=epochs)


def _keys(spec, parts, rank=0, world_size=1, **kw):
    kw = {"epochs": 1, "workers": 0, "seed": 1, "shuffle_buffer": 10, **kw}
    return keys_of(_loader(spec, parts, 5, rank=rank, world_size=world_size, **kw))


def test_weights_follow_open_clip_convention(mix):
    a, b = mix
    urls, factors = expand_sources(f"{a}::{b}", "1::2.5")
    assert len(urls) == 6 and factors == [1.0] * 4 + [2.5] * 2
    urls_list, factors_list = expand_sources([a, b], [1, 3])
    assert urls_list == urls and factors_list == [1.0] * 4 + [3.0] * 2
    with pytest.raises(ShardSpecError, match="2 weights .* for 1 sources"):
        expand_sources(a, "1::2")
    with pytest.raises(ShardSpecError, match="numbers joined by '::'"):
        expand_sources(f"{a}::{b}", "1::x")


def test_epoch_mode_upsamples_whole_sources(mix, parts):
    a, b = mix
    a_keys, b_keys = tar_keys(expand_sources(a)[0]), tar_keys(expand_sources(b)[0])
    # factor 2 lists every shard of b twice per epoch, factor 1 every shard of a once
    seen = Counter(_keys(f"{a}::{b}", parts, train_weights="1::2"))
    assert seen == a_keys + b_keys + b_keys
    # factor 0.5 takes half of a's shards, whole, a different half each epoch
    halves = [Counter(_keys(f"{a}::{b}", parts, train_weights="0.5::1", epochs=e + 1)) - Counter(_keys(
        f"{a}::{b}", parts, train_weights="0.5::1", epochs=e)) for e in range(3)]
    for half in halves:
        shards_of_a = {k[:3] for k in half if k.startswith("a")}
        assert len(shards_of_a) == 2 and all(half[k] == 1 for k in half)
        assert sum(1 for k in half if k.startswith("a")) == 24 and Counter(
            k for k in half if k.startswith("b")) == b_keys
    assert len({frozenset(h) for h in halves}) > 1


def test_epoch_mode_splits_ranks_and_workers_without_overlap(mix, parts):
    a, b = mix
    per_rank = [Counter(_keys(f"{a}::{b}", parts, rank=r, world_size=2, workers=2)) for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert per_rank[0] + per_rank[1] == tar_keys(expand_sources(f"{a}::{b}")[0])


def test_order_is_deterministic_per_seed_and_epoch(mix, parts):
    a, b = mix
    spec = f"{a}::{b}"
    assert _keys(spec, parts) == _keys(spec, parts)
    assert _keys(spec, parts) != _keys(spec, parts, seed=2)
    two = _keys(spec, parts, epochs=2)
    first, second = two[:len(two) // 2], two[len(two) // 2:]
    assert first == _keys(spec, parts) and sorted(first) == sorted(second) and first != second


def test_resampled_draws_with_replacement_in_proportion_to_weights(mix):
    a, b = mix
    urls, factors = expand_sources(f"{a}::{b}", "1::3")
    draws = Counter()
    for epoch in range(300):
        for rank in range(2):
            plan = ShardPlan(tuple(urls), tuple(factors), 5, True, True, rank, 2, 2)
            for worker in range(2):
                draws.update(plan.worker_shards(epoch, worker))
    total = sum(draws.values())
    assert total == 300 * 2 * 2 * 3  # ceil((4 x 1 + 2 x 3) / (2 x 2)) draws per worker and epoch
    share_b = sum(n for u, n in draws.items() if "/b-" in u) / total
    assert abs(share_b - 6 / 10) < 0.03  # factor x shards: 2 x 3 of 4 x 1 + 2 x 3
    plan = ShardPlan(tuple(urls), tuple(factors), 5, True, True, 0, 1, 1)
    assert plan.worker_shards(4, 0) == plan.worker_shards(4, 0) != plan.worker_shards(5, 0)


def test_resampled_loader_repeats_samples_and_is_deterministic(mix, parts):
    a, b = mix
    kw = {"resampled": True, "train_weights": "1::3", "epochs": 3}
    keys = _keys(f"{a}::{b}", parts, **kw)
    assert keys == _keys(f"{a}::{b}", parts, **kw)
    assert max(Counter(keys).values()) > 1  # with replacement
    assert keys != _keys(f"{a}::{b}", parts, seed=9, **kw)


def test_too_few_shards_for_the_workers_is_a_clear_error(mix, parts):
    a, _ = mix
    with pytest.raises(ShardSpecError, match="4 shards per epoch cannot be dealt to 3 ranks x 2"):
        _loader(a, parts, 4, world_size=3, workers=2)
    _loader(a, parts, 4, world_size=3, workers=2, resampled=True)


def test_missing_fsspec_backend_names_the_package(mix):
    with pytest.raises(ShardSpecError, match="nosuchproto"):
        expand_sources("nosuchproto://bucket/{0..3}.tar")
