"""Semantic deduplication (SemDeDup, Abbas et al. 2023): drop samples whose embedding is nearly the same as
another's, comparing only within k-means clusters so the cost is sum over clusters of size^2, not N^2.

1. Cluster the alive samples' L2-normalised embeddings with seeded spherical k-means (faiss). The default
   number of clusters is max(1, round(sqrt(n_alive))): clusters of about sqrt(n) samples, so the pairwise
   work is about n^1.5 (the paper used 50,000 clusters for LAION-440M, about 8,800 per cluster; pass
   `clusters` to choose).
2. Within a cluster, order the samples by their distance to the centroid, farthest first (the paper's
   default, "keep hard": of a group of near-duplicates the sample least like the cluster's prototype is
   kept), ties in the set's order.
3. Walk that order greedily: a sample is dropped when its cosine to an earlier *kept* sample of its
   cluster exceeds `threshold`; otherwise it is kept. (The paper's code drops a sample whose cosine to
   any earlier sample exceeds the threshold, kept or not; the greedy rule differs only on chains a~b, b~c
   with a !~ c, where it keeps c, and it guarantees that no two kept samples of a cluster are closer than
   the threshold.) `detail` holds the key of the earlier kept sample with the highest cosine, `score` that
   highest cosine to an earlier kept sample of the cluster (NaN for a cluster's first sample).

Near duplicates that k-means puts in different clusters are not compared: docs/curation.md
gives how often that happened on planted duplicates.
"""
from __future__ import annotations

import numpy as np

from ..extras import require
from .result import StageResult

STAGE = "semantic_dup"
REASON = "semantic_duplicate"
BLOCK = 4096  # rows of a cluster compared at a time


def default_clusters(n_alive: int) -> int:
    return max(1, int(round(np.sqrt(n_alive))))


def spherical_kmeans(x: np.ndarray, k: int, seed: int, niter: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [k, D] L2-normalised, assignment [n] int64) of seeded spherical k-means over the rows of x."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    k = max(1, min(k, n))
    if k == 1:
        c = x.mean(axis=0, keepdims=True)
        c /= max(float(np.linalg.norm(c)), 1e-12)
        return c.astype(np.float32), np.zeros(n, dtype=np.int64)
    faiss = require("faiss", "semantic deduplication (clipkit curate)")
    km = faiss.Kmeans(d, k, niter=niter, seed=int(seed), spherical=True, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max(256, (n + k - 1) // k + 1))
    km.train(x)
    centroids = km.centroids / np.maximum(np.linalg.norm(km.centroids, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexFlatIP(d)
    index.add(centroids.astype(np.float32))
    _, assign = index.search(x, 1)
    return centroids.astype(np.float32), assign[:, 0].astype(np.int64)


def cluster_order(x: np.ndarray, centroid: np.ndarray) -> np.ndarray:
    """Positions of a cluster's rows, farthest from the centroid first (lowest cosine), ties in row order."""
    cos = x @ centroid
    return np.lexsort((np.arange(len(x)), cos))


def greedy_within(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy dedup of rows in the given order: (kept bool [n], best earlier kept row or -1 [n], its cosine
    [n], NaN where none). Blocked: each block of rows is compared with the kept rows before it in one matrix
    product, then with the block's own earlier rows, walking only the rows that have a close earlier one."""
    n = len(x)
    kept = np.zeros(n, dtype=bool)
    best = np.full(n, -1, dtype=np.int64)
    best_cos = np.full(n, -np.inf, dtype=np.float32)
    kept_rows: list[np.ndarray] = []  # positions kept so far, per block
    for s in range(0, n, BLOCK):
        e = min(n, s + BLOCK)
        xb = x[s:e]
        if kept_rows:
            prev = np.concatenate(kept_rows)
            sims = x[prev] @ xb.T  # [kept, B]
            arg = sims.argmax(axis=0)
            best_cos[s:e] = sims[arg, np.arange(e - s)]
            best[s:e] = prev[arg]
        inner = xb @ xb.T
        inner[np.triu_indices(e - s)] = -np.inf  # earlier rows of the block only
        close = np.flatnonzero((inner > threshold).any(axis=1))
        kept[s:e] = best_cos[s:e] <= threshold
        for i in close:  # in order: the earlier rows' decisions are final when row i is reached
            earlier = np.flatnonzero(kept[s:s + i])
            if len(earlier):
                j = earlier[np.argmax(inner[i, earlier])]
                if inner[i, j] > best_cos[s + i]:
                    best_cos[s + i], best[s + i] = inner[i, j], s + j
            kept[s + i] = best_cos[s + i] <= threshold
        # rows not in `close` still need their best earlier kept row of this block for score and detail
        others = np.setdiff1d(np.arange(e - s), close)
        if len(others) and (e - s) > 1:
            masked = np.where(kept[s:e][None, :], inner[others], -np.inf)
            arg = masked.argmax(axis=1)
            val = masked[np.arange(len(others)), arg]
            better = val > best_cos[s + others]
            best_cos[s + others[better]], best[s + others[better]] = val[better], s + arg[better]
        kept_rows.append(s + np.flatnonzero(kept[s:e]))
    best_cos = np.where(best < 0, np.nan, best_cos).astype(np.float32)
    return kept, best, best_cos


def semantic_dedup(emb: np.ndarray, alive: np.ndarray, keys, *, threshold: float, clusters: int | None,
                   seed: int) -> StageResult:
    """SemDeDup over the alive samples (module docstring): drop, within each k-means cluster, a sample whose
    cosine to an earlier kept sample exceeds `threshold`."""
    alive = np.asarray(alive, dtype=bool)
    n = len(alive)
    if len(emb) != n or len(keys) != n:
        raise ValueError(f"semantic_dup: {len(emb)} embeddings and {len(keys)} keys for {n} samples")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"semantic_dup: threshold is a cosine, in [-1, 1], got {threshold}")
    if clusters is not None and clusters < 1:
        raise ValueError(f"semantic_dup: clusters must be positive, got {clusters}")
    result = StageResult.empty(STAGE, n)
    idx = np.flatnonzero(alive)
    k = min(default_clusters(len(idx)) if clusters is None else int(clusters), max(1, len(idx)))
    result.summary = {"threshold": float(threshold), "clusters": int(k), "alive": int(len(idx)),
                      "dropped": {REASON: 0}, "seed": int(seed)}
    if len(idx) == 0:
        return result
    x = np.ascontiguousarray(np.asarray(emb)[idx], dtype=np.float32)
    centroids, assign = spherical_kmeans(x, k, seed)
    sizes = np.bincount(assign, minlength=len(centroids))
    for c in np.flatnonzero(sizes > 1):
        members = np.flatnonzero(assign == c)  # positions in x, in set order
        members = members[cluster_order(x[members], centroids[c])]
        kept, best, best_cos = greedy_within(x[members], threshold)
        rows = idx[members]
        result.score[rows] = best_cos
        dropped = ~kept
        result.drop[rows[dropped]] = True
        result.reason[rows[dropped]] = REASON
        result.detail[rows[dropped]] = [str(keys[r]) for r in rows[best[dropped]]]
    result.summary["dropped"][REASON] = int(result.drop.sum())
    result.summary["largest_cluster"] = int(sizes.max())
    return result
