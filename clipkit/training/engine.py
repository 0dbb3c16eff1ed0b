"""Engines: how a model is wrapped, stepped and checkpointed across processes.

`TorchEngine` covers one process and DDP; `DeepSpeedEngine` covers ZeRO stages 1-3. Both expose the
same small API, so the training step and loop never ask which one they have:

    engine.model            the module to call (DDP- or DeepSpeed-wrapped)
    engine.input_dtype      the dtype images must have (None: as loaded, fp32)
    engine.module           the plain open_clip model
    engine.backward(loss)   engine.step()   engine.no_sync()   engine.lr
    engine.save(dir, step, client_state)   engine.load(path_or_dir) -> client_state
    engine.full_state_dict()  fp32 weights of the whole model, on rank 0 (for export/eval)
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import Config
from ..distributed import DistEnv
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .optim import WarmupCosine, build_optimizer, build_scheduler, param_groups

log = logging.getLogger("clipkit.training")


class TorchEngine:
    def __init__(self, module: nn.Module, cfg: Config, env: DistEnv) -> None:
        t = cfg.train
        self.module, self.env, self.grad_clip = module, env, t.grad_clip
        self.model = module
        if env.distributed:
            device_ids = [env.local_rank] if env.device.type == "cuda" else None
            self.model = DistributedDataParallel(module, device_ids=device_ids)
        self.optimizer = build_optimizer(module, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
        self.scheduler = build_scheduler(self.optimizer, t.warmup_steps, t.steps)
        self.keep = t.keep_checkpoints
        self.input_dtype = None  # fp32 weights; bf16/fp16 run under autocast (see ContrastiveStep)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(env.device.type) if t.precision == "fp16" else None

    def no_sync(self):
        """Skip DDP's gradient all-reduce (for all but the last backward of an accumulated step)."""
        return self.model.no_sync() if isinstance(self.model, DistributedDataParallel) else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        if self.scaler is None:
            self.optimizer.step()
        else:  # skips the update when the scaled gradients overflowed, and adapts the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, directory: Path, step: int, client_state: dict) -> Path | None:
        if not self.env.is_main:
            return None
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), **client_state}
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return save_checkpoint(state, directory, step, keep=self.keep)

    def find_latest(self, directory: Path) -> Path | None:
        return latest_checkpoint(directory)

    def load(self, path: Path) -> dict:
        state = load_checkpoint(path)
        if "optimizer" not in state:
            raise CheckpointError(f"{path} holds weights only (an exported or consolidated file): it can "
                                  "start a new run's weights but not resume one")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        return state

    def full_state_dict(self) -> dict | None:
        return self.module.state_dict() if self.env.is_main else None


class DeepSpeedEngine:
    """DeepSpeed ZeRO with DeepSpeed's own optimizer; clipkit's schedule, clipping and precision."""

    TAG_PREFIX = "step_"

    def __init__(self, module: nn.Module, cfg: Config, env: DistEnv, micro_batch: int) -> None:
        import deepspeed

        self.module, self.env, self.cfg = module, env, cfg
        if not torch.distributed.is_initialized():
            # One process (plain `clipkit train`, or torchrun with one rank): DeepSpeed still needs a
            # process group, and a one-member group needs no rendezvous.
            on_gpu = env.device.type == "cuda"
            torch.distributed.init_process_group("nccl" if on_gpu else "gloo", store=torch.distributed.HashStore(),
                                                 rank=0, world_size=1, device_id=env.device if on_gpu else None)
        ds_config = deepspeed_config(cfg, env, micro_batch)
        if cfg.train.precision != "fp32" and env.device.type != "cuda":
            log.warning("train.precision=%s: DeepSpeed on CPU trains in fp32", cfg.train.precision)
        schedule = WarmupCosine(cfg.train.warmup_steps, cfg.train.steps)

        def lr_lambda(step: int) -> float:
            return schedule(step)

        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module,
            model_parameters=param_groups(module, cfg.train.weight_decay),
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
            dist_init_required=False,
        )
        self.accum = ds_config["gradient_accumulation_steps"]
        # DeepSpeed's bf16/fp16 modes cast the model itself (no autocast): inputs must follow.
        self.input_dtype = (torch.bfloat16 if ds_config["bf16"]["enabled"]
                            else torch.float16 if ds_config["fp16"]["enabled"] else None)

    def no_sync(self):
        # DeepSpeed reduces gradients at its own accumulation boundary (gradient_accumulation_steps).
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # Contrastive accumulation already produces the exact full-batch gradient: no 1/K scaling.
        self.model.backward(loss, scale_wrt_gas=False)
        # DeepSpeed wants step() after every backward; it updates only at the accumulation boundary
        # (clipping, optimizer, schedule, zeroing the gradients).
        self.model.step()

    def step(self) -> None:
        """Nothing left to do: the boundary step ran inside the last backward."""

    @property
    def lr(self) -> float:
        return self.model.get_lr()[0]

    @staticmethod
    def _ds_dir(directory: Path) -> Path:
        return Path(directory) / "deepspeed"

    def save(self, directory: Path, step: int, client_state: dict) -> Path:
        ds_dir = self._ds_dir(directory)
        self.model.save_checkpoint(str(ds_dir), tag=f"{self.TAG_PREFIX}{step:08d}", client_state=client_state)
        return ds_dir / f"{self.TAG_PREFIX}{step:08d}"

    @classmethod
    def find_latest(cls, directory: Path) -> Path | None:
        latest = cls._ds_dir(directory) / "latest"
        return cls._ds_dir(directory) / latest.read_text().strip() if latest.is_file() else None

    def load(self, path: Path) -> dict:
        path = Path(path)
        if not (path.is_dir() and path.parent.is_dir()):
            raise CheckpointError(f"DeepSpeed checkpoint not found: {path} (expected run.dir/checkpoints/"
                                  "deepspeed/step_XXXXXXXX)")
        loaded, client_state = self.model.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
        return client_state

    def full_state_dict(self) -> dict | None:
        """Gather the whole fp32 model: ZeRO-3 partitions parameters, so every rank takes part."""
        if self.cfg.deepspeed.zero_stage == 3:
            return self._gathered_zero3_state()
        return {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()} if self.env.is_main else None

    def _gathered_zero3_state(self) -> dict | None:
        import deepspeed

        state = {}
        for name, param in self.module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if self.env.is_main:
                    state[name] = param.detach().float().cpu().clone()
        if not self.env.is_main:
            return None
        for name, buf in self.module.named_buffers():
            state[name] = buf.detach().cpu().clone()
        full = self.module.state_dict()
        return {k: state[k] for k in full if k in state}


def deepspeed_config(cfg: Config, env: DistEnv, micro_batch: int) -> dict:
    """DeepSpeed's JSON, derived from clipkit's config; a user JSON (deepspeed.config) overrides keys."""
    t = cfg.train
    on_gpu = env.device.type == "cuda"
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": t.accum_steps,
        "train_batch_size": micro_batch * t.accum_steps * env.world_size,
        # torch_adam: torch's AdamW, the optimizer of the DDP path, rather than DeepSpeed's FusedAdam,
        # which JIT-compiles a CUDA extension (nvcc + ninja) on every fresh node before the first step.
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps,
                                                   "weight_decay": t.weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        # DeepSpeed casts the model itself; on CPU it trains in fp32 whatever train.precision says.
        "bf16": {"enabled": on_gpu and t.precision == "bf16"},
        "fp16": {"enabled": on_gpu and t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if t.grad_clip is not None:
        config["gradient_clipping"] = t.grad_clip
    if cfg.deepspeed.config:
        path = Path(cfg.deepspeed.config)
        if not path.is_file():
            raise CheckpointError(f"deepspeed.config file not found: {path}")
        user = json.loads(path.read_text())
        config = {**config, **user}
    return config
