"""Export to open_clip's on-disk format, which every open_clip-based tool loads.

    OUT/open_clip_model.safetensors   the state dict
    OUT/open_clip_config.json         {"model_cfg": ..., "preprocess_cfg": ...}  (local-dir: schema)
    OUT/<name>.json                   the bare architecture config (open_clip.add_model_config)

<name> is the model's plain name (factory.plain_model_name: letters, digits, '.', '_', '-'; a JSON config's
path gives its stem), so every file lands directly in OUT whatever name a weights file's header carries;
another name is refused before anything is written. open_clip registers a config file under its stem, so
the name to build by is <name>. Both ways of loading work with no hub access:
    open_clip.create_model_and_transforms("local-dir:OUT")
    open_clip.add_model_config("OUT/<name>.json")
    open_clip.create_model_and_transforms("<name>", pretrained="OUT/open_clip_model.safetensors")
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ..errors import UserError
from ..models import ModelNameError, load_model, plain_model_name
from ..models.factory import HF_TEXT_CONFIG
from ..models.tokenizer_files import write_tokenizer_files

WEIGHTS_NAME = "open_clip_model.safetensors"
CONFIG_NAME = "open_clip_config.json"


def export_open_clip(model, model_name: str, model_cfg: dict, out: str | Path,
                     tokenizer_files: dict | None = None) -> dict[str, Path]:
    """tokenizer_files: a transformers tokenizer the model was trained with (LoadedModel.tokenizer_files): written
    into OUT and named by text_cfg.hf_tokenizer_name, where open_clip's local-dir: loading reads it."""
    model_name = plain_model_name(model_name)  # the architecture file's name: data, never a path
    if f"{model_name}.json" == CONFIG_NAME:
        raise ModelNameError(f"model name {model_name!r} would overwrite the export's {CONFIG_NAME}: train or "
                             "export under another name")
    if HF_TEXT_CONFIG in model_cfg.get("text_cfg", {}):
        raise UserError(f"{model_name}: its text tower is a transformers model recorded by model.pretrained_text "
                        "(text_cfg.hf_model_config), which open_clip's config cannot name without a hub name: "
                        "the open_clip export of such a model is not supported yet")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = out / WEIGHTS_NAME
    save_file(state, str(weights), metadata={"format": "pt", "model_name": model_name})
    files = {}
    if tokenizer_files:
        files["tokenizer"] = write_tokenizer_files(tokenizer_files, out)[0]
        text_cfg = model_cfg.get("text_cfg", {})
        model_cfg = {**model_cfg, "text_cfg": {**text_cfg,
                                               "hf_tokenizer_name": text_cfg.get("hf_tokenizer_name") or model_name}}
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    (out / CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg},
                                              indent=2))
    arch = out / f"{model_name}.json"
    arch.write_text(json.dumps(model_cfg, indent=2))
    return {"weights": weights, "config": out / CONFIG_NAME, "architecture": arch, **files}


def export_checkpoint(checkpoint: str | Path, out: str | Path, fmt: str = "open_clip",
                      model_name: str | None = None) -> dict[str, Path]:
    """Export anything clipkit.models.load_model reads (model_name: the architecture of a bare state dict)."""
    from . import EXPORT_FORMATS

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (available: {', '.join(EXPORT_FORMATS)})")
    loaded = load_model(checkpoint, model_name=model_name)
    return EXPORT_FORMATS[fmt](loaded.model, loaded.model_name, loaded.model_cfg, out,
                               **tokenizer_kwargs(fmt, loaded.tokenizer_files))


def tokenizer_kwargs(fmt: str, tokenizer_files: dict | None) -> dict:
    """A recorded transformers tokenizer, for the exporters (each writes it)."""
    return {"tokenizer_files": tokenizer_files} if tokenizer_files else {}
