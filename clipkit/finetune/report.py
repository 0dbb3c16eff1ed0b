"""`clipkit finetune-report DIR [DIR ...]`: zero-shot vs every fine-tuning method, side by side.

Each DIR is a fine-tune's run directory (holding result.json) or a directory of them. Prints one row per
run: the zero-shot baseline and the adapted model on the same val and test splits, and the trainable share
of the parameters; then each run's LR search (finetune.lr=auto): every LR tried with its val acc1 and loss,
the chosen one and whether it lies at the grid's edge. `--out FILE.json` also writes the rows; `--plot FILE`
(default: report.png in the first DIR) draws validation accuracy over optimizer steps, one line per run."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import UserError

ORDER = {"linear_probe": 0, "full": 1, "wise": 2, "lora": 3, "flyp": 4}


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
                    "lr_search": None, "run_dir": ""})
    for r in results:
        out.append({"method": r["method"], "val_acc1": r["val"]["acc1"], "test_acc1": r["test"]["acc1"],
                    "test_mean_per_class_recall": r["test"]["mean_per_class_recall"],
                    "trainable_fraction": r["trainable_fraction"],
                    # as the run recorded it: None for a fixed finetune.lr and for the linear probe
                    "lr_search": r.get("lr_search"), "run_dir": r["run_dir"],
                    # WiSE-FT's fine-tuned end: full, or flyp (absent in results written before FLYP)
                    **({"wise_method": r.get("wise_method", "full")} if r["method"] == "wise" else {})})
    return out


def _method(run: dict) -> str:
    """The method, and for WiSE-FT towards FLYP weights which: "wise (flyp)"."""
    wise = run.get("wise_method", "full")
    return run["method"] if wise == "full" else f"{run['method']} ({wise})"


def _label(run: dict, runs: list[dict]) -> str:
    """The method, and the run's directory name where several runs share a method."""
    same = sum(_method(r) == _method(run) for r in runs)
    return _method(run) if same == 1 else f"{_method(run)} ({Path(run.get('run_dir', '')).name})"


def format_table(table: list[dict]) -> str:
    width = max([14] + [len(_label(r, table)) + 2 for r in table])
    lines = [f"{'method':<{width}}{'val acc1':>10}{'test acc1':>11}{'test recall':>13}{'trainable':>11}"]
    for r in table:
        lines.append(f"{_label(r, table):<{width}}{r['val_acc1']:>10.4f}{r['test_acc1']:>11.4f}"
                     f"{r['test_mean_per_class_recall']:>13.4f}" + (f"{100 * r['trainable_fraction']:>10.2f}%"
                                                                     if r["trainable_fraction"] is not None
                                                                     else f"{'n/a':>11}"))
    return "\n".join(lines)


def format_lr_search(table: list[dict]) -> str:
    """One block per run that searched its LR: each LR tried, its val acc1 and loss; the chosen one marked."""
    blocks = []
    for r in table:
        search = r["lr_search"]
        if not search:
            continue
        # results written before the edge check have no at_edge
        edge = "  (at the edge of the grid: a wider one may do better)" if search.get("at_edge") else ""
        lines = [f"LR search, {_label(r, table)}: chose {search['lr']:g} (head {search['head_lr']:g}){edge}",
                 f"  {'lr':>10}{'val acc1':>10}{'val loss':>10}"]
        for t in search["trials"]:
            mark = "  <- chosen" if t["lr"] == search["lr"] else ""
            lines.append(f"  {t['lr']:>10g}{t['val_acc1']:>10.4f}{t['val_loss']:>10.4f}{mark}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def plot_val_curves(results: list[dict], path: str | Path):
    """Validation acc1 over optimizer steps, one line per run with a `history` (the linear probe has none).
    Returns the figure (closed, its data intact) or None when no run validated during training."""
    runs = [r for r in results if r.get("history")]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display: the plot is a file
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for r in runs:
        ax.plot([h["step"] for h in r["history"]], [h["val"]["acc1"] for h in r["history"]], label=_label(r, results),
                marker="o" if len(r["history"]) < 30 else None, markersize=3)
    zs = results[0]["zeroshot"]["val"]["acc1"]  # where every method starts from
    ax.axhline(zs, color="grey", linestyle=":", label="zero-shot")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("val acc1")
    ax.set_title("validation accuracy during fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return fig


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cliargs import renamed

    p.add_argument("dirs", nargs="+", metavar="RUN_DIR", help="fine-tune run directories, or directories holding them")
    renamed(p, "--out", "--json", default=None, metavar="FILE.json",
            help="also write the rows (with each run's LR search) to this JSON file")
    p.add_argument("--plot", default=None,
                   help="write the plot of val acc1 over steps here (default: report.png in the first DIR)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="clipkit finetune-report", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    results = find_results(args.dirs)
    models = {(r["model"], r["checkpoint"], r["data"]) for r in results}
    if len(models) > 1:
        raise UserError("these runs adapt different checkpoints or data; compare runs of one checkpoint and one "
                        f"data set: {sorted(models)}")
    table = rows(results)
    print(format_table(table))
    searches = format_lr_search(table)
    if searches:
        print("\n" + searches)
    plot = Path(args.plot) if args.plot else Path(args.dirs[0]) / "report.png"
    if plot_val_curves(results, plot) is not None:
        print(f"\nval acc1 over steps: {plot}")
    if args.out:
        atomic_write_text(args.out, json.dumps(table, indent=2))
    return 0
