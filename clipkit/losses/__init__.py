"""Contrastive losses."""
from .infonce import InfoNCELoss, clip_logits

__all__ = ["InfoNCELoss", "clip_logits"]
