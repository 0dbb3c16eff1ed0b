import numpy as np
import pytest

from clipkit.curate import semdedup
from clipkit.curate.semdedup import cluster_order, semantic_dedup, spherical_kmeans


def _planted(rng, n_base, n_dups, d=16, noise=0.02):
    """n_base random unit vectors around a few centres, plus n_dups noisy copies of some of them."""
    centres = rng.normal(size=(6, d))
    base = centres[rng.integers(0, 6, n_base)] + 0.8 * rng.normal(size=(n_base, d))
    src = rng.choice(n_base, n_dups, replace=False)
    dups = base[src] + noise * rng.normal(size=(n_dups, d))
    x = np.concatenate([base, dups]).astype(np.float32)
    perm = rng.permutation(len(x))
    x = x[perm]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # pairs (position of the original, position of the copy) after the shuffle
    where = np.argsort(perm)
    pairs = [(int(where[s]), int(where[n_base + i])) for i, s in enumerate(src)]
    return x, pairs


def _brute(x, alive, keys, assign, centroids, threshold):
    """The rule written plainly: per cluster, farthest from the centroid first, each sample compared with every
    earlier kept sample of its cluster one by one."""
    idx = [i for i in range(len(x)) if alive[i]]
    drop, detail, score = {}, {}, {}
    for c in set(assign.tolist()):
        members = [idx[p] for p in range(len(idx)) if assign[p] == c]
        cos = {i: float(np.dot(x[i].astype(np.float64), centroids[c])) for i in members}
        ordered = sorted(members, key=lambda i: (cos[i], i))
        kept = []
        for i in ordered:
            sims = [(float(np.dot(x[i].astype(np.float64), x[j])), j) for j in kept]
            best = max(sims, key=lambda t: t[0]) if sims else None
            score[i] = best[0] if best else np.nan
            if best and best[0] > threshold:
                drop[i], detail[i] = True, keys[best[1]]
            else:
                kept.append(i)
    return drop, detail, score


@pytest.mark.parametrize("block", [4096, 7])
def test_matches_brute_force_within_the_same_clusters(monkeypatch, block):
    monkeypatch.setattr(semdedup, "BLOCK", block)  # the blocked walk gives the same answer at any block size
    rng = np.random.default_rng(1)
    x, _ = _planted(rng, 150, 40)
    alive = rng.random(len(x)) < 0.9
    keys = [f"k{i:04d}" for i in range(len(x))]
    res = semantic_dedup(x, alive, keys, threshold=0.95, clusters=5, seed=3).check(alive)
    centroids, assign = spherical_kmeans(x[alive], 5, seed=3)
    drop, detail, score = _brute(x, alive, keys, assign, centroids.astype(np.float64), 0.95)
    assert 0 < len(drop) < alive.sum()
    for i in range(len(x)):
        assert res.drop[i] == drop.get(i, False)
        assert res.detail[i] == detail.get(i, "")
        assert res.reason[i] == ("semantic_duplicate" if i in drop else "")
        if alive[i]:
            assert res.score[i] == pytest.approx(score[i], abs=1e-5, nan_ok=True)
        else:
            assert np.isnan(res.score[i])
    assert res.summary["dropped"]["semantic_duplicate"] == len(drop)


def test_chain_keeps_the_far_end_and_no_two_kept_are_close():
    # a ~ b, b ~ c, a !~ c (all in one cluster): the walk from the farthest from the centroid keeps both ends
    t = np.deg2rad([0.0, 14.0, 28.0])
    x = np.stack([np.cos(t), np.sin(t), np.zeros(3)], axis=1).astype(np.float32)
    keys = ["a", "b", "c"]
    alive = np.ones(3, bool)
    res = semantic_dedup(x, alive, keys, threshold=float(np.cos(np.deg2rad(20))), clusters=1, seed=0)
    assert list(res.drop) == [False, True, False]
    assert res.detail[1] in ("a", "c")
    order = cluster_order(x, (x.mean(0) / np.linalg.norm(x.mean(0))).astype(np.float32))
    assert order[-1] == 1  # b is closest to the centroid, so it comes last


def test_seeded_and_deterministic():
    rng = np.random.default_rng(2)
    x, _ = _planted(rng, 200, 50)
    alive = np.ones(len(x), bool)
    keys = [str(i) for i in range(len(x))]
    a = semantic_dedup(x, alive, keys, threshold=0.9, clusters=None, seed=5)
    b = semantic_dedup(x, alive, keys, threshold=0.9, clusters=None, seed=5)
    assert a.summary["clusters"] == round(np.sqrt(len(x)))
    assert (a.drop == b.drop).all() and (a.detail == b.detail).all()


def test_planted_pairs_split_by_kmeans_rate():
    """How often k-means puts a planted near-duplicate pair in two clusters (then it is never compared).
    docs/curation.md reports the rate; the test keeps it below a bound."""
    rng = np.random.default_rng(4)
    x, pairs = _planted(rng, 2000, 300)
    _, assign = spherical_kmeans(x, int(round(np.sqrt(len(x)))), seed=0)
    split = sum(assign[a] != assign[b] for a, b in pairs) / len(pairs)
    res = semantic_dedup(x, np.ones(len(x), bool), [str(i) for i in range(len(x))], threshold=0.98,
                         clusters=None, seed=0)
    found = sum(res.drop[a] or res.drop[b] for a, b in pairs) / len(pairs)
    print(f"split {split:.4f} found {found:.4f}")
    assert split <= 0.05
    assert found >= 1 - split - 1e-9


def test_nothing_alive_and_singletons():
    x = np.eye(4, dtype=np.float32)
    keys = list("abcd")
    dead = np.zeros(4, bool)
    res = semantic_dedup(x, dead, keys, threshold=0.5, clusters=None, seed=0).check(dead)
    assert not res.drop.any() and np.isnan(res.score).all()
    alive = np.ones(4, bool)
    res = semantic_dedup(x, alive, keys, threshold=0.5, clusters=10, seed=0).check(alive)  # more clusters than samples
    assert not res.drop.any() and res.summary["clusters"] == 4
    with pytest.raises(ValueError):
        semantic_dedup(x, alive, keys, threshold=0.5, clusters=0, seed=0)


def test_same_clusters_with_one_thread_or_two():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(6)
    x, _ = _planted(rng, 600, 60)
    before = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        _, one = spherical_kmeans(x, 20, seed=1)
        faiss.omp_set_num_threads(2)
        _, two = spherical_kmeans(x, 20, seed=1)
    finally:
        faiss.omp_set_num_threads(before)
    assert (one == two).all()
