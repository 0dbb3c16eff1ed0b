"""Stage 1, basic filters: image size and aspect, caption length in words and tokens, caption language, captions
that are file names or boilerplate. Each alive sample is dropped for the first rule it breaks, in the order of
REASONS; the detail says what broke it (the size, the count, the language detected, the pattern matched)."""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from ..config.schema import CurateFiltersConfig
from .result import StageResult

REASONS = ("small_image", "aspect", "too_few_words", "too_many_words", "too_many_tokens", "language", "boilerplate")


def boilerplate_match(caption: str, patterns: list[re.Pattern]) -> str:
    """The first pattern (its source) a caption matches, "" when none does."""
    for p in patterns:
        if p.search(caption):
            return p.pattern
    return ""


def basic_filters(table: Mapping[str, np.ndarray], alive: np.ndarray, cfg: CurateFiltersConfig) -> StageResult:
    """Decisions over the feature table's columns width, height, caption, words, tokens, language,
    language_confidence (see clipkit.curate.scan). The score is the language confidence."""
    n = len(alive)
    out = StageResult.empty("filters", n)
    if not cfg.enabled:
        out.summary = {"enabled": False}
        return out
    width = np.asarray(table["width"], dtype=np.int64)
    height = np.asarray(table["height"], dtype=np.int64)
    words = np.asarray(table["words"], dtype=np.int64)
    tokens = np.asarray(table["tokens"], dtype=np.int64)
    lang = np.asarray(table["language"], dtype=object)
    conf = np.asarray(table["language_confidence"], dtype=np.float32)
    short, long_ = np.minimum(width, height), np.maximum(width, height)
    patterns = [re.compile(p, re.IGNORECASE) for p in cfg.boilerplate]
    plate = np.array([boilerplate_match(c, patterns) for c in table["caption"]], dtype=object)
    if not len(plate):
        plate = np.zeros(0, dtype=object)
    langs = set(cfg.languages)
    lang_ok = np.ones(n, dtype=bool) if not langs else np.array(
        [(l in langs) and c >= cfg.min_language_confidence for l, c in zip(lang, conf)], dtype=bool)
    rules = [
        ("small_image", short < cfg.min_image_side, lambda i: f"{width[i]}x{height[i]}"),
        ("aspect", long_ > cfg.max_aspect * np.maximum(short, 1), lambda i: f"{width[i]}x{height[i]}"),
        ("too_few_words", words < cfg.min_words, lambda i: f"{words[i]} words"),
        ("too_many_words", words > cfg.max_words, lambda i: f"{words[i]} words"),
        ("too_many_tokens", (tokens > cfg.max_tokens) if cfg.max_tokens is not None else np.zeros(n, bool),
         lambda i: f"{tokens[i]} tokens"),
        ("language", ~lang_ok, lambda i: f"{lang[i] or 'unknown'} ({conf[i]:.2f})"),
        ("boilerplate", plate != "", lambda i: str(plate[i])),
    ]
    todo = alive.copy()
    counts = {}
    for reason, broken, detail in rules:
        hit = todo & broken
        for i in np.flatnonzero(hit):
            out.reason[i], out.detail[i] = reason, detail(i)
        out.drop |= hit
        todo &= ~hit
        counts[reason] = int(hit.sum())
    out.score = np.where(np.isfinite(conf), conf, np.nan).astype(np.float32)
    out.summary = {"enabled": True, "dropped": counts, "languages": list(cfg.languages),
                   "min_image_side": cfg.min_image_side, "max_aspect": cfg.max_aspect,
                   "min_words": cfg.min_words, "max_words": cfg.max_words, "max_tokens": cfg.max_tokens}
    return out
