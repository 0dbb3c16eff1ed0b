"""A training run: train -> evaluate -> export -> summary. What `clipkit train` runs.

    from clipkit.config import load_config
    from clipkit.run import run
    summary = run(load_config("my.yaml", ["train.steps=200"]))

Training knows nothing of evaluation or export; this layer composes them on the weights of the run's
final checkpoint (read back from disk, so what is evaluated and exported is what was saved).

A run stopped by SIGTERM/SIGUSR1 (pre-emption, see clipkit.training.trainer) returns a summary with
"stopped": {"signal", "step"} and its checkpoint, unevaluated and unexported; `clipkit train` then exits
with status 75 (EXIT_PREEMPTED). The stall watchdog lives inside Trainer.fit() and has stopped before the
final evaluation and export here, which may take as long as they need.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .config import Config
from .data import ensure_synth_dataset
from .extras import check_config
from .distributed import DistEnv, cleanup, init_distributed
from .evaluation import (
    RetrievalSet,
    ZeroShotSet,
    evaluate_retrieval,
    evaluate_zeroshot,
    load_retrieval_set,
    load_zeroshot_set,
    write_result,
)
from .export import EXPORT_FORMATS, tokenizer_kwargs
from .models import create_model, load_model
from .report import write_report
from .training import Trainer


@dataclass
class HeldOut:
    """The held-out sets a run evaluates on (None: not evaluated)."""

    zeroshot: ZeroShotSet | None = None
    retrieval: RetrievalSet | None = None


def resolve_data(cfg: Config, env: DistEnv) -> tuple[Config, HeldOut]:
    """(cfg with data.train filled in, the held-out sets). The built-in set is written (rank 0, first use
    only) when the run trains on it, and its held-out splits are evaluated; a run on its own shards
    evaluates only on the sets it names. The sets are read here, so a bad one fails before training."""
    d, zeroshot, retrieval = cfg.data, cfg.data.zeroshot, cfg.data.retrieval
    if d.train is None:
        s = d.synth
        params = dict(train_samples=s.train_samples, eval_samples=s.eval_samples,
                      samples_per_shard=s.samples_per_shard, image_size=s.image_size, seed=s.seed,
                      downstream_train_samples=s.downstream_train_samples,
                      downstream_test_samples=s.downstream_test_samples)
        if env.is_main:
            ensure_synth_dataset(s.out, **params)
        if env.distributed:
            dist.barrier()
        synth = ensure_synth_dataset(s.out, **params)  # present now: only reads the manifest
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(d, train=synth.train_spec))
        zeroshot = zeroshot if zeroshot is not None else str(synth.eval_root)
        retrieval = retrieval if retrieval is not None else str(synth.retrieval_root)
    wanted = cfg.eval.every > 0
    return cfg, HeldOut(
        load_zeroshot_set(zeroshot) if zeroshot and (wanted or cfg.eval.zeroshot_at_end) else None,
        load_retrieval_set(retrieval) if retrieval and (wanted or cfg.eval.retrieval_at_end) else None)


def run(cfg: Config) -> dict:
    """Train, then (rank 0) evaluate and export as configured; returns the run summary."""
    check_config(cfg)
    env = init_distributed(timeout_s=cfg.dist.timeout_s)
    try:
        cfg, held_out = resolve_data(cfg, env)
        trainer = Trainer(cfg, env)
        started, start_step = time.perf_counter(), trainer.step
        periodic = PeriodicEval(cfg, trainer, held_out) if cfg.eval.every else None
        checkpoint = trainer.fit(after_step=periodic)
        summary = {"steps": trainer.step, "start_step": start_step, "train_seconds": time.perf_counter() - started,
                   "model": trainer.model_name, "run_dir": str(trainer.run_dir), "world_size": env.world_size,
                   "checkpoint": str(checkpoint), "skipped_samples": trainer.global_skipped(),
                   "nonfinite_steps": trainer.nonfinite.total, "samples_per_s": trainer.throughput.samples_per_s}
        if trainer.pretrained is not None:
            summary["pretrained"] = trainer.pretrained
        if trainer.stopped_by is not None:
            summary["stopped"] = {"signal": trainer.stopped_by, "step": trainer.step}
        if env.device.type == "cuda":
            summary["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(env.device) / 2 ** 30
        if env.is_main and trainer.stopped_by is None:
            summary.update(evaluate_and_export(cfg, checkpoint, held_out, env.device))
        if env.is_main:
            (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            if cfg.run.report:
                summary["report"] = str(write_report(trainer.run_dir))
        if env.distributed:
            dist.barrier()
        return summary
    finally:
        cleanup()


def evaluate(model, tokenizer, transform, held_out: HeldOut, cfg: Config, device, workers: int) -> dict:
    """{"zeroshot": metrics, "retrieval": metrics} for the held-out sets present."""
    out = {}
    if held_out.zeroshot is not None:
        zs = held_out.zeroshot
        out["zeroshot"] = {**evaluate_zeroshot(model, tokenizer, transform, zs, batch_size=cfg.eval.batch_size,
                                               workers=workers, device=device),
                           "num_classes": len(zs.classnames), "chance_acc1": 1.0 / len(zs.classnames)}
    if held_out.retrieval is not None:
        out["retrieval"] = evaluate_retrieval(model, tokenizer, transform, held_out.retrieval,
                                              batch_size=cfg.eval.batch_size, device=device, workers=workers)
    return out


class PeriodicEval:
    """Evaluation every eval.every steps during training, on every engine.

    Rank 0 evaluates a plain copy of the model loaded with the engine's full fp32 weights, which under
    ZeRO-3 every rank helps gather; no rank runs a collective the others do not, so none can wait on
    another forever (the deadlock of evaluating a sharded or DDP-wrapped model on one rank)."""

    def __init__(self, cfg: Config, trainer: Trainer, held_out: HeldOut) -> None:
        self.cfg, self.trainer, self.held_out = cfg, trainer, held_out
        self.model = None

    def __call__(self, step: int) -> dict | None:
        if step % self.cfg.eval.every or (self.held_out.zeroshot is None and self.held_out.retrieval is None):
            return None
        trainer = self.trainer
        state = trainer.engine.full_state_dict()  # collective under ZeRO-3: every rank is here
        if not trainer.env.is_main:
            return None
        if self.model is None:
            self.model = create_model(trainer.build_name, device=trainer.device)
        shapes = {k: v.shape for k, v in self.model.state_dict().items()}
        self.model.load_state_dict({k: v.reshape(shapes[k]) for k, v in state.items()})
        results = evaluate(self.model, trainer.tokenizer, trainer.val_transform, self.held_out, self.cfg,
                           trainer.device, workers=0)
        return {f"{task}_{name}": value for task, metrics in results.items() for name, value in metrics.items()
                if not name.startswith("num_") and name != "chance_acc1"}


def evaluate_and_export(cfg: Config, checkpoint: Path, held_out: HeldOut, device: torch.device) -> dict:
    """The final checkpoint evaluated and exported, with the tokenizer it carries (a pretrained source's own)."""
    run_dir, out = Path(cfg.run.dir), {}
    loaded = load_model(checkpoint, device=device)
    at_end = HeldOut(held_out.zeroshot if cfg.eval.zeroshot_at_end else None,
                     held_out.retrieval if cfg.eval.retrieval_at_end else None)
    results = evaluate(loaded.model, loaded.tokenizer, loaded.eval_transform, at_end, cfg, device,
                       workers=min(1, cfg.data.workers))
    for task, metrics in results.items():
        data = getattr(at_end, task)
        path = run_dir / f"{task}.json"
        write_result(path, metrics, data.name, loaded.model_name, str(checkpoint),
                     task="zeroshot_classification" if task == "zeroshot" else "zeroshot_retrieval")
        out[task] = {**metrics, "result_file": str(path)}
    if cfg.export.at_end:
        files = EXPORT_FORMATS[cfg.export.format](loaded.model.cpu(), loaded.model_name, loaded.model_cfg,
                                                  run_dir / "export",
                                                  **tokenizer_kwargs(cfg.export.format, loaded.tokenizer_files))
        out["export"] = {k: str(v) for k, v in files.items()}
        out["export_format"] = cfg.export.format
    return out
