"""Build a contrastive loss by name, so that configs and the trainer pick one with a string."""
from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ..config import ConfigError, TrainConfig
from .infonce import InfoNCELoss
from .siglip import SigLipLoss
from .tiled import DEFAULT_TILE_SIZE, TiledInfoNCELoss

LOSS_NAMES = ("infonce", "infonce_tiled", "siglip")


def validate_loss(train: TrainConfig) -> None:
    """The run config's loss names one of LOSS_NAMES; else ConfigError naming train.loss."""
    if train.loss not in LOSS_NAMES:
        raise ConfigError(f"config key 'train.loss' must be one of {', '.join(LOSS_NAMES)} (got {train.loss!r})")


def create_loss(name: str, *, local_loss: bool = False, tile_size: int = DEFAULT_TILE_SIZE,
                group: dist.ProcessGroup | None = None) -> nn.Module:
    """A loss called as loss(image_features, text_features, logit_scale, logit_bias=None).

    local_loss applies to the InfoNCE losses (SigLIP always scores its own rows only); tile_size applies
    to "infonce_tiled". Distributed behaviour follows the default process group (or `group`) at call time."""
    if name == "infonce":
        return InfoNCELoss(local_loss=local_loss, group=group)
    if name == "infonce_tiled":
        return TiledInfoNCELoss(local_loss=local_loss, tile_size=tile_size, group=group)
    if name == "siglip":
        return SigLipLoss(group=group)
    raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSS_NAMES)}")
