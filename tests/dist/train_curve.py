"""Run the Trainer's step on a fixed sequence of global batches and record the loss curve.

    [torchrun ...] python tests/dist/train_curve.py OUT.json SHARDS STEPS [dotted.key=value ...]

Every rank reads the same ordered samples and trains on its slice of each global batch, so a run on
W ranks sees exactly the global batches a single process sees: their loss curves must agree. With
train.resume set, the run continues from the checkpoint's step with the batches of those steps.
"""
import json
import sys

import torch

from clipkit.config import load_config
from clipkit.data import ShardStream, expand_shards
from clipkit.data.pipeline import Tokenize
from clipkit.training import Trainer


def main(out: str, shards: str, steps: int, overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg)
    env, batch = trainer.env, cfg.train.batch_size
    stream = ShardStream(expand_shards(shards), trainer.val_transform, Tokenize(trainer.tokenizer), batch,
                         shuffle=False, epochs=None)
    local = slice(env.rank * trainer.local_batch, (env.rank + 1) * trainer.local_batch)
    losses = []
    for step, global_batch in enumerate(stream):
        if step >= steps:
            break
        if step < trainer.step:  # resumed: these batches were trained on before the checkpoint
            continue
        loss = trainer.train_on(global_batch.images[local], global_batch.targets[local])
        losses.append(trainer._global_mean(loss))
        if trainer.step % cfg.train.checkpoint_every == 0:
            trainer.save()
    if env.is_main:
        json.dump({"losses": losses, "first_step": steps - len(losses)}, open(out, "w"))
    if env.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
