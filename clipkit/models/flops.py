"""FLOPs of a training step and the measured matmul peak: the two sides of model FLOP utilisation (MFU).

    flops = train_flops_per_sample(model, image_size=(224, 224), context_length=77)
    peak = matmul_peak(torch.device("cpu"), torch.float32)        # FLOP/s this process reaches on a matmul
    mfu = samples_per_s_per_device * flops / peak
    loss, flops = counted(lambda: step(batch))                   # what one call executes

Every FLOP figure clipkit reports (the trainer's MFU, the benchmarks) is counted here, in FLOP, and every
peak is measured here, in FLOP/s; a report that shows GFLOP divides by 1e9 where it writes the figure.

The count is torch's FlopCounterMode over one forward and backward of one image-text pair at the full
context length (matmuls, convolutions and attention; elementwise work is not counted), so it is the model's
FLOPs, the same for every implementation: a run that skips padding positions does less work for the same
count. The peak is measured, not taken from a datasheet: on CPU it depends on the cores and threads.
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")


def train_flops_per_sample(model: nn.Module, image_size: tuple[int, int], context_length: int) -> float:
    """FLOPs of the forward and backward of one (image, text) pair through `model` (an open_clip CLIP), the
    text at the full context length even where the model cuts its text tower at the longest caption
    (model.trim_text: counted untrimmed, then switched back); the model's gradients are left as they were."""
    from .trim import set_text_trimming, text_trimming

    trimmed = text_trimming(model)
    set_text_trimming(model, False)
    try:
        return _count(model, image_size, context_length)
    finally:
        set_text_trimming(model, trimmed)


def _count(model: nn.Module, image_size: tuple[int, int], context_length: int) -> float:
    param = next(model.parameters())
    images = torch.zeros(1, 3, *image_size, device=param.device, dtype=param.dtype)
    tokens = torch.ones(1, context_length, dtype=torch.long, device=param.device)
    before = [p.grad for p in model.parameters()]
    was_training = model.training

    def step() -> None:
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
        (image_features @ text_features.T).sum().backward()

    try:
        model.train()
        return count_flops(step)
    finally:
        for p, g in zip(model.parameters(), before):
            p.grad = g
        model.train(was_training)


def counted(fn: Callable[[], T]) -> tuple[T, float]:
    """(fn(), the FLOPs it executed): torch's FlopCounterMode (matmuls, convolutions, attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        result = fn()
    return result, float(counter.get_total_flops())


def count_flops(fn: Callable[[], object]) -> float:
    """The FLOPs fn() executes, counted as counted() counts them."""
    return counted(fn)[1]


def tower_train_flops_per_sample(model: nn.Module, batch: int = 2) -> dict[str, float]:
    """Forward + backward FLOPs per sample of each tower alone at its full input (the image size, the text at
    its context length: build the model with trim_text=False), counted over a batch of `batch` random
    inputs (the per-sample figure does not depend on it); the model's gradients accumulate."""
    size = model.visual.image_size
    h, w = size if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(batch, 3, h, w)
    tokens = torch.randint(1, 1000, (batch, model.context_length))
    return {"image_tower": count_flops(lambda: model.encode_image(images).sum().backward()) / batch,
            "text_tower": count_flops(lambda: model.encode_text(tokens).sum().backward()) / batch}


def image_inference_flops(model: nn.Module, image_size: tuple[int, int]) -> float:
    """FLOPs of one image through the image tower, forward only (as an embedding job runs it)."""
    with torch.inference_mode():
        return count_flops(lambda: model.encode_image(torch.zeros(1, 3, *image_size)))


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                seconds: float = 0.5) -> float:
    """FLOP/s of square matmuls of size n on `device` in `dtype`, with this process's threads (the best
    of several timed rounds of about `seconds` in all)."""
    if device.type == "cpu" and dtype != torch.float32:
        dtype = torch.float32  # CPU training runs its matmuls in fp32 unless autocast says otherwise
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b
    sync()
    best, spent, reps = 0.0, 0.0, 1
    while spent < seconds:
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        took = time.perf_counter() - start
        spent += took
        best = max(best, 2 * n ** 3 * reps / took)
        if took < 0.05:
            reps *= 2
    return best
