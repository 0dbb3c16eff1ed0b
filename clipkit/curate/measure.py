"""Precision and recall of every curation stage against the planted truth of a noisy set.

    clipkit data synth --noisy --out noisy --train-samples 1000 --image-size 32 --seed 11
    python -m clipkit.curate.measure --data noisy --out measured.json [--model CKPT] [curate.KEY=VALUE ...]

The noisy set (clipkit.data.noisy) says in planted.jsonl what was planted at every training key. This runs
`clipkit curate` on its training shards with every stage that can run switched on at the configured thresholds
(the defaults unless overridden): the basic filters, exact and near duplicates, decontamination against the
set's own eval/, MetaCLIP balancing and, with --model, semantic deduplication and CLIP-score filtering (and
decontamination by embedding when curate.decontam.cosine is set). Its work folder (--work, default OUT's
name with ".curate") keeps the scanned features, so a second call with other thresholds does not rescan.

Each stage is measured twice:
- isolated: the basic filters, then that stage alone (what the stage does on samples that pass the filters,
  whatever the other stages would have dropped);
- pipeline: in the run's order, on what the earlier stages left alive.

A stage's drops are compared with the samples it is there to drop (TARGETS), among the samples alive when it
ran: precision = true drops / drops, recall = true drops / targets (null when the denominator is 0).
- filters, clip_score: a drop is true when the sample's planted kind is one of the stage's kinds.
- decontam: a drop is true when the sample is a planted leak and the detail names its own evaluation image.
- exact_dedup, near_dedup, semantic_dedup: a planted original and its copies of the stage's kinds form a
  group; a group with m members alive expects m - 1 drops (either member of a pair may be the one kept), and
  a drop is true when the sample and the sample kept in its place (the detail) are members of one group.
- balance: the planted truth is a distribution, not labels; reported are the head classes' share of the
  clean samples and the largest over the smallest class count, before and after.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..config.schema import CurateConfig
from .run import STAGES

FILTER_KINDS = frozenset({"filename_caption", "foreign_language", "small_image", "extreme_aspect"})
TARGETS: dict[str, frozenset[str]] = {
    "filters": FILTER_KINDS,
    "exact_dedup": frozenset({"exact_dup"}),
    "near_dedup": frozenset({"exact_dup", "near_dup"}),
    "semantic_dedup": frozenset({"exact_dup", "near_dup"}),
    "decontam": frozenset({"eval_leak"}),
    "clip_score": frozenset({"mismatched"}),
}
DUP_STAGES = ("exact_dedup", "near_dedup", "semantic_dedup")


def read_planted(path: str | Path) -> dict[str, dict]:
    """planted.jsonl as {key: record}."""
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["key"]: r for r in records}


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def stage_counts(stage: str, keys, drop: np.ndarray, detail, alive: np.ndarray, planted: dict[str, dict]) -> dict:
    """Drops, true drops, targets, precision and recall of one stage's decisions (module docstring) over the
    samples `keys` (drop, detail: the stage's result; alive: the samples alive when it ran)."""
    keys = [str(k) for k in keys]
    kinds = [planted[k]["kind"] if k in planted else None for k in keys]
    wanted = TARGETS[stage]
    dropped = np.flatnonzero(np.asarray(drop, dtype=bool))
    live = np.flatnonzero(np.asarray(alive, dtype=bool))
    if stage in DUP_STAGES:
        def group(k: str) -> str | None:  # the original a member belongs to; None for a sample of no group
            r = planted.get(k)
            if r is None:
                return None
            return r["original"] if r["kind"] in wanted else k
        members: dict[str, list[str]] = {}
        for i in live:
            g = group(keys[i])
            if g is not None:
                members.setdefault(g, []).append(keys[i])
        targets = sum(len(m) - 1 for m in members.values() if len(m) > 1)
        true = sum(1 for j in dropped if group(keys[j]) is not None and group(keys[j]) == group(str(detail[j]))
                   and len(members.get(group(keys[j]), ())) > 1)
    elif stage == "decontam":
        targets = sum(1 for i in live if kinds[i] in wanted)
        true = sum(1 for j in dropped if kinds[j] in wanted
                   and str(detail[j]).split(":", 1)[-1] == planted[keys[j]]["original"].split(":", 1)[-1])
    else:
        targets = sum(1 for i in live if kinds[i] in wanted)
        true = sum(1 for j in dropped if kinds[j] in wanted)
    return {"alive": int(len(live)), "dropped": int(len(dropped)), "true_drops": int(true), "targets": int(targets),
            "precision": _ratio(true, len(dropped)), "recall": _ratio(true, targets),
            "dropped_by_kind": dict(sorted(Counter(str(kinds[j]) for j in dropped).items()))}


def missed_by_variant(stage: str, keys, drop: np.ndarray, detail, alive: np.ndarray,
                      planted: dict[str, dict]) -> dict[str, int]:
    """For a duplicate stage: the planted copies alive with their original whose pair was not caught, by
    variant ("exact" for exact copies)."""
    keys = [str(k) for k in keys]
    pos = {k: i for i, k in enumerate(keys)}
    drop = np.asarray(drop, dtype=bool)
    missed: Counter = Counter()
    for i, k in enumerate(keys):
        r = planted.get(k)
        if r is None or r["kind"] not in TARGETS[stage] or not alive[i]:
            continue
        o = pos.get(r["original"])
        if o is None or not alive[o]:
            continue
        if not ((drop[i] and str(detail[i]) == r["original"]) or (drop[o] and str(detail[o]) == k)):
            missed[r["variant"] or "exact"] += 1
    return dict(sorted(missed.items()))


def balance_counts(keys, drop: np.ndarray, alive: np.ndarray, planted: dict[str, dict], head: list[str]) -> dict:
    """The head classes' share of the clean samples and max/min class count, before and after balancing."""
    keys = [str(k) for k in keys]
    out = {}
    for name, mask in (("before", np.asarray(alive, bool)), ("after", np.asarray(alive, bool) & ~np.asarray(drop, bool))):
        classes = Counter(planted[keys[i]]["image_class"] for i in np.flatnonzero(mask)
                          if planted.get(keys[i], {}).get("kind") == "clean")
        total = sum(classes.values())
        out[name] = {"clean": total, "head_share": _ratio(sum(classes[c] for c in head), total),
                     "max_over_min": round(max(classes.values()) / min(classes.values()), 3) if classes else None}
    out["dropped"] = int(np.asarray(drop, bool).sum())
    return out


def only(c: CurateConfig, stage: str) -> CurateConfig:
    """A copy of C running the basic filters and `stage` alone (its thresholds as in C)."""
    c = copy.deepcopy(c)
    c.filters.enabled = True
    c.dedup.exact = stage == "exact_dedup"
    c.dedup.phash = stage == "near_dedup"
    c.dedup.semantic = stage == "semantic_dedup"
    if stage != "decontam":
        c.decontam.eval_sets = []
    c.score.enabled = stage == "clip_score"
    c.balance.enabled = stage == "balance"
    return c


def _measure(stage: str, keys, drop, detail, alive, planted, head) -> dict:
    if stage == "balance":
        return balance_counts(keys, drop, alive, planted, head)
    out = stage_counts(stage, keys, drop, detail, alive, planted)
    if stage in DUP_STAGES:
        out["missed_by_variant"] = missed_by_variant(stage, keys, drop, detail, alive, planted)
    return out


def pipeline_measures(decisions: dict[str, np.ndarray], planted: dict[str, dict], head: list[str],
                      stages: list[str]) -> dict:
    """Every stage that ran, measured on what the stages before it left alive, from a decisions table's
    columns ("key", "stage", "detail")."""
    keys, stage_of, detail = decisions["key"], np.asarray(decisions["stage"], dtype=object), decisions["detail"]
    alive = np.ones(len(keys), dtype=bool)
    out = {}
    for stage in STAGES:
        if stage not in stages:
            continue
        drop = stage_of == stage
        out[stage] = _measure(stage, keys, drop, detail, alive, planted, head)
        alive &= ~drop
    return out


def measure(data: str | Path, out: str | Path, *, planted: str | Path | None = None, model: str | None = None,
            work: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Curate the noisy set at DATA with every stage that can run and measure each against its planted
    truth (module docstring); the result is written to OUT (JSON) and returned."""
    import pyarrow.parquet as pq

    from ..config import load_config
    from ..config.validate import validate
    from ..data.shards import expand_shards
    from ..errors import UserError
    from .run import curate, run_stages
    from .scan import load_features

    root = Path(data)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{root}: no manifest.json; a noisy set is written by clipkit data synth --noisy")
    manifest = json.loads(manifest_path.read_text())
    planted_path = Path(planted) if planted else root / manifest.get("planted", "planted.jsonl")
    if not planted_path.is_file():
        raise UserError(f"{planted_path}: no planted truth (planted.jsonl of clipkit data synth --noisy)")
    truth = read_planted(planted_path)
    out = Path(out)
    work = Path(work) if work else out.with_name(out.stem + ".curate")
    work.mkdir(parents=True, exist_ok=True)
    # balancing entries for this set: its class names, singular and plural, as the captions write them
    entries = work / "balance_entries.txt"
    classes = (root / manifest["eval"] / "classnames.txt").read_text().split("\n")
    plural = [c + ("es" if c.endswith(("ss", "x", "ch", "sh")) else "s") for c in classes if c]
    atomic_write_text(entries, "\n".join([c for c in classes if c] + plural) + "\n")
    base = ["curate.balance.enabled=true", "curate.progress=false"]
    if model:
        base += [f"curate.model={model}", "curate.dedup.semantic=true", "curate.score.enabled=true"]
    cfg = load_config(None, base + list(overrides))
    c = cfg.curate
    c.data, c.out = str(root / manifest["train"]), str(work)
    if not any(o.startswith("curate.decontam.eval_sets=") for o in overrides):
        c.decontam.eval_sets = [str(root / manifest["eval"])]
    if not any(o.startswith("curate.balance.entries=") for o in overrides):
        c.balance.entries = str(entries)
    validate(cfg)
    summary = curate(cfg)
    table = pq.read_table(work / "decisions.parquet")
    decisions = {name: np.asarray(table.column(name).to_pylist(), dtype=object) for name in ("key", "stage", "detail")}
    ran = [s["stage"] for s in summary["stages"]]
    head = list(manifest.get("head_classes", []))
    result = {"data": str(root), "planted": str(planted_path), "model": c.model,
              "planted_counts": dict(sorted(Counter(r["kind"] for r in truth.values()).items())),
              "thresholds": {"filters.min_image_side": c.filters.min_image_side,
                             "filters.max_aspect": c.filters.max_aspect,
                             "dedup.phash_max_distance": c.dedup.phash_max_distance,
                             "dedup.phash_verify": c.dedup.phash_verify,
                             "dedup.semantic_threshold": c.dedup.semantic_threshold,
                             "decontam.phash_max_distance": c.decontam.phash_max_distance,
                             "decontam.cosine": c.decontam.cosine,
                             "score.threshold": c.score.threshold, "score.top_fraction": c.score.top_fraction,
                             "balance.t": c.balance.t},
              "pipeline": pipeline_measures(decisions, truth, head, ran), "isolated": {}}
    cols, emb = load_features(work / "work", len(expand_shards(c.data)), with_embeddings=c.model is not None)
    loaded = None
    if c.model is not None:
        from ..models import load_model

        loaded = load_model(c.model, device="cpu", model_name=c.model_name)
        loaded.model.eval()
    for stage in ran:
        if stage == "filters":
            result["isolated"][stage] = result["pipeline"][stage]
            continue
        results, _ = run_stages(only(c, stage), cols, emb, loaded)
        filters, res = results[0], results[-1]
        result["isolated"][stage] = _measure(stage, cols["key"], res.drop, res.detail, ~filters.drop, truth, head)
    atomic_write_text(out, json.dumps(result, indent=1))
    return result


def format_table(result: dict) -> str:
    """The result as a plain-text table: one row per stage, isolated and pipeline precision / recall."""
    def pr(m: dict) -> str:
        if "precision" not in m:
            b, a = m["before"], m["after"]
            return f"head share {b['head_share']} -> {a['head_share']}, max/min {b['max_over_min']} -> {a['max_over_min']}"
        p = "-" if m["precision"] is None else f"{m['precision']:.3f}"
        r = "-" if m["recall"] is None else f"{m['recall']:.3f}"
        return f"P {p} R {r} ({m['true_drops']}/{m['dropped']} dropped, {m['targets']} targets)"
    lines = []
    for stage, m in result["isolated"].items():
        lines.append(f"{stage:15s} isolated {pr(m)}")
        lines.append(f"{'':15s} pipeline {pr(result['pipeline'][stage])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clipkit.curate.measure", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, metavar="NOISY_DIR", help="a noisy set (clipkit data synth --noisy)")
    p.add_argument("--planted", default=None, metavar="FILE", help="its planted truth (default NOISY_DIR/planted.jsonl)")
    p.add_argument("--model", default=None, metavar="CKPT",
                   help="the scoring model (any source clipkit reads): adds semantic deduplication and CLIP-score "
                        "filtering")
    p.add_argument("--work", default=None, metavar="DIR",
                   help="clipkit curate's output folder, which keeps the scanned features (default: OUT's name "
                        "with .curate)")
    p.add_argument("--out", required=True, metavar="RESULT.json")
    p.add_argument("overrides", nargs="*", metavar="curate.KEY=VALUE")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    result = measure(args.data, args.out, planted=args.planted, model=args.model, work=args.work,
                     overrides=args.overrides)
    print(format_table(result))
    print(f"result        : {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
