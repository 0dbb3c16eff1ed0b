"""Stage 2a, exact and near duplicates over the whole set (within and across shards).

Keep rule, for both: samples are visited in set order; a sample is dropped when it matches a sample visited
before it that was kept, with detail = that sample's key (the first such one). So the first sample of every
group of duplicates is kept, and a sample is never dropped for matching one that was itself dropped.

Exact: identical image bytes (equal SHA-256).

Near: perceptual hashes within `max_distance` bits, comparing each sample's pHash with the other's pHash and
with the pHash of the other's mirror image (so a left-right flipped copy matches). Samples with an identical
(pHash, mirror pHash) pair are collapsed first (their first one stands for all).

near_dedup then walks the remaining samples (representatives) in set order, DEDUP_BLOCK at a time: each block is
searched against the samples kept so far (two faiss IndexBinaryFlat, of the kept pHashes and of the kept mirror
pHashes, grown as samples are kept: a block's pHashes against both, its mirror pHashes against the kept
pHashes) and against its own earlier rows (a numpy popcount of the block's pairs), and the keep rule is applied
row by row. A dropped sample never enters the index, so memory holds one block's matches with kept samples:
few on diverse data (few matches) and on look-alike data (few kept), never every matching pair. The work is
about 1.5 x N x kept comparisons (N^2 at most, for data with no duplicates).

near_pairs (every pair within the distance, for callers that want the pairs themselves) has two exact methods,
the same pairs either way:
- bands (a multi-index): the 64 bits are cut into max_distance + 1 bands, and by the pigeonhole principle two
  hashes within max_distance bits agree exactly on at least one band, so only hashes that share a band value
  are compared, bucket by bucket (numpy for small buckets, a faiss binary range search for large ones). The
  work is about N * (max_distance + 1) plus the pairs in shared buckets: small while the bands are wide (about
  13 bits at 4 bits of distance), close to all pairs, 13 times over, when they are narrow (about 5 bits at 12,
  when a bucket holds a 32nd of all hashes).
- flat: every pHash and mirror pHash against every pHash in one faiss IndexBinaryFlat range search (a popcount
  of the XOR per pair in C++, a fraction of a nanosecond each, threaded by faiss): 2 N^2 comparisons, but
  faster than the bands wherever their buckets are crowded.
near_pairs takes the method with fewer comparisons for the hashes at hand (it counts the buckets' sizes
first): the bands at small distances, the flat search at 12 bits. Its memory is that of the pairs it returns,
which on look-alike data (most samples within the distance of each other) grows as N^2.

Verification (min_similarity, with the samples' thumbnails from clipkit.curate.hashing.thumbnail): a hash match
counts only when the two images' 8x8 colour thumbnails also correlate at least that much (thumb_similarity,
mirror-aware). pHash keeps 64 bits of a 32x32 grey image, and a distance that lets a slightly cropped copy
through also lets some unrelated images through; the thumbnail is an independent, colour view of the same
coarse layout, so the two together admit a wider distance at the same precision. Samples are then collapsed on
(pHash, mirror pHash, thumbnail) instead of the hashes alone.
"""
from __future__ import annotations

import numpy as np

from ..extras import require
from .hashing import hamming, thumb_similarity, thumbs_array
from .result import StageResult


def exact_dedup(sha256: np.ndarray, alive: np.ndarray, keys) -> StageResult:
    """Drop samples whose image bytes equal those of an earlier kept sample."""
    n = len(alive)
    out = StageResult.empty("exact_dedup", n)
    first: dict[str, int] = {}
    for j in np.flatnonzero(alive):
        h = sha256[j]
        if h in first:
            out.drop[j], out.reason[j], out.detail[j] = True, "exact_duplicate", str(keys[first[h]])
        else:
            first[h] = int(j)
    out.summary = {"dropped": {"exact_duplicate": int(out.drop.sum())}, "groups": len(first)}
    return out


VERIFY_BLOCK = 1 << 16  # pairs whose thumbnails are compared at a time
FAISS_MIN_BUCKET = 64  # entries from which a band's bucket is searched with faiss rather than numpy
BUCKET_OVERHEAD = 4096  # a bucket's fixed cost, in distance computations, when choosing bands or one flat search
QUERY_BLOCK = 1 << 16  # queries per faiss range search in the flat search


def _codes(h: np.ndarray) -> np.ndarray:
    """uint64 hashes as faiss binary codes: uint8 [N, 8], the hash's 8 bytes per row (the Hamming distance of two
    rows is that of the two hashes, whatever the byte order)."""
    return np.ascontiguousarray(np.asarray(h, dtype=np.uint64)).view(np.uint8).reshape(-1, 8)


def _binary_index():
    """An empty exact (brute-force) faiss index of 64-bit hashes."""
    return require("faiss", "near deduplication (clipkit curate)").IndexBinaryFlat(64)


def _search(index, queries: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """(query row, index entry) of every query and indexed hash at most max_distance bits apart: a faiss range
    search (it returns the distances strictly below its radius: max_distance + 1), QUERY_BLOCK queries at a time;
    sorted by query row."""
    qs, ds = [], []
    for s in range(0, len(queries), QUERY_BLOCK):
        lims, _, ids = index.range_search(_codes(queries[s:s + QUERY_BLOCK]), max_distance + 1)
        qs.append(s + np.repeat(np.arange(len(lims) - 1, dtype=np.int64), np.diff(lims.astype(np.int64))))
        ds.append(ids.astype(np.int64))
    if not qs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(qs), np.concatenate(ds)


def _range_search(db: np.ndarray, queries: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """(query row, db row) of every query and db hash at most max_distance bits apart, exactly."""
    index = _binary_index()
    index.add(_codes(db))
    return _search(index, queries, max_distance)


def _band_buckets(values: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries sorted by bits lo..hi-1 of their hash: (order, bucket starts, bucket ends)."""
    band = (values >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
    order = np.argsort(band, kind="stable")
    sb = band[order]
    starts = np.flatnonzero(np.r_[True, sb[1:] != sb[:-1]])
    ends = np.r_[starts[1:], len(sb)]
    return order, starts, ends


def near_pairs(phash: np.ndarray, phash_flip: np.ndarray, max_distance: int, *, method: str = "auto") -> np.ndarray:
    """Every (i, j), i < j, of rows whose hashes match: hamming(p_i, p_j), hamming(p_i, f_j) or hamming(f_i, p_j)
    at most max_distance (two mirror hashes are not compared: that is nearly the pHash test again). Rows are
    expected to hold distinct (p, f) pairs (run on representatives). Returns int64 [P, 2], sorted by i then j.

    Two exact methods (module docstring), the same pairs: "bands" (multi-index: only hashes that agree on one of
    max_distance + 1 bands are compared; faiss within large buckets, numpy within small ones) and "flat" (every
    pHash and mirror pHash against every pHash, one faiss IndexBinaryFlat range search). "auto" takes the one
    with fewer distance computations for these hashes."""
    if method not in ("auto", "bands", "flat"):
        raise ValueError(f"near_pairs: method is auto, bands or flat, got {method!r}")
    if not 0 <= max_distance <= 64:
        raise ValueError(f"near_pairs: max_distance is a number of bits, 0..64, got {max_distance}")
    p = np.asarray(phash, dtype=np.uint64)
    f = np.asarray(phash_flip, dtype=np.uint64)
    n = len(p)
    if n < 2:
        return np.zeros((0, 2), np.int64)
    # Entries: every row's pHash (kind 0) and mirror pHash (kind 1).
    values = np.concatenate([p, f])
    rows = np.concatenate([np.arange(n), np.arange(n)])
    kinds = np.concatenate([np.zeros(n, np.int8), np.ones(n, np.int8)])
    buckets = []
    if method != "flat":
        edges = np.linspace(0, 64, min(max_distance + 1, 64) + 1).astype(int)
        buckets = [_band_buckets(values, lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]
    if method == "auto":
        band_cost = 0.0
        for _, starts, ends in buckets:
            size = (ends - starts)[ends - starts > 1].astype(np.float64)
            band_cost += float((size * size + BUCKET_OVERHEAD).sum())
        method = "bands" if band_cost < 2.0 * n * n else "flat"
    a_parts, b_parts = [], []
    if method == "flat":
        qa, db = _range_search(p, values, max_distance)  # queries: pHashes then mirror pHashes; db: pHashes
        a_parts.append(rows[qa])
        b_parts.append(db)
    else:
        for order, starts, ends in buckets:
            for s, e in zip(starts.tolist(), ends.tolist()):
                if e - s < 2:
                    continue
                idx = order[s:e]
                if e - s >= FAISS_MIN_BUCKET:
                    plain = idx[kinds[idx] == 0]  # the bucket's pHashes, searched by all its entries
                    if len(plain):
                        qa, db = _range_search(values[plain], values[idx], max_distance)
                        a_parts.append(rows[idx[qa]])
                        b_parts.append(rows[plain[db]])
                    continue
                ia, ib = np.nonzero(hamming(values[idx][:, None], values[idx][None, :]) <= max_distance)
                keep = ~((kinds[idx[ia]] == 1) & (kinds[idx[ib]] == 1))
                a_parts.append(rows[idx[ia[keep]]])
                b_parts.append(rows[idx[ib[keep]]])
    ra = np.concatenate(a_parts) if a_parts else np.zeros(0, np.int64)
    rb = np.concatenate(b_parts) if b_parts else np.zeros(0, np.int64)
    ok = ra != rb
    lo, hi = np.minimum(ra[ok], rb[ok]), np.maximum(ra[ok], rb[ok])
    code = np.unique(lo.astype(np.int64) * n + hi)
    return np.stack([code // n, code % n], axis=1)


DEDUP_BLOCK = 1024  # representatives walked at a time by near_dedup (its memory: a block's pairs, not all pairs)


class _KeptIndex:
    """The pHashes and the mirror pHashes of the samples kept so far, in two faiss IndexBinaryFlat (entry k: the
    k-th kept sample's), grown as samples are kept."""

    def __init__(self) -> None:
        self.p, self.f = _binary_index(), _binary_index()
        self.rows = np.zeros(0, np.int64)  # kept k -> its row among the representatives

    def add(self, rows: np.ndarray, p: np.ndarray, f: np.ndarray) -> None:
        if len(rows):
            self.p.add(_codes(p))
            self.f.add(_codes(f))
            self.rows = np.concatenate([self.rows, rows])

    def matches(self, p: np.ndarray, f: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
        """(query position, kept row) of every query within max_distance of a kept sample: the query's pHash
        against the kept pHashes and mirror pHashes, its mirror pHash against the kept pHashes (mirror against
        mirror is not compared). Sorted by query position then kept row, each pair once."""
        k = len(self.rows)
        if not k or not len(p):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        codes = []
        for index, queries in ((self.p, np.concatenate([p, f])), (self.f, p)):
            q, ids = _search(index, queries, max_distance)
            codes.append(q % len(p) * k + ids)
        code = np.unique(np.concatenate(codes))
        return code // k, self.rows[code % k]


def near_dedup(phash: np.ndarray, phash_flip: np.ndarray, alive: np.ndarray, keys, max_distance: int, *,
               thumbs=None, min_similarity: float | None = None, block: int | None = None) -> StageResult:
    """Drop samples whose perceptual hash (or mirror's) lies within max_distance bits of an earlier kept one's
    (and, with `min_similarity`, whose thumbnails (`thumbs`, thumbnail() bytes per sample) correlate at least
    that much: module docstring). The score is the bit distance to the kept sample (NaN for samples not
    dropped).

    The representatives are walked in set order, `block` (default DEDUP_BLOCK) at a time: each block is searched
    against the samples kept so far (a faiss index of their pHashes and mirror pHashes, grown as samples are
    kept) and against its own earlier rows, so memory holds a block's matches with kept samples, never every
    pair. summary["pairs_examined"] counts the pairs (kept sample, later sample) whose hashes match, the ones
    whose thumbnails are compared with the verification; summary["rejected_by_verification"] those of them
    whose thumbnails correlate below min_similarity. Neither depends on the block size."""
    n = len(alive)
    out = StageResult.empty("near_dedup", n)
    idx = np.flatnonzero(alive)
    p = np.asarray(phash, dtype=np.uint64)
    f = np.asarray(phash_flip, dtype=np.uint64)
    verify = min_similarity is not None
    if verify and (thumbs is None or len(thumbs) != n):
        raise ValueError("near_dedup: verification (min_similarity) needs one thumbnail per sample")
    if not 0 <= max_distance <= 64:
        raise ValueError(f"near_dedup: max_distance is a number of bits, 0..64, got {max_distance}")
    block = DEDUP_BLOCK if block is None else int(block)
    if block < 1:
        raise ValueError(f"near_dedup: block is a number of rows, at least 1, got {block}")
    reps: dict[tuple, int] = {}
    rep_of = {}
    for j in idx:
        ident = (int(p[j]), int(f[j]), bytes(thumbs[j])) if verify else (int(p[j]), int(f[j]))
        rep_of[int(j)] = reps.setdefault(ident, int(j))
    rep_rows = np.array(sorted(set(reps.values())), dtype=np.int64)
    rp, rf = p[rep_rows], f[rep_rows]
    t = thumbs_array([thumbs[i] for i in rep_rows]) if verify and len(rep_rows) else None
    kept_index = _KeptIndex()
    first_match = np.full(len(rep_rows), -1, np.int64)  # the first kept representative each one matches
    examined = rejected = 0
    for s in range(0, len(rep_rows), block):
        e = min(s + block, len(rep_rows))
        bp, bf = rp[s:e], rf[s:e]
        # Against the samples kept in earlier blocks (all before this block, in row order).
        qa, kb = kept_index.matches(bp, bf, max_distance)
        examined += len(qa)
        if verify and len(qa):
            ok = np.concatenate([thumb_similarity(t[kb[c:c + VERIFY_BLOCK]], t[s + qa[c:c + VERIFY_BLOCK]])
                                 for c in range(0, len(qa), VERIFY_BLOCK)]) >= min_similarity
            rejected += int((~ok).sum())
            qa, kb = qa[ok], kb[ok]
        if len(qa):  # sorted by query then kept row: a query's first entry is its first match
            first = np.r_[True, qa[1:] != qa[:-1]]
            first_match[s + qa[first]] = kb[first]
        # Against this block's earlier rows, one row at a time, since whether they are kept is decided here.
        dist = np.minimum(hamming(bp[:, None], bp[None, :]),
                          np.minimum(hamming(bp[:, None], bf[None, :]), hamming(bf[:, None], bp[None, :])))
        near = np.tril(dist <= max_distance, k=-1)  # near[r, i]: block rows i < r whose hashes match row r's
        del dist
        has_near = near.any(axis=1)
        kept_blk = np.zeros(e - s, dtype=bool)
        for r in range(e - s):
            cand = np.flatnonzero(near[r] & kept_blk) if has_near[r] else ()
            if len(cand):
                examined += len(cand)
                if verify:
                    ok = thumb_similarity(t[s + cand], np.repeat(t[s + r][None], len(cand), axis=0)) >= min_similarity
                    rejected += int((~ok).sum())
                    cand = cand[ok]
            if first_match[s + r] < 0 and len(cand):
                first_match[s + r] = s + int(cand[0])
            kept_blk[r] = first_match[s + r] < 0
        kept_index.add(np.arange(s, e)[kept_blk], bp[kept_blk], bf[kept_blk])
    for a in np.flatnonzero(first_match >= 0):
        j, i = int(rep_rows[a]), int(rep_rows[first_match[a]])
        out.drop[j], out.reason[j], out.detail[j] = True, "near_duplicate", str(keys[i])
    key_index = {str(keys[i]): i for i in rep_rows}
    for j in idx:
        r = rep_of[int(j)]
        if r == j:
            continue
        out.drop[j], out.reason[j] = True, "near_duplicate"
        out.detail[j] = str(keys[r]) if not out.drop[r] else out.detail[r]
    for j in np.flatnonzero(out.drop):
        k = key_index.get(out.detail[j])
        if k is not None:
            d = min(int(hamming(p[j], p[k])), int(hamming(p[j], f[k])), int(hamming(f[j], p[k])))
            out.score[j] = d
    out.summary = {"dropped": {"near_duplicate": int(out.drop.sum())}, "max_distance": max_distance,
                   "distinct_hashes": len(rep_rows), "min_similarity": min_similarity,
                   "pairs_examined": examined, "rejected_by_verification": rejected}
    return out
