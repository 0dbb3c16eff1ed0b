"""SigLIP: a sigmoid (binary) loss per image-text pair, with a learnable temperature and bias.

Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (2023). Every pair (i, j) is an independent
binary problem with label +1 on the diagonal and -1 elsewhere:

    loss = -sum_ij logsigmoid(label_ij * (s * img_i . txt_j + b)) / B

The model is initialised with t = log 10 (s = exp t) and b = -10 (open_clip's init_logit_scale /
init_logit_bias); this module only computes the loss.

Distributed (big_vision's normalisation): rank r sums over its B_local images and all B_global texts and
divides by B_local, so the mean over ranks of the per-rank loss equals the single-process loss on the
concatenated batch. The other ranks' text features travel around the ring by autograd-aware point-to-point
exchange (both directions at once, as in open_clip's SigLipLoss) and are scored one B_local x B_local
block at a time, so no all-gather is needed; autograd keeps each block for the backward. Gradient
convention as for InfoNCE: the gradient reaching rank r's features is W * dL/d(its slice), and the mean
over ranks of the temperature/bias gradient is dL/ds, dL/db; DDP's averaging makes both exact.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..distributed.gather import neighbour_exchange_with_grad, world_info


def _pair_logits(image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
    logits = logit_scale * image_features @ text_features.T
    return logits if logit_bias is None else logits + logit_bias


def _negatives_sum(logits: torch.Tensor) -> torch.Tensor:
    # -logsigmoid(-x) == softplus(x): every pair in the block is a negative.
    return F.softplus(logits).sum()


def _block_sum(image_features, text_features, logit_scale, logit_bias, positives_on_diagonal: bool):
    """-sum logsigmoid(label * logits) over one block of pairs."""
    logits = _pair_logits(image_features, text_features, logit_scale, logit_bias)
    total = _negatives_sum(logits)
    if positives_on_diagonal:
        # -logsigmoid(x) = softplus(x) - x: turn the diagonal's negative terms into positive ones
        # without building a B x B label matrix.
        total = total - logits.diagonal().sum()
    return total


def sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The SigLIP loss of one batch on one process (positives on the diagonal), normalised by the batch."""
    total = _block_sum(image_features, text_features, logit_scale, logit_bias, positives_on_diagonal=True)
    return total / image_features.shape[0]


def _other_ranks_texts(text_features: torch.Tensor, rank: int, world: int,
                       group: dist.ProcessGroup | None) -> Iterator[torch.Tensor]:
    """Yield every other rank's text features once, passed along the ring in both directions at once."""
    left, right = (rank - 1) % world, (rank + 1) % world
    to_left = to_right = text_features
    for _ in range((world - 1) // 2):
        from_right, from_left = neighbour_exchange_with_grad([left, right], [right, left], [to_left, to_right], group)
        yield from_right
        yield from_left
        to_left, to_right = from_right, from_left
    if (world - 1) % 2:  # an even world leaves the rank opposite us: one more step to the right
        (from_left,) = neighbour_exchange_with_grad([right], [left], [to_right], group)
        yield from_left


class SigLipLoss(nn.Module):
    """SigLIP loss; with several ranks, this rank's share of the global loss (see the module docstring).

    `logit_bias` may be None (no bias), so that every clipkit loss takes the same arguments."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.group = group

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        if image_features.shape != text_features.shape:
            raise ValueError(f"image features {tuple(image_features.shape)} and text features "
                             f"{tuple(text_features.shape)} must have the same shape (one caption per image)")
        rank, world = world_info(self.group)
        total = _block_sum(image_features, text_features, logit_scale, logit_bias, positives_on_diagonal=True)
        if world > 1:
            for texts in _other_ranks_texts(text_features, rank, world, self.group):
                total = total + _block_sum(image_features, texts, logit_scale, logit_bias,
                                           positives_on_diagonal=False)
        return total / image_features.shape[0]
