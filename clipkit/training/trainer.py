"""The training loop: composes data, model, loss, engine, checkpoints and metrics.

    from clipkit.config import load_config
    from clipkit.training import Trainer
    trainer = Trainer(load_config("my.yaml", ["train.steps=200", "data.train=shards/{0..9}.tar"]))
    trainer.fit()

The same code runs on one process, under torchrun (DDP), or with DeepSpeed ZeRO: parallelism is applied
from outside the model by the engine (engine.py), the loss gathers features across ranks, and the
checkpoint manager (checkpoint.py) decides what is saved and when. Evaluation and export happen above
this package, in clipkit.run.
"""
from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import CheckpointError
from ..config import Config, ConfigError, config_to_dict, save_config
from ..data import StreamState, build_train_loader, expand_sources
from ..distributed import DistEnv, gather_objects, init_distributed
from ..losses import create_loss
from ..models import create_model, create_transforms, get_model_config, get_tokenizer
from .checkpoint import CheckpointManager, RNGState
from .engine import build_engine, engine_class
from .metrics import MetricsLogger
from .step import ContrastiveStep

MAX_LOGIT_SCALE = math.log(100.0)

# Keys a resumed run may change: how it is observed, saved, evaluated and exported, how far it goes, and
# exact speed-ups (model.trim_text gives the same numbers either way).
# Any other difference from the checkpoint's config would silently not apply (or apply halfway).
RESUMABLE_CHANGES = ("run.dir", "run.progress", "run.log_every", "run.record_sample_keys", "train.steps", "train.resume",
                     "train.checkpoint_every", "train.keep_checkpoints", "data.prefetch", "data.zeroshot", "data.retrieval",
                     "eval.", "export.", "finetune.", "data.synth.downstream_", "model.trim_text")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: Config, device: torch.device, **engine_kwargs) -> torch.nn.Module:
    """The open_clip model with the config's training switches applied (no parallelism here)."""
    kwargs = dict(engine_kwargs)
    if cfg.train.loss == "siglip":  # SigLIP's initial temperature and bias
        kwargs.update(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    if cfg.model.patch_dropout > 0:
        kwargs["force_patch_dropout"] = cfg.model.patch_dropout
    model = create_model(cfg.model.name, device=device, trim_text=cfg.model.trim_text, **kwargs)
    m = cfg.model
    if m.lock_image:
        model.lock_image_tower(unlocked_groups=m.lock_image_unlocked_groups, freeze_bn_stats=m.lock_image_freeze_bn_stats)
    if m.lock_text:
        model.lock_text_tower(unlocked_layers=m.lock_text_unlocked_layers)
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


class Throughput:
    """Global samples/s over the logged windows, leaving out the first (start-up, warm-up, compilation)."""

    def __init__(self) -> None:
        self.windows = 0
        self.samples = 0
        self.seconds = 0.0

    def add(self, samples: int, seconds: float) -> None:
        self.windows += 1
        if self.windows > 1:
            self.samples += samples
            self.seconds += seconds

    @property
    def samples_per_s(self) -> float | None:
        return self.samples / self.seconds if self.seconds > 0 else None


class SkipTally(Counter):
    """This rank's skipped samples by reason (a checkpoint state provider)."""

    def state_dict(self) -> dict:
        return dict(self)

    def load_state_dict(self, state: dict) -> None:
        self.clear()
        self.update(state)


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    changed = []
    for key in sorted(set(saved) | set(current)):
        a, b, name = saved.get(key), current.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, name + ".")
        elif a != b:
            changed.append(name)
    return changed


def _with_defaults(defaults: dict, saved: dict) -> dict:
    """`saved` with every key it lacks taken from `defaults` (recursively)."""
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(value, out[key])
    return out


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv | None = None) -> None:
        self.cfg = cfg
        self.env = env = env or init_distributed()
        t = cfg.train
        if t.global_batch_size % (env.world_size * t.accum_steps):
            raise ConfigError(f"config key 'train.global_batch_size' ({t.global_batch_size}) must divide evenly "
                              f"over {env.world_size} ranks x train.accum_steps={t.accum_steps}")
        if cfg.data.train is None:
            raise ConfigError("config key 'data.train' names no shards (clipkit.run fills in the built-in set)")
        expand_sources(cfg.data.train, cfg.data.train_weights)  # a missing shard fails here, before training
        self.local_batch_size = t.global_batch_size // env.world_size
        self.device = env.device
        self.run_dir = Path(cfg.run.dir)
        self.model_name = cfg.model.name
        self.model_cfg = get_model_config(cfg.model.name)
        meta = {"model_name": self.model_name, "model_cfg": self.model_cfg, "config": config_to_dict(cfg)}

        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        self.module = build_model(cfg, self.device, **engine_class(cfg).model_kwargs(cfg))
        self.train_transform, self.val_transform = create_transforms(self.module)
        self.tokenizer = get_tokenizer(cfg.model.name)
        seed_everything(cfg.run.seed + env.rank)  # then per-rank randomness (augmentation, dropout)

        self.engine = build_engine(cfg, self.module, env, self.model_name, self.model_cfg)
        loss_fn = create_loss(t.loss, local_loss=t.local_loss, tile_size=t.tile_size)
        self.step_fn = ContrastiveStep(self.engine, loss_fn, t.accum_steps, self.device)
        self.step = 0
        self.skipped = SkipTally()
        self.stream = StreamState()  # where this rank is in its data stream (batches consumed)
        self.throughput = Throughput()
        self.resumed_from: Path | None = None
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", env, self.engine,
            {"rng": RNGState(), "data": self.stream, "skipped": self.skipped},
            every=t.checkpoint_every, keep=t.keep_checkpoints, meta=meta)
        self._start()

    def _start(self) -> None:
        """Refuse to mix runs, clean up after an interrupted save, resume, then record the config."""
        existing = self.checkpoints.existing()
        resume = self.cfg.train.resume
        if resume is None and existing is not None:  # never mix a new run's files with an old run's
            raise ConfigError(f"run.dir={self.run_dir} already holds a run (checkpoint {existing}): continue "
                              "it with train.resume=latest, or start this one in another run.dir")
        self.checkpoints.remove_stale()
        if resume is not None:
            resumed = self.checkpoints.resume(resume)
            if resumed is not None:
                self.step, info = resumed
                self._check_config(info["config"])
                self.resumed_from = self.checkpoints.last
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")

    def _check_config(self, saved: dict) -> None:
        # A key the checkpoint's config lacks (added by a later clipkit) had its default in that run.
        saved = _with_defaults(config_to_dict(Config()), saved)
        changed = [k for k in config_changes(saved, config_to_dict(self.cfg))
                   if not k.startswith(RESUMABLE_CHANGES)]
        if changed:
            raise ConfigError(f"config key '{changed[0]}' differs from the checkpoint's run "
                              f"({', '.join(changed)} changed): a resumed run trains with the config it started "
                              "with; set these back, or start a new run in another run.dir")

    # -- the loop -----------------------------------------------------------------------------------

    def _loader(self):
        """This rank's loader, continuing exactly where the batches consumed so far (or the checkpoint's)
        left the stream: over an epoch every sample is seen once, however often the run is resumed."""
        resume_state = self.stream.state_dict() if self.stream.fingerprint else None
        self.stream.load_state_dict(resume_state)
        loader = build_train_loader(self.cfg.data, transform=self.train_transform, tokenizer=self.tokenizer,
                                    local_batch_size=self.local_batch_size, rank=self.env.rank,
                                    world_size=self.env.world_size, seed=self.cfg.run.seed, resume_state=resume_state)
        self.step_fn.normalize = loader.dataset.normalize  # None unless the batches come as uint8
        return loader

    def train_on(self, images: torch.Tensor, tokens: torch.Tensor) -> float:
        """One optimisation step on this rank's share of a global batch; returns this rank's loss."""
        loss = self.step_fn(images, tokens)
        with torch.no_grad():
            self.module.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.step += 1
        return loss

    def global_mean(self, value: float) -> float:
        if not self.env.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.env.world_size

    def global_skipped(self) -> dict:
        total: Counter[str] = Counter()
        for counts in gather_objects(dict(self.skipped), self.env):
            total.update(counts)
        return dict(total)

    def _sample_keys_log(self):
        """run.dir/sample_keys/rank{R}.jsonl, one line per step with the keys of this rank's batch."""
        if not self.cfg.run.record_sample_keys:
            return None
        path = self.run_dir / "sample_keys" / f"rank{self.env.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():  # a resumed run: steps logged after the checkpoint will be trained again
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in kept))
        return open(path, "a", buffering=1)

    def fit(self, until: int | None = None, after_step: Callable[[int], dict | None] | None = None) -> Path:
        """Train up to train.steps (or to step `until`, e.g. to run a schedule in slices); returns the
        checkpoint written at the end (at train.steps it holds full fp32 weights for every engine).

        after_step(step) runs on every rank after each step (the run layer evaluates there); metrics it
        returns are logged under "eval". It may use collectives: every rank calls it at the same step."""
        c = self.cfg
        last = c.train.steps if until is None else min(until, c.train.steps)
        start = self.step
        logger = MetricsLogger(self.run_dir, c.train.steps, self.step, enabled=self.env.is_main,
                               progress=c.run.progress)
        if self.resumed_from is not None:
            logger.write(f"resumed from {self.resumed_from} at step {self.step}")
        self.engine.model.train()
        keys_log = self._sample_keys_log()
        try:
            if self.step < last:
                self._run_steps(last, logger, keys_log, after_step)
        finally:
            logger.close()
            if keys_log is not None:
                keys_log.close()
        if self.step == start and self.checkpoints.last is not None and self.checkpoints.holds_weights(self.step):
            return self.checkpoints.last  # nothing trained since the checkpoint this run resumed from
        return self.checkpoints.save(self.step, final=self.step >= c.train.steps)

    def _run_steps(self, last: int, logger: MetricsLogger, keys_log, after_step) -> None:
        c = self.cfg
        batches = iter(self._loader())
        window_start, window_samples, losses = time.perf_counter(), 0, []
        while self.step < last:
            batch = next(batches)
            self.stream.observe(batch)
            self.skipped.update(batch.skipped)
            losses.append(self.train_on(batch.images, batch.targets))
            if keys_log is not None:
                keys_log.write(json.dumps({"step": self.step, "keys": batch.keys}) + "\n")
            window_samples += batch.images.shape[0] * self.env.world_size
            logger.advance()
            if self.step % c.run.log_every == 0 or self.step == last:
                elapsed = time.perf_counter() - window_start
                logger.log(self.step, self._metrics(losses, window_samples, elapsed))
                self.throughput.add(window_samples, elapsed)
                window_start, window_samples, losses = time.perf_counter(), 0, []
            evaluated = after_step(self.step) if after_step is not None else None
            if evaluated:
                logger.log(self.step, {"eval": evaluated})
                window_start = time.perf_counter()  # evaluation time is not training throughput
            if self.step < last:
                self.checkpoints.maybe_save(self.step)

    def _metrics(self, losses: list[float], samples: int, elapsed: float) -> dict:
        record = {
            "loss": self.global_mean(float(np.mean(losses))),
            "lr": self.engine.lr,
            "logit_scale": self.module.logit_scale.exp().item(),
            "samples_per_s": samples / max(elapsed, 1e-9),
            "skipped": self.global_skipped(),
        }
        if self.device.type == "cuda":
            record["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        return record


__all__ = ["CheckpointError", "Trainer", "build_model", "seed_everything"]
