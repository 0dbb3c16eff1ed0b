"""Weights files: a model's state dict as safetensors, with the architecture to rebuild it in the header.

    save_weights(model.state_dict(), "model.safetensors", "clipkit-tiny", model_cfg)
    loaded = load_model("runs/default/checkpoints/step_00000600")   # or the .safetensors file, an open_clip
    loaded.model, loaded.name, loaded.model_cfg                     # export directory, or a run directory
                                                                    # (its newest checkpoint)

safetensors holds tensors and a JSON header only: loading a file never runs code from it, and the model
name in the header is data, never a path: a name that is not plain (see factory.plain_model_name) is
refused with CheckpointError naming it. Weights that
hold a NaN or an infinity (a diverged run) are refused with CheckpointError naming the first such tensor:
zero-shot, retrieval, embeddings and exports of them would be meaningless numbers.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..checkpoint import CheckpointError, read_latest, read_manifest, verify
from .factory import ModelNameError, create_model, plain_model_name, register_model_config

WEIGHTS_FILE = "model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    name: str  # the name it is buildable under here (tokenizer and transforms follow it)
    model_name: str  # the name it was trained under, plain (a JSON config's path gives its stem)
    model_cfg: dict
    source: Path  # the path as given
    weights: Path | None = None  # the file the tensors were read from (a run directory resolved to its step)

    @property
    def checkpoint(self) -> Path:
        """What loads these same weights again: a run directory resolved to its step directory (so a run that
        trains on is not followed), an open_clip directory, or the weights file given."""
        if self.weights is None:
            return self.source
        return self.weights.parent if self.source.is_dir() else self.weights


def save_weights(state_dict: dict, path: str | Path, model_name: str, model_cfg: dict) -> Path:
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(state, str(path), metadata={"format": "pt", "model_name": model_name,
                                          "model_cfg": json.dumps(model_cfg)})
    return path


def _read(path: Path) -> tuple[dict, dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors weights file: {e}") from None


def _weights_and_architecture(path: Path) -> tuple[Path, str, dict]:
    latest = read_latest(path / "checkpoints") if path.is_dir() else None
    if latest is not None:  # a run directory: its newest checkpoint
        path = latest
    if path.is_dir() and (path / OPEN_CLIP_CONFIG).is_file():  # an open_clip model directory
        cfg = json.loads((path / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
        return path / OPEN_CLIP_WEIGHTS, _directory_model_name(path), cfg
    if path.is_dir():  # a clipkit checkpoint: only its weights file is read, once its checksum matches
        manifest = read_manifest(path)
        if WEIGHTS_FILE not in manifest["files"]:
            raise CheckpointError(f"{path} holds {manifest.get('engine')} training state without full weights "
                                  f"(a ZeRO checkpoint is consolidated at the end of the run): use the run's "
                                  "final checkpoint")
        verify(path, only=[WEIGHTS_FILE])
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a checkpoint directory, a .safetensors weights file or an "
                              "open_clip model directory (clipkit reads no pickled files)")
    _, meta = _read(path)
    if "model_cfg" not in meta or "model_name" not in meta:
        raise CheckpointError(f"{path} does not say which architecture it holds (no model_name/model_cfg in "
                              "its header): it was not written by clipkit")
    try:
        name = plain_model_name(meta["model_name"])
    except ModelNameError as e:
        raise CheckpointError(f"{path}: its header's {e}") from None
    return path, name, json.loads(meta["model_cfg"])


def _directory_model_name(path: Path) -> str:
    """An open_clip model directory is named by its folder (a name the user chose), mapped to a plain name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.resolve().name).lstrip("._-")[:128]
    return name or "open_clip-model"


def first_nonfinite(state: dict) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    for key, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the architecture a weights file names and load its weights (refused when not finite)."""
    weights, name, model_cfg = _weights_and_architecture(Path(path))
    state, _ = _read(weights)
    bad = first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(f"{weights}: tensor '{bad}' holds non-finite values (NaN or inf): these weights "
                              "come from a diverged run and are not usable; use an earlier checkpoint")
    registered = register_model_config(name, model_cfg)
    model = create_model(registered, device="cpu")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    # A temperature kept as a 1-element vector (DeepSpeed) loads into open_clip's 0-d parameter.
    state = {k: v.reshape(shapes[k]) if k in shapes and v.numel() == shapes[k].numel() else v
             for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {weights} do not fit architecture {name}: {e}") from None
    return LoadedModel(model.to(device), registered, name, model_cfg, Path(path), weights)
