"""A training run: train -> evaluate -> export -> summary. What `clipkit train` runs.

    from clipkit.config import load_config
    from clipkit.run import run
    summary = run(load_config("my.yaml", ["train.steps=200"]))

Training knows nothing of evaluation or export; this layer composes them on the weights of the run's
final checkpoint (read back from disk, so what is evaluated and exported is what was saved).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .config import Config
from .data import ensure_synth_dataset
from .distributed import DistEnv, cleanup, init_distributed
from .evaluation import ZeroShotSet, evaluate_zeroshot, load_zeroshot_set, write_result
from .export import EXPORT_FORMATS
from .models import create_transforms, get_tokenizer, load_model
from .training import Trainer


def resolve_data(cfg: Config, env: DistEnv) -> tuple[Config, str | None]:
    """(cfg with data.train filled in, the zero-shot root or None). The built-in set is written (rank 0,
    first use only) when the run trains on it; a run on its own shards evaluates zero-shot only on a set
    it names."""
    zeroshot = cfg.data.zeroshot
    if cfg.data.train is not None:
        return cfg, zeroshot
    s = cfg.data.synth
    params = dict(train_samples=s.train_samples, eval_samples=s.eval_samples, samples_per_shard=s.samples_per_shard,
                  image_size=s.image_size, seed=s.seed)
    if env.is_main:
        ensure_synth_dataset(s.out, **params)
    if env.distributed:
        dist.barrier()
    synth = ensure_synth_dataset(s.out, **params)  # present now: only reads the manifest
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=synth.train_spec))
    return cfg, zeroshot if zeroshot is not None else str(synth.eval_root)


def run(cfg: Config) -> dict:
    """Train, then (rank 0) evaluate zero-shot and export as configured; returns the run summary."""
    env = init_distributed()
    try:
        cfg, zeroshot = resolve_data(cfg, env)
        zs = load_zeroshot_set(zeroshot) if cfg.eval.zeroshot_at_end and zeroshot else None  # fails before training
        trainer = Trainer(cfg, env)
        started, start_step = time.perf_counter(), trainer.step
        checkpoint = trainer.fit()
        summary = {"steps": trainer.step, "start_step": start_step, "train_seconds": time.perf_counter() - started,
                   "model": trainer.model_name, "run_dir": str(trainer.run_dir), "world_size": env.world_size,
                   "checkpoint": str(checkpoint), "skipped_samples": trainer.global_skipped(),
                   "samples_per_s": trainer.throughput.samples_per_s}
        if env.device.type == "cuda":
            summary["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(env.device) / 2 ** 30
        if env.is_main:
            summary.update(evaluate_and_export(cfg, checkpoint, zs, env.device))
            (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if env.distributed:
            dist.barrier()
        return summary
    finally:
        cleanup()


def evaluate_and_export(cfg: Config, checkpoint: Path, zs: ZeroShotSet | None, device: torch.device) -> dict:
    run_dir, out = Path(cfg.run.dir), {}
    loaded = load_model(checkpoint, device=device)
    if zs is not None:
        _, val_transform = create_transforms(loaded.model)
        metrics = evaluate_zeroshot(loaded.model, get_tokenizer(loaded.name), val_transform, zs,
                                    batch_size=cfg.eval.batch_size, workers=min(1, cfg.data.workers), device=device)
        metrics["num_classes"] = len(zs.classnames)
        metrics["chance_acc1"] = 1.0 / len(zs.classnames)
        path = run_dir / "zeroshot.json"
        write_result(path, metrics, zs.name, loaded.model_name, str(checkpoint))
        out["zeroshot"] = {**metrics, "result_file": str(path)}
    if cfg.export.at_end:
        files = EXPORT_FORMATS[cfg.export.format](loaded.model.cpu(), loaded.model_name, loaded.model_cfg,
                                                  run_dir / "export")
        out["export"] = {k: str(v) for k, v in files.items()}
    return out
