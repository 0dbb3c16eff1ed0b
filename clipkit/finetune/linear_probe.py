"""Linear probe: logistic regression on frozen, cached image features (CLIP paper / CLIP_benchmark protocol).

    train, val, test = (extract_features(model, batches, device) for batches in splits)  # or load_features
    result = linear_probe(train, val, test, num_classes, cfg.linear_probe)
    result.best_C, result.val["acc1"], result.test["acc1"], result.classifier.logits(features)

The classifier is scikit-learn's LogisticRegression(C=C) with its default L2 penalty and lbfgs solver, the
objective minimised exactly (scikit-learn >= 1.5, see ``fit_logistic``), solved full-batch in float64 by
torch's L-BFGS, so it runs where the features are (CPU or GPU). C is chosen on val from a log grid, the
classifier is then refitted on train+val at that C and evaluated on test.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_path
from ..config import LinearProbeConfig
from ..errors import UserError
from ..evaluation import classification_metrics
from ..models import eval_mode

log = logging.getLogger("clipkit.finetune")

# The header entry that marks a features file; the caller's meta is stored beside it.
_FORMAT_KEY = "clipkit_features_format"
_FORMAT_VERSION = "1"


@dataclass
class Features:
    features: torch.Tensor  # [N, D] float32, L2-normalised image embeddings
    labels: torch.Tensor  # [N] int64
    keys: list[str]

    def __len__(self) -> int:
        return int(self.labels.numel())


# ---------------------------------------------------------------------------------------------------------
# Features: extraction and cache


@torch.no_grad()
def extract_features(model, batches: Iterable, device: torch.device | str) -> Features:
    """The L2-normalised image embeddings of every sample of ``batches`` (clipkit.data.Batch, with
    class indices as targets), in order, on the CPU. The model runs in eval mode and is then put back in its
    own mode."""
    feats, labels, keys, skipped = [], [], [], {}
    with eval_mode(model):
        for batch in batches:
            for reason, n in (batch.skipped or {}).items():
                skipped[reason] = skipped.get(reason, 0) + n
            if not batch.keys:
                continue
            emb = model.encode_image(batch.images.to(device))
            feats.append(F.normalize(emb.float(), dim=-1).cpu())
            labels.append(torch.as_tensor(batch.targets, dtype=torch.int64).reshape(-1).cpu())
            keys.extend(batch.keys)
    if skipped:
        log.warning("feature extraction skipped unreadable samples: %s",
                    ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
    if not feats:
        raise UserError("no readable samples to extract features from")
    out = Features(torch.cat(feats), torch.cat(labels), keys)
    if out.features.shape[0] != out.labels.shape[0] or len(keys) != out.labels.shape[0]:
        raise UserError(f"batches hold {out.features.shape[0]} images, {out.labels.shape[0]} labels and "
                        f"{len(keys)} keys: each image needs one class index and one key")
    return out


def _header(meta: dict) -> dict[str, str]:
    header = {str(k): str(v) for k, v in meta.items()}
    if _FORMAT_KEY in header:
        raise ValueError(f"meta key {_FORMAT_KEY!r} is reserved")
    return header


def save_features(feats: Features, path: str | Path, meta: dict) -> None:
    """Write ``feats`` to a safetensors file with ``meta`` (str -> str) in its header; atomically, so an
    interrupted write never leaves a cache that loads."""
    from safetensors.torch import save_file

    header = _header(meta)
    header[_FORMAT_KEY] = _FORMAT_VERSION
    encoded = [k.encode("utf-8") for k in feats.keys]
    offsets = torch.zeros(len(encoded) + 1, dtype=torch.int64)
    if encoded:
        offsets[1:] = torch.cumsum(torch.tensor([len(b) for b in encoded], dtype=torch.int64), 0)
    blob = b"".join(encoded)
    tensors = {
        "features": feats.features.detach().to("cpu", torch.float32).contiguous(),
        "labels": feats.labels.detach().to("cpu", torch.int64).contiguous(),
        "key_offsets": offsets,
        "key_bytes": torch.from_numpy(np.frombuffer(blob, dtype=np.uint8).copy()),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=header)


def load_features(path: str | Path, meta: dict) -> Features | None:
    """The features saved at ``path`` with exactly this ``meta``; None when there is no such file, its meta
    differs (a stale cache) or it cannot be read (then it is recomputed and overwritten)."""
    from safetensors import safe_open

    path = Path(path)
    want = _header(meta)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            if header.pop(_FORMAT_KEY, None) != _FORMAT_VERSION:
                log.warning("%s is not a clipkit features file: recomputing it", path)
                return None
            if header != want:
                log.info("cached features %s were made with other settings: recomputing them", path)
                return None
            tensors = {name: f.get_tensor(name) for name in ("features", "labels", "key_offsets", "key_bytes")}
    except Exception as e:  # a truncated or foreign file: a cache miss
        log.warning("cannot read cached features %s (%s): recomputing them", path, e)
        return None
    blob = tensors["key_bytes"].numpy().tobytes()
    offsets = tensors["key_offsets"].tolist()
    keys = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]
    feats = Features(tensors["features"], tensors["labels"], keys)
    if feats.features.ndim != 2 or feats.features.shape[0] != len(keys) or feats.labels.shape != (len(keys),):
        log.warning("cached features %s are inconsistent: recomputing them", path)
        return None
    return feats


# ---------------------------------------------------------------------------------------------------------
# Logistic regression


@dataclass
class LogisticRegressionResult:
    weight: torch.Tensor  # [C, D] float64
    bias: torch.Tensor  # [C] float64
    C: float
    n_iter: int

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C] float64 class scores (softmax gives scikit-learn's predict_proba), on x's device."""
        w = self.weight.to(x.device)
        return x.to(w.dtype) @ w.T + self.bias.to(x.device)


def _check_xy(x: torch.Tensor, y: torch.Tensor, num_classes: int, what: str = "training") -> None:
    if x.ndim != 2:
        raise UserError(f"{what} features must be [samples, dim], got shape {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise UserError(f"{what} set has {x.shape[0]} feature rows but labels of shape {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise UserError(f"{what} labels fall outside 0..{num_classes - 1} (found {int(y.min())}..{int(y.max())})")


# Below this many multiply-adds per objective evaluation, torch's intra-op threads cost more in hand-offs than
# they save on CPU: a 1800 x 128 x 4 fit took 30 s with 2 threads and 0.9 s with one on a 2-core machine.
SMALL_FIT_MACS = 1 << 24


@contextlib.contextmanager
def _threads_for(x: torch.Tensor, rows: int):
    """One intra-op thread for a small CPU fit (restored after); larger fits and GPUs are left alone."""
    small = x.device.type == "cpu" and x.numel() * rows < SMALL_FIT_MACS
    before = torch.get_num_threads()
    if small and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, C: float, *, max_iter: int = 1000,
                 tol: float = 1e-8, init: LogisticRegressionResult | None = None,
                 warn: bool = True) -> LogisticRegressionResult:
    """scikit-learn's LogisticRegression(C=C) (L2 penalty, lbfgs, fit_intercept=True, no sample weights),
    minimising the same objective (scikit-learn >= 1.5, sklearn/linear_model/_logistic.py):

        num_classes > 2:   1/n sum_i CE(softmax(W x_i + b), y_i) + 1/(2 C n) ||W||_F^2   (W: [C, D], b: [C])
        num_classes == 2:  1/n sum_i BCE(sigmoid(w.x_i + b), y_i == 1) + 1/(2 C n) ||w||^2

    i.e. C scales the summed loss (C sum_i loss_i + ||W||^2 / 2, divided by C n), the intercept is not
    penalised. The binary case (one weight vector, as scikit-learn fits it) is returned as two classes,
    weight = [-w/2, w/2], bias = [-b/2, b/2], whose softmax is scikit-learn's probabilities. Multiclass biases
    are centred (they are defined up to a common shift). Full batch, float64, torch.optim.LBFGS with a strong
    Wolfe line search on x's device; stops when the largest gradient entry is <= tol (scipy's gtol, as
    scikit-learn passes tol), or the objective stops changing, or after max_iter iterations. ``init`` warm
    starts (a previous fit on the same problem, e.g. the neighbouring C of a sweep)."""
    _check_xy(x, y, num_classes)
    if num_classes < 2:
        raise UserError(f"logistic regression needs at least 2 classes, got {num_classes}")
    if not (C > 0 and math.isfinite(C)):
        raise UserError(f"C must be a positive number, got {C}")
    counts = torch.bincount(y.to(torch.int64).cpu(), minlength=num_classes)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise UserError(f"{len(missing)} of {num_classes} classes have no training samples (class {shown})")

    device = x.device
    x = x.detach().to(torch.float64)
    y = y.detach().to(device=device, dtype=torch.int64)
    n, d = x.shape
    binary = num_classes == 2
    rows = 1 if binary else num_classes
    w = torch.zeros(rows, d, dtype=torch.float64, device=device)
    b = torch.zeros(rows, dtype=torch.float64, device=device)
    if init is not None:
        if tuple(init.weight.shape) != (num_classes, d) or tuple(init.bias.shape) != (num_classes,):
            raise UserError(f"the warm start is a {tuple(init.weight.shape)} classifier, "
                            f"not ({num_classes}, {d})")
        iw, ib = init.weight.to(device, torch.float64), init.bias.to(device, torch.float64)
        if binary:
            w.copy_(iw[1:] - iw[:1])
            b.copy_(ib[1:] - ib[:1])
        else:
            w.copy_(iw)
            b.copy_(ib)
    w.requires_grad_(True)
    b.requires_grad_(True)
    l2 = 1.0 / (C * n)
    target = (y == 1).to(torch.float64) if binary else y

    def objective() -> torch.Tensor:
        z = torch.addmm(b, x, w.T)
        if binary:
            data = F.binary_cross_entropy_with_logits(z[:, 0], target)
        else:
            data = F.cross_entropy(z, target)
        return data + 0.5 * l2 * (w * w).sum()

    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=max(50 * max_iter, 1),
                            tolerance_grad=tol, tolerance_change=64 * torch.finfo(torch.float64).eps,
                            history_size=10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad(), _threads_for(x, rows):
        opt.step(closure)
    n_iter = int(opt.state[opt.param_groups[0]["params"][0]].get("n_iter", 0))
    if n_iter >= max_iter and warn:
        log.warning("logistic regression (C=%g) stopped at max_iter=%d before converging", C, max_iter)
    w, b = w.detach(), b.detach()
    if binary:
        weight = torch.cat([-w, w]) / 2
        bias = torch.cat([-b, b]) / 2
    else:
        weight, bias = w, b - b.mean()
    return LogisticRegressionResult(weight=weight, bias=bias, C=float(C), n_iter=n_iter)


# ---------------------------------------------------------------------------------------------------------
# The probe


@dataclass
class LinearProbeResult:
    classifier: LogisticRegressionResult  # the final one (refit on train+val when configured)
    best_C: float
    sweep: list[dict]  # [{"C": c, "val_acc1": a}, ...] over the grid, ascending C
    val: dict  # classification_metrics of the train-only fit at best_C on val
    test: dict  # classification_metrics of the final classifier on test


def c_grid(cfg: LinearProbeConfig) -> list[float]:
    """logspace(log10(c_min), log10(c_max), c_steps), ascending."""
    if not (cfg.c_min > 0 and cfg.c_max >= cfg.c_min and cfg.c_steps >= 1):
        raise UserError(f"linear_probe needs 0 < c_min <= c_max and c_steps >= 1 "
                        f"(got c_min={cfg.c_min}, c_max={cfg.c_max}, c_steps={cfg.c_steps})")
    if cfg.c_steps == 1:
        return [float(cfg.c_min)]
    grid = torch.logspace(math.log10(cfg.c_min), math.log10(cfg.c_max), cfg.c_steps, dtype=torch.float64)
    return grid.tolist()


def linear_probe(train: Features, val: Features, test: Features, num_classes: int,
                 cfg: LinearProbeConfig) -> LinearProbeResult:
    """Choose C on val (highest val acc1; ties go to the smaller C, the stronger regularisation) over the
    grid, each fit on train warm-started from the previous C; refit on train+val at that C when
    cfg.refit_on_train_val; evaluate on test. Runs on the device train's features are on."""
    if num_classes < 2:
        raise UserError(f"a linear probe needs at least 2 classes, got {num_classes}")
    splits = {"train": train, "val": val, "test": test}
    for name, split in splits.items():
        _check_xy(split.features, split.labels, num_classes, name)
        if split.features.shape[0] == 0:
            raise UserError(f"the {name} split has no samples")
    dims = {name: split.features.shape[1] for name, split in splits.items()}
    if len(set(dims.values())) != 1:
        raise UserError("feature dimensions differ between splits: "
                        + ", ".join(f"{k}={v}" for k, v in dims.items()))
    device = train.features.device
    xtr, ytr = train.features.to(device), train.labels.to(device)
    xva, yva = val.features.to(device), val.labels.to(device)
    xte, yte = test.features.to(device), test.labels.to(device)

    sweep, fits, prev = [], [], None
    for c in c_grid(cfg):
        # a sweep fit that runs out of iterations is recorded, not warned about: weakly regularised fits on
        # separable features often do, and only the chosen one matters (its refit warns)
        prev = fit_logistic(xtr, ytr, num_classes, c, max_iter=cfg.max_iter, init=prev, warn=False)
        acc1 = classification_metrics(prev.logits(xva), yva, num_classes)["acc1"]
        sweep.append({"C": c, "val_acc1": acc1, "iterations": prev.n_iter, "converged": prev.n_iter < cfg.max_iter})
        fits.append(prev)
        log.info("linear probe: C=%.4g val acc1=%.4f (%d iterations)", c, acc1, prev.n_iter)
    best = max(range(len(sweep)), key=lambda i: (sweep[i]["val_acc1"], -i))  # ties: the first (smallest C)
    best_C, chosen = sweep[best]["C"], fits[best]
    val_metrics = classification_metrics(chosen.logits(xva), yva, num_classes)
    final = chosen
    if cfg.refit_on_train_val:
        final = fit_logistic(torch.cat([xtr, xva]), torch.cat([ytr, yva]), num_classes, best_C,
                             max_iter=cfg.max_iter, init=chosen)
    test_metrics = classification_metrics(final.logits(xte), yte, num_classes)
    log.info("linear probe: best C=%.4g val acc1=%.4f test acc1=%.4f", best_C, val_metrics["acc1"],
             test_metrics["acc1"])
    return LinearProbeResult(classifier=final, best_C=best_C, sweep=sweep, val=val_metrics, test=test_metrics)
