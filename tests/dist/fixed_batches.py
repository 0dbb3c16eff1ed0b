"""What the resume scripts (ds_resume.py, fsdp_resume.py) do after loading: a few steps on fixed global batches,
then their outputs written by rank 0.

The batches are the same global batches whatever the number of ranks (random images and captions from a fixed
seed; rank r trains on its r-th share of each), so two layouts that resumed the same state give the same losses.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def train_fixed_batches(trainer, steps: int) -> list[float]:
    """The global loss of each of `steps` steps on the fixed batches."""
    env = trainer.env
    generator = torch.Generator().manual_seed(1234)
    size = trainer.module.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    batch = trainer.cfg.train.global_batch_size
    share = slice(env.rank * trainer.local_batch_size, (env.rank + 1) * trainer.local_batch_size)
    losses = []
    for step in range(steps):
        images = torch.randn(batch, 3, *size, generator=generator)
        words = torch.randint(0, 1000, (batch,), generator=generator).tolist()
        tokens = trainer.tokenizer([f"a photo of thing {w} number {step}" for w in words])
        loss = trainer.train_on(images[share], tokens[share])
        losses.append(trainer.global_mean(loss))
    return losses


def write_outputs(out: str, state: dict, resumed: dict, is_main: bool) -> None:
    """OUT/state.safetensors and OUT/resumed.json, from rank 0."""
    if is_main:
        Path(out).mkdir(parents=True, exist_ok=True)
        save_file(state, str(Path(out) / "state.safetensors"))
        (Path(out) / "resumed.json").write_text(json.dumps(resumed))
