"""Zero-shot classification, with CLIP_benchmark's data layout and result schema."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..data import build_labelled_loader


class ZeroShotDataError(ValueError):
    pass


@dataclass
class ZeroShotSet:
    shards: str  # shard spec of KEY.jpg + KEY.cls samples
    classnames: list[str]
    templates: list[str]
    name: str


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise ZeroShotDataError(f"{what} file not found: {path}")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ZeroShotDataError(f"{what} file {path} is empty")
    return lines


def load_zeroshot_set(data: str | Path, classnames: str | Path | None = None,
                      templates: str | Path | None = None, split: str = "test") -> ZeroShotSet:
    """DATA is a CLIP_benchmark wds root (SPLIT/nshards.txt, SPLIT/N.tar, classnames.txt,
    zeroshot_classification_templates.txt) or a shard spec, with the two text files given."""
    root = Path(data)
    if root.is_dir():
        split_dir = root / split
        nshards = split_dir / "nshards.txt"
        if not nshards.is_file():
            raise ZeroShotDataError(f"{root} is not a CLIP_benchmark webdataset root: {nshards} is missing")
        n = int(nshards.read_text().strip())
        shards = str(split_dir / (f"{{0..{n - 1}}}.tar" if n > 1 else "0.tar"))
        classnames = classnames or root / "classnames.txt"
        templates = templates or root / "zeroshot_classification_templates.txt"
        name = root.name
    else:
        if classnames is None or templates is None:
            if not any(c in str(data) for c in "{:*"):  # a plain path that is not a folder
                raise ZeroShotDataError(f"zero-shot data not found: {data} (expected a CLIP_benchmark "
                                        "webdataset root, or a shard spec with --classnames and --templates)")
            raise ZeroShotDataError("with a shard spec as data, --classnames and --templates are required")
        shards, name = str(data), Path(str(data).split("::")[0]).parent.name
    names = _read_lines(Path(classnames), "classnames")
    tmpl = _read_lines(Path(templates), "templates")
    bad = [t for t in tmpl if "{c}" not in t]
    if bad:
        raise ZeroShotDataError(f"template {bad[0]!r} in {templates} has no {{c}} placeholder")
    return ZeroShotSet(shards, names, tmpl, name)


@torch.no_grad()
def build_classifier(model, tokenizer: Callable, classnames: list[str], templates: list[str],
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """[embed_dim, num_classes]: per class, the mean of its L2-normalised template embeddings,
    re-normalised."""
    weights = []
    for name in classnames:
        tokens = tokenizer([t.replace("{c}", name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens), dim=-1).mean(dim=0)
        weights.append(F.normalize(emb, dim=-1))
    return torch.stack(weights, dim=1)


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


@torch.no_grad()
def evaluate_zeroshot(model, tokenizer: Callable, transform: Callable, zs: ZeroShotSet, batch_size: int = 256,
                      workers: int = 1, device: torch.device | str = "cpu") -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        classifier = build_classifier(model, tokenizer, zs.classnames, zs.templates, device)
        all_logits, all_labels = [], []
        for batch in build_labelled_loader(zs.shards, transform, batch_size, workers=workers):
            feats = F.normalize(model.encode_image(batch.images.to(device)), dim=-1)
            all_logits.append((feats @ classifier).float().cpu())
            all_labels.append(batch.targets)
        if not all_labels:
            raise ZeroShotDataError(f"no readable samples in {zs.shards}")
        labels = torch.cat(all_labels)
        if labels.max() >= len(zs.classnames) or labels.min() < 0:
            raise ZeroShotDataError(f"labels in {zs.shards} fall outside the {len(zs.classnames)} class names")
        return classification_metrics(torch.cat(all_logits), labels, len(zs.classnames))
    finally:
        model.train(was_training)


def write_result(path: str | Path, metrics: dict, dataset: str, model: str, pretrained: str) -> dict:
    """CLIP_benchmark's result schema."""
    result = {"dataset": dataset, "model": model, "pretrained": pretrained,
              "task": "zeroshot_classification", "metrics": metrics}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    return result
