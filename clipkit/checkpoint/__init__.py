"""Checkpoint files: atomic, checksummed, signed directories that are read without unpickling.

The training loop's CheckpointManager (clipkit.training.checkpoint) decides what goes in and when;
this package only knows how a checkpoint directory is sealed and verified."""
from .files import (
    MANIFEST,
    CheckpointError,
    commit,
    disk_full_error,
    is_disk_full,
    list_steps,
    read_manifest,
    remove_stale_temporaries,
    signing_key,
    step_dir,
    verify,
    write_json,
)

__all__ = ["MANIFEST", "CheckpointError", "commit", "disk_full_error", "is_disk_full", "list_steps",
           "read_manifest", "remove_stale_temporaries", "signing_key", "step_dir", "verify", "write_json"]
