"""`clipkit train` with faults injected from outside the library, for tests/test_faults.py.

    [torchrun ...] python tests/dist/fault_train.py [CONFIG.yaml] [dotted.key=value ...]

Runs the real command (clipkit.cli.main(["train", ...]): run layer, Trainer, engines, checkpoints) and
exits with its status. The faults come from the environment variable CLIPKIT_TEST_FAULTS, read here and
nowhere in clipkit: comma-separated entries, each applying on every rank unless it names one (":R").

    poison:K[:R]          the images of step K are inf (the forward gives NaN loss and gradients)
    poison_from:K[:R]     the same for every step from K on
    crash:K[:R]           SIGKILL inside the backward of step K (a process killed mid-step)
    sigkill_save:K[:R]    SIGKILL while checkpoint K is being written: its files are in step_K.tmp,
                          the manifest is not (a process killed mid-save)
    delay:S               sleep S seconds after each step (so that a test can act mid-run)
    first_attempt         the faults above apply only to torchrun's first attempt
                          (TORCHELASTIC_RESTART_COUNT=0): a restarted group runs clean
    digests               run.dir/digests_rank{R}.jsonl: after each step, the sha256 of the weights and
                          the largest AdamW step count (torch engine)

The wrappers call the real methods; they only add the fault at the chosen step.
"""
from __future__ import annotations

from clipkit.startup import paused_collection

with paused_collection():  # start-up imports, as the CLI makes them (clipkit/startup.py)
    import hashlib
    import json
    import os
    import signal
    import sys
    import time
    from pathlib import Path

    from clipkit import cli
    from clipkit.training import Trainer


def _faults() -> dict[str, list[tuple[float, int | None]]]:
    faults: dict[str, list] = {}
    for entry in filter(None, os.environ.get("CLIPKIT_TEST_FAULTS", "").split(",")):
        name, *args = entry.split(":")
        value = float(args[0]) if args else 0.0
        rank = int(args[1]) if len(args) > 1 else None
        faults.setdefault(name, []).append((value, rank))
    if "first_attempt" in faults and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        faults = {k: v for k, v in faults.items() if k in ("digests", "delay")}
    return faults


def _at(faults: dict, name: str, step: int, rank: int, *, from_on: bool = False) -> bool:
    return any((step >= k if from_on else step == k) and (r is None or r == rank) for k, r in faults.get(name, []))


def _digest(trainer: Trainer) -> dict:
    h = hashlib.sha256()
    for name, tensor in sorted(trainer.module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    optimizer = getattr(trainer.engine, "optimizer", None)
    steps = [float(s["step"]) for s in getattr(optimizer, "state", {}).values() if "step" in s]
    return {"step": trainer.step, "weights": h.hexdigest(), "adam_step": max(steps, default=0.0)}


def install(trainer: Trainer, faults: dict) -> None:
    rank = trainer.env.rank
    step_fn, engine = trainer.step_fn, trainer.engine
    real_run, real_backward, real_save_state = step_fn.run, engine.backward, engine.save_state
    digests = open(trainer.run_dir / f"digests_rank{rank}.jsonl", "a") if "digests" in faults else None
    delay = max((s for s, _ in faults.get("delay", [])), default=0.0)

    def run(images, tokens, stop=False):
        step = trainer.step + 1  # the step being trained
        if _at(faults, "poison", step, rank) or _at(faults, "poison_from", step, rank, from_on=True):
            images = images.clone().fill_(float("inf"))
        result = real_run(images, tokens, stop=stop)
        if digests is not None:
            digests.write(json.dumps({**_digest(trainer), "step": step, "applied": result.applied}) + "\n")
            digests.flush()
        if delay:
            time.sleep(delay)
        return result

    def backward(loss):
        real_backward(loss)
        if _at(faults, "crash", trainer.step + 1, rank):
            os.kill(os.getpid(), signal.SIGKILL)

    def save_state(directory: Path):
        real_save_state(directory)
        if _at(faults, "sigkill_save", trainer.step, rank):
            os.kill(os.getpid(), signal.SIGKILL)

    step_fn.run, engine.backward, engine.save_state = run, backward, save_state


def main() -> int:
    faults = _faults()
    real_fit = Trainer.fit

    def fit(self, *args, **kwargs):
        install(self, faults)
        return real_fit(self, *args, **kwargs)

    Trainer.fit = fit
    return cli.main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
