"""A run's report: `run.dir/report.html` with PNG plots of what metrics.jsonl and summary.json hold.

    from clipkit.report import write_report
    write_report("runs/default")      # -> runs/default/report.html, runs/default/report/*.png

Plots: the training loss, the learning rate, throughput (samples/s) with MFU and the loader's share of the
time, and every evaluation over the steps (eval.every) with the final one (summary.json). The page is
self-contained apart from the PNGs beside it; it reads nothing but the run directory, so it can be made
again for any run (`clipkit report RUN_DIR`).
"""
from __future__ import annotations

import html
import json
from pathlib import Path

PLOTS = "report"


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut short by a crash
            continue
    return out


def _series(records: list[dict], key: str, sub: str | None = None) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in records:
        value = r.get(key)
        if sub is not None:
            value = value.get(sub) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(r["step"])
            values.append(float(value))
    return steps, values


def _figure(path: Path, title: str, lines: list[tuple[str, list[int], list[float]]], ylabel: str,
            log_y: bool = False, right: tuple[str, list[int], list[float]] | None = None) -> bool:
    if not any(steps for _, steps, _ in lines):
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for label, steps, values in lines:
        if steps:
            ax.plot(steps, values, label=label, marker="o" if len(steps) < 30 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if right is not None and right[1]:
        ax2 = ax.twinx()
        ax2.plot(right[1], right[2], color="tab:red", linestyle="--", label=right[0])
        ax2.set_ylabel(right[0])
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if len(labels) > 1:
        ax.legend(handles, labels, loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _summary_rows(summary: dict) -> list[tuple[str, str]]:
    rows = []

    def add(name, value, fmt="{}"):
        if value is not None:
            rows.append((name, fmt.format(value)))

    add("model", summary.get("model"))
    add("steps", summary.get("steps"))
    add("world size", summary.get("world_size"))
    add("training time (s)", summary.get("train_seconds"), "{:.0f}")
    add("samples/s (after the first window)", summary.get("samples_per_s"), "{:.1f}")
    zs = summary.get("zeroshot") or {}
    add("zero-shot top-1", zs.get("acc1"), "{:.3f}")
    add("zero-shot top-5", zs.get("acc5"), "{:.3f}")
    add("zero-shot mean per-class recall", zs.get("mean_per_class_recall"), "{:.3f}")
    add("chance top-1", zs.get("chance_acc1"), "{:.3f}")
    rt = summary.get("retrieval") or {}
    for key in ("image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@1",
                "text_retrieval_recall@5"):
        add(key.replace("_", " "), rt.get(key), "{:.3f}")
    add("non-finite steps skipped", summary.get("nonfinite_steps"))
    skipped = summary.get("skipped_samples")
    if skipped:
        add("samples skipped", ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
    add("checkpoint", summary.get("checkpoint"))
    return rows


def write_report(run_dir: str | Path) -> Path:
    """Write run_dir/report.html (and its PNGs under run_dir/report/); returns the page's path."""
    run_dir = Path(run_dir)
    records = _records(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    plots = run_dir / PLOTS
    plots.mkdir(parents=True, exist_ok=True)
    made = []

    def plot(name, *args, **kwargs):
        if _figure(plots / f"{name}.png", *args, **kwargs):
            made.append(name)

    plot("loss", "training loss", [("loss", *_series(records, "loss"))], "contrastive loss")
    plot("lr", "learning rate", [("lr", *_series(records, "lr"))], "learning rate")
    plot("throughput", "throughput", [("samples/s", *_series(records, "samples_per_s"))], "samples/s",
         right=("MFU", *_series(records, "mfu")))
    plot("data_wait", "share of the time waiting for data", [("data wait", *_series(records, "data_wait"))],
         "share of wall time")
    evals = sorted({k for r in records if isinstance(r.get("eval"), dict) for k in r["eval"]})
    acc = [k for k in evals if k.endswith(("acc1", "acc5")) or "recall@1" in k or "recall@5" in k]
    final_step = summary.get("steps")
    lines = []
    for key in acc:
        steps, values = _series(records, "eval", key)
        task, _, metric = key.partition("_")
        final = (summary.get(task) or {}).get(metric)
        if final is not None and final_step is not None and (not steps or steps[-1] != final_step):
            steps, values = steps + [final_step], values + [float(final)]
        lines.append((key.replace("_", " "), steps, values))
    if not lines and final_step is not None:  # no evaluation during training: the final one alone
        for task in ("zeroshot", "retrieval"):
            for metric, value in (summary.get(task) or {}).items():
                if isinstance(value, (int, float)) and (metric.endswith(("acc1", "acc5")) or "recall@1" in metric):
                    lines.append((f"{task} {metric}".replace("_", " "), [final_step], [float(value)]))
    plot("eval", "held-out evaluation over training", lines, "accuracy / recall")

    rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _summary_rows(summary))
    images = "\n".join(f'<figure><img src="{PLOTS}/{name}.png" alt="{name}"></figure>' for name in made)
    last = records[-1] if records else {}
    note = ""
    if "mfu" in last:
        note = (f"<p>MFU: model FLOPs (one forward and backward per sample at the full context length) per second "
                f"per device over the measured matmul peak of this machine; last window {last['mfu']:.1%}.</p>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>clipkit run {html.escape(str(run_dir))}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:72em}}table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}figure{{display:inline-block;margin:.5em}}
img{{max-width:40em}}</style></head>
<body><h1>clipkit run: {html.escape(run_dir.name)}</h1>
<table>
{rows}
</table>
{note}
{images}
</body></html>
"""
    out = run_dir / "report.html"
    out.write_text(page)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")


def main(argv: list[str] | None = None) -> int:
    import argparse

    from ..errors import UserError

    p = argparse.ArgumentParser(prog="clipkit report", description="write RUN_DIR/report.html from a run's "
                                "metrics.jsonl and summary.json")
    add_arguments(p)
    args = p.parse_args(argv)
    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        raise UserError(f"{args.run_dir} holds no metrics.jsonl: not a clipkit run directory")
    print(write_report(args.run_dir))
    return 0


__all__ = ["main", "write_report"]
