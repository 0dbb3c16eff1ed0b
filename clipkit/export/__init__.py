"""Export trained models to the formats the field's tools read.

EXPORT_FORMATS is the one table of formats: config validation, the run layer and the CLI read it."""
from .open_clip_format import export_checkpoint, export_open_clip

EXPORT_FORMATS = {"open_clip": export_open_clip}

__all__ = ["EXPORT_FORMATS", "export_checkpoint", "export_open_clip"]
