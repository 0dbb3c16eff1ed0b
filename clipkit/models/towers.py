"""Pretrained weights for one tower (LiT and partial init): model.pretrained_image and model.pretrained_text.

    model.pretrained_image=PATH   a timm model's state dict (.safetensors, or .bin/.pth read with
                                  torch.load(weights_only=True)) for a config whose image tower is a timm model
                                  (open_clip's TimmModel): timm's own names map onto `visual.trunk.*`; the
                                  classifier head is left out (CLIP's projection replaces it)
    model.pretrained_text=DIR     a transformers text model directory (BertModel, RobertaModel, XLM-R ... saved
                                  with save_pretrained: config.json, weights, tokenizer files) for a config with
                                  a Hugging Face text tower (open_clip's HFTextEncoder): its weights map onto
                                  `text.transformer.*`, the tower's architecture is the directory's config.json
                                  and the run tokenises with the directory's tokenizer

The text tower's config.json is recorded in the model's config as data (text_cfg.hf_model_config, see
factory._open_clip_config) and its tokenizer in the weights files (tokenizer_files.py), so checkpoints load
without the directory and no name read from them is used as a path. Weights that do not fit the tower are
refused with one line naming the first tensor; a tower file for a config whose tower is of another kind is
refused in one line before anything is built.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from .factory import HF_TEXT_CONFIG


# a transformers text model's tokenizer is one of these (fast JSON, WordPiece, BPE, SentencePiece)
TEXT_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")


class TowerError(CheckpointError):
    """A tower weights file or directory that does not fit the configured tower; the message names why."""


# ------------------------------------------------------------------------------------------- image tower

def with_tower_files(model_cfg: dict, image: str | None, text: str | None) -> dict:
    """model_cfg with model.pretrained_text's text tower in place; TowerError when model.pretrained_image or
    pretrained_text does not fit the kind of tower the config has (checked before anything is built)."""
    if image is not None:
        check_image_tower(model_cfg, image)
    if text is not None:
        model_cfg = text_tower_config(model_cfg, text)
    return model_cfg


def check_image_tower(model_cfg: dict, path: str | Path) -> None:
    vision = model_cfg.get("vision_cfg", {})
    if not vision.get("timm_model_name"):
        kind = "a ResNet" if isinstance(vision.get("layers"), (list, tuple)) else "open_clip's own ViT"
        raise TowerError(f"model.pretrained_image={path}: the configured image tower is {kind}, not a timm model "
                         "(vision_cfg.timm_model_name): timm weights have no place in it")


def _classifier_prefixes(trunk: torch.nn.Module) -> tuple[str, ...]:
    """The names of timm's classifier head (pretrained_cfg['classifier']: one name or several)."""
    names = (getattr(trunk, "pretrained_cfg", None) or {}).get("classifier") or "head"
    return tuple(f"{n}." for n in ([names] if isinstance(names, str) else names))


def load_image_tower(model: torch.nn.Module, path: str | Path) -> None:
    """timm's state dict into model.visual.trunk, its classifier head excluded."""
    from .sources import read_tensors

    path = Path(path)
    if not path.is_file():
        raise TowerError(f"model.pretrained_image={path}: expected a timm weights file (.safetensors, .bin, .pth)")
    trunk = model.visual.trunk
    head = _classifier_prefixes(trunk)
    state = {k: v for k, v in read_tensors(path).items() if not k.startswith(head)}
    expected = {k: v for k, v in trunk.state_dict().items() if not k.startswith(head)}
    _check_fit(expected, state, path, f"timm model {model.visual.trunk.default_cfg.get('architecture', '')}".strip())
    trunk.load_state_dict(state, strict=False)


def _check_fit(expected: dict, state: dict, path: Path, what: str) -> None:
    """The first tensor left over, of another shape or missing, named in one line."""
    for key, value in state.items():
        if key not in expected:
            raise TowerError(f"{path} does not fit the {what}: tensor '{key}' has no place in it")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise TowerError(f"{path} does not fit the {what}: tensor '{key}' has shape {tuple(value.shape)}, the "
                             f"tower needs {tuple(expected[key].shape)}")
    missing = [k for k in expected if k not in state]
    if missing:
        raise TowerError(f"{path} does not fit the {what}: tensor '{missing[0]}' is missing ({len(missing)} missing)")


# -------------------------------------------------------------------------------------------- text tower

def _read_hf_config(path: Path) -> dict:
    from open_clip.hf_model import arch_dict

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise TowerError(f"model.pretrained_text={path}: expected a transformers model directory with a readable "
                         f"config.json ({e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    encoders = [t for t in arch_dict if t not in ("mt5", "m2m_100")]  # those two are encoder-decoders
    if model_type not in encoders or config.get("is_encoder_decoder"):
        raise TowerError(f"model.pretrained_text={path}: model_type {model_type!r} is not a text encoder open_clip's "
                         f"HFTextEncoder reads whole (supported: {', '.join(encoders)})")
    if config.get("auto_map"):  # a class defined by code in the directory: nothing from it is run
        raise TowerError(f"model.pretrained_text={path}: its config.json names custom code (auto_map); clipkit "
                         "builds only the model classes that ship with transformers")
    return config


def text_tower_config(model_cfg: dict, path: str | Path) -> dict:
    """model_cfg with its Hugging Face text tower built as the directory's model (its config.json as data)."""
    path = Path(path)
    text = model_cfg.get("text_cfg", {})
    if not text.get("hf_model_name"):
        raise TowerError(f"model.pretrained_text={path}: the configured text tower is open_clip's own transformer, "
                         "not a Hugging Face one (text_cfg.hf_model_name): a transformers model has no place in it")
    config = _read_hf_config(path)
    if not any((path / name).is_file() for name in TEXT_TOKENIZER_FILES):
        raise TowerError(f"model.pretrained_text={path}: it has no tokenizer ({', '.join(TEXT_TOKENIZER_FILES)}): "
                         "save the model's tokenizer into the directory (tokenizer.save_pretrained(DIR))")
    ctx = int(text.get("context_length", 77))
    # RoBERTa-style embeddings number positions from padding_idx + 1
    pad = config.get("pad_token_id")
    offset = (1 if pad is None else int(pad)) + 1 if config["model_type"] in ("roberta", "xlm-roberta") else 0
    positions = int(config.get("max_position_embeddings", 0)) - offset
    if ctx > positions:
        raise TowerError(f"model.pretrained_text={path}: the config's context_length {ctx} is longer than the "
                         f"{positions} positions the model embeds")
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", path.resolve().name).lstrip("._-")[:128] or "text-model"
    return {**model_cfg, "text_cfg": {**text, "hf_model_name": label, "hf_tokenizer_name": label,
                                      "context_length": ctx, HF_TEXT_CONFIG: config}}


def _hf_weights(path: Path) -> dict:
    from .hf_clip import HF_WEIGHTS
    from .sources import read_tensors

    for name in HF_WEIGHTS:
        if (path / name).is_file():
            return read_tensors(path / name)
    raise TowerError(f"model.pretrained_text={path}: no weights (model.safetensors or pytorch_model.bin); a "
                     "sharded model must be saved unsharded first")


def load_text_tower(model: torch.nn.Module, path: str | Path) -> None:
    """The directory's weights into model.text.transformer: a task model's head (an MLM head...) and, when
    the tower pools without it, BERT's pooler are left out; every other tensor must fit."""
    path = Path(path)
    transformer = model.text.transformer
    state = _hf_weights(path)
    prefix = f"{transformer.base_model_prefix}."
    if any(k.startswith(prefix) for k in state):  # saved from a task model (BertForMaskedLM...): its body
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    index_buffers = ("position_ids", "token_type_ids")  # index buffers some versions save: not weights
    expected = {k: v for k, v in transformer.state_dict().items() if k in state or not k.endswith(index_buffers)}
    state = {k: v for k, v in state.items()
             if k in expected or not (k.startswith("pooler.") or k.endswith(index_buffers))}
    _check_fit(expected, state, path, f"{transformer.config.model_type} text tower")
    transformer.load_state_dict(state, strict=False)

