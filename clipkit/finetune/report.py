"""`clipkit finetune-report DIR [DIR ...]`: zero-shot vs every fine-tuning method, side by side.

Each DIR is a fine-tune's run directory (holding result.json) or a directory of them. Prints one row per
run: the zero-shot baseline and the adapted model on the same val and test splits, and the trainable share
of the parameters; `--json FILE` also writes the rows."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import UserError

ORDER = {"linear_probe": 0, "full": 1, "wise": 2, "lora": 3}


def find_results(dirs: list[str]) -> list[dict]:
    results = []
    for d in map(Path, dirs):
        files = [d / "result.json"] if (d / "result.json").is_file() else sorted(d.glob("*/result.json"))
        if not files:
            raise UserError(f"no fine-tune result (result.json) in {d} or its sub-directories")
        for f in files:
            results.append({**json.loads(f.read_text()), "run_dir": str(f.parent)})
    return sorted(results, key=lambda r: (ORDER.get(r["method"], 9), r["run_dir"]))


def rows(results: list[dict]) -> list[dict]:
    out = []
    if results:
        zs = results[0]["zeroshot"]
        out.append({"method": "zero-shot", "val_acc1": zs["val"]["acc1"], "test_acc1": zs["test"]["acc1"],
                    "test_mean_per_class_recall": zs["test"]["mean_per_class_recall"], "trainable_fraction": 0.0,
                    "run_dir": ""})
    for r in results:
        out.append({"method": r["method"], "val_acc1": r["val"]["acc1"], "test_acc1": r["test"]["acc1"],
                    "test_mean_per_class_recall": r["test"]["mean_per_class_recall"],
                    "trainable_fraction": r["trainable_fraction"], "run_dir": r["run_dir"]})
    return out


def format_table(table: list[dict]) -> str:
    lines = [f"{'method':<14}{'val acc1':>10}{'test acc1':>11}{'test recall':>13}{'trainable':>11}"]
    for r in table:
        lines.append(f"{r['method']:<14}{r['val_acc1']:>10.4f}{r['test_acc1']:>11.4f}"
                     f"{r['test_mean_per_class_recall']:>13.4f}" + (f"{100 * r['trainable_fraction']:>10.2f}%"
                                                                     if r["trainable_fraction"] is not None
                                                                     else f"{'n/a':>11}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="clipkit finetune-report", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="fine-tune run directories, or directories holding them")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    results = find_results(args.dirs)
    models = {(r["model"], r["checkpoint"], r["data"]) for r in results}
    if len(models) > 1:
        raise UserError("these runs adapt different checkpoints or data; compare runs of one checkpoint and one "
                        f"data set: {sorted(models)}")
    table = rows(results)
    print(format_table(table))
    if args.json:
        atomic_write_text(args.json, json.dumps(table, indent=2))
    return 0
