"""The fine-tuning loop: an objective (cross-entropy on the classifier's logits; FLYP's contrastive loss, see
flyp.py), AdamW with warmup + cosine, validation every `val_every` optimizer steps, early stopping on val acc1
after `patience_steps` steps without a better one (never before warm-up and `min_steps` have run), the best
weights kept. Every length is in optimizer steps, so a set
of 300 images (5 steps an epoch) gets the same schedule as a large one. Runs in one process or under
torchrun (DDP: each rank takes its slice of every global batch, so the update equals the single-process one).

Rank 0 validates (the others wait for its verdict), so no rank runs a collective that another does not."""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import FinetuneConfig
from ..distributed import DistEnv
from ..evaluation import classification_metrics
from ..models import eval_mode
from ..training.metrics import MetricsLogger
from ..training.optim import build_scheduler
from .data import eval_loader, train_loader
from .model import ImageClassifier, optimizer_groups

log = logging.getLogger("clipkit.finetune")


class EarlyStopping:
    """Stop once `patience` steps have passed since the best validation score (0: never stop early), but never
    before step `earliest` (the end of warm-up plus the minimum steps: a model still warming up has not shown
    what its LR does)."""

    def __init__(self, patience: int, earliest: int = 0) -> None:
        self.patience, self.earliest = patience, earliest
        self.best = -math.inf
        self.best_step = 0

    def update(self, score: float, step: int) -> bool:
        """Record the validation score at this step; True when it is the best so far."""
        if score > self.best:
            self.best, self.best_step = score, step
            return True
        return False

    def should_stop(self, step: int) -> bool:
        return self.patience > 0 and step >= self.earliest and step - self.best_step >= self.patience


@dataclass(frozen=True)
class Plan:
    """One training run's lengths, in optimizer steps."""

    total: int
    warmup: int
    val_every: int
    patience: int  # steps without a better val acc1 that end the run (0: never)
    earliest_stop: int  # no early stop before this step

    @classmethod
    def for_run(cls, cfg: FinetuneConfig, steps_per_epoch: int) -> "Plan":
        """cfg.epochs passes over train, but at least warm-up + min_steps (a small set trains more epochs)."""
        earliest = cfg.warmup_steps + cfg.min_steps
        return cls(total=max(cfg.epochs * steps_per_epoch, earliest), warmup=cfg.warmup_steps,
                   val_every=cfg.val_every, patience=cfg.patience_steps, earliest_stop=earliest)

    @classmethod
    def for_trial(cls, cfg: FinetuneConfig, steps: int) -> "Plan":
        """An LR search trial: `steps` steps, a quarter of them (at most warmup_steps) warming up, validated once
        at the end, never stopped early."""
        return cls(total=steps, warmup=min(cfg.warmup_steps, steps // 4), val_every=steps, patience=0,
                   earliest_stop=steps)


class CrossEntropy:
    """The classifier's objective: cross-entropy on its logits. fit() calls forward under autocast, loss outside
    it, after_step after every optimizer step and prepare_eval before every validation (FLYP's objective,
    flyp.FlypObjective, uses the last two to clamp its temperature and rebuild its head)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def forward(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, keys: list[str], epoch: int):
        return model(images)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)

    def after_step(self, model: nn.Module) -> None:
        pass

    def prepare_eval(self, model: nn.Module) -> None:
        pass


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]  # the weights at the best validation (CPU copies)
    best_step: int
    best_epoch: int
    best_val: dict
    epochs_run: int  # epochs begun
    stopped_early: bool
    steps: int
    # per validation: {"step", "epoch", "loss" (mean training loss since the previous one), "val": metrics}
    history: list[dict] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)


def steps_per_epoch(train_samples, cfg: FinetuneConfig, env: DistEnv, seed: int) -> int:
    return len(train_loader(train_samples, None, global_batch_size=cfg.global_batch_size, rank=env.rank,
                            world_size=env.world_size, seed=seed, epoch=0, workers=0))


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict(model: nn.Module, samples, transform, *, batch_size: int, workers: int, device: torch.device,
            precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """(logits [N, classes], labels [N], skipped counts) over the samples, in order, in eval mode."""
    logits, labels, skipped = [], [], {}
    with eval_mode(model):
        for batch in eval_loader(samples, transform, batch_size=batch_size, workers=workers):
            for reason, n in batch.skipped.items():
                skipped[reason] = skipped.get(reason, 0) + n
            if not batch.keys:
                continue
            with autocast(device, precision):
                out = model(batch.images.to(device))
            logits.append(out.float().cpu())
            labels.append(batch.targets)
    if not labels:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), skipped
    return torch.cat(logits), torch.cat(labels), skipped


def evaluate(model: nn.Module, samples, transform, num_classes: int, **kwargs) -> dict:
    """CLIP_benchmark's classification metrics (acc1, acc5, mean_per_class_recall, num_samples)."""
    logits, labels, skipped = predict(model, samples, transform, **kwargs)
    metrics = classification_metrics(logits, labels, num_classes)
    # mean cross-entropy (no label smoothing): the LR search's tie-break between equal accuracies
    metrics["loss"] = F.cross_entropy(logits, labels).item() if len(labels) else float("nan")
    if skipped:
        metrics["skipped"] = skipped
    return metrics


def _global_mean(value, env: DistEnv) -> float:
    """The mean over the ranks of a per-rank mean (every rank's slice of a global batch is the same size), so
    the logged loss is the global batch's, as in one process. A collective: every rank calls it."""
    value = torch.as_tensor(value, dtype=torch.float64)
    if env.distributed:
        value = value.to(env.device)
        dist.all_reduce(value)
        value = value / env.world_size
    return value.item()


def _merge_counts(total: dict[str, int], new: dict[str, int]) -> None:
    for k, v in new.items():
        total[k] = total.get(k, 0) + v


def fit(model: ImageClassifier, train_samples, val_samples, num_classes: int, cfg: FinetuneConfig, *,
        plan: Plan, lr: float, head_lr: float, env: DistEnv, transforms, seed: int, workers: int,
        eval_batch_size: int, logger: MetricsLogger, log_every: int = 10, objective=None) -> FitResult:
    """Train the model's trainable parameters for plan.total steps (fewer when early stopping ends it); returns
    the best weights by val acc1 (the model is left at its last weights). transforms: (train, eval). objective:
    what a step minimises (default: CrossEntropy with cfg.label_smoothing)."""
    device = env.device
    objective = objective if objective is not None else CrossEntropy(cfg.label_smoothing)
    train_tf, eval_tf = transforms
    model.to(device)
    groups = optimizer_groups(model, lr, head_lr, cfg.weight_decay, cfg.layer_decay)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    scheduler = build_scheduler(optimizer, plan.warmup, plan.total)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    wrapped = model
    if env.distributed:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    stopper = EarlyStopping(plan.patience, plan.earliest_stop)
    result = FitResult({}, -1, -1, {}, 0, False, 0)
    step, epoch, stop = 0, 0, False
    loss_sum, loss_n = torch.zeros((), dtype=torch.float64, device=device), 0
    while step < plan.total and not stop:
        wrapped.train()
        loader = train_loader(train_samples, train_tf if cfg.augment else eval_tf,
                              global_batch_size=cfg.global_batch_size, rank=env.rank, world_size=env.world_size,
                              seed=seed, epoch=epoch, workers=workers)
        result.epochs_run, epoch_start = epoch + 1, step
        for batch in loader:
            _merge_counts(result.skipped, batch.skipped)
            weight, keys = 1.0, batch.keys
            if batch.keys:
                images, targets = batch.images.to(device), batch.targets.to(device)
            elif env.distributed:  # nothing in this rank's slice decoded: a zero-weight step keeps the ranks in step
                size = model.clip.visual.image_size
                images = torch.zeros(1, 3, *(size if isinstance(size, tuple) else (size, size)), device=device)
                targets, weight, keys = torch.zeros(1, dtype=torch.long, device=device), 0.0, [""]
            else:
                continue
            with autocast(device, cfg.precision):
                out = objective.forward(wrapped, images, targets, keys, epoch)
            loss = weight * objective.loss(out, targets)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            objective.after_step(model)
            scheduler.step()
            step += 1
            result.steps = step
            loss_sum, loss_n = loss_sum + loss.detach(), loss_n + 1
            logger.advance()
            if step % log_every == 0:
                logger.log(step, {"loss": _global_mean(loss.detach(), env), "lr": optimizer.param_groups[0]["lr"],
                                  "epoch": epoch})
            if step % plan.val_every == 0 or step == plan.total:
                train_loss = _global_mean(loss_sum / max(1, loss_n), env) if loss_n else float("nan")
                loss_sum, loss_n = torch.zeros_like(loss_sum), 0
                stop = _validate(model, val_samples, num_classes, cfg, stopper, result, step=step, epoch=epoch,
                                 train_loss=train_loss, env=env, eval_tf=eval_tf, workers=workers,
                                 eval_batch_size=eval_batch_size, logger=logger, objective=objective)
                wrapped.train()
            if stop or step == plan.total:
                break
        if step == epoch_start:  # no image of a whole epoch decoded: another pass would not either
            break
        epoch += 1
    result.stopped_early = stop and step < plan.total
    return result


def _validate(model: ImageClassifier, val_samples, num_classes: int, cfg: FinetuneConfig, stopper: EarlyStopping,
              result: FitResult, *, step: int, epoch: int, train_loss: float, env: DistEnv, eval_tf, workers: int,
              eval_batch_size: int, logger: MetricsLogger, objective) -> bool:
    """Rank 0 validates, keeps the best weights and decides whether to stop; every rank gets the verdict."""
    stop = False
    if env.is_main:
        objective.prepare_eval(model)
        val = evaluate(model, val_samples, eval_tf, num_classes, batch_size=eval_batch_size, workers=workers,
                       device=env.device, precision=cfg.precision)
        improved = stopper.update(val["acc1"], step)
        if improved:
            result.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            result.best_step, result.best_epoch, result.best_val = step, epoch, val
        result.history.append({"step": step, "epoch": epoch, "loss": train_loss, "val": val})
        logger.log(step, {"train_loss": train_loss, "val": {k: v for k, v in val.items() if isinstance(v, float)}})
        logger.write(f"step {step} (epoch {epoch}): loss {train_loss:.4f}, val acc1 {val['acc1']:.4f}"
                     f"{' (best)' if improved else ''}")
        stop = stopper.should_stop(step)
    if env.distributed:
        flag = [stop]
        dist.broadcast_object_list(flag, src=0)
        stop = flag[0]
    return stop
