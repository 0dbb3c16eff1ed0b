"""near_dedup walked in blocks (clipkit.curate.hashdedup): its decisions (drop, reason, detail, score) equal those of a
one-by-one greedy reference from brute-force popcounts and thumb_similarity (tests/near_dedup_reference.py), at 4 and 12 bits, with
and without the thumbnail verification, for block sizes small enough that matches cross block boundaries; and
on look-alike hashes (all near a few seeds) the pairs it examines grow as N x kept, not N^2."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from near_dedup_reference import flip_bits, greedy_reference

from clipkit.curate import hashdedup
from clipkit.curate.hashdedup import near_dedup
def _data(n: int, seed: int):
    """n samples: random hashes and thumbnails, about a third of them copies of an earlier sample's pHash (or of
    its mirror pHash) with 0..14 bits flipped, whose thumbnails are the source's plus noise except every fourth
    (unrelated: the verification rejects it); a few rows repeat an earlier row exactly (hashes and thumbnail)."""
    rng = np.random.default_rng(seed)
    p = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    f = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    thumbs = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    for j in range(1, n):
        if rng.random() < 1 / 3:
            i = int(rng.integers(0, j))
            p[j] = flip_bits(p[i] if rng.random() < 0.7 else f[i], int(rng.integers(0, 15)), rng)
            if j % 4:
                noise = rng.integers(-20, 21, (8, 8, 3))
                thumbs[j] = np.clip(thumbs[i].astype(int) + noise, 0, 255).astype(np.uint8)
    for j in rng.choice(np.arange(10, n), size=8, replace=False):
        i = int(rng.integers(0, j))
        p[j], f[j], thumbs[j] = p[i], f[i], thumbs[i]
    return p, f, thumbs


@pytest.mark.parametrize("bits", [4, 12])
@pytest.mark.parametrize("verify", [None, 0.85])
def test_blocks_decide_as_the_greedy_reference(bits, verify):
    n = 700
    p, f, thumbs = _data(n, seed=bits)
    keys = [f"k{i}" for i in range(n)]
    alive = np.random.default_rng(1).random(n) > 0.05
    thumb_bytes = [t.tobytes() for t in thumbs]
    drop, detail, score, examined, rejected = greedy_reference(p, f, thumbs, alive, keys, bits, verify)
    assert drop.sum() > 40
    for block in (1, 16, 97, 4096):  # 4096: the whole set in one block
        got = near_dedup(p, f, alive, keys, bits, thumbs=thumb_bytes if verify else None, min_similarity=verify,
                         block=block).check(alive)
        assert np.array_equal(got.drop, drop), block
        assert set(got.reason[got.drop]) == {"near_duplicate"} and not got.reason[~got.drop].any()
        assert list(got.detail) == detail, block
        np.testing.assert_array_equal(got.score, score)
        assert got.summary["pairs_examined"] == examined
        assert got.summary["rejected_by_verification"] == rejected
    if verify is not None:
        assert rejected > 0
    # Drops whose kept match lies in an earlier block of 16 representatives (alive rows less exact repeats):
    # matches cross the blocks' seams.
    ident = [(int(p[j]), int(f[j]), thumb_bytes[j]) if verify else (int(p[j]), int(f[j])) for j in range(n)]
    first = {}
    for j in np.flatnonzero(alive):
        first.setdefault(ident[j], j)
    position = {j: r for r, j in enumerate(sorted(first.values()))}
    rows = {k: i for i, k in enumerate(keys)}
    crossing = [j for j in np.flatnonzero(drop) if j in position
                and position[rows[detail[j]]] // 16 != position[j] // 16]
    assert len(crossing) > 10


def test_default_block_is_the_module_constant(monkeypatch):
    p, f, thumbs = _data(300, seed=7)
    keys = [f"k{i}" for i in range(300)]
    alive = np.ones(300, bool)
    want = near_dedup(p, f, alive, keys, 12)
    monkeypatch.setattr(hashdedup, "DEDUP_BLOCK", 8)
    got = near_dedup(p, f, alive, keys, 12)
    assert np.array_equal(got.drop, want.drop) and list(got.detail) == list(want.detail)
    with pytest.raises(ValueError, match="block"):
        near_dedup(p, f, alive, keys, 12, block=0)


def test_look_alike_hashes_examine_n_times_kept_pairs():
    """3,000 samples within 3 bits of one of 5 seeds (and thumbnails near the seed's): at 12 bits all but the 5
    first are dropped, and the pairs examined are at most N x kept (a brute-force pair list would hold 4.5 million),
    with the numpy memory of the stage a few MB."""
    rng = np.random.default_rng(0)
    n, seeds = 3000, 5
    sp = rng.integers(0, 2**64, seeds, dtype=np.uint64, endpoint=False)
    sf = rng.integers(0, 2**64, seeds, dtype=np.uint64, endpoint=False)
    st = rng.integers(0, 256, (seeds, 8, 8, 3), dtype=np.uint8)
    of = np.r_[np.arange(seeds), rng.integers(0, seeds, n - seeds)]
    p = np.array([flip_bits(sp[s], int(rng.integers(0, 4)), rng) for s in of], dtype=np.uint64)
    f = np.array([flip_bits(sf[s], int(rng.integers(0, 4)), rng) for s in of], dtype=np.uint64)
    noise = rng.integers(-10, 11, (n, 8, 8, 3))
    thumbs = [t.tobytes() for t in np.clip(st[of].astype(int) + noise, 0, 255).astype(np.uint8)]
    keys = [f"k{i}" for i in range(n)]
    alive = np.ones(n, bool)
    tracemalloc.start()
    got = near_dedup(p, f, alive, keys, 12, thumbs=thumbs, min_similarity=0.85, block=1024).check(alive)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert int((~got.drop).sum()) == seeds and not got.drop[:seeds].any()
    assert [got.detail[j] for j in range(seeds, n)] == [keys[s] for s in of[seeds:]]
    # every sample is examined against the kept seeds that match it (its own): exactly one pair per dropped sample
    assert got.summary["pairs_examined"] == n - seeds
    assert got.summary["pairs_examined"] <= n * seeds < n * (n - 1) // 2 // 100
    assert got.summary["rejected_by_verification"] == 0
    assert peak < 24 * 2**20, peak
