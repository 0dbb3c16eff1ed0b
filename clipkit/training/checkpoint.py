"""Checkpoints: everything needed to rebuild the model and continue the run exactly where it stopped."""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"step_(\d+)\.pt")  # full name only: not step_N.fp32.pt (weights only)


class CheckpointError(ValueError):
    pass


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_RE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, directory: str | Path, step: int, keep: int = 0) -> Path:
    """Write atomically (temp file + rename) so a preempted save never leaves a truncated 'latest'."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    if keep > 0:
        for old in list_checkpoints(directory)[:-keep]:
            old.unlink()
    return path


REQUIRED_KEYS = ("model", "step", "model_name", "model_cfg")


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # RNG states hold numpy arrays and tuples: weights_only loading would refuse them.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be read (truncated or not a torch file?): {e}") from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"{path} is not a clipkit checkpoint (missing {', '.join(missing)})")
    return state


def load_model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """(model, model_name, state): the architecture is rebuilt from the config stored in the checkpoint."""
    from ..models import create_model, register_model_config

    state = load_checkpoint(path)
    name = register_model_config(state["model_name"], state["model_cfg"])
    model = create_model(name, device=device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"weights in {path} do not fit architecture {state['model_name']}: {e}") from e
    return model, name, state
