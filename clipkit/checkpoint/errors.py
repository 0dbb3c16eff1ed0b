"""The one error type of checkpoint files."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, found, trusted or used; the message names it."""
