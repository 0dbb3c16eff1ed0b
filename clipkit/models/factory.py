"""One factory for every architecture: open_clip's registry, extended with clipkit's JSON configs.

Architectures are data: `model_configs/*.json` in open_clip's schema (embed_dim, vision_cfg,
text_cfg). `model.name` may be any registered name (ViT-B-32, RN50, clipkit-tiny, ...) or the path of
a JSON file in that schema. Weights are never downloaded: models are built from their configs and
trained here, or loaded from a local file (a Hugging Face text tower is built from its config, not with
its pretrained weights).

A model name read from a file (a weights file's header) is data, never a path: `plain_model_name` accepts
letters, digits, '.', '_' and '-' only (a JSON config's path gives its stem), and the configs that
checkpoints carry are registered under `<name>-ckpt<digest>` from a private directory of this process.
"""
from __future__ import annotations

import atexit
import copy
import hashlib
import json
import logging
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from ..config import ConfigError, ModelConfig
from ..errors import UserError
from .siglip_tower import register as register_siglip_tower
from .trim import set_text_trimming

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)


class ModelNotFoundError(ValueError):
    pass


class ModelNameError(UserError):
    """A model name that is not a plain name: it could name a path or an open_clip schema (local-dir:, hf-hub:)."""


# Letters, digits, '.', '_', '-', starting with a letter or digit (no hidden files, nothing read as an option).
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def plain_model_name(name: str) -> str:
    """The name as data: a JSON config's path gives its stem, anything else must already be plain.

    Raises ModelNameError naming it otherwise: such a name is refused, never mapped, so a crafted name cannot
    pass for another model's."""
    stem = Path(name).stem if name.endswith(".json") else name
    if not PLAIN_NAME.fullmatch(stem):
        shown = repr(name[:120]) + ("..." if len(name) > 120 else "")
        raise ModelNameError(f"model name {shown} is not a plain name (up to 128 letters, digits, '.', '_', '-', "
                             "or a path ending in .json): refused, clipkit never uses a name read from a file as "
                             "a path")
    return stem


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


def validate_model(model: ModelConfig) -> None:
    """The run config's model.name names an architecture this registry knows; else ConfigError naming the key."""
    try:
        get_model_config(model.name)
    except ModelNotFoundError as e:
        raise ConfigError(f"config key 'model.name': {e}") from None


def create_model(name: str, device: str | torch.device = "cpu", precision: str = "fp32", *,
                 trim_text: bool = True, **kwargs) -> open_clip.CLIP:
    """Build an untrained model from its architecture config (no pretrained weights, no download).

    trim_text: run the text tower only up to the batch's longest caption wherever that gives the same
    features (see trim.py; exact, so on unless asked otherwise)."""
    cfg = get_model_config(name)  # clear error for unknown names before open_clip's own
    # an imported SigLIP image tower is a timm model named by its shape (siglip_tower.py)
    register_siglip_tower(cfg.get("vision_cfg", {}).get("timm_model_name"))
    with _quiet_root_logger():
        # pretrained_text=False: open_clip would otherwise load a Hugging Face text tower's pretrained weights
        # (a hub download where HF_HUB_OFFLINE is unset) before ours replace them.
        model = open_clip.create_model(_resolve_name(name), pretrained=None, precision=precision, device=device,
                                       output_dict=True, pretrained_text=False, **kwargs)
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
    """Make an architecture stored elsewhere (a checkpoint, an export) buildable; returns the name to build by.

    `name` (often read from a file) is only data: a plain name whose registered config is this one is
    returned as it is; otherwise the config registers as `<name>-ckpt<digest of the config>`, the same name
    for the same architecture in every process. The name keeps its plain part because open_clip picks some
    tokenizers by name (SigLIP). The JSON file open_clip reads is named by that alone, in a directory of this
    process that no one else can write to."""
    name = plain_model_name(name)
    if open_clip.get_model_config(name) == model_cfg:
        return name
    digest = hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:16]
    registered = f"{name}-ckpt{digest}"
    if open_clip.get_model_config(registered) != model_cfg:
        path = _private_config_dir() / f"{registered}.json"
        path.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(path)  # open_clip rescans its config paths, this one included, on each add
    return registered


_config_dir: Path | None = None


def _private_config_dir() -> Path:
    """One directory (mode 0700, removed at exit) for the configs this process registers."""
    global _config_dir
    if _config_dir is None:
        _config_dir = Path(tempfile.mkdtemp(prefix="clipkit-cfg-"))
        atexit.register(shutil.rmtree, _config_dir, ignore_errors=True)
    return _config_dir


def create_transforms(model: torch.nn.Module) -> tuple[Callable, Callable]:
    """open_clip's (train, val) image transforms for this model's preprocessing config."""
    pp_cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    return image_transform_v2(pp_cfg, is_train=True), image_transform_v2(pp_cfg, is_train=False)


def get_tokenizer(name: str):
    """open_clip's tokenizer for this architecture, at its context length (BPE vocab ships in open_clip)."""
    return open_clip.get_tokenizer(_resolve_name(name))
