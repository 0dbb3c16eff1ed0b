"""torch.compile for training (train.compile): regional compilation of the towers' transformer blocks.

`train.compile=model` compiles every transformer block of both towers with torch.compile, from outside the
model code (open_clip's and timm's blocks as they are): the blocks of a tower are instances of one class with
the same shapes, so dynamo compiles one graph and every block of that shape reuses it (torchtitan's and
OpenCLIP's regional compilation). What is not a block (patch and token embeddings, pooling, projections, the
loss, the optimizer) runs eagerly.

Shapes (dynamic=False, a bounded set): the image blocks see one shape per run (the local batch is the same at
every step: the loader hands out full batches only). The text blocks see the trimmed caption length
(model.trim_text), which varies from batch to batch; with compilation on, the trimmed length is rounded up to
a multiple of train.compile_pad_text (capped at the context length), which is exact (positions after the last
one read never reach the features) and bounds the text shapes to ceil(context / pad) + 1. Every compile is
counted (CompileStats): graphs compiled, those after the first step (recompiles), and the seconds they took,
logged apart from step time in metrics.jsonl.

The blocks run compiled only inside the training forward and backward (RegionalCompile.active(), entered by
the engine's forward context and its backward, where gradient checkpointing recomputes a block: it must run
as in the forward, whose saved tensors it reproduces): evaluation, export and anything else that calls the
model outside a training step run the same blocks eagerly, so no evaluation batch size or eval-mode graph is
compiled.

Engines: the torch engine (one process, DDP) compiles the blocks before DDP wraps the model; the FSDP2 engine
compiles them before fully_shard shards each block (torchtitan's order). FSDP2's hooks, which gather a block's
weights before it runs and free them after, run eagerly around the compiled block (torch marks them
dynamo-disabled), so inductor compiles the same block graphs as under DDP, and the kernels compiled for one
engine are cache hits for the other. AOTAutograd's cache entries are not shared: dynamo traces a module FSDP
manages with parameter sources of its own (FSDPManagedNNModuleVariable), which changes their keys, so a run
of the other engine traces the forward and backward again (seconds) and loads the kernels.

Cache: torch's compile caches (inductor's FX graph cache and AOTAutograd's cache) are kept in
run.dir/compile_cache unless TORCHINDUCTOR_CACHE_DIR names another folder, so a resumed run (or a second run
in the same folder) loads its graphs instead of compiling them again.

`train.compile=step` (the whole step as one graph) is refused by the config check (config/validate.py
says why, docs/distributed.md in more words).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError

log = logging.getLogger("clipkit.training")

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
CACHE_DIR_NAME = "compile_cache"
BLOCK_LISTS = ("resblocks", "blocks")  # open_clip's Transformer.resblocks, timm's VisionTransformer.blocks
_set_cache_dir: str | None = None  # the cache folder this process set (any other value came from the user)


def transformer_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every transformer block of the model: the members of a ModuleList named resblocks
    (open_clip) or blocks (timm)."""
    found = []
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS:
            found += [(f"{name}.{i}", block) for i, block in enumerate(child)]
    return found


def text_lengths(context_length: int, pad: int) -> list[int]:
    """The text lengths the compiled text blocks can see: multiples of `pad` below the context, and the context."""
    return sorted({min(k * pad, context_length) for k in range(1, math.ceil(context_length / pad) + 1)})


def use_cache_dir(directory: Path) -> str:
    """Keep torch's compile caches in `directory`, unless the user's TORCHINDUCTOR_CACHE_DIR names a folder;
    returns the folder in use."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    global _set_cache_dir
    current = os.environ.get(CACHE_ENV)
    # torch writes its default into the environment on first use: that one is not the user's choice
    if current is not None and current not in (_set_cache_dir, os.path.abspath(default_cache_dir())):
        return current
    directory.mkdir(parents=True, exist_ok=True)
    _set_cache_dir = os.environ[CACHE_ENV] = str(directory.resolve())
    return _set_cache_dir


class CompileStats:
    """Compiles since this object was made: graphs (dynamo's unique graphs), recompiles (graphs compiled after
    the first training step), compile seconds (dynamo's frame compile, which includes the forward graph's
    inductor compile or cache load, plus AOTAutograd's lazy backward compile) and how many graphs the on-disk
    cache served (AOTAutograd cache hits; misses were compiled from scratch)."""

    TIMERS = ("_compile.compile_inner", "backward._backward_impl")

    def __init__(self) -> None:
        self._graphs0 = self._graphs()
        self._seconds0 = self._seconds()
        self._cache0 = self._cache()
        self.after_first_step: int | None = None  # graphs compiled by the end of the first step

    @staticmethod
    def _graphs() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    @staticmethod
    def _cache() -> tuple[int, int]:
        from torch._dynamo.utils import counters

        return int(counters["aot_autograd"]["autograd_cache_hit"]), int(counters["aot_autograd"]["autograd_cache_miss"])

    @classmethod
    def _seconds(cls) -> float:
        from torch._dynamo.utils import compilation_time_metrics

        return sum(sum(compilation_time_metrics.get(key, ())) for key in cls.TIMERS)

    @property
    def graphs(self) -> int:
        return self._graphs() - self._graphs0

    @property
    def seconds(self) -> float:
        return self._seconds() - self._seconds0

    def step_done(self) -> None:
        if self.after_first_step is None:
            self.after_first_step = self.graphs

    @property
    def recompiles(self) -> int:
        return 0 if self.after_first_step is None else self.graphs - self.after_first_step

    def as_dict(self) -> dict:
        hits, misses = (now - then for now, then in zip(self._cache(), self._cache0))
        return {"graphs": self.graphs, "recompiles": self.recompiles, "seconds": round(self.seconds, 3),
                "cache_hits": hits, "cache_misses": misses}


class RegionalCompile:
    """The model's transformer blocks compiled (dynamic=False), active only inside `active()`."""

    def __init__(self, module: nn.Module, pad_text: int, cache_dir: Path) -> None:
        blocks = transformer_blocks(module)
        if not blocks:
            raise ConfigError(f"config key 'train.compile': the model ({type(module).__name__}) has no transformer "
                              "blocks (resblocks or blocks) to compile; use train.compile=off")
        self.cache_dir = use_cache_dir(cache_dir)
        context = getattr(module, "context_length", None)
        self.text_lengths = text_lengths(context, pad_text) if context else []
        module.trim_text_multiple = pad_text  # read by TrimmedTextCLIP (models/trim.py): exact at any multiple
        # one graph per (tower, text length, grad mode): keep them all, however many blocks share the code
        needed = 2 * (len(self.text_lengths) + 2)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, needed)
        self.stats = CompileStats()
        self._blocks = [block for _, block in blocks]
        for block in self._blocks:
            block.compile(dynamic=False)
        self._compiled = [block._compiled_call_impl for block in self._blocks]
        self._set(False)
        log.info("train.compile=model: %d transformer blocks compiled (dynamic=False; text lengths %s); "
                 "compile cache %s", len(self._blocks), self.text_lengths or "n/a", self.cache_dir)

    def _set(self, on: bool) -> None:
        for block, compiled in zip(self._blocks, self._compiled):
            block._compiled_call_impl = compiled if on else None

    @contextlib.contextmanager
    def active(self):
        """The blocks run compiled inside this context (the training forward and backward), eagerly outside it."""
        self._set(True)
        try:
            yield
        finally:
            self._set(False)


def apply_compile(module: nn.Module, mode: str, pad_text: int, cache_dir: Path) -> RegionalCompile | None:
    """train.compile applied to the plain model (before any parallel wrapper); None when it is off."""
    if mode == "off":
        return None
    if mode != "model":
        raise ConfigError(f"config key 'train.compile': {mode!r} is not applied here (off or model)")
    return RegionalCompile(module, pad_text, cache_dir)


__all__ = ["CompileStats", "RegionalCompile", "apply_compile", "text_lengths", "transformer_blocks", "use_cache_dir"]
