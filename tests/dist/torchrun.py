"""Launch a script under torchrun as real processes, the way users launch training."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import process_env

HERE = Path(__file__).resolve().parent


def run_torchrun(script: str | Path, nproc: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `script` (a path, or a file name in tests/dist/) on `nproc` gloo ranks; fail with its output."""
    script = Path(script) if Path(script).is_absolute() else HERE / script
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    # Every warning shown once per place, so a deprecated collective cannot hide behind a filter.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=process_env(PYTHONWARNINGS="default"))
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc
