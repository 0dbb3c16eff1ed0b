"""The stall watchdog: a training process that stops making progress dumps its stacks and exits.

    watchdog = Watchdog(timeout_s=cfg.train.stall_timeout_s, dump_dir=run_dir, rank=env.rank)
    watchdog.start()
    for batch in batches:
        train_on(batch)
        watchdog.beat()            # a step completed
        with watchdog.paused():    # evaluation, checkpoint writes: not steps, and allowed to take long
            ...
    watchdog.stop()

A daemon thread checks the time since the last beat (since start() for the first step, which includes
the loader's start-up). When no step completes for timeout_s seconds (a rank stuck in a collective whose
peer died or was stopped, a loader waiting on a dead file system, a deadlock), it writes every thread's
Python stack to DUMP_DIR/stall_rank{R}.txt (faulthandler, which needs neither the GIL holder's help nor
a working interpreter state), prints one line naming that file and ends the process with os._exit(3)
(EXIT_STALLED): a hung collective cannot be unwound by an exception, and a non-zero exit is what lets
torchrun --max-restarts (or a job scheduler) restart the group, which then resumes from the latest
checkpoint by itself (see Trainer).
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

EXIT_STALLED = 3  # the exit status of a process the watchdog ended


class Watchdog:
    def __init__(self, timeout_s: float, dump_dir: str | Path, rank: int = 0, what: str = "training step",
                 exit_code: int = EXIT_STALLED) -> None:
        """timeout_s <= 0: disabled (every method is a no-op)."""
        self.timeout_s = float(timeout_s)
        self.dump_path = Path(dump_dir) / f"stall_rank{rank}.txt"
        self.rank, self.what, self.exit_code = rank, what, exit_code
        self._last = time.monotonic()
        self._beats = 0
        self._paused = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self) -> "Watchdog":
        if not self.enabled or self._thread is not None:
            return self
        self._last = time.monotonic()
        self._stopped.clear()
        self._thread = threading.Thread(target=self._watch, name="clipkit-watchdog", daemon=True)
        self._thread.start()
        return self

    def beat(self) -> None:
        """A step completed: the clock starts again."""
        with self._lock:
            self._last = time.monotonic()
            self._beats += 1

    @contextlib.contextmanager
    def paused(self):
        """No stall is reported inside; the clock starts again when it ends."""
        with self._lock:
            self._paused += 1
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1
                self._last = time.monotonic()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        period = min(1.0, self.timeout_s / 4)
        while not self._stopped.wait(period):
            with self._lock:
                idle = time.monotonic() - self._last
                stalled = not self._paused and idle >= self.timeout_s
                beats = self._beats
            if stalled and not self._stopped.is_set():
                self._fire(idle, beats)

    def _fire(self, idle: float, beats: int) -> None:
        where = "before its first step" if beats == 0 else f"after {beats} steps in this process"
        try:
            self.dump_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.dump_path, "w") as f:
                f.write(f"clipkit watchdog, rank {self.rank}, pid {os.getpid()}: no {self.what} completed in "
                        f"{idle:.0f} s, {where} (train.stall_timeout_s={self.timeout_s:g}). Every thread's "
                        "stack:\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
                f.flush()
                os.fsync(f.fileno())
            written = f"every thread's stack is in {self.dump_path}"
        except OSError as e:  # the run dir itself may be what hangs or fails: dump to stderr instead
            written = f"could not write {self.dump_path} ({e}); every thread's stack follows on stderr"
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        print(f"clipkit: rank {self.rank}: no {self.what} completed in {idle:.0f} s (train.stall_timeout_s="
              f"{self.timeout_s:g}): {written}; exiting with status {self.exit_code}", file=sys.stderr, flush=True)
        os._exit(self.exit_code)
