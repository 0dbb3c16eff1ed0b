"""MetaCLIP balancing: match captions against metadata entries, then sample head entries down to t each.

The definitions follow MetaCLIP's own code (facebookresearch/MetaCLIP):
- matching (metaclip/curation/substr_matching.py: `spacing`, `get_spaced_metadata`): the caption is wrapped in
  spaces, the punctuation marks , . ; : ? ! ` get a space on each side, tabs and line breaks become spaces; an
  entry is wrapped in a space on each end whose character is not CJK-like or punctuation; an entry matches when
  its spaced form is a substring of the spaced caption (Aho-Corasick, every occurrence). Matching is case
  sensitive, as theirs: "Dog" and "dog" are two entries.
- counts (metaclip/curation/curate.py `count_per_shard`): an entry's count is the number of pool samples whose
  caption matches it (a caption counts an entry once).
- probabilities (curate.py `count_to_prob`): p_e = t / max(count_e, t), so a tail entry (count < t) has p = 1
  and a head entry t / count.
- sampling (curate.py `curate`): a sample is kept with probability 1 - prod over its matched entries of (1 - p_e),
  one uniform draw per sample (MetaCLIP 1's `balancing.balance_sampling` draws once per entry and keeps on the
  first success: the same probability). A sample that matches no entry is dropped.

The draw of a sample depends only on the seed and the sample's key, so a sample's fate does not change when
other samples are added or removed or the run is split over ranks (counts must then be the pool's: pass
`counts`, the sum of `entry_counts` over the ranks).
"""
from __future__ import annotations

import hashlib
import io
import string
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes
from ..errors import UserError
from ..extras import require
from .result import StageResult

STAGE = "balance"
PURPOSE = "MetaCLIP balancing (clipkit curate)"

_PUNCTS_TO_WRAP = (",", ".", ";", ":", "?", "!", "`")
_CHARS_TO_SPACE = ("\t", "\n", "\r")
_ADDITIONAL_PUNCTUATION = frozenset("，。、；：？！“”‘’（）【】《》〈〉「」『』～—")
_CJK_LIKE = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
             (0x2B820, 0x2CEAF), (0x2CEB0, 0x2EBEF), (0xF900, 0xFAFF), (0x2E80, 0x2EFF), (0x2F00, 0x2FDF),
             (0x2FF0, 0x2FFF), (0x0E00, 0x0E7F), (0x0E80, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF),
             (0x0F00, 0x0FFF))


def read_entries(path: str) -> list[str]:
    """Metadata entries from a text file, one per line: stripped, blank lines and repeats dropped, order kept."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"balancing entries file {path} does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"balancing entries file {path} is not UTF-8 text") from None
    entries = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if not entries:
        raise UserError(f"balancing entries file {path} holds no entries")
    return entries


def builtin_entries(eval_roots: list[str]) -> list[str]:
    """The built-in entry list: the class names of evaluation sets (CLIP_benchmark layout, ROOT/classnames.txt).

    Each class name is offered as written, in lower case, and with its first letter upper case (matching is case
    sensitive, as MetaCLIP's, and captions write names both ways). The single words of a multi-word name are not
    added: words such as "great" or "white" match most captions and would make balancing a filter on common words.
    """
    names: list[str] = []
    for root in eval_roots:
        path = Path(root) / "classnames.txt"
        if not path.is_file():
            raise UserError(f"evaluation set {root} has no classnames.txt for the built-in balancing entries")
        names += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    entries: list[str] = []
    for name in names:
        entries += [name, name.lower(), name[:1].upper() + name[1:]]
    entries = list(dict.fromkeys(entries))
    if not entries:
        raise UserError("the evaluation sets' classnames.txt files hold no class names for balancing entries")
    return entries


def spacing(text: str) -> str:
    """A caption as MetaCLIP matches it (substr_matching.py `spacing`)."""
    spaced = f" {text} "
    for punct in _PUNCTS_TO_WRAP:
        spaced = spaced.replace(punct, f" {punct} ")
    for char in _CHARS_TO_SPACE:
        spaced = spaced.replace(char, " ")
    return spaced


def _is_cjk_or_similar(char: str) -> bool:
    code = ord(char)
    return (any(lo <= code <= hi for lo, hi in _CJK_LIKE) or char in string.punctuation
            or char in _ADDITIONAL_PUNCTUATION)


def spaced_entry(entry: str) -> str:
    """An entry as MetaCLIP matches it (substr_matching.py `get_spaced_metadata`)."""
    if not entry:
        raise UserError("a balancing entry is empty")
    if not _is_cjk_or_similar(entry[0]):
        entry = f" {entry}"
    if not _is_cjk_or_similar(entry[-1]):
        entry = f"{entry} "
    return entry


def match_entries(captions: list[str], entries: list[str]) -> list[list[int]]:
    """For each caption the sorted indices of the entries it matches (MetaCLIP's spaced substring matching)."""
    ahocorasick = require("ahocorasick", PURPOSE)
    ids_of: dict[str, list[int]] = {}
    for idx, entry in enumerate(entries):
        ids_of.setdefault(spaced_entry(entry), []).append(idx)
    if not ids_of:
        return [[] for _ in captions]
    automaton = ahocorasick.Automaton()
    for key, ids in ids_of.items():
        automaton.add_word(key, tuple(ids))
    automaton.make_automaton()
    out = []
    for caption in captions:
        found: set[int] = set()
        for _, ids in automaton.iter(spacing(caption)):
            found.update(ids)
        out.append(sorted(found))
    return out


def entry_counts(matches: list[list[int]], alive: np.ndarray, n_entries: int) -> np.ndarray:
    """int64 [n_entries]: how many alive samples match each entry (curate.py `count_per_shard`)."""
    counts = np.zeros(n_entries, dtype=np.int64)
    for ids, a in zip(matches, alive):
        if a and ids:
            counts[ids] += 1
    return counts


def entry_probabilities(counts: np.ndarray, t: int) -> np.ndarray:
    """p_e = t / max(count_e, t) (curate.py `count_to_prob`)."""
    if t <= 0:
        raise UserError(f"balancing t must be positive, got {t}")
    return t / np.maximum(np.asarray(counts, dtype=np.float64), t)


def keep_probability(ids: list[int], probs: np.ndarray) -> float:
    """1 - prod over the sample's entries of (1 - p_e); 0 for a sample that matches nothing."""
    if not ids:
        return 0.0
    return float(1.0 - np.prod(1.0 - probs[ids]))


def uniform_draws(keys: list[str], seed: int) -> np.ndarray:
    """float64 [N] in [0, 1): a sample's draw, a function of the seed and its key only (BLAKE2b, 53 bits)."""
    out = np.empty(len(keys), dtype=np.float64)
    prefix = f"clipkit-balance:{seed}:".encode()
    for i, key in enumerate(keys):
        h = hashlib.blake2b(prefix + key.encode("utf-8"), digest_size=8).digest()
        out[i] = (int.from_bytes(h, "little") >> 11) / float(1 << 53)
    return out


def balance(captions: list[str], alive: np.ndarray, keys: list[str], entries: list[str], *, t: int, seed: int,
            counts: np.ndarray | None = None, matches: list[list[int]] | None = None) -> StageResult:
    """The balancing stage over N samples (only alive ones are counted and decided).

    Reasons: "no_entry" (the caption matches no entry) and "head_entry_sampled_out" (every matched entry is a head
    entry and the draw lost). detail: the matched entries joined with '|' (every alive sample that matched);
    score: the keep probability (0 for no_entry, NaN where not alive). counts: the pool's entry counts when the
    pool is larger than this call's samples (a run over ranks); default: counted over this call's alive samples.
    matches: match_entries(captions, entries) when already computed (to count them for `counts`), else matched here.
    """
    alive = np.asarray(alive, dtype=bool)
    n = len(alive)
    if not (len(captions) == len(keys) == n):
        raise ValueError(f"balance: {len(captions)} captions, {len(keys)} keys for {n} samples")
    res = StageResult.empty(STAGE, n)
    if matches is None:
        matches = match_entries(captions, entries)
    elif len(matches) != n:
        raise ValueError(f"balance: {len(matches)} match lists for {n} samples")
    local = entry_counts(matches, alive, len(entries))
    pool = local if counts is None else np.asarray(counts, dtype=np.int64)
    if pool.shape != (len(entries),):
        raise ValueError(f"balance: counts has shape {pool.shape} for {len(entries)} entries")
    probs = entry_probabilities(pool, t)
    draws = uniform_draws(keys, seed)
    kept_counts = np.zeros(len(entries), dtype=np.int64)
    matched = unmatched = 0
    for i in np.flatnonzero(alive):
        ids = matches[i]
        if not ids:
            unmatched += 1
            res.drop[i], res.reason[i], res.score[i] = True, "no_entry", 0.0
            continue
        matched += 1
        prob = keep_probability(ids, probs)
        res.score[i] = prob
        res.detail[i] = "|".join(entries[j] for j in ids)
        if prob < draws[i]:  # curate.py: `if prob < random.random(): continue`
            res.drop[i], res.reason[i] = True, "head_entry_sampled_out"
        else:
            kept_counts[ids] += 1
    res.summary = {
        "t": int(t),
        "seed": int(seed),
        "entries": len(entries),
        "head_entries": int(np.sum(pool > t)),
        "matched": matched,
        "unmatched": unmatched,
        "kept": int(matched - np.sum(res.reason == "head_entry_sampled_out")),
        "reasons": {"no_entry": unmatched,
                    "head_entry_sampled_out": int(np.sum(res.reason == "head_entry_sampled_out"))},
        "counts_before": {entries[j]: int(local[j]) for j in np.flatnonzero(local)},
        "counts_after": {entries[j]: int(kept_counts[j]) for j in np.flatnonzero(kept_counts)},
    }
    return res.check(alive)


def plot_entry_counts(counts_before: dict, counts_after: dict, path, t: int | None = None) -> None:
    """Entry counts before and after balancing, each sorted largest first, on a log scale, with the t line;
    written as a PNG at `path` (atomically). Entries with no match are left out (log scale)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, counts in (("before", counts_before), ("after", counts_after)):
        values = np.sort(np.array([v for v in counts.values() if v > 0], dtype=np.float64))[::-1]
        if len(values):
            ax.plot(np.arange(1, len(values) + 1), values, label=f"{label} ({len(values)} entries)")
    if t is not None:
        ax.axhline(t, color="k", linestyle="--", linewidth=1, label=f"t = {t}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("entry rank (by count)")
    ax.set_ylabel("matched samples")
    ax.set_title("MetaCLIP balancing: entry counts")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
