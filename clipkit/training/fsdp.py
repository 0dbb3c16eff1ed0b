"""The FSDP2 engine: PyTorch's fully_shard applied from outside the model, sharded checkpoints through
torch.distributed.checkpoint (DCP).

`parallelize(model, mesh, ...)` shards as torchtitan's parallelize functions do: every transformer block and
ResNet stage of both towers gets its own fully_shard (its weights are gathered just before it runs and freed
after), then the root takes what is left (embeddings, projections, the temperature). Each rank keeps 1/W of
every weight, of its gradient and of the AdamW moments; the parameters become DTensors. The model code knows
nothing of it.

Checkpoints: every rank writes its shards into step_N/fsdp/ (DCP's `__<rank>_0.distcp` files and its pickled
`.metadata`), rank 0 the schedule and loss scale (schedule.pt, tensors and numbers only). DCP's metadata is
unpickled on load, so only checkpoints this installation signed are loaded (engine.unpickles_on_load), from the
verified private copy. DCP places every saved tensor by its global offsets: a checkpoint of W ranks loads on any
other number of ranks, and a plain (unsharded) state loads into shards the same way, which is what the
conversions to and from the torch engine's checkpoints use (clipkit.training.convert).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError
from ..config import Config, ConfigError
from ..distributed import DistEnv
from ..models.weights import first_nonfinite
from .compile import CACHE_DIR_NAME, apply_compile
from .engine_parts import AUTOCAST_DTYPES, gradient_norm, join_one_process_group, run_backward, update
from .optim import build_optimizer, build_scheduler

STATE_DIR = "fsdp"  # DCP's files, in the checkpoint directory
SCHEDULE_FILE = "schedule.pt"  # LR schedule and fp16 loss scale (rank 0)
BLOCK_LISTS = ("resblocks", "blocks", "layers", "layer")  # ModuleLists of transformer blocks (open_clip, timm, HF)
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")  # open_clip's ModifiedResNet and timm's ResNet stages


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that each get their own fully_shard: every transformer block and every ResNet stage, in
    both towers, deepest first (fully_shard goes from the leaves to the root)."""
    units = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.ModuleList) and last in BLOCK_LISTS:
            units += [(name.count(".") + 1, block) for block in module]
        elif last in RESNET_STAGES and isinstance(module, nn.Sequential):
            units.append((name.count("."), module))
    units.sort(key=lambda unit: -unit[0])  # a stage holding blocks of its own comes after them
    return [module for _, module in units]


def mixed_precision(param_dtype: str, reduce_dtype: str):
    """FSDP2's MixedPrecisionPolicy: the forward and backward in param_dtype, gradients averaged across ranks in
    reduce_dtype; fp32 throughout: no policy (the sharded master weights are fp32 either way)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if param_dtype == "fp32" and reduce_dtype == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=AUTOCAST_DTYPES.get(param_dtype, torch.float32),
                                reduce_dtype=AUTOCAST_DTYPES.get(reduce_dtype, torch.float32))


def parallelize(model: nn.Module, mesh, *, param_dtype: str = "fp32", reduce_dtype: str = "fp32",
                reshard_after_forward: bool = True, cpu_offload: bool = False) -> nn.Module:
    """fully_shard every block and stage of `model` (shard_units), then the root; in place, returns `model`."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    options = {"mesh": mesh, "mp_policy": mixed_precision(param_dtype, reduce_dtype),
               "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    for unit in shard_units(model):
        fully_shard(unit, reshard_after_forward=reshard_after_forward, **options)
    # the root's weights are needed again at once by the backward: not resharded after its forward
    fully_shard(model, reshard_after_forward=False, **options)
    return model


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full value of a (possibly sharded) tensor: an all-gather for a DTensor, so every rank calls it. A run
    that never imported DTensor (the torch and DeepSpeed engines) holds none, and does not import it here."""
    if "torch.distributed.tensor" not in sys.modules:
        return tensor
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole value (an optimizer moment read from a file) as the optimizer holds it for `param`: in param's dtype
    and device, and, for a DTensor (FSDP2), sharded as param is (each rank keeps its own shard). A run that never
    imported DTensor (the torch and DeepSpeed engines) holds none, and does not import it here."""
    if "torch.distributed.tensor" in sys.modules:
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(param, DTensor):
            local_value = tensor.to(dtype=param.dtype, device=param.to_local().device)
            return distribute_tensor(local_value, param.device_mesh, param.placements)
    return tensor.to(param).clone()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def load_plain(path: Path) -> dict:
    """A torch.save file of tensors and plain values only (torch.load with weights_only): schedule.pt."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} was refused: it holds more than tensors and plain values "
                              f"({type(e).__name__}); clipkit does not unpickle objects") from None


class FSDP2Engine:
    """FSDP2 (fully_shard) over every rank, AdamW on the sharded fp32 weights, clipkit's schedule and clipping."""

    name = "fsdp2"
    unpickles_on_load = True  # DCP's .metadata is pickled: signed checkpoints only
    writes_full_weights = False  # sharded state; consolidated weights are added to the final checkpoint
    checks_gradients = False  # the caller checks grad_norm() (and the loss), as for the torch engine
    resumes_on_other_world_sizes = True  # DCP re-partitions by global offsets

    @staticmethod
    def model_kwargs(cfg: Config) -> dict:
        # fully_shard refuses 0-d parameters: the temperature (and bias) as 1-element vectors
        return {"nonscalar_logit_scale": True}

    def __init__(self, module: nn.Module, cfg: Config, env: DistEnv, model_name: str, model_cfg: dict) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        t, f = cfg.train, cfg.fsdp
        if f.cpu_offload and env.device.type != "cuda":
            raise ConfigError("config key 'fsdp.cpu_offload' moves sharded state from GPU to CPU memory: this run is "
                              f"on {env.device.type}, where it is in CPU memory already; set it to false")
        self.module, self.env, self.grad_clip = module, env, t.grad_clip
        self.model_name, self.model_cfg = model_name, model_cfg
        self.preprocess_cfg = None
        self.tokenizer_files = None
        join_one_process_group(env)  # one process: a one-member group, so that one code path serves all
        self.mesh = init_device_mesh(env.device.type, (env.world_size,))
        self.param_dtype = f.param_dtype or t.precision
        # train.compile=model: each block compiled first, then sharded (torchtitan's order); the FSDP2 hooks that
        # gather a block's weights before it runs and free them after stay outside its graph (dynamo-disabled)
        self.compiler = apply_compile(module, t.compile, t.compile_pad_text, Path(cfg.run.dir) / CACHE_DIR_NAME)
        self.model = parallelize(module, self.mesh, param_dtype=self.param_dtype, reduce_dtype=f.reduce_dtype,
                                 reshard_after_forward=f.reshard_after_forward, cpu_offload=f.cpu_offload)
        self.optimizer = build_optimizer(module, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps, t.optimizer_impl)
        self.scheduler = build_scheduler(self.optimizer, t.warmup_steps, t.steps)
        self.input_dtype = None  # the policy casts the forward's inputs to param_dtype itself
        self.scaler = torch.amp.GradScaler(env.device.type) if self.param_dtype == "fp16" else None
        self._norm: torch.Tensor | None = None

    def autocast(self):
        """No autocast: the mixed-precision policy gathers the weights in param_dtype; the compiled blocks
        (train.compile=model) are active here."""
        return contextlib.nullcontext() if self.compiler is None else self.compiler.active()

    @contextlib.contextmanager
    def no_sync(self):
        """Gradients of this backward stay on each rank, unreduced (the last micro-batch's backward reduces)."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor) -> None:
        run_backward(self, loss)

    def grad_norm(self) -> torch.Tensor:
        """The global norm of the true gradients (each rank holds a shard of each: the norm is all-reduced, so
        every rank gets the same), unscaled (fp16) and clipped when train.grad_clip is set."""
        if self._norm is None:
            self._norm = whole(gradient_norm(self))
        return self._norm

    def step(self, apply: bool | None = None) -> bool:
        """As the torch engine's: update when the (all-reduced) norm is finite, schedule, zero the gradients."""
        return update(self, apply)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- checkpoints ----------------------------------------------------------------------------------

    def _sharded_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.module, self.optimizer)
        return {"model": model, "optim": optim}

    def save_state(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._sharded_state(), checkpoint_id=str(directory / STATE_DIR))
        if self.env.is_main:
            state = {"scheduler": self.scheduler.state_dict()}
            if self.scaler is not None:
                state["grad_scaler"] = self.scaler.state_dict()
            torch.save(state, directory / SCHEDULE_FILE)

    def load_state(self, directory: Path, saved_world_size: int | None = None,
                   scratch: Path | None = None) -> str | None:
        """Only ever called on the verified private copy of a signed checkpoint: DCP unpickles its metadata."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._sharded_state()
        dcp.load(state, checkpoint_id=str(directory / STATE_DIR))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        saved = load_plain(directory / SCHEDULE_FILE)
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None and "grad_scaler" in saved:
            self.scaler.load_state_dict(saved["grad_scaler"])
        if saved_world_size is not None and saved_world_size != self.env.world_size:
            return (f"the fsdp2 checkpoint of {saved_world_size} ranks was re-sharded over {self.env.world_size} "
                    "by torch.distributed.checkpoint (weights and optimizer state)")
        return None

    def full_state_dict(self) -> dict | None:
        """The whole fp32 model on rank 0 (every rank takes part in gathering it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.env.is_main else None

    def nonfinite_weight(self) -> str | None:
        """The first weight whose shard on this rank holds a NaN or an infinity, or None."""
        return first_nonfinite({name: local(p.detach()) for name, p in self.module.named_parameters()})
