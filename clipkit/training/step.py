"""One optimisation step of contrastive training, with exact gradient accumulation.

Contrastive losses do not decompose over micro-batches (every pair in the batch is a negative), so
summing micro-batch losses is NOT the large-batch update. With accum_steps=K we follow GradCache:

1. embed every micro-batch without autograd (remembering each one's RNG state),
2. compute the loss over the whole accumulated batch (gathered across ranks as usual) and its
   gradient w.r.t. the cached features and the temperature/bias,
3. re-embed each micro-batch with autograd under the same RNG state and back-propagate the cached
   feature gradients through it.

The resulting parameter gradients equal those of one batch K times larger; activation memory is
that of one micro-batch.

Non-finite steps: `run()` skips the update of a step whose loss or gradients are not finite on any rank
(one small all-reduce per step, which also carries the caller's stop request, so every rank makes the
same decision at the same step). The torch engine decides after the backward, on the loss and the global
gradient norm; DeepSpeed, whose optimizer skips non-finite gradients itself, decides on the loss before
any backward runs.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.profiler import record_function


def _rng_snapshot(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _rng_restore(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@dataclass
class StepResult:
    loss: float  # this rank's loss (NaN or inf when it was not finite)
    applied: bool  # the weights were updated; False: skipped, every rank alike (non-finite loss or gradients)
    stop: bool  # some rank asked to stop after this step (run(stop=True)); every rank sees the same
    # the global gradient norm (unscaled, before clipping; every rank has the same), or None where the engine
    # checks its gradients itself (DeepSpeed)
    grad_norm: float | None = None


class ContrastiveStep:
    """Precision is the engine's: the forward runs in engine.autocast(), images take engine.input_dtype."""

    def __init__(self, engine, loss_fn: Callable, accum_steps: int = 1, device: torch.device | None = None,
                 normalize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.engine = engine
        self.normalize = normalize  # for uint8 batches: normalised here, on the device
        self.loss_fn = loss_fn
        self.accum_steps = accum_steps
        self.device = device or torch.device("cpu")

    def _forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        with self.engine.autocast():
            return self.engine.model(images, tokens)

    def _loss(self, out: dict, image_features=None, text_features=None, logit_scale=None, logit_bias=None):
        # The similarity and the softmax run in fp32 even under bf16 autocast.
        img = out["image_features"] if image_features is None else image_features
        txt = out["text_features"] if text_features is None else text_features
        scale = out["logit_scale"] if logit_scale is None else logit_scale
        bias = out.get("logit_bias") if logit_bias is None else logit_bias
        return self.loss_fn(img.float(), txt.float(), scale.float(), None if bias is None else bias.float())

    def compute_gradients(self, images: torch.Tensor, tokens: torch.Tensor,
                          before_backward: Callable[[float], bool] | None = None) -> float:
        """Forward and backward for one global step's local batch; gradients land in the parameters.

        before_backward(loss): called once the step's loss is known and before any backward; False skips
        the backward (no gradients)."""
        if self.normalize is not None:
            images = self.normalize(images.to(self.device, non_blocking=True))
        images = images.to(self.device, dtype=self.engine.input_dtype, non_blocking=True)
        tokens = tokens.to(self.device, non_blocking=True)
        if self.accum_steps == 1:
            with record_function("clipkit.forward"):
                out = self._forward(images, tokens)
            with record_function("clipkit.loss"):
                loss = self._loss(out)
                value = loss.item()
            if before_backward is None or before_backward(value):
                with record_function("clipkit.backward"):
                    self.engine.backward(loss)
            return value
        return self._accumulated(images.chunk(self.accum_steps), tokens.chunk(self.accum_steps), before_backward)

    def _accumulated(self, image_chunks, token_chunks, before_backward=None) -> float:
        # 1. features of every chunk, without autograd
        rng_states, img_feats, txt_feats = [], [], []
        with torch.no_grad():
            for images, tokens in zip(image_chunks, token_chunks):
                rng_states.append(_rng_snapshot(self.device))
                out = self._forward(images, tokens)
                img_feats.append(out["image_features"].float())
                txt_feats.append(out["text_features"].float())
        # 2. the full-batch loss and its gradient w.r.t. the cached features, temperature and bias
        img = torch.cat(img_feats).requires_grad_()
        txt = torch.cat(txt_feats).requires_grad_()
        scale = out["logit_scale"].detach().float().requires_grad_()
        bias = out.get("logit_bias")
        bias = None if bias is None else bias.detach().float().requires_grad_()
        loss = self.loss_fn(img, txt, scale, bias)
        if before_backward is not None and not before_backward(loss.item()):
            return loss.item()
        leaves = [img, txt, scale] + ([bias] if bias is not None else [])
        grads = torch.autograd.grad(loss, leaves)
        img_grads = grads[0].split([f.shape[0] for f in img_feats])
        txt_grads = grads[1].split([f.shape[0] for f in txt_feats])
        # 3. re-embed each chunk with autograd and push the cached gradients through it
        last = len(img_grads) - 1
        devices = [self.device] if self.device.type == "cuda" else []
        for k, (images, tokens) in enumerate(zip(image_chunks, token_chunks)):
            with torch.random.fork_rng(devices=devices):
                _rng_restore(rng_states[k], self.device)
                sync = self.engine.no_sync() if k < last else contextlib.nullcontext()
                with sync:
                    out = self._forward(images, tokens)
                    surrogate = (out["image_features"].float() * img_grads[k]).sum() + \
                        (out["text_features"].float() * txt_grads[k]).sum()
                    if k == 0:  # the temperature (and bias) gradient, once
                        surrogate = surrogate + out["logit_scale"].float() * grads[2]
                        if bias is not None:
                            surrogate = surrogate + out["logit_bias"].float() * grads[3]
                    self.engine.backward(surrogate)
        return loss.item()

    def _agree(self, nonfinite: bool | torch.Tensor, stop: bool | Callable[[], bool]) -> tuple[bool, bool]:
        """(any rank non-finite, any rank asked to stop): one all-reduce of two numbers under DDP."""
        flags = torch.tensor([0.0, float(stop() if callable(stop) else stop)], device=self.device)
        flags[0] = torch.as_tensor(nonfinite, device=self.device).float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad, stop_all = flags.tolist()
        return bad > 0, stop_all > 0

    def run(self, images: torch.Tensor, tokens: torch.Tensor, stop: bool | Callable[[], bool] = False) -> StepResult:
        """One step: gradients, then the update unless the loss or the gradients are not finite on some rank.

        stop: this rank's request to stop after this step (a callable is asked at the all-reduce, so that a
        request made during the forward or backward still counts for this step)."""
        decided: list[tuple[bool, bool]] = []

        def before_backward(loss: float) -> bool:  # DeepSpeed: decide on the loss before any backward
            decided.append(self._agree(not math.isfinite(loss), stop))
            return not decided[0][0]

        grad_norm = None
        if self.engine.checks_gradients:
            loss = self.compute_gradients(images, tokens, before_backward)
            nonfinite, stop_all = decided[0]
            with record_function("clipkit.optimizer"):
                applied = self.engine.step(apply=not nonfinite)  # DeepSpeed skips non-finite gradients itself
        else:
            loss = self.compute_gradients(images, tokens)
            with record_function("clipkit.grad_norm"):
                norm = self.engine.grad_norm()
                local = ~torch.isfinite(norm) if math.isfinite(loss) else True  # one device sync, in _agree
                nonfinite, stop_all = self._agree(local, stop)
                grad_norm = norm.item()  # computed already: _agree waited for it; read before the update is queued
            with record_function("clipkit.optimizer"):
                applied = self.engine.step(apply=not nonfinite)
        return StepResult(loss, applied, stop_all, grad_norm)

    def __call__(self, images: torch.Tensor, tokens: torch.Tensor) -> float:
        return self.run(images, tokens).loss
