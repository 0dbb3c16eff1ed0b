"""Training: the loop, engines, exact accumulation, the checkpoint manager, optimizer and metrics.

Evaluation and export are not here: clipkit.run composes them with training."""
from ..checkpoint import CheckpointError
from .checkpoint import CheckpointManager
from .trainer import Trainer

__all__ = ["CheckpointError", "CheckpointManager", "Trainer"]
