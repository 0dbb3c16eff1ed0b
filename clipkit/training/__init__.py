"""Training: the loop, optimizer and schedule, checkpoints, metrics."""
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_model_from_checkpoint
from .trainer import Trainer, train

__all__ = ["CheckpointError", "Trainer", "latest_checkpoint", "load_checkpoint", "load_model_from_checkpoint",
           "train"]
