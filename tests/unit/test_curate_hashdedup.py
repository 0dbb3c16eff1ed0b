"""Exact and near duplicates against a brute-force reference of the same keep rule."""
from __future__ import annotations

import io

import numpy as np
from near_dedup_reference import greedy_reference
from PIL import Image

from clipkit.curate.hashdedup import exact_dedup, near_dedup
from clipkit.curate.hashing import perceptual_hashes, sha256_hex


def test_near_dedup_matches_brute_force_on_random_hashes():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 40, dtype=np.int64).astype(np.uint64)
    p, f = [], []
    for i in range(200):  # copies of a few bases with a few bits flipped
        b = base[rng.integers(0, 40)]
        for _ in range(rng.integers(0, 7)):
            b ^= np.uint64(1) << np.uint64(rng.integers(0, 64))
        p.append(b)
        f.append(b ^ np.uint64(0xFFFF) if rng.random() < 0.5 else rng.integers(0, 2**63, dtype=np.int64).astype(np.uint64))
    p, f = np.array(p, np.uint64), np.array(f, np.uint64)
    keys = [f"k{i}" for i in range(200)]
    alive = rng.random(200) > 0.1
    for d in (0, 3, 6):
        got = near_dedup(p, f, alive, keys, d).check(alive)
        drop, detail = greedy_reference(p, f, None, alive, keys, d, None)[:2]
        assert np.array_equal(got.drop, drop)
        assert list(got.detail[got.drop]) == [detail[i] for i in np.flatnonzero(drop)]
        assert set(got.reason[got.drop]) <= {"near_duplicate"}


def _jpeg(img, quality):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_reencoded_and_flipped_copies_are_near_duplicates_and_exact_copies_exact():
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((96, 96), Image.BILINEAR)
            for _ in range(4)]
    samples = [_jpeg(imgs[0], 95), _jpeg(imgs[1], 95), _jpeg(imgs[0], 60),  # re-encoded copy of 0
               _jpeg(imgs[1].transpose(Image.FLIP_LEFT_RIGHT), 95),  # mirrored copy of 1
               _jpeg(imgs[2], 95), _jpeg(imgs[2], 95), _jpeg(imgs[3], 95)]  # 5: byte-identical to 4
    keys = [f"s{i}" for i in range(len(samples))]
    alive = np.ones(len(samples), bool)
    ex = exact_dedup(np.array([sha256_hex(s) for s in samples], object), alive, keys).check(alive)
    assert list(np.flatnonzero(ex.drop)) == [5] and ex.detail[5] == "s4"
    hashes = [perceptual_hashes(Image.open(io.BytesIO(s))) for s in samples]
    p = np.array([h[0] for h in hashes], np.uint64)
    f = np.array([h[1] for h in hashes], np.uint64)
    alive2 = alive & ~ex.drop
    near = near_dedup(p, f, alive2, keys, 6).check(alive2)
    assert list(np.flatnonzero(near.drop)) == [2, 3]
    assert list(near.detail[[2, 3]]) == ["s0", "s1"]
    drop, _ = greedy_reference(p, f, None, alive2, keys, 6, None)[:2]
    assert np.array_equal(near.drop, drop)
