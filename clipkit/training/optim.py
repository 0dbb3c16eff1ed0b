"""Optimizer and learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn


def is_no_decay(name: str, param: torch.Tensor, explicit: set[str]) -> bool:
    # Norm weights, biases, class/scale vectors (all < 2-D), the temperature, and whatever the model
    # itself lists (positional and class embeddings in open_clip's towers).
    return param.ndim < 2 or name in explicit or "logit_scale" in name or "logit_bias" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    explicit = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if is_no_decay(name, p, explicit) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, impl: str = "fused") -> torch.optim.AdamW:
    """AdamW over param_groups. impl (train.optimizer_impl): "fused", one kernel over every tensor (on CPU
    about 10x faster than torch's default there, which updates one tensor at a time with several passes over
    memory: a large share of a small model's step); "foreach"; "for_loop". The same update up to rounding, and
    the same state, so a checkpoint written with one continues with another."""
    kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[impl]
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, **kwargs)


class WarmupCosine:
    """LR multiplier: linear warmup from 0 to 1 over `warmup` steps, then cosine decay to 0 at `total`."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = max(0, warmup), max(1, total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = WarmupCosine(warmup, total)

    # A plain function, not the object: LambdaLR would save a callable object's fields into the
    # checkpoint and restore them on resume, so a run resumed with more steps would keep the old schedule.
    def lr_lambda(step: int) -> float:
        return schedule(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
