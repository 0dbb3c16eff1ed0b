"""What every engine shares: the autocast dtypes, the schedule step, the backward and the update, the
one-process group."""
from __future__ import annotations

import contextlib
import math
import os
import warnings

import torch

from ..distributed import DistEnv

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def advance_schedule(scheduler) -> None:
    """Advance the LR schedule (also on a step that skipped the update: the schedule follows the step count)."""
    with warnings.catch_warnings():  # torch's note that the schedule moved before any optimizer update
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        scheduler.step()


def gradient_norm(engine) -> torch.Tensor:
    """The norm of the gradients this rank holds, unscaled first (fp16: engine.scaler) and clipped when
    engine.grad_clip is set (the norm before clipping). Under DDP that is the global norm; an engine whose ranks
    hold shards of the gradients completes it across ranks itself."""
    if engine.scaler is not None:
        engine.scaler.unscale_(engine.optimizer)  # clip (and check) the true gradients
    params = [p for p in engine.module.parameters() if p.grad is not None]
    if engine.grad_clip is not None:
        return torch.nn.utils.clip_grad_norm_(params, engine.grad_clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def run_backward(engine, loss: torch.Tensor) -> None:
    """The torch and FSDP2 engines' backward: the loss scaled (fp16: engine.scaler), with the compiled blocks of
    train.compile=model active (engine.compiler), so that a block gradient checkpointing recomputes in the
    backward runs as it ran in the forward (the compiled graph's saved tensors are not the eager block's)."""
    with contextlib.nullcontext() if engine.compiler is None else engine.compiler.active():
        (loss if engine.scaler is None else engine.scaler.scale(loss)).backward()


def update(engine, apply: bool | None) -> bool:
    """The torch and FSDP2 engines' step: update (apply=None: when engine.grad_norm() is finite, decided by this
    rank alone), then schedule and zero the gradients; returns whether the weights were updated. Reads the
    engine's optimizer, scheduler, scaler (GradScaler or None) and clears its cached norm (`_norm`)."""
    norm = engine.grad_norm()
    if apply is None:
        apply = math.isfinite(norm.item())
    if apply:
        if engine.scaler is None:
            engine.optimizer.step()
        else:  # found no overflow in unscale_ (the norm is finite), so it updates
            engine.scaler.step(engine.optimizer)
    if engine.scaler is not None:  # an overflow (recorded by unscale_) lowers the scale, as GradScaler does
        engine.scaler.update()
    advance_schedule(engine.scheduler)
    engine.optimizer.zero_grad(set_to_none=True)
    engine._norm = None
    return apply


def join_one_process_group(env: DistEnv) -> None:
    """One process (plain `clipkit train`, or torchrun with one rank): DeepSpeed and FSDP2 still need a
    process group and the variables torchrun would set; a one-member group needs no rendezvous."""
    if torch.distributed.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    on_gpu = env.device.type == "cuda"
    torch.distributed.init_process_group("nccl" if on_gpu else "gloo", store=torch.distributed.HashStore(),
                                         rank=0, world_size=1, device_id=env.device if on_gpu else None)
