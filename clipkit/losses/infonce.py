"""Symmetric InfoNCE (the CLIP loss) with a learnable temperature, on one process or across ranks.

Distributed semantics are OpenCLIP's (`ClipLoss(gather_with_grad=True)`): every rank gathers the image and
text features of all ranks with gradient (`all_gather_with_grad`, whose backward sums each slice's
gradient over ranks), then either

- full mode (`local_loss=False`): every rank computes the same B_global x B_global loss, or
- local mode (`local_loss=True`): rank r computes only its B_local rows against all B_global columns
  (image->text and text->image), positives at columns r*B_local + i. The mean of the ranks' losses is
  the global loss; each rank holds B_local x B_global logits instead of B_global x B_global.

Gradient convention (what the data-parallel wrapper expects). Let L be the single-process loss on the
concatenated batch and W the number of ranks. In both modes

- mean over ranks of the per-rank loss == L (in full mode every rank's loss already equals L);
- the gradient that reaches rank r's local features == W * dL/d(rank r's slice): the gather's backward
  sums the contributions of all W ranks' losses, and each rank's loss carries weight 1 rather than 1/W;
- mean over ranks of the temperature (and bias) gradient == dL/dscale.

DDP and DeepSpeed average parameter gradients over ranks, so the W cancels and every parameter receives
exactly dL/dparam, as in one process with the whole batch. Every rank must pass the same batch size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..distributed.gather import all_gather_with_grad, world_info


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image->text and text->image logits for L2-normalised features; logit_scale is exp(t)."""
    logits_per_image = logit_scale * image_features @ text_features.T
    return logits_per_image, logits_per_image.T


@dataclass(frozen=True)
class ContrastiveBlock:
    """What one rank scores: its rows (local, or all in full mode) against the gathered columns.

    Row i's positive is column `offset + i`, in both directions."""
    image_rows: torch.Tensor
    text_rows: torch.Tensor
    image_cols: torch.Tensor
    text_cols: torch.Tensor
    offset: int

    @property
    def is_square(self) -> bool:
        """Rows are all columns (one process, or full mode): text->image logits are the transpose."""
        return self.image_rows is self.image_cols


def contrastive_block(image_features: torch.Tensor, text_features: torch.Tensor, local_loss: bool,
                      group: dist.ProcessGroup | None = None) -> ContrastiveBlock:
    """Gather both modalities from every rank (with gradient) and pick this rank's rows."""
    if image_features.shape != text_features.shape:
        raise ValueError(f"image features {tuple(image_features.shape)} and text features "
                         f"{tuple(text_features.shape)} must have the same shape (one caption per image)")
    rank, world = world_info(group)
    if world == 1:
        return ContrastiveBlock(image_features, text_features, image_features, text_features, 0)
    all_images = all_gather_with_grad(image_features, group)
    all_texts = all_gather_with_grad(text_features, group)
    if local_loss:
        offset = rank * image_features.shape[0]
        return ContrastiveBlock(image_features, text_features, all_images, all_texts, offset)
    return ContrastiveBlock(all_images, all_texts, all_images, all_texts, 0)


def _with_bias(logits: torch.Tensor, logit_bias: torch.Tensor | None) -> torch.Tensor:
    return logits if logit_bias is None else logits + logit_bias


class InfoNCELoss(nn.Module):
    """Mean of the image->text and text->image cross-entropies, positives on the diagonal.

    The model owns the temperature (open_clip's `logit_scale` = log(1/0.07) at init, exponentiated
    in the forward); the trainer clamps it so that exp(logit_scale) <= 100, as CLIP does (or
    at most a pretrained model's own higher value). A `logit_bias`
    is added to every logit as OpenCLIP does; softmax is shift-invariant, so it changes neither the
    loss nor any gradient (its own gradient is 0) and exists so that every loss takes the same arguments.
    See the module docstring for the distributed modes and the gradient convention.
    """

    def __init__(self, local_loss: bool = False, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.group = group

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        block = contrastive_block(image_features, text_features, self.local_loss, self.group)
        logits_per_image = _with_bias(logit_scale * block.image_rows @ block.text_cols.T, logit_bias)
        if block.is_square:
            logits_per_text = logits_per_image.T
        else:
            logits_per_text = _with_bias(logit_scale * block.text_rows @ block.image_cols.T, logit_bias)
        labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device) + block.offset
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
