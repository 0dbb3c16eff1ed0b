"""Where training metrics go: console progress bar, metrics.jsonl and TensorBoard (rank 0 only).

metrics.jsonl is strict JSON, one object per line: a value that is not a finite number (a diverged loss)
is written as null, never as the bare NaN/Infinity that JSON readers reject. It holds each step once: a
run resumed from the checkpoint of step N (by hand or after an automatic restart) drops the records of
the steps after N that the interrupted attempt logged, since those steps are trained again.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm

from ..atomic import atomic_write_text


def finite_or_none(value):
    """The record with every non-finite float (NaN, inf) replaced by None (null in JSON), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def _drop_records_after(path: Path, step: int) -> None:
    """Keep the records of steps <= step (the checkpoint a run resumes from); rewritten atomically."""
    if not path.is_file():
        return
    kept, dropped = [], False
    for line in path.read_text().splitlines():
        try:
            record_step = json.loads(line).get("step", 0)
        except ValueError:  # a line cut short by a crash mid-write
            dropped = True
            continue
        if isinstance(record_step, int) and record_step > step:
            dropped = True
        else:
            kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))


class MetricsLogger:
    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool = True) -> None:
        self.enabled = enabled
        self.bar = None
        self.writer = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        _drop_records_after(run_dir / "metrics.jsonl", start_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = finite_or_none({"step": step, **metrics})
        self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
            elif isinstance(value, dict):
                for sub, v in value.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self.writer.add_scalar(f"{key}/{sub}", v, step)
        if self.bar is not None and "loss" in metrics:
            loss, lr = record.get("loss"), record.get("lr")
            self.bar.set_postfix(loss="nan" if loss is None else f"{loss:.4f}",
                                 lr="nan" if lr is None else f"{lr:.2e}")

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()
