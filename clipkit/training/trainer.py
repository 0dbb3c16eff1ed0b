"""The training loop: composes data, model, loss, optimizer, checkpoints and metrics.

    from clipkit.config import load_config
    from clipkit.training import train
    summary = train(load_config("my.yaml", ["train.steps=200"]))
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

from ..config import Config, config_to_dict, save_config
from ..data import build_train_loader, ensure_synth_dataset
from ..distributed import DistEnv, cleanup, init_distributed
from ..evaluation import evaluate_zeroshot, load_zeroshot_set, write_result
from ..export import export_open_clip
from ..losses import InfoNCELoss
from ..models import create_model, create_transforms, get_model_config, get_tokenizer
from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .metrics import MetricsLogger
from .optim import build_optimizer, build_scheduler

MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class DataSources:
    train: str
    zeroshot: str | None


def resolve_data(cfg: Config, env: DistEnv) -> DataSources:
    """The shard spec and zero-shot root to use; the built-in set is written on first use."""
    train, zeroshot = cfg.data.train, cfg.data.zeroshot
    if train is None or zeroshot is None:
        s = cfg.data.synth
        params = dict(train_samples=s.train_samples, eval_samples=s.eval_samples,
                      samples_per_shard=s.samples_per_shard, image_size=s.image_size, seed=s.seed)
        if env.is_main:
            synth = ensure_synth_dataset(s.out, **params)
        if env.distributed:
            torch.distributed.barrier()
        if not env.is_main:
            synth = ensure_synth_dataset(s.out, **params)  # now present: only reads the manifest
        train = train if train is not None else synth.train_spec
        zeroshot = zeroshot if zeroshot is not None else str(synth.eval_root)
    return DataSources(train, zeroshot)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.env = init_distributed()
        if cfg.train.batch_size % self.env.world_size:
            raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                             f"{self.env.world_size} ranks")
        self.local_batch = cfg.train.batch_size // self.env.world_size
        self.device = self.env.device
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        seed_everything(cfg.run.seed + self.env.rank)

        self.model_name = cfg.model.name
        self.model_cfg = get_model_config(cfg.model.name)
        self.model = create_model(cfg.model.name, device=self.device)
        self.train_transform, self.val_transform = create_transforms(self.model)
        self.tokenizer = get_tokenizer(cfg.model.name)
        self.loss_fn = InfoNCELoss()
        t = cfg.train
        self.optimizer = build_optimizer(self.model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
        self.scheduler = build_scheduler(self.optimizer, t.warmup_steps, t.steps)
        self.step = 0
        self.skipped: Counter[str] = Counter()
        self.resumed_from: Path | None = None
        self._maybe_resume()
        self.data = resolve_data(cfg, self.env)

    # -- checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "rng": rng_state(),
            "skipped": dict(self.skipped),
            "config": config_to_dict(self.cfg),
            "model_name": self.model_name,
            "model_cfg": self.model_cfg,
        }

    def save(self) -> Path | None:
        if not self.env.is_main:
            return None
        return save_checkpoint(self.state_dict(), self.ckpt_dir, self.step, keep=self.cfg.train.keep_checkpoints)

    def _maybe_resume(self) -> None:
        resume = self.cfg.train.resume
        if resume is None:
            return
        if resume == "latest":
            path = latest_checkpoint(self.ckpt_dir)
            if path is None:  # nothing to continue yet: a fresh start, as OpenCLIP's --resume latest
                return
        else:
            path = Path(resume)
        state = load_checkpoint(path)
        if state["model_cfg"] != self.model_cfg:
            raise CheckpointError(f"checkpoint {path} holds architecture {state['model_name']}, which differs "
                                  f"from model.name={self.model_name}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.skipped.update(state.get("skipped", {}))
        set_rng_state(state["rng"])
        self.resumed_from = path

    # -- the loop -----------------------------------------------------------------------------------

    def _loader(self):
        c = self.cfg
        # A resumed run reshuffles with a seed of its own, so it does not replay the first batches.
        return build_train_loader(self.data.train, self.train_transform, self.tokenizer, self.local_batch,
                                  rank=self.env.rank, world_size=self.env.world_size, workers=c.data.workers,
                                  seed=c.run.seed + self.step, shuffle_buffer=c.data.shuffle_buffer,
                                  image_keys=c.data.image_key, caption_key=c.data.caption_key)

    def train_step(self, images: torch.Tensor, tokens: torch.Tensor) -> float:
        out = self.model(images.to(self.device, non_blocking=True), tokens.to(self.device, non_blocking=True))
        loss = self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return loss.item()

    def fit(self, until: int | None = None) -> None:
        """Train up to train.steps (or to step `until`, e.g. to run a schedule in slices)."""
        c = self.cfg
        last = c.train.steps if until is None else min(until, c.train.steps)
        logger = MetricsLogger(self.run_dir, c.train.steps, self.step, enabled=self.env.is_main,
                               progress=c.run.progress)
        if self.resumed_from is not None:
            logger.write(f"resumed from {self.resumed_from} at step {self.step}")
        self.model.train()
        batches = iter(self._loader())
        window_start, window_samples, losses = time.perf_counter(), 0, []
        try:
            while self.step < last:
                batch = next(batches)
                self.skipped.update(batch.skipped)
                losses.append(self.train_step(batch.images, batch.targets))
                self.step += 1
                window_samples += batch.images.shape[0] * self.env.world_size
                logger.advance()
                if self.step % c.run.log_every == 0 or self.step == last:
                    elapsed = time.perf_counter() - window_start
                    logger.log(self.step, {
                        "loss": float(np.mean(losses)),
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "logit_scale": self.model.logit_scale.exp().item(),
                        "samples_per_s": window_samples / max(elapsed, 1e-9),
                        "skipped": dict(self.skipped),
                    })
                    window_start, window_samples, losses = time.perf_counter(), 0, []
                if self.step % c.train.checkpoint_every == 0 and self.step < last:
                    self.save()
        finally:
            logger.close()
        self.last_checkpoint = self.save()


def train(cfg: Config) -> dict:
    """Train, then (rank 0) evaluate zero-shot and export as configured; returns the run summary."""
    trainer = Trainer(cfg)
    started = time.perf_counter()
    try:
        trainer.fit()
        summary = {"steps": trainer.step, "train_seconds": time.perf_counter() - started,
                   "model": trainer.model_name, "run_dir": str(trainer.run_dir),
                   "checkpoint": str(trainer.last_checkpoint) if trainer.last_checkpoint else None,
                   "skipped_samples": dict(trainer.skipped)}
        if trainer.env.is_main:
            summary.update(_finish(trainer))
            (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        cleanup()


def _finish(trainer: Trainer) -> dict:
    cfg, out = trainer.cfg, {}
    if cfg.eval.zeroshot_at_end and trainer.data.zeroshot:
        zs = load_zeroshot_set(trainer.data.zeroshot)
        metrics = evaluate_zeroshot(trainer.model, trainer.tokenizer, trainer.val_transform, zs,
                                    batch_size=cfg.eval.batch_size, workers=min(1, cfg.data.workers),
                                    device=trainer.device)
        metrics["num_classes"] = len(zs.classnames)
        metrics["chance_acc1"] = 1.0 / len(zs.classnames)
        path = trainer.run_dir / "zeroshot.json"
        write_result(path, metrics, zs.name, trainer.model_name, str(trainer.last_checkpoint))
        out["zeroshot"] = {**metrics, "result_file": str(path)}
    if cfg.export.at_end:
        if cfg.export.format != "open_clip":
            raise ValueError(f"export.format={cfg.export.format!r} is not supported (available: open_clip)")
        files = export_open_clip(trainer.model, trainer.model_name, trainer.model_cfg, trainer.run_dir / "export")
        out["export"] = {k: str(v) for k, v in files.items()}
    return out
