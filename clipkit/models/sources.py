"""Where a model's weights and architecture come from, detected from the files themselves (no flag).

    clipkit           a checkpoint directory, a run directory (its newest checkpoint) or a .safetensors file
                      written by clipkit (architecture in its header)
    open_clip         a directory with open_clip_config.json and open_clip_model.safetensors or
                      open_clip_pytorch_model.bin (the hub layout, and clipkit's open_clip export)
    transformers      a CLIPModel (hf_clip.py) or SiglipModel (hf_siglip.py) directory: config.json, weights,
                      tokenizer and image-processor files
    open_clip-trainer an OpenCLIP trainer checkpoint (epoch_N.pt: state_dict, optimizer, epoch); the
                      architecture is named by --model / model.name
    state-dict        a bare open_clip state dict (.safetensors, .bin, .pt, .pth); architecture as above
    openai-torchscript OpenAI's original CLIP archives (ViT-B-32.pt, RN50.pt): their tensors read without
                      running their code (torchscript.py); the architecture from the tensor shapes

Pickled files are read only with torch.load(weights_only=True), which unpickles tensors and plain
containers and refuses anything else (a `__reduce__` payload never runs): such a file is refused with
CheckpointError in one line.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from ..checkpoint import CheckpointError

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_pickled(path: Path):
    """torch.load with weights_only: tensors and plain containers only, no code from the file ever runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, OSError) as e:
        if "TorchScript" in str(e):  # read as a whole model only (torchscript.py), never as a weights file
            raise CheckpointError(f"{path} is a TorchScript archive, not a weights file: clipkit reads OpenAI's "
                                  "CLIP archives as a whole model (--checkpoint, model.pretrained), without "
                                  "running their code, and no other TorchScript") from None
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused, not a weights-only file (torch.load(weights_only=True) would "
                              f"have to run code or cannot read it: {reason}); clipkit runs no code from "
                              "files: save a plain state dict, or safetensors") from None


def read_safetensors(path: Path) -> tuple[dict, dict]:
    """(tensors, header metadata) of a .safetensors file; CheckpointError naming it when unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors weights file: {e}") from None


def read_tensors(path: Path) -> dict:
    """A state dict from a .safetensors or a weights_only pickle; anything but a dict of tensors is refused."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    state = read_pickled(path)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def trainer_state(path: Path, obj) -> tuple[dict, dict] | None:
    """(state_dict, the rest) when obj is an OpenCLIP trainer checkpoint ({"epoch", "state_dict", ...})."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and "epoch" in obj:
        return obj["state_dict"], {k: v for k, v in obj.items() if k != "state_dict"}
    return None


def open_clip_state(model: torch.nn.Module, state: dict) -> dict:
    """What open_clip's load_checkpoint does to a state dict before loading it, less the position-embedding
    resizing (a size that does not fit is refused, not interpolated): module. prefixes off (DDP), the
    older text-tower layout, a missing logit bias for a sigmoid-loss model, transformers' position ids."""
    from open_clip.factory import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    if state and next(iter(state)).startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    state = convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    state.pop("text.transformer.embeddings.position_ids", None)
    return state


def open_clip_directory(path: Path) -> tuple[Path, dict, dict]:
    """(weights file, model_cfg, preprocess_cfg) of an open_clip hub-layout directory."""
    try:
        config = json.loads((path / OPEN_CLIP_CONFIG).read_text())
        model_cfg = config["model_cfg"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / OPEN_CLIP_CONFIG} is not an open_clip config (JSON with model_cfg): "
                              f"{e}") from None
    for name in OPEN_CLIP_WEIGHTS:
        if (path / name).is_file():
            return path / name, model_cfg, dict(config.get("preprocess_cfg") or {})
    raise CheckpointError(f"{path} has {OPEN_CLIP_CONFIG} but no weights ({' or '.join(OPEN_CLIP_WEIGHTS)})")
