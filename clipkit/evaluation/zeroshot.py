"""Zero-shot classification, with CLIP_benchmark's data layout and result schema.

The data is any of:
  - a CLIP_benchmark webdataset root: SPLIT/nshards.txt, SPLIT/N.tar (KEY.jpg + KEY.cls),
    classnames.txt, optional zeroshot_classification_templates.txt;
  - an image folder with one sub-folder per class (torchvision ImageFolder semantics, see data/labelled.py);
  - a shard spec of KEY.jpg + KEY.cls samples, with the class names given.
Templates hold a "{c}" placeholder; without a templates file the OpenAI ImageNet set is used.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..data import build_labelled_loader
from ..data.labelled import (IMG_EXTENSIONS, PLACEHOLDER, LabelledDataError, build_folder_loader, find_classes,
                             folder_samples, read_lines, read_templates)
from ..models import eval_mode

log = logging.getLogger("clipkit.evaluation")


class ZeroShotDataError(LabelledDataError):
    pass


@dataclass
class ZeroShotSet:
    shards: str | None  # shard spec of KEY.jpg + KEY.cls samples; None for an image folder
    classnames: list[str]
    templates: list[str]
    name: str
    folder: Path | None = None  # an image folder with one sub-folder per class
    samples: list[tuple[str, int]] | None = None  # the folder's (relative path, label), in ImageFolder order


@dataclass
class ZeroShotPredictions:
    keys: list[str]  # sample key (shards) or path relative to the folder
    logits: torch.Tensor  # [N, classes]: cosine similarity of each image to each class
    labels: torch.Tensor  # [N]
    logit_scale: float | None = None  # the model's temperature, for probabilities


def load_zeroshot_set(data: str | Path, classnames: str | Path | None = None,
                      templates: str | Path | None = None, split: str = "test") -> ZeroShotSet:
    """DATA is a CLIP_benchmark wds root, an image folder (one sub-folder per class) or a shard spec
    (then `classnames` is required). `classnames`/`templates` files override the set's own."""
    root = Path(data)
    if root.is_dir() and (root / split / "nshards.txt").is_file():
        return _wds_set(root, classnames, templates, split)
    if root.is_dir():
        return _folder_set(root, classnames, templates, split)
    if classnames is None:
        if not any(c in str(data) for c in "{:*") and not root.exists():  # a plain path that is not there
            raise ZeroShotDataError(f"zero-shot data not found: {data} (expected a CLIP_benchmark webdataset "
                                    "root, an image folder with one sub-folder per class, or a shard spec with "
                                    "--classnames)")
        raise ZeroShotDataError("with a shard spec as data, --classnames is required (one class name per line, "
                                "in label order)")
    name = Path(str(data).split("::")[0]).parent.name
    return ZeroShotSet(str(data), read_lines(Path(classnames), "classnames", ZeroShotDataError),
                       read_templates(templates, ZeroShotDataError), name)


def _wds_set(root: Path, classnames, templates, split: str) -> ZeroShotSet:
    kind_file = root / "dataset_type.txt"
    kind = kind_file.read_text().strip().lower() if kind_file.is_file() else ""
    if kind not in ("", "classification"):
        hint = ": use `clipkit retrieval-eval`" if kind == "retrieval" else ""
        raise ZeroShotDataError(f"{root} is a {kind} set (dataset_type.txt), not a classification set{hint}")
    text = (root / split / "nshards.txt").read_text().strip()
    if not text.isdigit() or int(text) < 1:
        raise ZeroShotDataError(f"{root / split / 'nshards.txt'} should hold a positive shard count, not {text!r}")
    n = int(text)
    shards = str(root / split / (f"{{0..{n - 1}}}.tar" if n > 1 else "0.tar"))
    own = root / "zeroshot_classification_templates.txt"
    tmpl = read_templates(templates if templates is not None else (own if own.is_file() else None), ZeroShotDataError)
    names = read_lines(Path(classnames or root / "classnames.txt"), "classnames", ZeroShotDataError)
    return ZeroShotSet(shards, names, tmpl, root.name)


def _folder_set(root: Path, classnames, templates, split: str) -> ZeroShotSet:
    classes = find_classes(root)
    if not classes:
        raise ZeroShotDataError(f"{root} is neither a CLIP_benchmark webdataset root ({split}/nshards.txt is "
                                "missing) nor an image folder (it has no class sub-folders)")
    samples = folder_samples(root, classes)
    if not samples:
        raise ZeroShotDataError(f"no images ({', '.join(IMG_EXTENSIONS)}) in the {len(classes)} class folders of "
                                f"{root}")
    names = classes
    if classnames is not None:
        names = read_lines(Path(classnames), "classnames", ZeroShotDataError)
        if len(names) != len(classes):
            raise ZeroShotDataError(f"{classnames} names {len(names)} classes but {root} has {len(classes)} class "
                                    "folders (names go one per line, in sorted folder-name order)")
    return ZeroShotSet(None, names, read_templates(templates, ZeroShotDataError), root.name, root, samples)


@torch.no_grad()
def build_classifier(model, tokenizer: Callable, classnames: list[str], templates: list[str],
                     device: torch.device | str = "cpu", text_batch: int = 512) -> torch.Tensor:
    """[embed_dim, num_classes]: per class, the mean of its L2-normalised template embeddings,
    re-normalised. Prompts are encoded `text_batch` at a time across classes (ImageNet: 80,000 prompts)."""
    prompts = [t.replace(PLACEHOLDER, name) for name in classnames for t in templates]
    embs = [F.normalize(model.encode_text(tokenizer(prompts[i:i + text_batch]).to(device)), dim=-1)
            for i in range(0, len(prompts), text_batch)]
    per_class = torch.cat(embs).reshape(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).T


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices
    correct = topk == labels[:, None]
    pred = topk[:, 0]
    recalls = []
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            recalls.append((pred[mask] == c).float().mean().item())
    return {
        "acc1": correct[:, 0].float().mean().item(),
        "acc5": correct.any(dim=1).float().mean().item(),
        "mean_per_class_recall": float(sum(recalls) / len(recalls)),
        "num_samples": int(labels.numel()),
    }


def _batches(zs: ZeroShotSet, transform: Callable, batch_size: int, workers: int):
    if zs.folder is not None:
        return build_folder_loader(zs.folder, zs.samples, transform, batch_size, workers)
    return build_labelled_loader(zs.shards, transform, batch_size, workers=workers)


def _log_skipped(skipped: dict[str, int], where: str) -> None:
    if skipped:
        log.warning("zero-shot evaluation skipped unreadable samples in %s: %s", where,
                    ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))


@torch.no_grad()
def predict_zeroshot(model, tokenizer: Callable, transform: Callable, zs: ZeroShotSet, batch_size: int = 256,
                     workers: int = 1, device: torch.device | str = "cpu") -> ZeroShotPredictions:
    """Every image's similarity to every class (the model is put in eval mode and restored)."""
    with eval_mode(model):
        classifier = build_classifier(model, tokenizer, zs.classnames, zs.templates, device)
        logits, labels, keys, skipped = [], [], [], {}
        for batch in _batches(zs, transform, batch_size, workers):
            for reason, n in batch.skipped.items():
                skipped[reason] = skipped.get(reason, 0) + n
            if not batch.keys:
                continue
            feats = F.normalize(model.encode_image(batch.images.to(device)), dim=-1)
            logits.append((feats @ classifier).float().cpu())
            labels.append(batch.targets)
            keys.extend(batch.keys)
        where = zs.folder or zs.shards
        _log_skipped(skipped, str(where))
        if not labels:
            raise ZeroShotDataError(f"no readable samples in {where}")
        scale = getattr(model, "logit_scale", None)
        scale = float(scale.exp()) if isinstance(scale, torch.Tensor) else None
        return ZeroShotPredictions(keys, torch.cat(logits), torch.cat(labels), scale)


def evaluate_zeroshot(model, tokenizer: Callable, transform: Callable, zs: ZeroShotSet, batch_size: int = 256,
                      workers: int = 1, device: torch.device | str = "cpu",
                      predictions_csv: str | Path | None = None) -> dict[str, float]:
    """acc1, acc5, mean_per_class_recall, num_samples; per-image predictions to a CSV if asked."""
    preds = predict_zeroshot(model, tokenizer, transform, zs, batch_size, workers, device)
    if preds.labels.max() >= len(zs.classnames) or preds.labels.min() < 0:
        raise ZeroShotDataError(f"labels in {zs.shards} fall outside the {len(zs.classnames)} class names")
    if predictions_csv is not None:
        write_predictions(predictions_csv, preds, zs.classnames)
    return classification_metrics(preds.logits, preds.labels, len(zs.classnames))


PREDICTION_COLUMNS = ["key", "true_index", "true_label", "predicted_index", "predicted_label", "score",
                      "probability", "top5_indices", "top5_labels", "top5_scores"]


def write_predictions(path: str | Path, preds: ZeroShotPredictions, classnames: list[str], k: int = 5) -> Path:
    """One row per image (PREDICTION_COLUMNS). score: cosine similarity to the predicted class;
    probability: its softmax probability at the model's temperature; top5_*: '|'-separated, best first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    top = preds.logits.topk(min(k, len(classnames)), dim=1)
    probs = (preds.logits * preds.logit_scale).softmax(dim=1) if preds.logit_scale else None
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(PREDICTION_COLUMNS)
        for i, key in enumerate(preds.keys):
            idx, scores = top.indices[i].tolist(), top.values[i].tolist()
            true = int(preds.labels[i])
            prob = f"{float(probs[i, idx[0]]):.6f}" if probs is not None else ""
            out.writerow([key, true, classnames[true], idx[0], classnames[idx[0]], f"{scores[0]:.6f}", prob,
                          "|".join(map(str, idx)), "|".join(classnames[j] for j in idx),
                          "|".join(f"{s:.6f}" for s in scores)])
    return path


def write_result(path: str | Path, metrics: dict, dataset: str, model: str, pretrained: str,
                 task: str = "zeroshot_classification") -> dict:
    """CLIP_benchmark's result schema."""
    result = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics,
              "language": "en"}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    return result
