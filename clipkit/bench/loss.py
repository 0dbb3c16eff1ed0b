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
import ctypes
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

METHODS = ("openclip", "tiled")
MEMORY_TARGET = 1 / 12  # tiled peak <= 1/12 of OpenCLIP's
TIME_TARGET = 1.5  # at no more than 1.5x its time
GIB = 1024 ** 3
CURVE_BATCHES = (4096, 8192, 16384, 32768, 65536)  # global batches of --curve
# The watchdog stops a job when MemAvailable falls below max(3% of MemTotal, 512 MiB): there is no swap to
# slow things down first, and below that the kernel's OOM killer may pick any process on the machine.
WATCHDOG_FLOOR_FRACTION, WATCHDOG_FLOOR_BYTES = 0.03, 512 * 2 ** 20


class BenchError(RuntimeError):
    """A benchmark job could not run; the message says what to change."""


# ----------------------------------------------------------------------------------------------- arguments

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="clipkit bench loss", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-per-rank", type=int, default=16384)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--world", type=int, default=2, help="ranks (processes) per job")
    p.add_argument("--repeats", type=int, default=3, help="jobs per method, alternating")
    p.add_argument("--tile-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None, help="threads per rank (default: cores / world)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    p.add_argument("--out", default=None, help="result JSON (default: bench_loss.json, with --curve "
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


# ------------------------------------------------------------------------------------ one rank of one job

def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"/proc/self/status has no {field}: peak memory needs Linux")


def _trim_heap() -> bool:
    """Return the heap's free pages to the kernel; False where the C library cannot (not glibc)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _reset_peak_rss() -> tuple[int, str]:
    """Reset the high-water mark to the current RSS and return (baseline bytes, how)."""
    # Pages freed by the warm-up and the matmul probe stay resident in glibc's heap, and a step that reuses
    # them adds nothing to VmHWM: up to megabytes of its peak went unseen (at 2 x 512 rows OpenCLIP's read
    # anywhere from 0.5 to 4.7 MiB). Trimmed, only pages still partly in use can be reused unseen.
    trimmed = "; free heap trimmed" if _trim_heap() else "; free heap not trimmed (may understate)"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        return _status_bytes("VmRSS"), "VmHWM reset via clear_refs; baseline VmRSS" + trimmed
    except OSError:
        # Cannot reset: measure from the mark so far, which can only understate the step's own peak.
        return _status_bytes("VmHWM"), "VmHWM not resettable; baseline VmHWM (may understate)" + trimmed


def _matmul_gflops(seconds: float = 1.0) -> float:
    """Measured fp32 matmul throughput of this rank while the others measure theirs (the MFU reference; the
    trainer's own measurement, clipkit.models.flops.matmul_peak)."""
    import torch

    from ..models.flops import matmul_peak

    return matmul_peak(torch.device("cpu"), torch.float32, seconds=seconds) / 1e9


def _inputs(batch: int, dim: int, seed: int, requires_grad: bool = True):
    """L2-normalised image/text features (correlated pairs) and CLIP's initial log-temperature."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    txt = F.normalize(img + torch.randn(batch, dim, generator=g), dim=-1)
    log_scale = torch.tensor(math.log(1 / 0.07))
    return tuple(t.requires_grad_(requires_grad) for t in (img, txt, log_scale))


def _make_loss(method: str, rank: int, world: int, tile_size: int):
    if method == "tiled":
        from clipkit.losses import TiledInfoNCELoss

        return TiledInfoNCELoss(local_loss=True, tile_size=tile_size)
    from open_clip.loss import ClipLoss

    peer = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)

    def openclip_loss(img, txt, scale):
        # The peer's own gather (torch.distributed.nn.all_gather) warns that it is deprecated; that is
        # OpenCLIP's code, measured as it ships, so keep its warning out of the report only.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is deprecated.*", category=FutureWarning)
            return peer(img, txt, scale)

    return openclip_loss


def _timed_step(loss_fn, img, txt, log_scale) -> dict:
    import torch.distributed as dist
    from torch.utils.flop_counter import FlopCounterMode

    dist.barrier()
    start = time.perf_counter()
    with FlopCounterMode(display=False) as counter:
        loss = loss_fn(img, txt, log_scale.exp())
        loss.backward()
    seconds = time.perf_counter() - start
    return {"loss": loss.item(), "seconds": seconds, "flops": counter.get_total_flops(),
            "image_grad_norm": img.grad.norm().item(), "text_grad_norm": txt.grad.norm().item(),
            "log_scale_grad": log_scale.grad.item()}


def _cap_heap(limit: int) -> None:
    """Let this process's resident memory grow to `limit` bytes in all and no further: from here on an
    allocation past it fails (RLIMIT_DATA counts the heap and private writable mappings)."""
    budget = limit - _status_bytes("VmRSS")
    data = _status_bytes("VmData")
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = data + max(0, budget)
    resource.setrlimit(resource.RLIMIT_DATA, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def is_out_of_memory(error: BaseException) -> bool:
    """torch's CPU allocator, gloo and Python each say it differently."""
    text = str(error).lower()
    return isinstance(error, MemoryError) or any(s in text for s in ("can't allocate memory", "bad_alloc",
                                                                     "out of memory", "cannot allocate memory"))


def _worker(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from clipkit.distributed.gather import world_info

    dist.init_process_group("gloo")
    rank, world = world_info()
    loss_fn = _make_loss(args.worker, rank, world, args.tile_size)
    # Warm-up: the measured code path on small separate tensors, so first-call costs (gloo connections,
    # thread pools, lazy imports) stay out of the step, while the real inputs' .grad buffers are first
    # allocated inside the measured step.
    _timed_step(loss_fn, *_inputs(min(args.batch_per_rank, 256), args.dim, args.seed + 10_000 + rank))
    img, txt, log_scale = _inputs(args.batch_per_rank, args.dim, args.seed * 1000 + rank)
    dist.barrier()
    matmul_gflops = _matmul_gflops()
    dist.barrier()
    baseline, how = _reset_peak_rss()
    if args.rank_memory_limit:
        _cap_heap(args.rank_memory_limit)
    try:
        result = _timed_step(loss_fn, img, txt, log_scale)
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        oom = {"rank": rank, "method": args.worker, "oom": True, "error": str(e).splitlines()[0][:500],
               "baseline_bytes": baseline, "rank_memory_limit": args.rank_memory_limit}
        Path(args.result_dir, f"{args.worker}_rank{rank}.oom.json").write_text(json.dumps(oom))
        os._exit(3)  # the other ranks wait in a collective: torchrun ends them when this rank exits
    # The kernel syncs its RSS counters lazily: for a tiny step the difference can come out a few pages
    # below zero, which means "nothing measurable".
    peak = max(0, _status_bytes("VmHWM") - baseline)
    result |= {"rank": rank, "world": world, "method": args.worker, "peak_bytes": peak,
               "baseline_bytes": baseline, "memory_baseline": how, "matmul_gflops": matmul_gflops}
    Path(args.result_dir, f"{args.worker}_rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------------------ driver

def _threads(args: argparse.Namespace) -> int:
    return args.threads or max(1, (os.cpu_count() or 1) // args.world)


def _check_memory(args: argparse.Namespace) -> None:
    """Refuse a size that cannot fit: OpenCLIP peaks near 4 fp32 B_local x B_global matrices per rank."""
    need = 4 * 4 * args.batch_per_rank * args.batch_per_rank * args.world * args.world
    available = _meminfo_bytes("MemAvailable")
    if available is not None and need > 0.95 * available:
        raise BenchError(f"OpenCLIP's loss needs about {need / GIB:.1f} GiB over {args.world} ranks at "
                         f"--batch-per-rank {args.batch_per_rank}, but only {available / GIB:.1f} GiB is "
                         f"available; lower --batch-per-rank or stop other jobs")


def _meminfo_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Job:
    """How one measurement job ended: "measured" (ranks: every rank's result) or "oom" / "timeout" (reason)."""
    status: str
    ranks: list[dict] | None = None
    reason: str | None = None


def run_job(method: str, args: argparse.Namespace, result_dir: str, batch_per_rank: int,
            rank_memory_limit: int | None = None) -> Job:
    """One fresh torchrun job running `method`, watched: an out-of-memory or a timeout is an outcome; any
    other failure raises BenchError."""
    for stale in Path(result_dir).glob(f"{method}_rank*.json"):
        stale.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.world}",
           "-m", "clipkit.bench.loss", "--worker", method, "--result-dir", result_dir,
           "--batch-per-rank", str(batch_per_rank), "--dim", str(args.dim),
           "--tile-size", str(args.tile_size), "--seed", str(args.seed)]
    if rank_memory_limit:
        cmd += ["--rank-memory-limit", str(rank_memory_limit)]
    env = os.environ | {"OMP_NUM_THREADS": str(_threads(args)), "HF_HUB_OFFLINE": "1"}
    log = Path(result_dir, f"{method}.log")
    with open(log, "w") as out:  # a file, not a pipe: nobody reads while the job runs
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # its own process group: the ranks are stopped with it
        stopped = _watch(proc, args.timeout)
        proc.wait()
    output = log.read_text(errors="replace")
    ooms = [json.loads(f.read_text()) for f in sorted(Path(result_dir).glob(f"{method}_rank*.oom.json"))]
    if stopped:
        return stopped
    if ooms:
        o = ooms[0]
        return Job("oom", reason=f"rank {o['rank']} ran out of memory (limit {_gib(o['rank_memory_limit'])} per "
                                 f"rank): {o['error']}")
    if proc.returncode != 0:
        if "Signal 9" in output or "SIGKILL" in output:
            return Job("oom", reason="a rank was killed (SIGKILL): out of memory")
        raise BenchError(f"{method} job exited with {proc.returncode}:\n{output[-3000:]}")
    return Job("measured", [json.loads(Path(result_dir, f"{method}_rank{r}.json").read_text())
                            for r in range(args.world)])


def _watch(proc: subprocess.Popen, timeout: float) -> Job | None:
    """Wait for the job; stop its whole process group, and say why, when it runs past `timeout` or the
    machine's available memory falls below the floor."""
    total = _meminfo_bytes("MemTotal") or 0
    floor = max(WATCHDOG_FLOOR_FRACTION * total, WATCHDOG_FLOOR_BYTES)
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        available = _meminfo_bytes("MemAvailable")
        stop = None
        if available is not None and available < floor:
            stop = Job("oom", reason=f"stopped by the benchmark: the machine's available memory fell to "
                                     f"{_gib(available)} (floor {_gib(floor)})")
        elif time.monotonic() > deadline:
            stop = Job("timeout", reason=f"ran past --timeout {timeout:.0f} s")
        if stop:
            os.killpg(proc.pid, signal.SIGKILL)
            return stop
        time.sleep(0.1)
    return None


def _gib(n: float | None) -> str:
    return "none" if n is None else f"{n / GIB:.2f} GiB"


def _launch(method: str, args: argparse.Namespace, result_dir: str) -> list[dict]:
    """One job at --batch-per-rank; every rank's result."""
    job = run_job(method, args, result_dir, args.batch_per_rank)
    if job.status != "measured":
        raise BenchError(f"{method} job did not finish ({job.reason}); lower --batch-per-rank")
    return job.ranks


def _summarize_method(jobs: list[list[dict]]) -> dict:
    """Per repeat, a job's time and peak are its slowest and largest rank; medians over repeats."""
    seconds = [max(r["seconds"] for r in job) for job in jobs]
    peaks = [max(r["peak_bytes"] for r in job) for job in jobs]
    first = jobs[0]
    median_s = statistics.median(seconds)
    peak_gflops = statistics.median(r["matmul_gflops"] for job in jobs for r in job)
    achieved = first[0]["flops"] / median_s / 1e9
    return {
        "seconds_median": median_s, "seconds": seconds,
        "peak_bytes_per_rank_median": statistics.median(peaks), "peak_bytes_per_rank": peaks,
        "loss_per_rank": [r["loss"] for r in first], "loss_mean": statistics.fmean(r["loss"] for r in first),
        "image_grad_norm_per_rank": [r["image_grad_norm"] for r in first],
        "log_scale_grad_per_rank": [r["log_scale_grad"] for r in first],
        "flops_per_rank": first[0]["flops"], "achieved_gflops_per_rank": achieved,
        "matmul_peak_gflops_per_rank": peak_gflops, "mfu": achieved / peak_gflops,
        "memory_baseline": first[0]["memory_baseline"],
    }


def summarize(args: argparse.Namespace, jobs: dict[str, list[list[dict]]], argv: list[str]) -> dict:
    import torch

    methods = {m: _summarize_method(jobs[m]) for m in METHODS}
    oc, tiled = methods["openclip"], methods["tiled"]
    memory_ratio = tiled["peak_bytes_per_rank_median"] / oc["peak_bytes_per_rank_median"]
    time_ratio = tiled["seconds_median"] / oc["seconds_median"]
    return {
        "benchmark": "contrastive loss forward+backward, local-loss InfoNCE, fp32, CPU/gloo",
        "command": "clipkit bench loss " + " ".join(argv),
        "config": {"batch_per_rank": args.batch_per_rank, "world": args.world,
                   "global_batch": args.batch_per_rank * args.world, "dim": args.dim, "dtype": "float32",
                   "tile_size": args.tile_size, "repeats": args.repeats, "threads_per_rank": _threads(args)},
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "mem_total_bytes": _meminfo_bytes("MemTotal")},
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


def _drive(args: argparse.Namespace, argv: list[str]) -> int:
    _check_memory(args)
    jobs: dict[str, list[list[dict]]] = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory(prefix="clipkit_bench_loss_") as result_dir:
        for repeat in range(args.repeats):
            # Alternate which method goes first, so slow drift on a shared machine favours neither.
            for method in METHODS if repeat % 2 == 0 else METHODS[::-1]:
                jobs[method].append(_launch(method, args, result_dir))
                print(f"repeat {repeat + 1}/{args.repeats} {method}: {max(r['seconds'] for r in jobs[method][-1]):.2f} s, "
                      f"peak {max(r['peak_bytes'] for r in jobs[method][-1]) / 2**20:.1f} MiB/rank", flush=True)
    report = summarize(args, jobs, argv)
    print(format_table(report))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return _worker(args)
    try:
        if args.curve:
            from .loss_curve import drive_curve

            return drive_curve(args, argv)
        return _drive(args, argv)
    except BenchError as e:
        print(f"clipkit bench loss: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
