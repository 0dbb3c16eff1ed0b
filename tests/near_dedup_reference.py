"""The near-duplicate keep rule, computed one sample at a time from brute-force popcounts (and thumb_similarity):
the independent reference the near-deduplication tests hold clipkit.curate.hashdedup to; and a hash with bits
flipped, to plant copies at a known distance."""
from __future__ import annotations

import numpy as np

from clipkit.curate.hashing import thumb_similarity

ONE = np.uint64(1)


def flip_bits(h: np.uint64, k: int, rng) -> np.uint64:
    """h with exactly k distinct bits flipped."""
    for bit in rng.choice(64, size=k, replace=False):
        h ^= ONE << np.uint64(bit)
    return h


def greedy_reference(p, f, thumbs, alive, keys, d, min_similarity):
    """One sample at a time in set order (thumbs and min_similarity None: hashes alone): dropped when within d
    bits (pHash against pHash, pHash against mirror pHash, either way) of an earlier kept sample whose thumbnail
    (with min_similarity) correlates at least that much; detail: the first such sample's key, score: the bit distance to it. Also the number of (kept, later)
    pairs within d bits, and of those the verification rejects, counted for the first of each group of identical
    rows (hashes, and thumbnail with the verification) only: the stage compares only those."""
    pp = np.bitwise_count(p[:, None] ^ p[None, :])
    pf = np.bitwise_count(p[:, None] ^ f[None, :])
    dist = np.minimum(pp, np.minimum(pf, pf.T)).astype(int)
    n = len(p)
    drop, detail, score = np.zeros(n, bool), [""] * n, np.full(n, np.nan)
    kept: list[int] = []
    examined = rejected = 0
    seen = set()
    for j in np.flatnonzero(alive):
        ident = (int(p[j]), int(f[j])) + ((thumbs[j].tobytes(),) if min_similarity is not None else ())
        counted = ident not in seen
        seen.add(ident)
        near = [i for i in kept if dist[i, j] <= d]
        examined += len(near) * counted
        if min_similarity is not None and near:
            sim = thumb_similarity(thumbs[near], np.repeat(thumbs[j][None], len(near), axis=0))
            rejected += int((sim < min_similarity).sum()) * counted
            near = [i for i, s in zip(near, sim) if s >= min_similarity]
        if near:
            drop[j], detail[j], score[j] = True, keys[near[0]], dist[near[0], j]
        else:
            kept.append(int(j))
    return drop, detail, score, examined, rejected
