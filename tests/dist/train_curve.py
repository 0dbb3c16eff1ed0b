"""Loss curves of the real training loop, and the single-process reference on the same global batches.

    [torchrun ...] python tests/dist/train_curve.py fit OUT.json STEPS [dotted.key=value ...] [then OUT2.json ...]
    python tests/dist/train_curve.py reference OUT.json STEPS WORLD [dotted.key=value ...]

`fit` runs Trainer.fit() up to step STEPS with the real loader (each rank reads its own shards, as in
any run) and logs every step; with train.resume set it continues from the checkpoint. OUT gets the
global loss, the global gradient norm (before clipping) and whether train.grad_clip clipped it, of each step
it trained, read back from metrics.jsonl. Each `then OUT2.json [dotted.key=value ...]` is one more run after
it, in the same processes (no second start-up; the first run's overrides, then these), whose curve goes to
OUT2; `until=N` among them stops that run at step N instead of STEPS (its schedule is still train.steps').

`reference` is one process that builds the loaders of all WORLD ranks (their batches depend only on the
seed and the rank's place in the stream, not on the process that reads them), concatenates their
step-k batches into the global batch, and trains on it: the curve (losses and gradient norms) a W-rank run
must reproduce.
"""
from clipkit.startup import paused_collection

with paused_collection():  # start-up imports, as the CLI makes them (clipkit/startup.py)
    import json
    import sys
    from pathlib import Path

    import torch

    from clipkit.config import load_config
    from clipkit.data import build_train_loader
    from clipkit.training import Trainer
    from jobs import split_then


def fit(out: str, steps: int, overrides: list[str]) -> Trainer:
    trainer = Trainer(load_config(None, ["run.log_every=1", *overrides]))
    start = trainer.step
    trainer.fit(until=steps)
    if trainer.env.is_main:
        logged = [json.loads(line) for line in (Path(trainer.cfg.run.dir) / "metrics.jsonl").open()]
        logged = [r for r in logged if r["step"] > start]
        assert [r["step"] for r in logged] == list(range(start + 1, steps + 1))
        json.dump({"losses": [r["loss"] for r in logged], "grad_norms": [r.get("grad_norm") for r in logged],
                   "clipped_steps": [r.get("clipped_steps") for r in logged], "first_step": start}, open(out, "w"))
    return trainer


def fit_all(steps: int, out: str, args: list[str]) -> None:
    """fit(out, steps, overrides), then, for each `then OUT2 overrides2...`, fit(OUT2, steps, overrides +
    overrides2) (`until=N` among overrides2: up to step N), in this process; the process group is left once,
    after the last."""
    runs = split_then([out, *args])
    overrides = runs[0][1:]
    trainer = fit(out, steps, overrides)
    for path, *extra in runs[1:]:
        until = [int(a.split("=", 1)[1]) for a in extra if a.startswith("until=")]
        extra = [a for a in extra if not a.startswith("until=")]
        trainer = fit(path, until[-1] if until else steps, [*overrides, *extra])
    if trainer.env.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def reference(out: str, steps: int, world: int, overrides: list[str]) -> None:
    trainer = Trainer(load_config(None, overrides))
    cfg = trainer.cfg
    local = cfg.train.global_batch_size // world
    loaders = [iter(build_train_loader(cfg.data, transform=trainer.train_transform, tokenizer=trainer.tokenizer,
                                       local_batch_size=local, rank=r, world_size=world, seed=cfg.run.seed))
               for r in range(world)]
    losses, norms = [], []
    for _ in range(steps):
        batches = [next(loader) for loader in loaders]
        images = torch.cat([b.images for b in batches])
        tokens = torch.cat([b.targets for b in batches])
        losses.append(trainer.train_on(images, tokens))
        norms.append(trainer.last_grad_norm)
    json.dump({"losses": losses, "grad_norms": norms, "first_step": 0}, open(out, "w"))


if __name__ == "__main__":
    mode, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "fit":
        fit_all(steps, out, sys.argv[4:])
    else:
        reference(out, steps, int(sys.argv[4]), sys.argv[5:])
