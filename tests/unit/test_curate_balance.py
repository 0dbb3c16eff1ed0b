"""MetaCLIP balancing: matching against a brute-force reference, counts and probabilities against a hand
computation of MetaCLIP's formula, head entries sampled down to about t, determinism, the plot."""
import math
import random

import numpy as np
import pytest

from clipkit.curate.balance import (balance, builtin_entries, entry_counts, match_entries, plot_entry_counts,
                                    read_entries, uniform_draws)
from clipkit.errors import UserError


def _ref_spaced_caption(text):
    # MetaCLIP's rules, written out again: spaces around the caption and around , . ; : ? ! ` ; tabs/newlines -> space
    out = " " + text + " "
    for p in ",.;:?!`":
        out = out.replace(p, " " + p + " ")
    return out.replace("\t", " ").replace("\n", " ").replace("\r", " ")


def _ref_matches(captions, entries):
    # entries in these tests are plain latin words/phrases: both ends get a space
    return [sorted(j for j, e in enumerate(entries) if " " + e + " " in _ref_spaced_caption(c)) for c in captions]


def test_matching_follows_metaclip_spacing_rules():
    entries = ["dog", "hot dog", "Dog", "cat"]
    captions = ["a dog.", "hotdog stand", "dogs", "my hot dog,cat", "Dog\tand cat!", "", "a dog dog"]
    assert match_entries(captions, entries) == [[0], [], [], [0, 1, 3], [2, 3], [], [0]]


def test_matching_equals_brute_force_on_random_captions():
    rng = random.Random(0)
    words = ["red", "car", "blue", "sky", "big", "dog", "of", "the", "a"]
    entries = ["red car", "sky", "dog", "big dog", "the sky", "car", "a"]
    puncts = ["", "", "", ".", ",", "!", "?", ";", ":"]
    captions = []
    for _ in range(400):
        n = rng.randint(0, 8)
        captions.append("".join(rng.choice(words) + rng.choice(puncts) + rng.choice([" ", " ", "\t", "\n", ""])
                                for _ in range(n)))
    got = match_entries(captions, entries)
    assert got == _ref_matches(captions, entries)
    assert sum(map(len, got)) > 200  # the reference is not trivially empty


def test_counts_and_probabilities_against_hand_computation():
    # t = 2. Alive samples and their matches (entries a=0, b=1, c=2):
    #  s0 "a"      s1 "a"      s2 "a b"    s3 "a"      s4 "c"      s5 "none"   s6 "b" (not alive)
    # counts among alive: a=4, b=1, c=1 -> p_a = 2/4 = 0.5, p_b = 1, p_c = 1
    # keep probabilities: s0 s1 s3: 0.5; s2: 1-(1-0.5)(1-1) = 1; s4: 1; s5: 0 (no entry, dropped)
    entries = ["apple", "banana", "cherry"]
    captions = ["an apple", "apple", "apple and banana", "apple!", "cherry pie", "nothing here", "banana"]
    alive = np.array([True] * 6 + [False])
    keys = [f"k{i}" for i in range(7)]
    res = balance(captions, alive, keys, entries, t=2, seed=5).check(alive)
    np.testing.assert_allclose(res.score[:6], [0.5, 0.5, 1.0, 0.5, 1.0, 0.0])
    assert math.isnan(res.score[6]) and not res.drop[6] and res.reason[6] == ""
    assert res.summary["counts_before"] == {"apple": 4, "banana": 1, "cherry": 1}
    assert res.summary["matched"] == 5 and res.summary["unmatched"] == 1 and res.summary["head_entries"] == 1
    assert res.reason[5] == "no_entry" and res.drop[5]
    assert res.detail[2] == "apple|banana"
    draws = uniform_draws(keys, 5)
    for i in (0, 1, 3):  # kept iff not (p < u), as curate.py's `if prob < random.random(): continue`
        assert res.drop[i] == (0.5 < draws[i])
        assert res.reason[i] == ("head_entry_sampled_out" if res.drop[i] else "")
    assert not res.drop[2] and not res.drop[4]
    kept_apple = 1 + sum(not res.drop[i] for i in (0, 1, 3))
    assert res.summary["counts_after"]["apple"] == kept_apple
    assert res.summary["counts_after"]["banana"] == 1 and res.summary["counts_after"]["cherry"] == 1


def test_head_entries_are_sampled_down_to_about_t():
    # each caption matches exactly one entry: a head entry's kept count is Binomial(count, t / count), mean t,
    # std sqrt(t (1 - t / count)); allowed: 4 standard deviations
    t = 200
    sizes = {"alpha": 5000, "beta": 2000, "gamma": 800, "delta": 150, "epsilon": 20}
    captions = [f"a photo of {name} number {i}" for name, m in sizes.items() for i in range(m)]
    keys = [f"s{i:06d}" for i in range(len(captions))]
    alive = np.ones(len(captions), dtype=bool)
    res = balance(captions, alive, keys, list(sizes), t=t, seed=11)
    after = res.summary["counts_after"]
    for name, m in sizes.items():
        if m > t:
            std = math.sqrt(t * (1 - t / m))
            assert abs(after[name] - t) <= 4 * std, (name, after[name])
        else:
            assert after[name] == m  # tail entries keep everything
    assert res.summary["counts_before"] == sizes


def test_draws_depend_only_on_seed_and_key():
    entries = ["x", "y"]
    captions = [f"{'x' if i % 3 else 'y'} {i}" for i in range(600)]
    keys = [f"key{i}" for i in range(600)]
    alive = np.ones(600, dtype=bool)
    a = balance(captions, alive, keys, entries, t=50, seed=1)
    b = balance(captions, alive, keys, entries, t=50, seed=1)
    assert np.array_equal(a.drop, b.drop) and np.array_equal(a.reason, b.reason)
    c = balance(captions, alive, keys, entries, t=50, seed=2)
    assert not np.array_equal(a.drop, c.drop)
    # reversed order and a subset, with the pool's counts passed: the same fate for each key
    perm = np.random.default_rng(0).permutation(600)[:250]
    sub = balance([captions[i] for i in perm], alive[perm], [keys[i] for i in perm], entries, t=50, seed=1,
                  counts=np.array([400, 200]))
    assert np.array_equal(sub.drop, a.drop[perm])
    np.testing.assert_allclose(sub.score, a.score[perm])
    # two "ranks": each counts its own samples, the counts are summed, each decides with the pool's counts
    halves = [np.arange(0, 600, 2), np.arange(1, 600, 2)]
    found = [match_entries([captions[i] for i in h], entries) for h in halves]
    pool = sum(entry_counts(m, alive[h], len(entries)) for m, h in zip(found, halves))
    for m, h in zip(found, halves):
        part = balance([captions[i] for i in h], alive[h], [keys[i] for i in h], entries, t=50, seed=1,
                       counts=pool, matches=m)
        assert np.array_equal(part.drop, a.drop[h])
    u = uniform_draws(keys, 1)
    assert np.all((u >= 0) & (u < 1)) and abs(u.mean() - 0.5) < 0.05


def test_entries_files(tmp_path):
    f = tmp_path / "entries.txt"
    f.write_text(" dog \n\ncat\ndog\nhot dog\n", encoding="utf-8")
    assert read_entries(str(f)) == ["dog", "cat", "hot dog"]
    with pytest.raises(UserError, match="does not exist"):
        read_entries(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UserError, match="no entries"):
        read_entries(str(tmp_path / "empty.txt"))
    root = tmp_path / "cifar"
    root.mkdir()
    (root / "classnames.txt").write_text("airplane\nGolden retriever\n")
    assert builtin_entries([str(root)]) == ["airplane", "Airplane", "Golden retriever", "golden retriever"]
    with pytest.raises(UserError, match="classnames.txt"):
        builtin_entries([str(tmp_path)])


def test_plot_is_a_png(tmp_path):
    out = tmp_path / "entry_counts.png"
    plot_entry_counts({"a": 5000, "b": 30, "c": 2}, {"a": 210, "b": 30, "c": 2}, out, t=200)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_cjk_and_punctuation_ended_entries_get_no_space_on_that_end():
    # get_spaced_metadata: no space beside a CJK-like or punctuation character
    entries = ["猫", "C++", "dog"]
    captions = ["一只猫在睡觉", "learning C++11 fast", "C++ code", "a dog猫"]
    assert match_entries(captions, entries) == [[0], [1], [1], [0]]
