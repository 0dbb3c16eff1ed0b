"""Each basic-filter reason against hand-made samples."""
from __future__ import annotations

import numpy as np

from clipkit.config.schema import CurateFiltersConfig
from clipkit.curate.filters import basic_filters


def _table(rows):
    cols = ("width", "height", "caption", "words", "tokens", "language", "language_confidence")
    return {c: np.array([r[i] for r in rows], dtype=object if c in ("caption", "language") else None)
            for i, c in enumerate(cols)}


def test_each_reason():
    cfg = CurateFiltersConfig(min_image_side=32, max_aspect=3.0, min_words=2, max_words=6, max_tokens=8,
                              languages=["en"], min_language_confidence=0.5)
    rows = [
        (64, 64, "a red square on grey", 5, 6, "en", 0.9),  # kept
        (20, 64, "a red square on grey", 5, 6, "en", 0.9),  # small_image
        (200, 40, "a red square on grey", 5, 6, "en", 0.9),  # aspect 5
        (64, 64, "square", 1, 1, "en", 0.9),  # too_few_words
        (64, 64, "one two three four five six seven", 7, 7, "en", 0.9),  # too_many_words
        (64, 64, "supercalifragilistic thing", 2, 9, "en", 0.9),  # too_many_tokens
        (64, 64, "ein rotes Quadrat", 3, 4, "de", 0.95),  # language
        (64, 64, "a red square", 3, 4, "en", 0.3),  # language (not confident)
        (64, 64, "IMG_1234.jpg", 1 + 1, 4, "en", 0.9),  # boilerplate (a file name)
        (64, 64, "image may contain: dog", 4, 5, "en", 0.9),  # boilerplate
        (20, 64, "IMG_1234.jpg", 2, 4, "de", 0.9),  # several rules broken: the first one wins
    ]
    alive = np.ones(len(rows), bool)
    alive_in = alive.copy()
    alive_in[0] = True
    r = basic_filters(_table(rows), alive_in, cfg).check(alive_in)
    assert list(r.reason) == ["", "small_image", "aspect", "too_few_words", "too_many_words", "too_many_tokens",
                              "language", "language", "boilerplate", "boilerplate", "small_image"]
    assert r.detail[1] == "20x64" and r.detail[6].startswith("de")
    # a sample already dropped is never dropped again; [] languages turns the language filter off
    alive_in[1] = False
    cfg.languages = []
    r = basic_filters(_table(rows), alive_in, cfg).check(alive_in)
    assert not r.drop[1] and not r.drop[6] and not r.drop[7] and r.drop[8]
    assert r.summary["dropped"]["language"] == 0
