"""Contrastive losses. Each is called as loss(image_features, text_features, logit_scale, logit_bias=None)
and, under torch.distributed, returns this rank's share of the global loss (see infonce.py)."""
from .factory import LOSS_NAMES, create_loss, validate_loss
from .infonce import InfoNCELoss, clip_logits
from .siglip import SigLipLoss, sigmoid_loss
from .tiled import TiledInfoNCELoss, tiled_logsumexp

__all__ = ["LOSS_NAMES", "InfoNCELoss", "SigLipLoss", "TiledInfoNCELoss", "clip_logits", "create_loss",
           "sigmoid_loss", "tiled_logsumexp", "validate_loss"]
