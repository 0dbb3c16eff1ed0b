"""Conversion between torch-engine (one process / DDP) and FSDP2 checkpoints, both ways, in one process.

    clipkit convert-checkpoint --checkpoint RUN/checkpoints/step_00000600 --to fsdp2 \
        --out NEW_RUN/checkpoints/step_00000600
    from clipkit.training.convert import convert_checkpoint

The weights, the AdamW moments and step counts, the LR schedule, the fp16 loss scale and every rank's data-stream,
RNG and counter state carry over unchanged, so `train.resume=` on the converted checkpoint continues the run on
the other engine (on any number of ranks: DCP re-shards, the data stream is repartitioned). trainer.json records
the new engine and fsdp.enabled; nothing else of the run's config changes.

torch -> fsdp2: the whole weights and optimizer state are written by torch.distributed.checkpoint as one rank's
shards (DCP places every tensor by its global offsets, so any number of ranks loads them); model.safetensors is
kept when the source has it (exports read it). fsdp2 -> torch: DCP reads the shards of every rank into whole
tensors. The source must verify; an FSDP2 source must also be signed by this installation (DCP's metadata is
unpickled). The result is sealed and signed as a checkpoint the trainer wrote, and becomes the `latest` of the
directory it is written in.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, commit, stage_verified, write_json
from ..config import config_from_dict
from ..models import WEIGHTS_FILE, register_model_config, save_weights
from .checkpoint import RANKS_FILE, TRAINER_FILE
from .engine import OPTIMIZER_FILE, TorchEngine
from .fsdp import SCHEDULE_FILE, STATE_DIR, FSDP2Engine, load_plain
from .optim import build_optimizer, build_scheduler
from .trainer import build_model

ENGINE_NAMES = {"torch": TorchEngine.name, "fsdp2": FSDP2Engine.name}
SCALARS = ("logit_scale", "logit_bias")  # 0-d in open_clip, 1-element vectors under FSDP2 (model_kwargs)
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # per-parameter optimizer tensors (param-shaped)


def convert_checkpoint(source: str | Path, out: str | Path, to: str) -> Path:
    """Write checkpoint `source` (torch or fsdp2 engine) as a checkpoint of engine `to` ("fsdp2" or "torch") in
    the new directory `out`; returns it."""
    source, out = Path(source), Path(out)
    if to not in ENGINE_NAMES:
        raise CheckpointError(f"--to {to}: the engines a checkpoint converts to are {', '.join(ENGINE_NAMES)}")
    if out.exists():
        raise CheckpointError(f"{out} exists: the converted checkpoint goes in a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix=".verified-", suffix=".tmp", dir=out.parent))
    tmp = out.with_name(out.name + ".tmp")
    try:
        manifest = _stage(source, private)
        info = json.loads((private / TRAINER_FILE).read_text())
        wanted = {"fsdp2": TorchEngine.name, "torch": FSDP2Engine.name}[to]
        if info["engine"] != wanted:
            raise CheckpointError(f"{source} was written by the {info['engine']} engine: --to {to} converts "
                                  f"{wanted} checkpoints")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        model, optimizer = _training_state(info)
        (_to_fsdp2 if to == "fsdp2" else _to_torch)(private, tmp, info, model, optimizer)
        config = info["config"]
        config["fsdp"] = {**config.get("fsdp", {}), "enabled": to == "fsdp2"}
        write_json(tmp / TRAINER_FILE, {**info, "engine": ENGINE_NAMES[to], "config": config})
        shutil.copyfile(private / RANKS_FILE, tmp / RANKS_FILE)
        return commit(tmp, {"step": manifest.get("step", info["step"]), "engine": ENGINE_NAMES[to]})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _stage(source: Path, private: Path) -> dict:
    """The verified private copy of `source`; signed when its engine's files are unpickled on load."""
    from ..checkpoint import read_manifest

    engine = read_manifest(source).get("engine")
    return stage_verified(source, private, signed=engine == FSDP2Engine.name)


def _training_state(info: dict):
    """The model (FSDP2's shapes: the temperature as a 1-element vector) and the AdamW the run trained with, built from the checkpoint's own config and architecture (locked towers leave the optimizer, as in
    training); the weights are the architecture's fresh ones until loaded."""
    cfg = config_from_dict(info["config"])
    name = register_model_config(info["model_name"], info["model_cfg"])
    model_cfg = dataclasses.replace(cfg.model, name=name, pretrained=None, pretrained_image=None, pretrained_text=None)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    model = build_model(cfg, torch.device("cpu"), None, **FSDP2Engine.model_kwargs(cfg))
    t = cfg.train
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps, "for_loop")
    build_scheduler(optimizer, t.warmup_steps, t.steps)  # sets each group's initial_lr, as in training
    return model, optimizer


def _fit(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` in the shape of `like` when they hold as many values (the temperature: 0-d or 1-element)."""
    return tensor.reshape(like.shape) if tensor.shape != like.shape and tensor.numel() == like.numel() else tensor


@contextlib.contextmanager
def _one_process():
    """DCP in this one process, by intent (no_dist=True): its notice that no process group exists is not news."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _plain(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor in the torch engine's shape: the temperature and bias are 0-d there (FSDP2 shards vectors only)."""
    return tensor.reshape(()) if name in SCALARS and tensor.numel() == 1 else tensor


def _to_fsdp2(private: Path, tmp: Path, info: dict, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights = load_file(str(private / WEIGHTS_FILE))
    model.load_state_dict({k: _fit(v, model.state_dict()[k]) for k, v in weights.items()})
    saved = load_plain(private / OPTIMIZER_FILE)  # tensors and plain values only
    optimizer.load_state_dict(saved["optimizer"])
    for param, state in optimizer.state.items():
        for key in MOMENTS:
            if key in state:
                state[key] = _fit(state[key], param)
    model_state, optim_state = get_state_dict(model, optimizer)
    with _one_process():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / STATE_DIR), no_dist=True)
    torch.save({k: v for k, v in saved.items() if k != "optimizer"}, tmp / SCHEDULE_FILE)
    shutil.copyfile(private / WEIGHTS_FILE, tmp / WEIGHTS_FILE)  # exports read it


def _to_torch(private: Path, tmp: Path, info: dict, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)  # gives the optimizer its (empty) moments
    state = {"model": model_state, "optim": optim_state}
    with _one_process():
        dcp.load(state, checkpoint_id=str(private / STATE_DIR), no_dist=True)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    weights = {k: _plain(k, v.detach()).contiguous() for k, v in model.state_dict().items()}
    save_weights(weights, tmp / WEIGHTS_FILE, info["model_name"], info["model_cfg"], info.get("preprocess_cfg"))
    names = {param: name for name, param in model.named_parameters()}
    optim = optimizer.state_dict()
    for index, param in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        for key in MOMENTS:
            if key in optim["state"].get(index, {}):
                optim["state"][index][key] = _plain(names[param], optim["state"][index][key])
    saved = load_plain(private / SCHEDULE_FILE)
    torch.save({"optimizer": optim, **saved}, tmp / OPTIMIZER_FILE)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a torch-engine or fsdp2 checkpoint directory")
    p.add_argument("--to", required=True, choices=sorted(ENGINE_NAMES), metavar="ENGINE", help="the engine of the converted checkpoint: fsdp2 or torch")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the new checkpoint directory (e.g. NEW_RUN/checkpoints/step_00000600: it becomes that run's "
                        "latest, so `train.resume=latest` with run.dir=NEW_RUN continues from it)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="clipkit convert-checkpoint", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    print(convert_checkpoint(args.checkpoint, args.out, args.to))
    return 0
