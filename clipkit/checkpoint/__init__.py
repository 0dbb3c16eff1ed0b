"""Checkpoint files: atomic, checksummed, signed directories that are read without unpickling.

The training loop's CheckpointManager (clipkit.training.checkpoint) decides what goes in and when;
this package only knows how a checkpoint directory is sealed, verified, recovered after a crash and
copied privately for a loader that must read only what was verified."""
from .errors import CheckpointError
from .files import (
    MANIFEST,
    commit,
    disk_full_error,
    is_disk_full,
    list_steps,
    read_latest,
    read_manifest,
    recover_interrupted,
    remove_checkpoint,
    step_dir,
    verify,
    write_json,
)
from .key import signing_key
from .private import stage_verified

__all__ = ["MANIFEST", "CheckpointError", "commit", "disk_full_error", "is_disk_full", "list_steps", "read_latest",
           "read_manifest", "recover_interrupted", "remove_checkpoint", "signing_key", "stage_verified", "step_dir",
           "verify", "write_json"]
