import math

import numpy as np
import pytest

from clipkit.curate.clipscore import clip_score_filter


def _unit(rng, n, d=8):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_threshold_keeps_scores_at_or_above_it():
    rng = np.random.default_rng(0)
    img, txt = _unit(rng, 50), _unit(rng, 50)
    alive = rng.random(50) < 0.8
    res = clip_score_filter(img, txt, alive, threshold=0.1, top_fraction=None).check(alive)
    for i in range(50):  # by hand: the cosine of each pair
        cos = sum(float(a) * float(b) for a, b in zip(img[i], txt[i]))
        assert res.score[i] == pytest.approx(cos, abs=1e-5)
        assert res.drop[i] == (alive[i] and cos < 0.1)
        assert res.reason[i] == ("low_clip_score" if res.drop[i] else "")
    assert res.summary["dropped"]["low_clip_score"] == int(res.drop.sum())


def test_top_fraction_keeps_the_best_of_the_alive_with_ties_in_set_order():
    d = 4
    # five distinct scores plus ties: samples 1, 3 and 5 share one score
    angles = [0.1, 0.5, 0.2, 0.5, 0.9, 0.5, 0.3, 0.05]
    img = np.zeros((len(angles), d), np.float32)
    txt = np.zeros((len(angles), d), np.float32)
    img[:, 0] = 1.0
    txt[:, 0] = np.cos(angles)
    txt[:, 1] = np.sin(angles)
    alive = np.array([True, True, True, True, True, True, True, False])
    res = clip_score_filter(img, txt, alive, threshold=None, top_fraction=0.5).check(alive)
    # 7 alive -> keep ceil(3.5) = 4: scores by angle ascending: 0 (0.1), 2 (0.2), 6 (0.3), then one of the
    # three tied at 0.5: the earliest, sample 1
    kept = sorted(np.flatnonzero(alive & ~res.drop))
    assert math.ceil(0.5 * 7) == 4
    assert kept == [0, 1, 2, 6]
    assert not res.drop[7]  # not alive: never dropped
    assert list(np.flatnonzero(res.drop)) == [3, 4, 5]


def test_exactly_one_of_threshold_and_fraction():
    z = np.ones((2, 2), np.float32) / np.sqrt(2)
    alive = np.ones(2, bool)
    with pytest.raises(ValueError):
        clip_score_filter(z, z, alive, threshold=None, top_fraction=None)
    with pytest.raises(ValueError):
        clip_score_filter(z, z, alive, threshold=0.2, top_fraction=0.3)
    with pytest.raises(ValueError):
        clip_score_filter(z, z, alive, threshold=None, top_fraction=1.5)


def test_nothing_alive():
    z = np.ones((3, 2), np.float32) / np.sqrt(2)
    dead = np.zeros(3, bool)
    for kw in ({"threshold": 0.5, "top_fraction": None}, {"threshold": None, "top_fraction": 0.3}):
        res = clip_score_filter(z, z, dead, **kw).check(dead)
        assert not res.drop.any() and res.score == pytest.approx([1.0] * 3)
