"""One factory for every architecture: open_clip's registry, extended with clipkit's JSON configs.

Architectures are data: `model_configs/*.json` in open_clip's schema (embed_dim, vision_cfg,
text_cfg). `model.name` may be any registered name (ViT-B-32, RN50, clipkit-tiny, ...) or the path of
a JSON file in that schema. Weights are never downloaded: models are built from their configs and
trained here, or loaded from a local file.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from .trim import set_text_trimming

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)


class ModelNotFoundError(ValueError):
    pass


def list_models() -> list[str]:
    return open_clip.list_models()


def _resolve_name(name: str) -> str:
    """A path to a JSON config registers that file and returns its stem as the model name."""
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise ModelNotFoundError(f"model config file not found: {name}")
        open_clip.add_model_config(path)
        return path.stem
    return name


def get_model_config(name: str) -> dict:
    name = _resolve_name(name)
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        near = [m for m in list_models() if name.lower().split("-")[0] in m.lower()][:8]
        hint = f" Similar: {', '.join(near)}." if near else ""
        raise ModelNotFoundError(
            f"unknown model '{name}'.{hint} Use any open_clip architecture name, a clipkit config "
            f"({', '.join(sorted(p.stem for p in MODEL_CONFIG_DIR.glob('*.json')))}) or a path to a JSON config."
        )
    return copy.deepcopy(cfg)


def create_model(name: str, device: str | torch.device = "cpu", precision: str = "fp32", *,
                 trim_text: bool = True, **kwargs) -> open_clip.CLIP:
    """Build an untrained model from its architecture config (no pretrained weights, no download).

    trim_text: run the text tower only up to the batch's longest caption wherever that gives the same
    features (see trim.py; exact, so on unless asked otherwise)."""
    get_model_config(name)  # clear error for unknown names before open_clip's own
    with _quiet_root_logger():
        model = open_clip.create_model(_resolve_name(name), pretrained=None, precision=precision, device=device,
                                       output_dict=True, **kwargs)
    set_text_trimming(model, trim_text)
    return model


@contextmanager
def _quiet_root_logger():
    # open_clip warns "No pretrained weights loaded" on every from-scratch build, which is the norm here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


@contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode for the block (no dropout, no patch dropout), then back in its own mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def register_model_config(name: str, model_cfg: dict) -> str:
    """Make an architecture stored elsewhere (a checkpoint, an export) buildable by name.

    A name already registered with a different config is registered under a suffixed name, so a
    checkpoint always rebuilds exactly the architecture it was trained with."""
    name = Path(name).stem if name.endswith(".json") else name
    existing = open_clip.get_model_config(name)
    if existing == model_cfg:
        return name
    if existing is not None:
        digest = hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:8]
        name = f"{name}-ckpt{digest}"  # the same name for the same architecture in every process
    path = Path(tempfile.mkdtemp(prefix="clipkit-cfg-")) / f"{name}.json"
    path.write_text(json.dumps(model_cfg))
    open_clip.add_model_config(path)
    return name


def create_transforms(model: torch.nn.Module) -> tuple[Callable, Callable]:
    """open_clip's (train, val) image transforms for this model's preprocessing config."""
    pp_cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    return image_transform_v2(pp_cfg, is_train=True), image_transform_v2(pp_cfg, is_train=False)


def get_tokenizer(name: str):
    """open_clip's tokenizer for this architecture, at its context length (BPE vocab ships in open_clip)."""
    return open_clip.get_tokenizer(_resolve_name(name))
