"""Where training metrics go: console progress bar, metrics.jsonl and TensorBoard (rank 0 only)."""
from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool = True) -> None:
        self.enabled = enabled
        self.bar = None
        self.writer = None
        if not enabled:
            return
        run_dir = Path(run_dir)
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
        record = {"step": step, **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
            elif isinstance(value, dict):
                for sub, v in value.items():
                    self.writer.add_scalar(f"{key}/{sub}", v, step)
        if self.bar is not None and "loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", lr=f"{metrics.get('lr', 0):.2e}")

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
