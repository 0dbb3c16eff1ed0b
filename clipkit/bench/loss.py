"""Contrastive loss memory and time: OpenCLIP's ClipLoss against clipkit's tiled InfoNCE, across real ranks.

    clipkit bench loss [--batch-per-rank 16384] [--dim 512] [--world 2] [--repeats 3] [--tile-size 1024]
                       [--out bench_loss.json]
    clipkit bench loss --curve [--global-batches 4096,8192,16384,32768,65536] [--memory-limit GIB]
                       [--attempt-unfit] [--out bench_loss_curve.json]     (see clipkit/bench/loss_curve.py)
    python -m clipkit.bench.loss ...            (the same)

Both methods compute the local-loss InfoNCE (each rank: its B_local rows against the B_global gathered
columns, features gathered with gradient), fp32, gloo on CPU, one forward+backward per measurement:

- openclip: open_clip.loss.ClipLoss(local_loss=True, gather_with_grad=True, rank, world_size)
- tiled:    clipkit.losses.TiledInfoNCELoss(local_loss=True, tile_size)

Every measurement is its own fresh `torchrun --standalone --nproc_per_node=WORLD` job, and the methods
alternate (openclip, tiled, tiled, openclip, ...), so neither inherits the other's heap or page cache and
drift on a shared machine hits both alike. Medians over repeats are reported.

Peak memory per rank is the growth of the process's resident set during the step: after the inputs are
allocated and a small warm-up has run, freed heap pages are handed back to the kernel (glibc malloc_trim),
the kernel's high-water mark VmHWM is reset to the current RSS (write "5" to /proc/self/clear_refs) and the
baseline RSS is read; after the step, peak = VmHWM - baseline. That counts everything the step touches
(tensors, allocator slack, gloo buffers), which is what decides whether ranks fit in RAM, and it needs no
cooperation from the code being measured.

Memory is guarded: a job whose need cannot fit is refused before it starts, and while a job runs the
driver watches the machine's MemAvailable and stops the job (every rank) if it falls below a floor, so that
a wrong estimate ends in a reported out-of-memory, not in swapping or the kernel's OOM killer choosing a
process. With a per-rank limit (the --curve points), each rank's heap may grow only to that limit
(RLIMIT_DATA, set just before the step): an allocation past it fails, and the rank reports a measured
out-of-memory instead of a result.
"""
from __future__ import annotations

import argparse
import sys
import tempfile

from ..cliargs import THREADS_HELP
from .harness import BenchError, bench_main, command_line, machine_facts, meminfo_bytes, orders
from .loss_curve import drive_curve, format_curve
from .loss_jobs import GIB, METHODS, rank_main, run_job, summarize_method, threads_per_rank

MEMORY_TARGET = 1 / 12  # tiled peak <= 1/12 of OpenCLIP's
TIME_TARGET = 1.5  # at no more than 1.5x its time
CURVE_BATCHES = (4096, 8192, 16384, 32768, 65536)  # global batches of --curve


# ----------------------------------------------------------------------------------------------- arguments

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-per-rank", type=int, default=16384)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--world", type=int, default=2, help="ranks (processes) per job")
    p.add_argument("--repeats", type=int, default=3, help="jobs per method, alternating")
    p.add_argument("--tile-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    p.add_argument("--out", metavar="FILE.json",
                   default=None, help="result JSON (default: bench_loss.json, with --curve "
                                      "bench_loss_curve.json and its plot beside it)")
    curve = p.add_argument_group("curve", "--curve: both methods over a range of global batches")
    curve.add_argument("--curve", action="store_true", help="measure every global batch of --global-batches")
    curve.add_argument("--global-batches", default=None,
                       help=f"comma-separated global batches, each a multiple of --world (default: "
                            f"{','.join(map(str, CURVE_BATCHES))})")
    curve.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                       help="the most memory one job's ranks may use together (default: 90%% of MemAvailable "
                            "when the point starts); a point predicted to need more is skipped")
    curve.add_argument("--attempt-unfit", action="store_true",
                       help="run points predicted not to fit too, each rank held to its share of the limit: "
                            "a measured out-of-memory instead of a skip")
    curve.add_argument("--plot", default=None, help="PNG (default: the JSON's name with .png)")
    # Internal: one rank of one measurement job (set by the driver through torchrun).
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--result-dir", help=argparse.SUPPRESS)
    p.add_argument("--rank-memory-limit", type=int, default=None, help=argparse.SUPPRESS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="clipkit bench loss", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    for name in ("batch_per_rank", "dim", "world", "repeats", "tile_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.memory_limit is not None and args.memory_limit <= 0:
        p.error("--memory-limit must be a positive number of GiB")
    given = [f"--{n.replace('_', '-')}" for n in ("global_batches", "memory_limit", "attempt_unfit", "plot")
             if getattr(args, n) not in (None, False)]
    if given and not args.curve and not args.worker:
        p.error(f"{', '.join(given)}: only with --curve")
    try:
        args.global_batches = sorted({int(b) for b in (args.global_batches or ",".join(map(str, CURVE_BATCHES)))
                                      .split(",") if b.strip()})
    except ValueError:
        p.error(f"--global-batches takes comma-separated integers, not {args.global_batches!r}")
    bad = [b for b in args.global_batches if b < args.world or b % args.world]
    if args.curve and (bad or not args.global_batches):
        p.error(f"--global-batches must be multiples of --world {args.world}" + (f" (not {bad})" if bad else ""))
    args.out = args.out or ("bench_loss_curve.json" if args.curve else "bench_loss.json")
    return args


def _check_memory(args: argparse.Namespace) -> None:
    """Refuse a size that cannot fit: OpenCLIP peaks near 4 fp32 B_local x B_global matrices per rank."""
    need = 4 * 4 * args.batch_per_rank * args.batch_per_rank * args.world * args.world
    available = meminfo_bytes("MemAvailable")
    if available is not None and need > 0.95 * available:
        raise BenchError(f"OpenCLIP's loss needs about {need / GIB:.1f} GiB over {args.world} ranks at "
                         f"--batch-per-rank {args.batch_per_rank}, but only {available / GIB:.1f} GiB is "
                         f"available; lower --batch-per-rank or stop other jobs")


def _launch(method: str, args: argparse.Namespace, result_dir: str) -> list[dict]:
    """One job at --batch-per-rank; every rank's result."""
    job = run_job(method, args, result_dir, args.batch_per_rank)
    if job.status != "measured":
        raise BenchError(f"{method} job did not finish ({job.reason}); lower --batch-per-rank")
    return job.ranks


def summarize(args: argparse.Namespace, jobs: dict[str, list[list[dict]]], argv: list[str]) -> dict:
    methods = {m: summarize_method(jobs[m]) for m in METHODS}
    oc, tiled = methods["openclip"], methods["tiled"]
    memory_ratio = tiled["peak_bytes_per_rank_median"] / oc["peak_bytes_per_rank_median"]
    time_ratio = tiled["seconds_median"] / oc["seconds_median"]
    return {
        "benchmark": "contrastive loss forward+backward, local-loss InfoNCE, fp32, CPU/gloo",
        "command": command_line("loss", argv),
        "config": {"batch_per_rank": args.batch_per_rank, "world": args.world,
                   "global_batch": args.batch_per_rank * args.world, "dim": args.dim, "dtype": "float32",
                   "tile_size": args.tile_size, "repeats": args.repeats, "threads_per_rank": threads_per_rank(args)},
        "machine": machine_facts(),
        "methods": methods,
        "ratios": {"memory_tiled_over_openclip": memory_ratio, "time_tiled_over_openclip": time_ratio},
        "loss_max_abs_diff": max(abs(a - b) for a, b in zip(oc["loss_per_rank"], tiled["loss_per_rank"])),
        "targets": {"memory_ratio_max": MEMORY_TARGET, "time_ratio_max": TIME_TARGET,
                    "memory_met": memory_ratio <= MEMORY_TARGET, "time_met": time_ratio <= TIME_TARGET},
    }


def format_table(report: dict) -> str:
    rows = [f"{'method':<9} {'peak MiB/rank':>13} {'time s':>8} {'GFLOP/rank':>11} {'GFLOP/s':>8} "
            f"{'MFU':>5} {'loss (rank mean)':>17}"]
    for name, m in report["methods"].items():
        rows.append(f"{name:<9} {m['peak_bytes_per_rank_median'] / 2**20:>13.1f} {m['seconds_median']:>8.2f} "
                    f"{m['flops_per_rank'] / 1e9:>11.1f} {m['achieved_gflops_per_rank']:>8.1f} "
                    f"{m['mfu']:>5.2f} {m['loss_mean']:>17.6f}")
    r, t = report["ratios"], report["targets"]
    rows.append(f"tiled/openclip: memory {r['memory_tiled_over_openclip']:.4f} (target <= {t['memory_ratio_max']:.4f}, "
                f"{'met' if t['memory_met'] else 'NOT met'}), time {r['time_tiled_over_openclip']:.2f}x "
                f"(target <= {t['time_ratio_max']}, {'met' if t['time_met'] else 'NOT met'})")
    return "\n".join(rows)


def _drive(args: argparse.Namespace, argv: list[str]) -> dict:
    _check_memory(args)
    jobs: dict[str, list[list[dict]]] = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory(prefix="clipkit_bench_loss_") as result_dir:
        for repeat, order in orders(METHODS, args.repeats):
            for method in order:
                ranks = _launch(method, args, result_dir)
                jobs[method].append(ranks)
                print(f"repeat {repeat + 1}/{args.repeats} {method}: {max(r['seconds'] for r in ranks):.2f} s, "
                      f"peak {max(r['peak_bytes'] for r in ranks) / 2**20:.1f} MiB/rank", flush=True)
    return summarize(args, jobs, argv)


def _drive_any(args: argparse.Namespace, argv: list[str]) -> dict:
    return drive_curve(args, argv) if args.curve else _drive(args, argv)


def _show(report: dict) -> None:
    print(format_curve(report) if "points" in report else format_table(report))


def main(argv: list[str] | None = None) -> int:
    return bench_main("loss", argv, parse_args, _drive_any, _show, worker=rank_main)


if __name__ == "__main__":
    sys.exit(main())
