"""finetune.lr=auto: the LR chosen on the validation split, as the linear probe chooses its C.

    choice = search_lr(build, train, val, num_classes, cfg, ...)   # {"lr", "head_lr", "trials": [...]}

Each LR of finetune.lr_search.lrs trains a fresh model (build(), from the same seed) for lr_search.steps
optimizer steps, with the run's own batch size, augmentation and head-LR ratio; its val acc1 after them decides
(ties: the lower val loss, then the smaller LR). The test split is never given to the search.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.distributed as dist

from ..config import FinetuneConfig, parse_lrs
from ..distributed import DistEnv
from ..training.metrics import MetricsLogger
from .model import ImageClassifier
from .train import Plan, fit

log = logging.getLogger("clipkit.finetune")


def head_lr_for(cfg: FinetuneConfig, lr: float) -> float:
    """The head's LR: finetune.head_lr when set, else lr times finetune.head_lr_ratio."""
    return cfg.head_lr if cfg.head_lr is not None else lr * cfg.head_lr_ratio


def _rank(trial: dict) -> tuple:
    """Sort key, best first: higher val acc1, then lower val loss (a diverged trial's NaN counts as worst),
    then the smaller LR."""
    loss = trial["val_loss"]
    return (-trial["val_acc1"], math.inf if math.isnan(loss) else loss, trial["lr"])


def search_lr(build: Callable[[], ImageClassifier], train_samples, val_samples, num_classes: int,
              cfg: FinetuneConfig, *, env: DistEnv, transforms, seed: int, workers: int, eval_batch_size: int,
              run_dir, objective=None) -> dict:
    """Try every LR of the grid on train, judge it on val; every rank returns the same choice."""
    quiet = MetricsLogger(run_dir, total_steps=0, enabled=False, progress=False)
    trials = []
    for lr in parse_lrs(cfg.lr_search.lrs):
        torch.manual_seed(seed)  # every trial starts from the same state: the LR is all that differs
        model = build()
        fitted = fit(model, train_samples, val_samples, num_classes, cfg, plan=Plan.for_trial(cfg, cfg.lr_search.steps),
                     lr=lr, head_lr=head_lr_for(cfg, lr), env=env, transforms=transforms, seed=seed, workers=workers,
                     eval_batch_size=eval_batch_size, logger=quiet, objective=objective)
        if env.is_main:
            val = fitted.history[-1]["val"]
            trials.append({"lr": lr, "head_lr": head_lr_for(cfg, lr), "steps": fitted.steps,
                           "val_acc1": val["acc1"], "val_loss": val["loss"]})
        del model, fitted
    chosen = [min(trials, key=_rank)["lr"] if trials else None]
    if env.distributed:
        dist.broadcast_object_list(chosen, src=0)
    grid = parse_lrs(cfg.lr_search.lrs)
    at_edge = len(grid) > 1 and chosen[0] in (min(grid), max(grid))
    if at_edge and env.is_main:  # the best may lie beyond the grid: say so, the figures are in result.json
        log.warning("the LR search chose %g, at the edge of finetune.lr_search.lrs (%s): a wider grid may do better",
                    chosen[0], cfg.lr_search.lrs)
    return {"lr": chosen[0], "head_lr": head_lr_for(cfg, chosen[0]), "at_edge": at_edge, "trials": trials}
