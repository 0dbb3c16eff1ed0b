"""The measurement jobs of `clipkit bench loss` and `clipkit bench loss --curve` (see clipkit/bench/loss.py):
one rank of one job (its inputs, the step under FlopCounterMode, its peak resident memory), the torchrun
job that runs the ranks under a watchdog, and the summary of a method's jobs over the repeats.

A rank is a `python -m clipkit.bench.loss --worker METHOD ...` process started by torchrun; it writes its
result as RESULT_DIR/METHOD_rankR.json (or .oom.json when its step ran out of memory).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from statistics import fmean
from pathlib import Path

from ..cliargs import default_threads
from .harness import (BenchError, median, meminfo_bytes, proc_status_bytes, reset_peak_rss, trim_heap,
                      worker_env)

METHODS = ("openclip", "tiled")
GIB = 1024 ** 3
# The watchdog stops a job when MemAvailable falls below max(3% of MemTotal, 512 MiB): there is no swap to
# slow things down first, and below that the kernel's OOM killer may pick any process on the machine.
WATCHDOG_FLOOR_FRACTION, WATCHDOG_FLOOR_BYTES = 0.03, 512 * 2 ** 20


# ------------------------------------------------------------------------------------ one rank of one job

def _status_bytes(field: str) -> int:
    value = proc_status_bytes(field)
    if value is None:
        raise BenchError(f"/proc/self/status has no {field}: peak memory needs Linux")
    return value


def _reset_peak_rss() -> tuple[int, str]:
    """Reset the high-water mark to the current RSS and return (baseline bytes, how)."""
    # Pages freed by the warm-up and the matmul probe stay resident in glibc's heap, and a step that reuses
    # them adds nothing to VmHWM: up to megabytes of its peak went unseen (at 2 x 512 rows OpenCLIP's read
    # anywhere from 0.5 to 4.7 MiB). Trimmed, only pages still partly in use can be reused unseen.
    trimmed = "; free heap trimmed" if trim_heap() else "; free heap not trimmed (may understate)"
    if reset_peak_rss():  # Linux >= 4.0: VmHWM := VmRSS
        return _status_bytes("VmRSS"), "VmHWM reset via clear_refs; baseline VmRSS" + trimmed
    # Cannot reset: measure from the mark so far, which can only understate the step's own peak.
    return _status_bytes("VmHWM"), "VmHWM not resettable; baseline VmHWM (may understate)" + trimmed


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

    from ..models.flops import counted

    def step():
        loss = loss_fn(img, txt, log_scale.exp())
        loss.backward()
        return loss

    dist.barrier()
    start = time.perf_counter()
    loss, flops = counted(step)
    seconds = time.perf_counter() - start
    return {"loss": loss.item(), "seconds": seconds, "flops": flops,
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


def rank_main(args: argparse.Namespace) -> int:
    """One rank of one job: the warm-up, the matmul peak, the measured step; its result as a file."""
    import torch
    import torch.distributed as dist

    from ..models.flops import matmul_peak

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
    # this rank's fp32 matmul throughput while the others measure theirs: the MFU reference
    matmul_gflops = matmul_peak(torch.device("cpu"), torch.float32, seconds=1.0) / 1e9
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

def threads_per_rank(args: argparse.Namespace) -> int:
    return args.threads or default_threads(args.world)



# ------------------------------------------------------------------------------------------------- jobs

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
    env = worker_env(threads_per_rank(args))
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
    total = meminfo_bytes("MemTotal") or 0
    floor = max(WATCHDOG_FLOOR_FRACTION * total, WATCHDOG_FLOOR_BYTES)
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        available = meminfo_bytes("MemAvailable")
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


def summarize_method(jobs: list[list[dict]]) -> dict:
    """Per repeat, a job's time and peak are its slowest and largest rank; medians over repeats."""
    seconds = [max(r["seconds"] for r in job) for job in jobs]
    peaks = [max(r["peak_bytes"] for r in job) for job in jobs]
    first = jobs[0]
    median_s = median(seconds)
    peak_gflops = median(r["matmul_gflops"] for job in jobs for r in job)
    achieved = first[0]["flops"] / median_s / 1e9
    return {
        "seconds_median": median_s, "seconds": seconds,
        "peak_bytes_per_rank_median": median(peaks), "peak_bytes_per_rank": peaks,
        "loss_per_rank": [r["loss"] for r in first], "loss_mean": fmean(r["loss"] for r in first),
        "image_grad_norm_per_rank": [r["image_grad_norm"] for r in first],
        "log_scale_grad_per_rank": [r["log_scale_grad"] for r in first],
        "flops_per_rank": first[0]["flops"], "achieved_gflops_per_rank": achieved,
        "matmul_peak_gflops_per_rank": peak_gflops, "mfu": achieved / peak_gflops,
        "memory_baseline": first[0]["memory_baseline"],
    }
