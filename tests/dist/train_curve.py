"""Loss curves of the real training loop, and the single-process reference on the same global batches.

    [torchrun ...] python tests/dist/train_curve.py fit OUT.json STEPS [dotted.key=value ...]
    python tests/dist/train_curve.py reference OUT.json STEPS WORLD [dotted.key=value ...]

`fit` runs Trainer.fit() up to step STEPS with the real loader (each rank reads its own shards, as in
any run) and logs every step; with train.resume set it continues from the checkpoint. OUT gets the
global loss of each step it trained, read back from metrics.jsonl.

`reference` is one process that builds the loaders of all WORLD ranks (their batches depend only on the
seed and the rank's place in the stream, not on the process that reads them), concatenates their
step-k batches into the global batch, and trains on it: the curve a W-rank run must reproduce.
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


def fit(out: str, steps: int, overrides: list[str]) -> None:
    trainer = Trainer(load_config(None, ["run.log_every=1", *overrides]))
    start = trainer.step
    trainer.fit(until=steps)
    if trainer.env.is_main:
        logged = [json.loads(line) for line in (Path(trainer.cfg.run.dir) / "metrics.jsonl").open()]
        losses = [r["loss"] for r in logged if r["step"] > start]
        assert [r["step"] for r in logged if r["step"] > start] == list(range(start + 1, steps + 1))
        json.dump({"losses": losses, "first_step": start}, open(out, "w"))
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
    losses = []
    for _ in range(steps):
        batches = [next(loader) for loader in loaders]
        images = torch.cat([b.images for b in batches])
        tokens = torch.cat([b.targets for b in batches])
        losses.append(trainer.train_on(images, tokens))
    json.dump({"losses": losses, "first_step": 0}, open(out, "w"))


if __name__ == "__main__":
    mode, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "fit":
        fit(out, steps, sys.argv[4:])
    else:
        reference(out, steps, int(sys.argv[4]), sys.argv[5:])
