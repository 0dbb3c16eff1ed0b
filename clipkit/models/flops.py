"""FLOPs of a training step and the measured matmul peak: the two sides of model FLOP utilisation (MFU).

    flops = train_flops_per_sample(model, image_size=(224, 224), context_length=77)
    peak = matmul_peak(torch.device("cpu"), torch.float32)        # FLOP/s this process reaches on a matmul
    mfu = samples_per_s_per_device * flops / peak

The count is torch's FlopCounterMode over one forward and backward of one image-text pair at the full
context length (matmuls, convolutions and attention; elementwise work is not counted), so it is the model's
FLOPs, the same for every implementation: a run that skips padding positions does less work for the same
count. The peak is measured, not taken from a datasheet: on CPU it depends on the cores and threads.
"""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


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
    counter = FlopCounterMode(display=False)
    try:
        model.train()
        with counter:
            image_features = model.encode_image(images, normalize=True)
            text_features = model.encode_text(tokens, normalize=True)
            (image_features @ text_features.T).sum().backward()
    finally:
        for p, g in zip(model.parameters(), before):
            p.grad = g
        model.train(was_training)
    return float(counter.get_total_flops())


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
