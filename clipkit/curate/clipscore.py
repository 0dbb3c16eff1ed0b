"""CLIP-score filtering: drop pairs whose image and caption embeddings disagree (LAION's filter).

The score of a sample is the cosine similarity of its image and text embeddings (rows L2-normalised, so the
dot product). A sample is kept when its score reaches an absolute threshold (LAION-400M used 0.28 with ViT-B/32),
or when it is among the top fraction of the samples still alive (DataComp's "CLIP score top 30%"): the rank
cut is relative to the set, so it needs no calibration to the model's scale.
"""
from __future__ import annotations

import math

import numpy as np

from .result import StageResult

STAGE = "clip_score"
REASON = "low_clip_score"


def clip_scores(image_emb: np.ndarray, text_emb: np.ndarray, block: int = 65536) -> np.ndarray:
    """Row-wise dot product of two [N, D] arrays of L2-normalised rows (the cosine of each pair), float32."""
    image_emb, text_emb = np.asarray(image_emb), np.asarray(text_emb)
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"image and text embeddings must be [N, D] arrays of one shape, "
                         f"got {image_emb.shape} and {text_emb.shape}")
    out = np.empty(len(image_emb), dtype=np.float32)
    for s in range(0, len(image_emb), block):  # in blocks: no float32 copy of a whole billion-row memmap
        a = image_emb[s:s + block].astype(np.float32, copy=False)
        b = text_emb[s:s + block].astype(np.float32, copy=False)
        out[s:s + block] = np.einsum("ij,ij->i", a, b)
    return out


def clip_score_filter(image_emb: np.ndarray, text_emb: np.ndarray, alive: np.ndarray, *,
                      threshold: float | None, top_fraction: float | None) -> StageResult:
    """Score every sample; drop the alive ones below `threshold` (keep score >= threshold), or outside the
    top `top_fraction` of alive samples (keep ceil(fraction * n_alive) of them, the highest scores, ties
    broken by the set's order: the earlier sample is kept). Exactly one of the two must be set."""
    if (threshold is None) == (top_fraction is None):
        raise ValueError("clip_score: set exactly one of threshold and top_fraction")
    if top_fraction is not None and not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"clip_score: top_fraction must be in (0, 1], got {top_fraction}")
    alive = np.asarray(alive, dtype=bool)
    scores = clip_scores(image_emb, text_emb)
    if len(scores) != len(alive):
        raise ValueError(f"clip_score: {len(scores)} embeddings for {len(alive)} samples")
    result = StageResult.empty(STAGE, len(alive))
    result.score[:] = scores
    idx = np.flatnonzero(alive)
    if threshold is not None:
        cut = float(threshold)
        drop_idx = idx[scores[idx] < cut]
        summary = {"threshold": cut}
    else:
        keep_n = math.ceil(top_fraction * len(idx))
        # stable sort on -score: equal scores keep the set's order, so the earlier sample ranks first
        order = idx[np.argsort(-scores[idx], kind="stable")]
        drop_idx = np.sort(order[keep_n:])
        cut = float(scores[order[keep_n - 1]]) if keep_n > 0 else None
        summary = {"top_fraction": float(top_fraction), "kept": int(keep_n), "score_at_cut": cut}
    result.drop[drop_idx] = True
    result.reason[drop_idx] = REASON
    alive_scores = scores[idx]
    summary.update({
        "alive": int(len(idx)),
        "dropped": {REASON: int(len(drop_idx))},
        "score_mean": float(alive_scores.mean()) if len(idx) else None,
        "score_quantiles": ({q: float(np.quantile(alive_scores, float(q))) for q in ("0.1", "0.5", "0.9")}
                            if len(idx) else {}),
    })
    result.summary = summary
    return result
