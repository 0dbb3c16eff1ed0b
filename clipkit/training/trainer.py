"""The training loop: composes data, model, loss, engine, checkpoints and metrics.

    from clipkit.config import load_config
    from clipkit.training import train
    summary = train(load_config("my.yaml", ["train.steps=200"]))

The same code runs on one process, under torchrun (DDP), or with DeepSpeed ZeRO: parallelism is
applied from outside the model by the engine (engine.py), the loss gathers features across ranks.
"""
from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..config import Config, ConfigError, config_to_dict, save_config
from ..data import StreamState, build_train_loader, ensure_synth_dataset, expand_sources
from ..distributed import DistEnv, cleanup, init_distributed
from ..evaluation import evaluate_zeroshot, load_zeroshot_set, write_result
from ..export import export_open_clip
from ..losses import create_loss
from ..models import create_model, create_transforms, get_model_config, get_tokenizer
from .checkpoint import CheckpointError, latest_checkpoint, rng_state, set_rng_state
from .engine import DeepSpeedEngine, TorchEngine
from .metrics import MetricsLogger
from .step import ContrastiveStep

MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class DataSources:
    train: str
    zeroshot: str | None


def resolve_data(cfg: Config, env: DistEnv) -> DataSources:
    """The shard spec and zero-shot root to use; the built-in set is written on first use (rank 0)."""
    train, zeroshot = cfg.data.train, cfg.data.zeroshot
    if train is None or zeroshot is None:
        s = cfg.data.synth
        params = dict(train_samples=s.train_samples, eval_samples=s.eval_samples,
                      samples_per_shard=s.samples_per_shard, image_size=s.image_size, seed=s.seed)
        if env.is_main:
            ensure_synth_dataset(s.out, **params)
        if env.distributed:
            dist.barrier()
        synth = ensure_synth_dataset(s.out, **params)  # present now: only reads the manifest
        train = train if train is not None else synth.train_spec
        zeroshot = zeroshot if zeroshot is not None else str(synth.eval_root)
    expand_sources(train, cfg.data.train_weights)  # a missing shard or bad spec fails here, before training
    return DataSources(train, zeroshot)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: Config, device: torch.device) -> torch.nn.Module:
    """The open_clip model with the config's training switches applied (no parallelism here)."""
    kwargs = {}
    if cfg.train.loss == "siglip":  # SigLIP's initial temperature and bias
        kwargs.update(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    if cfg.model.patch_dropout > 0:
        kwargs["force_patch_dropout"] = cfg.model.patch_dropout
    if cfg.deepspeed.enabled:
        # DeepSpeed's initial broadcast views every parameter as bytes, which fails on 0-d tensors:
        # open_clip can hold the temperature (and bias) as 1-element vectors instead.
        kwargs["nonscalar_logit_scale"] = True
    model = create_model(cfg.model.name, device=device, **kwargs)
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


def _gather_objects(obj, env: DistEnv) -> list:
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.env = env = init_distributed()
        t = cfg.train
        if t.batch_size % (env.world_size * t.accum_steps):
            raise ConfigError(f"config key 'train.batch_size' ({t.batch_size}) must divide evenly over "
                              f"{env.world_size} ranks x train.accum_steps={t.accum_steps}")
        self.local_batch = t.batch_size // env.world_size
        self.device = env.device
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        existing = latest_checkpoint(self.ckpt_dir) or DeepSpeedEngine.find_latest(self.ckpt_dir)
        if t.resume is None and existing is not None:  # never mix a new run's files with an old run's
            raise ConfigError(f"run.dir={self.run_dir} already holds a run (checkpoint {existing}): continue "
                              "it with train.resume=latest, or start this one in another run.dir")
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.data = resolve_data(cfg, env)  # the data is there and the spec names real shards

        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        self.model_name = cfg.model.name
        self.model_cfg = get_model_config(cfg.model.name)
        self.module = build_model(cfg, self.device)
        self.train_transform, self.val_transform = create_transforms(self.module)
        self.tokenizer = get_tokenizer(cfg.model.name)
        seed_everything(cfg.run.seed + env.rank)  # then per-rank randomness (augmentation, dropout)

        if cfg.deepspeed.enabled:
            self.engine = DeepSpeedEngine(self.module, cfg, env, self.local_batch // t.accum_steps)
            autocast = None  # DeepSpeed's own bf16 mode casts the model
        else:
            self.engine = TorchEngine(self.module, cfg, env)
            autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        loss_fn = create_loss(t.loss, local_loss=t.local_loss, tile_size=t.tile_size)
        self.step_fn = ContrastiveStep(self.engine, loss_fn, t.accum_steps, autocast, self.device)
        self.step = 0
        self.skipped: Counter[str] = Counter()  # this rank's skipped samples, by reason
        self.resumed_from: Path | None = None
        self.last_checkpoint: Path | None = None
        self.consolidated: Path | None = None  # DeepSpeed runs: the fp32 weight file written at the end
        self.throughput = Throughput()
        self.stream = StreamState()  # where this rank is in its data stream (batches consumed)
        self._maybe_resume()

    # -- checkpoints --------------------------------------------------------------------------------

    def _client_state(self) -> dict:
        """What the engine's checkpoint does not hold: progress, per-rank RNG and data positions."""
        ranks = _gather_objects({"rng": rng_state(), "skipped": dict(self.skipped),
                                 "data": self.stream.state_dict()}, self.env)
        return {"step": self.step, "ranks": ranks, "config": config_to_dict(self.cfg),
                "model_name": self.model_name, "model_cfg": self.model_cfg}

    def save(self) -> Path | None:
        path = self.engine.save(self.ckpt_dir, self.step, self._client_state())
        self.last_checkpoint = path
        return path

    def _maybe_resume(self) -> None:
        resume = self.cfg.train.resume
        if resume is None:
            return
        if resume == "latest":
            path = self.engine.find_latest(self.ckpt_dir)
            if path is None:  # nothing to continue yet: a fresh start, as OpenCLIP's --resume latest
                return
        else:
            path = Path(resume)
        state = self.engine.load(path)
        if state.get("model_cfg") != self.model_cfg:
            raise CheckpointError(f"checkpoint {path} holds architecture {state.get('model_name')}, which "
                                  f"differs from model.name={self.model_name}")
        ranks = state["ranks"]
        if len(ranks) != self.env.world_size:
            raise CheckpointError(f"checkpoint {path} was written by {len(ranks)} ranks; this run has "
                                  f"{self.env.world_size}: resume with the same world size")
        mine = ranks[self.env.rank]
        set_rng_state(mine["rng"])
        self.skipped.update(mine["skipped"])
        if mine.get("data") is not None:
            self.stream = StreamState(mine["data"])
        self.step = state["step"]
        self.resumed_from = path

    # -- the loop -----------------------------------------------------------------------------------

    def _loader(self):
        """This rank's loader, continuing exactly where the batches consumed so far (or the checkpoint's)
        left the stream: over an epoch every sample is seen once, however often the run is resumed."""
        c = self.cfg
        resume_state = self.stream.state_dict() if self.stream.fingerprint else None
        self.stream = StreamState(resume_state)
        loader = build_train_loader(self.data.train, self.train_transform, self.tokenizer, self.local_batch,
                                    rank=self.env.rank, world_size=self.env.world_size, workers=c.data.workers,
                                    seed=c.run.seed, shuffle_buffer=c.data.shuffle_buffer,
                                    image_keys=c.data.image_key, caption_key=c.data.caption_key,
                                    weights=c.data.train_weights, resampled=c.data.resampled,
                                    max_image_pixels=c.data.max_image_pixels, prefetch=c.data.prefetch,
                                    resume_state=resume_state, normalize_on_device=c.data.normalize_on_device)
        self.step_fn.normalize = loader.dataset.normalize  # None unless the batches come as uint8
        return loader

    def train_on(self, images: torch.Tensor, tokens: torch.Tensor) -> float:
        """One optimisation step on this rank's share of a global batch; returns this rank's loss."""
        loss = self.step_fn(images, tokens)
        with torch.no_grad():
            self.module.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.step += 1
        return loss

    def _global_mean(self, value: float) -> float:
        if not self.env.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.env.world_size

    def _global_skipped(self) -> dict:
        total: Counter[str] = Counter()
        for counts in _gather_objects(dict(self.skipped), self.env):
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

    def fit(self, until: int | None = None) -> None:
        """Train up to train.steps (or to step `until`, e.g. to run a schedule in slices)."""
        c = self.cfg
        last = c.train.steps if until is None else min(until, c.train.steps)
        logger = MetricsLogger(self.run_dir, c.train.steps, self.step, enabled=self.env.is_main,
                               progress=c.run.progress)
        if self.resumed_from is not None:
            logger.write(f"resumed from {self.resumed_from} at step {self.step}")
        self.engine.model.train()
        batches = iter(self._loader())
        keys_log = self._sample_keys_log()
        window_start, window_samples, losses = time.perf_counter(), 0, []
        try:
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
                    record = {
                        "loss": self._global_mean(float(np.mean(losses))),
                        "lr": self.engine.lr,
                        "logit_scale": self.module.logit_scale.exp().item(),
                        "samples_per_s": window_samples / max(elapsed, 1e-9),
                        "skipped": self._global_skipped(),
                    }
                    if self.device.type == "cuda":
                        record["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
                    logger.log(self.step, record)
                    self.throughput.add(window_samples, elapsed)
                    window_start, window_samples, losses = time.perf_counter(), 0, []
                if self.step % c.train.checkpoint_every == 0 and self.step < last:
                    self.save()
        finally:
            logger.close()
            if keys_log is not None:
                keys_log.close()
        self.save()

    # -- after training -----------------------------------------------------------------------------

    def final_model(self) -> torch.nn.Module | None:
        """The trained model in fp32 on rank 0 (None elsewhere). Collective under ZeRO-3."""
        if isinstance(self.engine, TorchEngine):
            return self.module if self.env.is_main else None
        state = self.engine.full_state_dict()
        if not self.env.is_main:
            return None
        model = create_model(self.model_name, device="cpu")
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.reshape(shapes[k]) for k, v in state.items()})  # 1-element -> 0-d scale
        # A consolidated fp32 weight file next to the DeepSpeed checkpoints: export and zeroshot read it.
        path = self.ckpt_dir / f"step_{self.step:08d}.fp32.pt"
        torch.save({"model": model.state_dict(), "step": self.step, "model_name": self.model_name,
                    "model_cfg": self.model_cfg, "config": config_to_dict(self.cfg)}, path)
        self.consolidated = path
        return model


def train(cfg: Config) -> dict:
    """Train, then (rank 0) evaluate zero-shot and export as configured; returns the run summary."""
    trainer = Trainer(cfg)
    started, start_step = time.perf_counter(), trainer.step
    try:
        trainer.fit()
        skipped = trainer._global_skipped()
        model = trainer.final_model()
        summary = {"steps": trainer.step, "start_step": start_step, "train_seconds": time.perf_counter() - started,
                   "model": trainer.model_name, "run_dir": str(trainer.run_dir),
                   "world_size": trainer.env.world_size,
                   "checkpoint": str(trainer.consolidated or trainer.last_checkpoint),
                   "skipped_samples": skipped,
                   "samples_per_s": trainer.throughput.samples_per_s}
        if trainer.device.type == "cuda":
            summary["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(trainer.device) / 2 ** 30
        if trainer.env.is_main:
            summary.update(_finish(trainer, model))
            (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if trainer.env.distributed:
            dist.barrier()
        return summary
    finally:
        cleanup()


def _finish(trainer: Trainer, model: torch.nn.Module) -> dict:
    cfg, out = trainer.cfg, {}
    model = model.to(trainer.device)
    if cfg.eval.zeroshot_at_end and trainer.data.zeroshot:
        zs = load_zeroshot_set(trainer.data.zeroshot)
        metrics = evaluate_zeroshot(model, trainer.tokenizer, trainer.val_transform, zs,
                                    batch_size=cfg.eval.batch_size, workers=min(1, cfg.data.workers),
                                    device=trainer.device)
        metrics["num_classes"] = len(zs.classnames)
        metrics["chance_acc1"] = 1.0 / len(zs.classnames)
        path = trainer.run_dir / "zeroshot.json"
        write_result(path, metrics, zs.name, trainer.model_name,
                     str(trainer.consolidated or trainer.last_checkpoint))
        out["zeroshot"] = {**metrics, "result_file": str(path)}
    if cfg.export.at_end:
        if cfg.export.format != "open_clip":
            raise ValueError(f"export.format={cfg.export.format!r} is not supported (available: open_clip)")
        files = export_open_clip(model, trainer.model_name, trainer.model_cfg, trainer.run_dir / "export")
        out["export"] = {k: str(v) for k, v in files.items()}
    return out
