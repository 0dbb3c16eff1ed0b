"""Engines: how a model is wrapped, stepped, kept in precision and checkpointed across processes.

The engine is chosen once, by `build_engine(cfg, module, env)`; the step and the loop never ask which
one they have. Every engine exposes:

    engine.name              "torch", "deepspeed-zero{N}" or "fsdp2" (recorded in checkpoints; resume must match)
    engine.model             the module to call (DDP- or DeepSpeed-wrapped; FSDP2: the module, sharded in place)
    engine.module            the plain open_clip model
    engine.input_dtype       the dtype images must have (None: as loaded, fp32)
    engine.autocast()        the context the training forward runs in (bf16/fp16 autocast, or nothing; with
                             train.compile=model the compiled blocks are active there and in engine.backward,
                             and only there)
    engine.compiler          the RegionalCompile of train.compile=model (its .stats: compiles), or None
    engine.no_sync()         skip the gradient all-reduce (all but the last backward of a step)
    engine.backward(loss)    gradients only: parameters change in engine.step()
    engine.checks_gradients  True: the engine's own step skips non-finite gradients (DeepSpeed), and the
                             caller decides on the loss before the backward; False: the caller decides
                             on the loss and engine.grad_norm() after it (torch)
    engine.grad_norm()       unscale (fp16), clip; the global gradient norm (torch engine)
    engine.step(apply)       clip, update, schedule, zero the gradients; returns whether the weights were
                             updated. apply=False: a step skipped for non-finite values (no update; the
                             fp16 loss scale adapts and the LR schedule advances: it follows the step count)
    engine.lr
    engine.save_state(dir)   write its own files into a checkpoint directory (every rank calls it)
    engine.load_state(dir, saved_world_size, scratch)   read them back (written by that many ranks); scratch:
                             a directory of this run for temporaries (removed before it returns); returns a
                             line for the run's log, or None
    engine.resumes_on_other_world_sizes  whether load_state takes a checkpoint of another world size
    engine.full_state_dict() fp32 weights of the whole model on rank 0 (collective under ZeRO-3)
    engine.nonfinite_weight() the first weight this rank holds that is NaN or inf (checked before each save)
    engine.unpickles_on_load the loader of its files unpickles: load only checkpoints clipkit signed
    Engine.model_kwargs(cfg) what the engine needs from create_model
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import CheckpointError
from ..config import Config
from ..distributed import DistEnv, gather_objects
from ..extras import require
from ..startup import paused_collection
from ..models import WEIGHTS_FILE, save_weights
from ..models.weights import first_nonfinite
from .engine_parts import (AUTOCAST_DTYPES, advance_schedule, gradient_norm, join_one_process_group, run_backward,
                           update)
from .fsdp import FSDP2Engine
from .compile import CACHE_DIR_NAME, apply_compile
from .optim import WarmupCosine, build_optimizer, build_scheduler, param_groups

log = logging.getLogger("clipkit.training")

OPTIMIZER_FILE = "optimizer.pt"


class TorchEngine:
    """One process or DDP; autocast with fp32 master weights, GradScaler loss scaling for fp16."""

    name = "torch"
    unpickles_on_load = False
    writes_full_weights = True  # model.safetensors is in every checkpoint
    checks_gradients = False  # the caller checks grad_norm() (and the loss) and passes its decision to step()
    resumes_on_other_world_sizes = True  # weights and optimizer state are whole in every checkpoint

    @staticmethod
    def model_kwargs(cfg: Config) -> dict:
        return {}

    def __init__(self, module: nn.Module, cfg: Config, env: DistEnv, model_name: str, model_cfg: dict) -> None:
        t = cfg.train
        self.module, self.env, self.grad_clip = module, env, t.grad_clip
        self.model_name, self.model_cfg = model_name, model_cfg
        self.preprocess_cfg = None  # an imported model's image preprocessing, kept in its weights files
        self.tokenizer_files = None  # ...and its transformers tokenizer (models/tokenizer_files.py)
        self.model = module
        self.compiler = apply_compile(module, t.compile, t.compile_pad_text, Path(cfg.run.dir) / CACHE_DIR_NAME)
        if env.distributed:
            device_ids = [env.local_rank] if env.device.type == "cuda" else None
            self.model = DistributedDataParallel(module, device_ids=device_ids)
        self.optimizer = build_optimizer(module, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps, t.optimizer_impl)
        self.scheduler = build_scheduler(self.optimizer, t.warmup_steps, t.steps)
        self.input_dtype = None  # fp32 weights; bf16/fp16 run under autocast
        self.autocast_dtype = AUTOCAST_DTYPES.get(t.precision)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(env.device.type) if t.precision == "fp16" else None
        self._norm: torch.Tensor | None = None  # this step's gradient norm, once computed

    def autocast(self):
        context = contextlib.ExitStack()
        if self.compiler is not None:
            context.enter_context(self.compiler.active())
        if self.autocast_dtype is not None:
            context.enter_context(torch.autocast(self.env.device.type, dtype=self.autocast_dtype))
        return context

    def no_sync(self):
        return self.model.no_sync() if isinstance(self.model, DistributedDataParallel) else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        run_backward(self, loss)

    def grad_norm(self) -> torch.Tensor:
        """The global norm of the true gradients, once this step's backward is done: unscaled (fp16) and
        clipped when train.grad_clip is set (the norm before clipping). Under DDP the gradients are
        already all-reduced, so every rank computes the same norm; not finite: skip this step."""
        if self._norm is None:
            self._norm = gradient_norm(self)
        return self._norm

    def step(self, apply: bool | None = None) -> bool:
        """Update (apply=None: when the gradient norm is finite, decided by this rank alone), then schedule
        and zero the gradients; returns whether the weights were updated."""
        return update(self, apply)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save_state(self, directory: Path) -> None:
        if not self.env.is_main:  # DDP replicas are identical: rank 0 writes for all
            return
        save_weights(self.module.state_dict(), directory / WEIGHTS_FILE, self.model_name, self.model_cfg,
                     self.preprocess_cfg, self.tokenizer_files)
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        torch.save(state, directory / OPTIMIZER_FILE)

    def load_state(self, directory: Path, saved_world_size: int | None = None, scratch: Path | None = None) -> None:
        from safetensors.torch import load_file

        self.module.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        try:  # tensors, numbers and lists only: a file that needs anything else is refused unread
            state = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{directory / OPTIMIZER_FILE} was refused: it holds more than tensors and "
                                  f"plain values ({type(e).__name__}); clipkit does not unpickle objects") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])

    def full_state_dict(self) -> dict | None:
        return self.module.state_dict() if self.env.is_main else None

    def nonfinite_weight(self) -> str | None:
        """The first weight (or buffer) holding a NaN or an infinity, or None."""
        return first_nonfinite(self.module.state_dict())


class DeepSpeedEngine:
    """DeepSpeed ZeRO with DeepSpeed's own optimizer; clipkit's schedule, clipping and precision."""

    compiler = None  # train.compile applies to the torch and FSDP2 engines (config/validate.py)
    unpickles_on_load = True  # DeepSpeed's load_checkpoint calls torch.load(weights_only=False)
    writes_full_weights = False  # sharded state; consolidated weights are added to the final checkpoint
    # ZeRO partitions are per rank: on another world size the checkpoint is converted to DeepSpeed's universal
    # format (whole fp32 weights and Adam moments per parameter), which any number of ranks re-partitions on load.
    resumes_on_other_world_sizes = True
    STATE_DIR = "deepspeed"
    TAG = "state"
    UNIVERSAL_PREFIX = ".universal-"  # the conversion's directory in `scratch`, removed after loading

    @staticmethod
    def model_kwargs(cfg: Config) -> dict:
        # DeepSpeed's initial broadcast views every parameter as bytes, which fails on 0-d tensors:
        # open_clip can hold the temperature (and bias) as 1-element vectors instead.
        return {"nonscalar_logit_scale": True}

    def __init__(self, module: nn.Module, cfg: Config, env: DistEnv, model_name: str, model_cfg: dict) -> None:
        with paused_collection():  # DeepSpeed's import is as large as torch's (clipkit/startup.py)
            deepspeed = require("deepspeed", "deepspeed.enabled=true")
        _no_shared_memory_all_reduce(deepspeed)

        self.module, self.env, self.cfg = module, env, cfg
        self.name = f"deepspeed-zero{cfg.deepspeed.zero_stage}"
        t = cfg.train
        join_one_process_group(env)
        micro_batch = t.global_batch_size // env.world_size // t.accum_steps
        ds_config = deepspeed_config(cfg, env, micro_batch)
        if t.precision != "fp32" and env.device.type != "cuda":
            log.warning("train.precision=%s: DeepSpeed on CPU trains in fp32", t.precision)
        schedule = WarmupCosine(t.warmup_steps, t.steps)

        def lr_lambda(step: int) -> float:
            return schedule(step)

        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module,
            model_parameters=param_groups(module, t.weight_decay),
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
            dist_init_required=False,
        )
        # DeepSpeed's bf16/fp16 modes cast the model itself (no autocast): inputs must follow.
        self.input_dtype = (torch.bfloat16 if ds_config["bf16"]["enabled"]
                            else torch.float16 if ds_config["fp16"]["enabled"] else None)

    def autocast(self):
        return contextlib.nullcontext()

    def no_sync(self):
        # DeepSpeed reduces gradients at its own accumulation boundary (gradient_accumulation_steps).
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # Contrastive accumulation already produces the exact full-batch gradient: no 1/K scaling.
        self.model.backward(loss, scale_wrt_gas=False)
        if not self.model.is_gradient_accumulation_boundary():
            # DeepSpeed counts micro-batches in step(): off the boundary it only advances that count
            # (no update), and it must, or the next backward would not know it closes the step.
            self.model.step()

    # DeepSpeed's optimizers check the gradients themselves and skip a step whose gradient norm is not
    # finite (ZeRO 1-3 in fp32, bf16 with bf16.check_grad_overflow, which deepspeed_config sets, fp16 with
    # its loss scaling): the caller only decides on the loss, collectively, before any backward runs.
    checks_gradients = True

    def grad_norm(self) -> None:
        return None  # DeepSpeed's own step checks it

    def step(self, apply: bool = True) -> bool:
        """At the boundary: clipping, optimizer, schedule, zeroing the gradients; returns whether the weights
        were updated. apply=False: the loss was not finite and no backward ran: only the schedule moves."""
        if not apply:
            advance_schedule(self.scheduler)
            return False
        if self.cfg.deepspeed.zero_stage == 0 and self.input_dtype is None:
            # Without ZeRO, in fp32, DeepSpeed steps torch's AdamW unchecked: a non-finite gradient (all-reduced
            # in the backward, the same on every rank) is dropped here, and an optimizer with no gradient
            # leaves every parameter and its moments as they were.
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            if grads and not math.isfinite(torch.nn.utils.get_total_norm(grads).item()):
                for p in self.module.parameters():
                    p.grad = None
                self.model.step()
                return False
        self.model.step()
        if self.model.was_step_applied():
            return True
        # Skipped for non-finite gradients (an fp16 overflow included): DeepSpeed leaves the LR schedule where
        # it was; clipkit's follows the step count on every engine, so a resumed run gets the same rates.
        advance_schedule(self.scheduler)
        return False

    @property
    def lr(self) -> float:
        return self.model.get_lr()[0]

    def save_state(self, directory: Path) -> None:
        self.model.save_checkpoint(str(directory / self.STATE_DIR), tag=self.TAG, save_latest=False)

    def load_state(self, directory: Path, saved_world_size: int | None = None,
                   scratch: Path | None = None) -> str | None:
        # Only ever called on a private copy of a checkpoint, made as its signature and checksums were verified
        # (CheckpointManager.resume): DeepSpeed finds files by pattern there and unpickles them.
        # Without ZeRO (stage 0) the weights and the optimizer state are whole in the model-states file: DeepSpeed
        # loads them on any world size.
        if (saved_world_size is not None and saved_world_size != self.env.world_size
                and self.cfg.deepspeed.zero_stage > 0):
            return self._load_resharded(directory, saved_world_size, Path(scratch or directory.parent))
        loaded, _ = self.model.load_checkpoint(str(directory / self.STATE_DIR), tag=self.TAG)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {directory / self.STATE_DIR}")
        return None

    def _load_resharded(self, directory: Path, saved_world_size: int, scratch: Path) -> str:
        """A checkpoint of another world size: rank 0 converts its ZeRO partitions into DeepSpeed's universal
        checkpoint (ds_to_universal: the whole fp32 weights and Adam moments of every parameter) in a fresh
        directory of `scratch` (the sealed checkpoint is never written to); every rank then loads its own
        partition of that (DeepSpeed's load_universal), and rank 0 removes the directory. A failure on any rank
        is raised on every rank."""
        source = directory / self.STATE_DIR
        started = time.perf_counter()
        out, error = None, None
        if self.env.is_main:
            try:
                scratch.mkdir(parents=True, exist_ok=True)
                out = Path(tempfile.mkdtemp(prefix=self.UNIVERSAL_PREFIX, suffix=".tmp", dir=scratch))
                convert_to_universal(source / self.TAG, out / self.TAG)
            except Exception as e:
                detail = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"
                error = (f"checkpoint {directory} was written by {saved_world_size} ranks; converting it for "
                         f"{self.env.world_size} (DeepSpeed's ds_to_universal) failed: {detail}")
                if out is not None:
                    shutil.rmtree(out, ignore_errors=True)
        out, error = gather_objects((str(out) if out else None, error), self.env)[0]
        if error:
            raise CheckpointError(error)
        converted = time.perf_counter() - started
        error = None
        try:
            self._load_universal(Path(out))
        except Exception as e:
            error = (f"checkpoint {directory} was written by {saved_world_size} ranks; loading its universal form "
                     f"on {self.env.world_size} (DeepSpeed's load_checkpoint with load_universal) failed on rank "
                     f"{self.env.rank}: {type(e).__name__}: {e}")
        errors = [e for e in gather_objects(error, self.env) if e]  # every rank has read the files
        if self.env.is_main:
            shutil.rmtree(out, ignore_errors=True)
        if errors:
            raise CheckpointError(errors[0])
        return (f"the {self.name} checkpoint of {saved_world_size} ranks was converted to DeepSpeed's universal "
                f"checkpoint and re-partitioned over {self.env.world_size} (weights and optimizer state; "
                f"{converted:.1f} s to convert, {time.perf_counter() - started - converted:.1f} s to load)")

    def _load_universal(self, path: Path) -> None:
        """DeepSpeed's load_checkpoint in universal mode (checkpoint.load_universal, read only at load time)."""
        config = self.model._config
        before = config.load_universal_checkpoint
        config.load_universal_checkpoint = True
        try:
            loaded, _ = self.model.load_checkpoint(str(path), tag=self.TAG)
        finally:
            config.load_universal_checkpoint = before
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint in {path}")

    def nonfinite_weight(self) -> str | None:
        """The first weight in this rank's keeping (its partition under ZeRO-3) holding a NaN or an infinity."""
        local = {name: getattr(p, "ds_tensor", None) if getattr(p, "ds_tensor", None) is not None else p.data
                 for name, p in self.module.named_parameters()}
        return first_nonfinite(local)

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


def convert_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's ds_to_universal on one ZeRO checkpoint directory (its tag's directory), in this process:
    one extract and one merge worker (no process pool), DeepSpeed's progress output kept off the console
    (it is in the error when the conversion fails). clipkit saves no Megatron universal_checkpoint_info (the
    tensor- and pipeline-parallel layout hints): --inject_missing_state supplies the empty one, which is
    right for data parallelism alone."""
    from deepspeed.checkpoint.ds_to_universal import main

    args = argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            main(args)
    except Exception as e:
        tail = " | ".join(line.strip() for line in output.getvalue().splitlines()[-3:] if line.strip())
        raise CheckpointError(f"{type(e).__name__}: {e}" + (f" (after: {tail})" if tail else "")) from e


def _no_shared_memory_all_reduce(deepspeed) -> None:
    """Keep DeepSpeed from building and opening its shared-memory all-reduce.

    On a CPU machine DeepSpeed's communication backend first probes every one of its compiled ops (compiler runs
    in each process), then JIT-builds `deepspeed_shm_comm` (a minute of C++ once per environment) and maps
    shared-memory segments that every job on the machine shares. The op serves only `inference_all_reduce`, which
    DeepSpeed's inference kernels call; training's collectives (ZeRO's reduce-scatter, all-gather and all-reduce)
    go through torch.distributed either way. DeepSpeed computes its table of compatible ops on first access and
    keeps it in `deepspeed.ops` for edits to persist: an empty table, set before that access, is "none built".
    """
    ops = deepspeed.ops
    if "__compatible_ops__" not in vars(ops):
        ops.__compatible_ops__ = {}


ENGINES = {"torch": TorchEngine, "deepspeed": DeepSpeedEngine, "fsdp": FSDP2Engine}


def engine_class(cfg: Config) -> type:
    return ENGINES["deepspeed" if cfg.deepspeed.enabled else "fsdp" if cfg.fsdp.enabled else "torch"]


def build_engine(cfg: Config, module: nn.Module, env: DistEnv, model_name: str, model_cfg: dict):
    return engine_class(cfg)(module, cfg, env, model_name, model_cfg)


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
        # check_grad_overflow: a bf16 step whose gradients are not finite is skipped (DeepSpeed's default,
        # stated because clipkit's non-finite guard relies on it).
        "bf16": {"enabled": on_gpu and t.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": on_gpu and t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if t.grad_clip is not None:
        config["gradient_clipping"] = t.grad_clip
    if cfg.deepspeed.config:
        config = {**config, **json.loads(Path(cfg.deepspeed.config).read_text())}
    return config
