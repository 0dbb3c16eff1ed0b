"""Export trained models to the formats the field's tools read.

EXPORT_FORMATS is the one table of formats: config validation, the run layer and the CLI read it.
Each entry is a function (model, model_name, model_cfg, out, tokenizer_files=None) -> {kind: written file};
tokenizer_files is a recorded transformers tokenizer (models/tokenizer_files.py), which each format writes.

    open_clip  open_clip's local-dir: model directory (any architecture)
    hf         a transformers CLIPModel + CLIPProcessor directory (ViT image tower, standard text tower)
    onnx       ONNX Runtime image and text encoders, fp32 and int8, with a JSON of inputs and preprocessing
"""
from ..config import ConfigError, ExportConfig
from .hf_format import export_hf
from .onnx_format import export_onnx
from .open_clip_format import export_checkpoint, export_open_clip, tokenizer_kwargs

EXPORT_FORMATS = {"open_clip": export_open_clip, "hf": export_hf, "onnx": export_onnx}


def validate_export(export: ExportConfig) -> None:
    """The run config's export.format names one of EXPORT_FORMATS; else ConfigError naming the key."""
    if export.format not in EXPORT_FORMATS:
        raise ConfigError(f"config key 'export.format' must be one of {', '.join(EXPORT_FORMATS)} "
                          f"(got {export.format!r})")


__all__ = ["EXPORT_FORMATS", "export_checkpoint", "export_hf", "export_onnx", "export_open_clip", "tokenizer_kwargs",
           "validate_export"]
