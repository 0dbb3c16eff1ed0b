"""Symmetric InfoNCE (the CLIP loss) with a learnable temperature."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image->text and text->image logits for L2-normalised features; logit_scale is exp(t)."""
    logits_per_image = logit_scale * image_features @ text_features.T
    return logits_per_image, logits_per_image.T


class InfoNCELoss(nn.Module):
    """Mean of the image->text and text->image cross-entropies, positives on the diagonal.

    The model owns the temperature (open_clip's `logit_scale` = log(1/0.07) at init, exponentiated
    in the forward); the trainer clamps it so that exp(logit_scale) <= 100, as CLIP does.
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        logits_per_image, logits_per_text = clip_logits(image_features, text_features, logit_scale)
        labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
