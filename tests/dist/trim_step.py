"""A few steps of clipkit's training step (trainer.build_model, the engine, ContrastiveStep) on fixed global
batches of captions of mixed length, each rank training on its slice of every global batch.

    [torchrun ...] python tests/dist/trim_step.py OUT.json STEPS [dotted.key=value ...]

OUT (written by rank 0): the loss of every step, and per rank the lengths its text transformer ran at.
tests/test_text_trim.py runs it under DDP and DeepSpeed with model.trim_text=true and as one process with
the untouched open_clip text tower (model.trim_text=false).
"""
from clipkit.startup import paused_collection

with paused_collection():  # start-up imports, as the CLI makes them (clipkit/startup.py)
    import json
    import random
    import sys

    import open_clip
    import torch

    from clipkit.config import load_config
    from clipkit.distributed import gather_objects, init_distributed
    from clipkit.losses import create_loss
    from clipkit.models import get_model_config
    from clipkit.training.engine import build_engine, engine_class
    from clipkit.training.step import ContrastiveStep
    from clipkit.training.trainer import build_model

WORDS = "a the dog cat red blue small old wooden house by the river under a bright sky at night".split()


def global_batch(step: int, size: int, image_size: int):
    rng = random.Random(step)
    # rank slices of mixed length: the longest caption of each slice differs, so each rank cuts elsewhere
    captions = [" ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 2, 3, 5, 8, 12]))) for _ in range(size)]
    images = torch.randn(size, 3, image_size, image_size, generator=torch.Generator().manual_seed(step))
    return images, open_clip.get_tokenizer("ViT-B-32")(captions)


def main(out: str, steps: int, overrides: list[str]) -> None:
    env = init_distributed()
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.run.seed)
    module = build_model(cfg, env.device, **engine_class(cfg).model_kwargs(cfg))
    lengths: list[int] = []
    module.transformer.register_forward_pre_hook(lambda m, args, kw: lengths.append(args[0].shape[1]),
                                                 with_kwargs=True)
    engine = build_engine(cfg, module, env, cfg.model.name, get_model_config(cfg.model.name))
    step = ContrastiveStep(engine, create_loss(cfg.train.loss, local_loss=cfg.train.local_loss),
                           cfg.train.accum_steps, env.device)
    size, local = cfg.train.global_batch_size, cfg.train.global_batch_size // env.world_size
    losses = []
    for k in range(steps):
        images, tokens = global_batch(k, size, module.visual.image_size[0])
        mine = slice(env.rank * local, (env.rank + 1) * local)
        loss = torch.tensor([step(images[mine], tokens[mine])], dtype=torch.float64)
        if env.distributed:
            torch.distributed.all_reduce(loss)
        losses.append(loss.item() / env.world_size)
    everyone = gather_objects(lengths, env)
    if env.rank == 0:
        json.dump({"losses": losses, "lengths": everyone}, open(out, "w"))
    if env.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
