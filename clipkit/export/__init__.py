"""Export trained models to the formats the field's tools read."""
from .open_clip_format import export_checkpoint, export_open_clip

__all__ = ["export_checkpoint", "export_open_clip"]
