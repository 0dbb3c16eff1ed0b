"""What every benchmark shares; the benchmarks differ only in what they time.

    for repeat, order in orders(methods, repeats):           # peers and ours alternate over the repeats
        for method in order:
            r = run_worker("clipkit.bench.data", method, [...], env=worker_env(threads=1), timeout=600)
    ...                                                      # the worker process: emit_result({...})
    report = {"command": command_line("data", argv), "machine": machine_facts(), ...}
    return bench_main("data", argv, parse_args, drive, show, worker=measure)   # errors, JSON report

A measurement that must not share a process with its peer (a trainer, a loader pool, a heap to measure) runs
in a fresh `python -m clipkit.bench.NAME --worker METHOD ...` of its own, which prints its result as one
`RESULT {json}` line on stdout; anything else it prints is its own business. FLOPs and the matmul peak come
from clipkit.models.flops (FLOP and FLOP/s; reports convert where they show GFLOP).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

CACHE = Path(os.environ.get("CLIPKIT_CACHE", Path.home() / ".cache" / "clipkit"))
RESULT = "RESULT "  # the line a worker process reports its measurement on
# OpenCLIP's data pipeline needs webdataset<=0.2.86 (clipkit uses 1.0.2) and pandas: they are installed once
# into a folder of their own, placed ahead on the peer process's path.
PEER_PACKAGES = ["webdataset==0.2.86", "pandas", "python-dateutil", "pytz", "tzdata", "six"]
CLIPKIT_ROOT = Path(__file__).resolve().parents[2]  # where clipkit imports from, whatever the working folder


class BenchError(RuntimeError):
    """A benchmark could not run; the message says what to change."""


# ------------------------------------------------------------------------------------------ alternation

def orders(methods: Sequence[str], repeats: int, rotate: bool = False) -> Iterator[tuple[int, list[str]]]:
    """(repeat, the methods in that repeat's order): reversed on every other repeat, or with `rotate` the
    first one moved to the end each repeat, so that slow drift on a shared machine favours none."""
    methods = list(methods)
    for repeat in range(repeats):
        if rotate:
            k = repeat % len(methods)
            yield repeat, methods[k:] + methods[:k]
        else:
            yield repeat, methods if repeat % 2 == 0 else methods[::-1]


# ------------------------------------------------------------------------------------- worker processes

def peer_site() -> Path:
    """A folder holding webdataset 0.2.86 and pandas for OpenCLIP's data pipeline (installed once)."""
    site = CACHE / "bench_peer"
    if (site / ".complete").is_file():
        return site
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), *PEER_PACKAGES]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"could not install OpenCLIP's data dependencies ({' '.join(PEER_PACKAGES)}) into "
                         f"{site}:\n{proc.stderr[-2000:]}")
    (site / ".complete").write_text(" ".join(PEER_PACKAGES))
    return site


def worker_env(threads: int, peer: bool = False) -> dict[str, str]:
    """The environment of a measurement process: `threads` OpenMP threads, no hub, this clipkit first on the
    path (with `peer`, OpenCLIP's data dependencies ahead of it)."""
    paths = ([str(peer_site())] if peer else []) + [str(CLIPKIT_ROOT), os.environ.get("PYTHONPATH", "")]
    return os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                         "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def worker_command(module: str, method: str, args: Iterable[object] = ()) -> list[str]:
    """`python -m MODULE --worker METHOD ARGS...`: the benchmark re-run as one measurement process."""
    return [sys.executable, "-m", module, "--worker", method, *map(str, args)]


def emit_result(result: dict) -> None:
    """The worker's side: its measurement, as the one line run_worker reads."""
    print(RESULT + json.dumps(result), flush=True)


def run_worker(module: str, method: str, args: Iterable[object], *, env: dict[str, str], timeout: float,
               timeout_hint: str = "") -> dict:
    """One measurement process; its RESULT. BenchError (one line, then the end of its stderr) when it fails,
    prints no result or runs past `timeout` seconds."""
    try:
        proc = subprocess.run(worker_command(module, method, args), capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{method} measurement ran past --timeout {timeout:.0f} s{timeout_hint}") from e
    result = read_result(proc.stdout)
    if proc.returncode != 0 or result is None:
        raise BenchError(f"{method} measurement failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return result


def read_result(output: str) -> dict | None:
    """The last RESULT a worker printed in `output`; None when it printed none."""
    lines = [line for line in output.splitlines() if line.startswith(RESULT)]
    return json.loads(lines[-1][len(RESULT):]) if lines else None


# ------------------------------------------------------------------------------------- medians, spreads

def runs_and_median(name: str, values: Sequence[float]) -> dict:
    """{name: every repeat's value, name_median: their median}: how every report gives a figure."""
    return {name: list(values), f"{name}_median": statistics.median(values)}


def median(values: Iterable[float]) -> float:
    return statistics.median(values)


# --------------------------------------------------------------------------------------- machine facts

def proc_status_bytes(field: str, pid: int | str = "self") -> int | None:
    """A memory figure (VmRSS, VmHWM, VmData, ...) of a process from /proc/PID/status; None where there is
    none (not Linux, the process gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def trim_heap() -> bool:
    """Return the heap's free pages to the kernel; False where the C library cannot (not glibc). Pages freed
    earlier stay resident otherwise, and a measured step that reuses them adds nothing to the peak RSS."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> bool:
    """Start this process's peak RSS (VmHWM) afresh from its current RSS, so that the next peak read is of what
    runs from now on (Linux's /proc/self/clear_refs); False where that cannot be done."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def meminfo_bytes(field: str) -> int | None:
    """A figure of the machine's memory (MemTotal, MemAvailable) from /proc/meminfo; None where unreadable."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_facts(**extra) -> dict:
    """What every report says of the machine it ran on (extra: a benchmark's own facts, e.g. its peak)."""
    import torch

    cuda = torch.cuda.is_available()
    return {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "cpu_model": _cpu_model(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "device": "cuda" if cuda else "cpu", "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "mem_total_bytes": meminfo_bytes("MemTotal"), **extra}


def home_as_tilde(spec: str) -> str:
    """A path or spec as a report shows it: the user's home folder as ~ (the caches live under it)."""
    home = str(Path.home())
    return spec.replace(home + os.sep, "~" + os.sep) if home != os.sep else spec


# ----------------------------------------------------------------------------------------------- report

def command_line(bench: str, argv: Sequence[str]) -> str:
    return f"clipkit bench {bench} " + " ".join(argv)


def write_report(path: str | Path, report: dict) -> None:
    from ..atomic import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def bench_main(name: str, argv: list[str] | None, parse: Callable, drive: Callable, show: Callable[[dict], None],
               *, worker: Callable | None = None, errors: tuple[type[BaseException], ...] = ()) -> int:
    """A benchmark's `main`: parse; a --worker process measures; else drive the measurements, print `show`'s
    summary and write the JSON to --out. BenchError and `errors` end it with one line and status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    try:
        if worker is not None and getattr(args, "worker", None):
            return worker(args)
        report = drive(args, argv)
    except (BenchError, *errors) as e:
        print(f"clipkit bench {name}: error: {e}", file=sys.stderr)
        return 2
    show(report)
    write_report(args.out, report)
    print(f"written to {args.out}")
    return 0
