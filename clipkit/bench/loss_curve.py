"""`clipkit bench loss --curve`: peak memory and time per step of OpenCLIP's ClipLoss and clipkit's tiled
loss over a range of global batches, with the points OpenCLIP cannot fit shown as such.

    clipkit bench loss --curve [--global-batches 4096,8192,16384,32768,65536] [--world 2] [--dim 512]
                       [--repeats 3] [--memory-limit GIB] [--attempt-unfit] [--out bench_loss_curve.json]

Every point (global batch G, G / world rows per rank) is measured as `clipkit bench loss` measures one size:
a fresh torchrun job per method and repeat, methods alternating, medians of the repeats.

Which points run. OpenCLIP's local loss holds B_local x G fp32 logits per rank: its peak is about four such
matrices (logits per image and per text and their gradients), so it grows with G^2; the tiled loss holds
the gathered features, their gradients and two logit tiles, linear in G. Before a point, each method's
peak per rank is predicted as the larger of that arithmetic and its last measured point scaled (by the
square of the batch ratio for OpenCLIP, linearly for the tiled loss); the job's need is that plus each
rank's baseline (the largest measured so far, 1 GiB before any, plus its inputs), for every rank. The
allowance is --memory-limit if given, and at most 90% of MemAvailable when the point starts. A point that
needs more is skipped and recorded with the prediction and the reason; with --attempt-unfit it runs
anyway. Every job's ranks are held to their share of the allowance (RLIMIT_DATA, see loss.py), so a point
that does not fit ends in a measured out-of-memory, never in swapping; and once a method has run out of
memory (or time), its larger points are skipped.

Output: the JSON (one entry per point and method: status measured / oom / skipped / timeout, the reason,
the prediction, and the measured figures as `clipkit bench loss` reports them) and a PNG beside it: peak
memory per rank and time per step against the global batch, log-log, with OOM and skipped points marked.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from .harness import BenchError, command_line, machine_facts, meminfo_bytes, orders
from .loss_jobs import GIB, METHODS, run_job, summarize_method, threads_per_rank

DEFAULT_BASELINE = GIB  # a rank's resident memory before the step (torch, gloo, open_clip), until measured
AVAILABLE_FRACTION = 0.9  # of MemAvailable, the most a job may use
LABELS = {"openclip": "OpenCLIP ClipLoss (local_loss, gather_with_grad)", "tiled": "clipkit TiledInfoNCELoss"}
COLORS = {"openclip": "tab:red", "tiled": "tab:blue"}


# ----------------------------------------------------------------------------------------------- prediction

def arithmetic_peak(method: str, batch_per_rank: int, world: int, dim: int, tile: int) -> int:
    """Bytes a rank's step holds at its peak, from the shapes alone (fp32)."""
    g = batch_per_rank * world
    if method == "openclip":
        return 4 * 4 * batch_per_rank * g  # logits per image and per text, and their gradients
    return 4 * (4 * g * dim + 2 * min(tile, batch_per_rank) * g)  # gathered features and grads, two tiles


def predict_peak(method: str, batch_per_rank: int, world: int, dim: int, tile: int,
                 last: tuple[int, int] | None) -> int:
    """The larger of the arithmetic and `last` (batch per rank, measured peak) scaled to this batch."""
    peak = arithmetic_peak(method, batch_per_rank, world, dim, tile)
    if last:
        ratio = batch_per_rank / last[0]
        peak = max(peak, int(last[1] * (ratio * ratio if method == "openclip" else ratio)))
    return peak


def baseline_estimate(measured: list[int], batch_per_rank: int, dim: int) -> int:
    """A rank's memory before its step: the largest baseline measured so far, plus this point's inputs."""
    return (max(measured) if measured else DEFAULT_BASELINE) + 2 * 4 * batch_per_rank * dim


def allowance(memory_limit_gib: float | None) -> tuple[int, str]:
    """(bytes one job's ranks may use together, what set it)."""
    available = meminfo_bytes("MemAvailable")
    options = []
    if memory_limit_gib is not None:
        options.append((int(memory_limit_gib * GIB), f"--memory-limit {memory_limit_gib:g} GiB"))
    if available is not None:
        options.append((int(AVAILABLE_FRACTION * available),
                        f"{AVAILABLE_FRACTION:.0%} of MemAvailable ({available / GIB:.1f} GiB)"))
    if not options:
        raise BenchError("cannot read MemAvailable from /proc/meminfo: give --memory-limit")
    return min(options)


# ------------------------------------------------------------------------------------------------- points

class Tracker:
    """What the curve has learned so far: each method's last measured point and where it stopped, and
    the ranks' baselines."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[int, int]] = {}
        self.stopped: dict[str, tuple[int, str]] = {}
        self.baselines: list[int] = []

    def plan(self, method: str, global_batch: int, args: argparse.Namespace) -> dict:
        """The point's entry, before any job: its prediction and whether it runs."""
        bpr = global_batch // args.world
        peak = predict_peak(method, bpr, args.world, args.dim, args.tile_size, self.last.get(method))
        base = baseline_estimate(self.baselines, bpr, args.dim)
        need = args.world * (base + peak)
        allowed, by = allowance(args.memory_limit)
        entry = {"method": method, "global_batch": global_batch, "batch_per_rank": bpr, "status": "run",
                 "reason": None, "predicted_peak_bytes_per_rank": peak, "predicted_baseline_bytes_per_rank": base,
                 "predicted_job_bytes": need, "allowed_job_bytes": allowed, "allowed_by": by,
                 "rank_memory_limit_bytes": allowed // args.world, "repeats_completed": 0}
        if method in self.stopped:
            g, status = self.stopped[method]
            entry |= {"status": "skipped", "reason": f"a smaller global batch ({g}) already ended in {status}"}
        elif need > allowed and not args.attempt_unfit:
            entry |= {"status": "skipped",
                      "reason": f"predicted {need / GIB:.1f} GiB for {args.world} ranks ({peak / GIB:.2f} GiB step "
                                f"peak + {base / GIB:.2f} GiB baseline per rank) > {allowed / GIB:.1f} GiB allowed "
                                f"({by})"}
        return entry

    def record(self, entry: dict, jobs: list[list[dict]]) -> None:
        self.baselines += [r["baseline_bytes"] for job in jobs for r in job]
        if entry["status"] == "measured":
            self.last[entry["method"]] = (entry["batch_per_rank"], entry["peak_bytes_per_rank_median"])
        elif entry["status"] in ("oom", "timeout"):
            self.stopped[entry["method"]] = (entry["global_batch"], entry["status"])


def measure_point(global_batch: int, args: argparse.Namespace, tracker: Tracker, result_dir: str) -> list[dict]:
    """Both methods' entries at one global batch: jobs alternate, `--repeats` each, while they fit."""
    entries = {m: tracker.plan(m, global_batch, args) for m in METHODS}
    jobs: dict[str, list[list[dict]]] = {m: [] for m in METHODS}
    for repeat, order in orders(METHODS, args.repeats):
        for method in order:
            entry = entries[method]
            if entry["status"] != "run":
                continue
            job = run_job(method, args, result_dir, entry["batch_per_rank"], entry["rank_memory_limit_bytes"])
            if job.status != "measured":
                entry |= {"status": job.status, "reason": job.reason}
                print(f"G={global_batch} {method}: {job.status}: {job.reason}", flush=True)
                continue
            jobs[method].append(job.ranks)
            print(f"G={global_batch} repeat {repeat + 1}/{args.repeats} {method}: "
                  f"{max(r['seconds'] for r in job.ranks):.2f} s, "
                  f"peak {max(r['peak_bytes'] for r in job.ranks) / 2**20:.1f} MiB/rank", flush=True)
    for method, entry in entries.items():
        if entry["status"] == "skipped":
            print(f"G={global_batch} {method}: skipped: {entry['reason']}", flush=True)
        if entry["status"] == "run":
            entry["status"] = "measured"
        entry["repeats_completed"] = len(jobs[method])
        if jobs[method]:
            entry |= summarize_method(jobs[method])
        tracker.record(entry, jobs[method])
    return list(entries.values())


# ------------------------------------------------------------------------------------------------- report

def summarize_curve(points: list[dict]) -> dict:
    by = {(p["method"], p["global_batch"]): p for p in points}
    both = sorted(g for (m, g), p in by.items() if m == "tiled" and p["status"] == "measured"
                  and by.get(("openclip", g), {}).get("status") == "measured")
    unfit = [p for p in points if p["method"] == "openclip" and p["status"] != "measured"]
    tiled = [p["global_batch"] for p in points if p["method"] == "tiled" and p["status"] == "measured"]
    return {
        "memory_tiled_over_openclip": {str(g): by[("tiled", g)]["peak_bytes_per_rank_median"]
                                       / by[("openclip", g)]["peak_bytes_per_rank_median"] for g in both},
        "time_tiled_over_openclip": {str(g): by[("tiled", g)]["seconds_median"] / by[("openclip", g)]["seconds_median"]
                                     for g in both},
        "openclip_first_unfit": ({k: unfit[0][k] for k in ("global_batch", "status", "reason")} if unfit else None),
        "tiled_largest_measured_global_batch": max(tiled) if tiled else None,
    }


def format_curve(report: dict) -> str:
    rows = [f"{'global':>7} {'method':<9} {'status':<9} {'peak MiB/rank':>13} {'time s':>8} {'predicted MiB/rank':>18}"]
    for p in report["points"]:
        peak = f"{p['peak_bytes_per_rank_median'] / 2**20:13.1f}" if "peak_bytes_per_rank_median" in p else f"{'-':>13}"
        secs = f"{p['seconds_median']:8.2f}" if "seconds_median" in p else f"{'-':>8}"
        rows.append(f"{p['global_batch']:>7} {p['method']:<9} {p['status']:<9} {peak} {secs} "
                    f"{p['predicted_peak_bytes_per_rank'] / 2**20:18.1f}")
    return "\n".join(rows)


def _mark_unfit(mem, secs, p: dict) -> None:
    """A point that did not run to the end: its predicted peak on the memory plot, a line on the time plot."""
    color, predicted = COLORS[p["method"]], p["predicted_peak_bytes_per_rank"] / GIB
    what = {"oom": "out of memory", "timeout": "timed out"}.get(p["status"], "skipped")
    mem.plot([p["global_batch"]], [predicted], "X" if p["status"] == "oom" else "x", color=color, markersize=11,
             markerfacecolor="none" if p["status"] == "skipped" else color)
    mem.annotate(f"{what}\n(predicted {predicted:.1f} GiB)", (p["global_batch"], predicted),
                 textcoords="offset points", xytext=(-12, 0), ha="right", va="center", fontsize=8, color=color)
    secs.axvline(p["global_batch"], color=color, linestyle=":", linewidth=1)
    secs.annotate(f"{p['method']}: {what}", (p["global_batch"], 0.5), xycoords=("data", "axes fraction"),
                  rotation=90, ha="right", va="center", fontsize=8, color=color)


def plot_curve(report: dict, path: Path) -> None:
    """Peak memory per rank and time per step against the global batch, log-log, OOM/skips marked."""
    try:
        import matplotlib
    except ImportError as e:
        raise BenchError("the curve's plot needs matplotlib: pip install 'clipkit[bench]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, secs) = plt.subplots(1, 2, figsize=(12, 4.8))
    for method in METHODS:
        pts = [p for p in report["points"] if p["method"] == method]
        done = [p for p in pts if p["status"] == "measured"]
        xs = [p["global_batch"] for p in done]
        mem.plot(xs, [p["peak_bytes_per_rank_median"] / GIB for p in done], "o-", color=COLORS[method],
                 label=LABELS[method])
        secs.plot(xs, [p["seconds_median"] for p in done], "o-", color=COLORS[method], label=LABELS[method])
        for p in pts:
            if p["status"] != "measured":
                _mark_unfit(mem, secs, p)
        if done and len(done) < len(pts):  # the extrapolation to the first point that did not run
            nxt = pts[len(done)]
            mem.plot([done[-1]["global_batch"], nxt["global_batch"]],
                     [done[-1]["peak_bytes_per_rank_median"] / GIB, nxt["predicted_peak_bytes_per_rank"] / GIB],
                     "--", color=COLORS[method], linewidth=1)
    last = report["points"][-1]  # by then the ranks' baseline has been measured
    room = last["allowed_job_bytes"] / report["config"]["world"] - last["predicted_baseline_bytes_per_rank"]
    if room > 0:
        mem.axhline(room / GIB, color="grey", linestyle="-.", linewidth=1,
                    label=f"room per rank for the step at {last['global_batch']:,} (allowance / ranks - baseline)")
    cfg = report["config"]
    for ax, title, unit in ((mem, "peak memory per rank", "GiB"), (secs, "time per step (forward + backward)", "s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"global batch ({cfg['world']} ranks)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xticks(cfg["global_batches"], [f"{g:,}" for g in cfg["global_batches"]])
    mem.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"local-loss InfoNCE, fp32, dim {cfg['dim']}, {cfg['threads_per_rank']} thread(s) per rank, "
                 f"median of {cfg['repeats']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def drive_curve(args: argparse.Namespace, argv: list[str]) -> dict:
    """Every point of --global-batches, both methods; the report, with its plot drawn beside --out."""
    tracker, points = Tracker(), []
    with tempfile.TemporaryDirectory(prefix="clipkit_bench_loss_curve_") as result_dir:
        for global_batch in args.global_batches:
            points += measure_point(global_batch, args, tracker, result_dir)
    out = Path(args.out)
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    report = {
        "benchmark": "contrastive loss forward+backward over global batches, local-loss InfoNCE, fp32, CPU/gloo",
        "command": command_line("loss", argv),
        "config": {"global_batches": args.global_batches, "world": args.world, "dim": args.dim, "dtype": "float32",
                   "tile_size": args.tile_size, "repeats": args.repeats, "threads_per_rank": threads_per_rank(args),
                   "memory_limit_gib": args.memory_limit, "attempt_unfit": args.attempt_unfit},
        "machine": machine_facts(),
        "points": points,
        "summary": summarize_curve(points),
        "plot": os.path.relpath(plot, out.parent),
    }
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot_curve(report, plot)
    print(f"plot: {plot}")
    return report
