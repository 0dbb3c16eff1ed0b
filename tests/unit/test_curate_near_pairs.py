"""Near-duplicate hash search (clipkit.curate.hashdedup.near_pairs): both exact methods, and the automatic choice,
give the pairs of a brute-force popcount computed here, ties at exactly the distance included; near_dedup with
the thumbnail verification at 12 bits keeps the same samples as a one-by-one greedy reference (tests/near_dedup_reference.py)."""
from __future__ import annotations

import numpy as np
import pytest
from near_dedup_reference import flip_bits, greedy_reference

from clipkit.curate.hashdedup import near_dedup, near_pairs


def _hashes(n: int, seed: int, shared_low_bits: int = 0):
    """n (pHash, mirror pHash) rows: random hashes, a third of them copies of an earlier row's pHash (or of its
    mirror pHash, as a flipped copy would be) with 0..14 bits flipped, so every distance up to 14 occurs; with
    shared_low_bits, the first half of the rows agree on their low bits (one crowded bucket for every method)."""
    rng = np.random.default_rng(seed)
    p = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    f = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    for j in range(1, n):
        if rng.random() < 1 / 3:
            i = int(rng.integers(0, j))
            src = p[i] if rng.random() < 0.7 else f[i]
            p[j] = flip_bits(src, int(rng.integers(0, 15)), rng)
    if shared_low_bits:
        mask = np.uint64((1 << shared_low_bits) - 1)
        p[: n // 2] &= ~mask
    return p, f


def _brute_pairs(p, f, d) -> np.ndarray:
    """(i, j), i < j, with min(hamming(p_i, p_j), hamming(p_i, f_j), hamming(f_i, p_j)) <= d, by numpy popcount of
    every XOR; and the matrix of those minima."""
    pp = np.bitwise_count(p[:, None] ^ p[None, :])
    pf = np.bitwise_count(p[:, None] ^ f[None, :])
    dist = np.minimum(pp, np.minimum(pf, pf.T))
    i, j = np.nonzero(np.triu(dist <= d, k=1))
    return np.stack([i, j], axis=1).astype(np.int64), dist


@pytest.mark.parametrize("shared", [0, 20])
def test_near_pairs_equal_brute_force_at_every_distance_and_method(shared):
    p, f = _hashes(1500, seed=shared, shared_low_bits=shared)
    upper = None
    for d in (0, 1, 4, 7, 12, 13):
        want, dist = _brute_pairs(p, f, d)
        upper = dist[np.triu_indices(len(p), k=1)] if upper is None else upper
        assert (upper == d).sum() > 0  # pairs at exactly the distance: the radius is inclusive
        assert (upper == d + 1).sum() > 0  # and just outside it
        for method in ("auto", "bands", "flat"):
            got = near_pairs(p, f, d, method=method)
            assert got.dtype == np.int64 and got.shape[1] == 2
            assert np.array_equal(got, want), (d, method, len(got), len(want))


def test_near_pairs_edge_cases():
    p, f = _hashes(3, seed=5)
    assert near_pairs(p[:1], f[:1], 12).shape == (0, 2)
    assert near_pairs(p[:0], f[:0], 12).shape == (0, 2)
    same = np.array([7, 7, 7], dtype=np.uint64)  # identical pHashes: every pair, at any distance
    for method in ("bands", "flat"):
        assert near_pairs(same, same ^ np.uint64(2**64 - 1), 0, method=method).tolist() == [[0, 1], [0, 2], [1, 2]]
    with pytest.raises(ValueError, match="method"):
        near_pairs(p, f, 4, method="mih")
    with pytest.raises(ValueError, match="bits"):
        near_pairs(p, f, 65)


def test_near_dedup_at_12_bits_with_verification_matches_greedy_reference():
    rng = np.random.default_rng(3)
    n = 400
    p, f = _hashes(n, seed=3)
    thumbs = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    # Copies' thumbnails: their source's plus noise (correlated), except every fourth (unrelated: rejected).
    for j in range(1, n):
        near = np.flatnonzero(np.bitwise_count(p[:j] ^ p[j]) <= 14)
        if len(near) and j % 4:
            noise = rng.integers(-20, 21, (8, 8, 3))
            thumbs[j] = np.clip(thumbs[near[0]].astype(int) + noise, 0, 255).astype(np.uint8)
    thumbs[5] = thumbs[2]  # a repeated sample: same hashes and thumbnail
    p[5], f[5] = p[2], f[2]
    keys = [f"k{i}" for i in range(n)]
    alive = rng.random(n) > 0.05
    alive[2] = alive[5] = True
    for d in (4, 12):
        got = near_dedup(p, f, alive, keys, d, thumbs=[t.tobytes() for t in thumbs], min_similarity=0.85)
        got.check(alive)
        drop, detail = greedy_reference(p, f, thumbs, alive, keys, d, 0.85)[:2]
        assert drop.sum() > 10 and got.summary["rejected_by_verification"] > 0
        assert np.array_equal(got.drop, drop), d
        assert list(got.detail[got.drop]) == [detail[i] for i in np.flatnonzero(drop)]
