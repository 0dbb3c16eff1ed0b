"""The labelled data of a downstream task: its splits indexed once, then read by (train, eval) loaders.

`--data DIR` is either

  - an image folder: DIR/train/, DIR/test/ and optionally DIR/val/, each with one sub-folder per class
    (torchvision ImageFolder semantics: classes are train/'s sorted sub-folder names, label = position;
    val/ and test/ may hold any subset of those classes, labelled by train/'s order); or
  - a CLIP_benchmark webdataset root: DIR/train/, DIR/test/, optional DIR/val/, each with nshards.txt and
    0.tar, 1.tar, ... of KEY.jpg (png/webp/jpeg) + KEY.cls samples, and DIR/classnames.txt.

Class names are the folder names ("_" read as a space) or classnames.txt; templates are
DIR/zeroshot_classification_templates.txt if present, else the OpenAI ImageNet set; files given as
arguments override both. Without a val split a seeded, stratified share of train becomes val.

Every sample is indexed up front as (file, byte offset, size, label, key), so a loader reads any sample
directly: the permutation of an epoch and each rank's slice of it are plain index arithmetic, and the
single-process run and a DDP run see the same global batches in the same order with the same augmentation.
"""
from __future__ import annotations

import logging
import math
import os
import random
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import DEFAULT_IMAGE_KEY
from ..data.decode import DEFAULT_MAX_IMAGE_PIXELS, image_pipeline
from ..data.labelled import (IMG_EXTENSIONS, LabelledCollate, LabelledDataError, find_classes, folder_samples,
                             read_lines, read_templates)
from ..data.tario import split_name
from ..errors import UserError

log = logging.getLogger("clipkit.finetune")

SPLITS = ("train", "val", "test")
IMAGE_EXTS = tuple(DEFAULT_IMAGE_KEY.split(";"))  # a wds sample's image member, first found in this order
LABEL_EXT = "cls"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
CLASSNAMES_FILE = "classnames.txt"


class DownstreamDataError(LabelledDataError):
    """The labelled set is missing, malformed or inconsistent (the message names the file)."""


@dataclass(frozen=True)
class Sample:
    """One labelled image."""
    source: str  # a file path, or the path of the tar holding it
    offset: int  # -1 for a file; else the byte offset of the image member's data in the tar
    size: int  # bytes of the image (file size, or the member's size)
    label: int
    key: str  # path relative to the split folder, or "tarname/KEY"

    def read(self) -> bytes:
        if self.offset < 0:
            return Path(self.source).read_bytes()
        with open(self.source, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.source} is truncated: {len(data)} of {self.size} bytes at offset {self.offset}")
        return data


@dataclass
class DownstreamSet:
    name: str
    root: Path
    classnames: list[str]
    templates: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    val_from_train: bool  # val was split off train
    skipped: dict[str, int] = field(default_factory=dict)  # counted while indexing, e.g. {"not_an_image": 2}


# -- indexing -------------------------------------------------------------------------------------------------


def load_downstream(root: str | Path, *, val_fraction: float = 0.1, seed: int = 0, classnames: str | Path | None = None,
                    templates: str | Path | None = None) -> DownstreamSet:
    """Index DIR's splits (see the module doc). `classnames`/`templates`: files (one per line) overriding the
    set's own. Raises DownstreamDataError (a UserError) naming the file for anything malformed."""
    if not 0.0 < val_fraction < 1.0:
        raise DownstreamDataError(f"val_fraction must be between 0 and 1 (exclusive), not {val_fraction}")
    root = Path(os.path.abspath(Path(root).expanduser()))
    if not root.is_dir():
        raise DownstreamDataError(f"fine-tuning data not found: {root} (expected a directory with train/ and test/: "
                                  "class folders of images, or CLIP_benchmark webdataset shards)")
    skipped: Counter = Counter()
    if _is_wds(root):
        splits = _wds_splits(root, skipped)
        names_file = Path(classnames) if classnames is not None else root / CLASSNAMES_FILE
        names = read_lines(names_file, "classnames", DownstreamDataError)
        own = root / CLASSNAMES_FILE
        own_count = len(read_lines(own, "classnames", DownstreamDataError)) if classnames is not None and own.is_file() \
            else None
        if own_count is not None and len(names) != own_count:
            raise DownstreamDataError(f"{names_file} names {len(names)} classes but {own} names {own_count} (one name "
                                      "per line, in label order)")
        _check_wds_labels(splits, len(names), names_file)  # .cls labels index the class names
    elif (root / "train").is_dir():
        classes, splits = _folder_splits(root, skipped)
        names = [c.replace("_", " ") for c in classes]
        own = root / CLASSNAMES_FILE
        names_file = Path(classnames) if classnames is not None else (own if own.is_file() else None)
        if names_file is not None:
            names = read_lines(names_file, "classnames", DownstreamDataError)
            if len(names) != len(classes):
                raise DownstreamDataError(f"{names_file} names {len(names)} classes but {root / 'train'} has "
                                          f"{len(classes)} class folders (one name per line, in sorted folder-name "
                                          "order)")
    else:
        raise DownstreamDataError(f"{root} is neither an image folder nor a CLIP_benchmark webdataset root: expected "
                                  "train/ and test/ (and optionally val/) holding class folders of images, or "
                                  "nshards.txt and N.tar shards")
    own_templates = root / TEMPLATES_FILE
    tmpl = read_templates(templates if templates is not None else (own_templates if own_templates.is_file() else None),
                          DownstreamDataError)

    for split in ("train", "test") + (("val",) if splits.get("val") is not None else ()):
        if not splits[split]:
            raise DownstreamDataError(f"the {split} split of {root} has no samples ({root / split})")
    val_from_train = splits.get("val") is None
    if val_from_train:
        splits["train"], splits["val"] = split_train_val(splits["train"], val_fraction, seed)
        if not splits["val"]:
            raise DownstreamDataError(f"{root} has no val/ split and its train split is too small to hold one out "
                                      "(a class needs at least 2 images to give one to val): add a val/ split")
        log.info("%s has no val split: %d of its %d training images (%.0f%% of each class, seed %d) are held out as "
                 "val", root, len(splits["val"]), len(splits["val"]) + len(splits["train"]), 100 * val_fraction, seed)
    if skipped:
        log.warning("indexing %s skipped %s", root, ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
    return DownstreamSet(root.name, root, names, tmpl, splits["train"], splits["val"], splits["test"], val_from_train,
                         dict(sorted(skipped.items())))


def split_train_val(train: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, val): per class, round(val_fraction * n) images (at least 1 when the class has 2 or more,
    always leaving 1 in train) drawn with an RNG seeded by (seed, class). Both keep the input order, so the
    split depends only on the samples and the seed (not on ranks or workers)."""
    by_label: dict[int, list[int]] = {}
    for i, s in enumerate(train):
        by_label.setdefault(s.label, []).append(i)
    held = set()
    for label, indices in sorted(by_label.items()):
        n = len(indices)
        if n < 2:
            continue
        k = min(n - 1, max(1, math.floor(val_fraction * n + 0.5)))
        held.update(random.Random(f"clipkit.finetune.val:{seed}:{label}").sample(indices, k))
    return ([s for i, s in enumerate(train) if i not in held], [s for i, s in enumerate(train) if i in held])


def _is_wds(root: Path) -> bool:
    return any((root / split / "nshards.txt").is_file() or any((root / split).glob("*.tar"))
               for split in SPLITS if (root / split).is_dir())


def _folder_splits(root: Path, skipped: Counter) -> tuple[list[str], dict[str, list[Sample] | None]]:
    train_dir = root / "train"
    classes = find_classes(train_dir)
    if not classes:
        raise DownstreamDataError(f"{train_dir} has no class folders (expected one sub-folder of images per class)")
    if not (root / "test").is_dir():
        raise DownstreamDataError(f"{root} has train/ but no test/ split (expected {root / 'test'} with the same "
                                  "class folders)")
    splits: dict[str, list[Sample] | None] = {"val": None}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        if split != "train":
            extra = sorted(set(find_classes(split_dir)) - set(classes))
            if extra:
                raise DownstreamDataError(f"class folder {split_dir / extra[0]} is not a class of {train_dir}"
                                          + (f" (nor are {len(extra) - 1} more)" if len(extra) > 1 else "")
                                          + ": every class in val/ and test/ needs a folder in train/")
        # labels are positions in train's classes, whichever of them this split holds
        found = folder_samples(split_dir, classes)
        if split == "train":
            counts = Counter(label for _, label in found)
            empty = [c for i, c in enumerate(classes) if counts[i] == 0]
            if empty:
                raise DownstreamDataError(f"class folder {train_dir / empty[0]} has no images "
                                          f"({', '.join(IMG_EXTENSIONS)})"
                                          + (f", nor do {len(empty) - 1} more" if len(empty) > 1 else "")
                                          + ": a class with no training images cannot be learnt")
        splits[split] = [Sample(str(split_dir / rel), -1, (split_dir / rel).stat().st_size, label, rel)
                         for rel, label in found]
        _count_non_images(split_dir, set(classes), skipped)
    return classes, splits


def _count_non_images(split_dir: Path, classes: set[str], skipped: Counter) -> None:
    """Files folder_samples passes over: non-images in class folders, and files outside any class folder."""
    for entry in os.scandir(split_dir):
        if entry.is_dir() and entry.name in classes:
            for _, _, files in os.walk(entry.path, followlinks=True):
                skipped["not_an_image"] += sum(not f.lower().endswith(IMG_EXTENSIONS) for f in files)
        elif not entry.is_dir():
            skipped["outside_class_folder"] += 1


def _wds_splits(root: Path, skipped: Counter) -> dict[str, list[Sample] | None]:
    kind_file = root / "dataset_type.txt"
    kind = kind_file.read_text().strip().lower() if kind_file.is_file() else ""
    if kind not in ("", "classification"):
        raise DownstreamDataError(f"{root} is a {kind} set (dataset_type.txt), not a classification set")
    splits: dict[str, list[Sample] | None] = {"val": None}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            if split == "val":
                continue
            raise DownstreamDataError(f"{root} has no {split}/ split (expected {split_dir}/nshards.txt and its shards)")
        samples: list[Sample] = []
        for shard in _shards(split_dir):
            samples.extend(_index_tar(shard, f"{split}/{shard.name}", skipped))
        splits[split] = samples
    return splits


def _shards(split_dir: Path) -> list[Path]:
    nshards = split_dir / "nshards.txt"
    if not nshards.is_file():
        raise DownstreamDataError(f"{nshards} not found (it holds the number of shards, N.tar for N = 0, 1, ...)")
    text = nshards.read_text().strip()
    if not text.isdigit() or int(text) < 1:
        raise DownstreamDataError(f"{nshards} should hold a positive shard count, not {text!r}")
    shards = [split_dir / f"{i}.tar" for i in range(int(text))]
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise DownstreamDataError(f"{nshards} says {text} shards but {missing[0]} is missing"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(set(split_dir.glob("*.tar")) - set(shards))
    if extra:
        log.warning("%s says %s shards: ignoring %d more tar files in %s (e.g. %s)", nshards, text, len(extra),
                    split_dir, extra[0].name)
    return shards


def _index_tar(path: Path, where: str, skipped: Counter) -> list[Sample]:
    """The tar's samples in member order: (offset, size) of the image member's data, the label read from .cls.
    The label is kept as text here and checked against the class names by _check_wds_labels."""
    try:
        tar = tarfile.open(path, mode="r:")  # uncompressed only: the offsets must be offsets in the file
    except (tarfile.TarError, OSError) as e:
        raise DownstreamDataError(f"cannot read {path} as an uncompressed tar: {e}") from None
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    labels: dict[str, str] = {}
    with tar:
        try:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_name(info.name)
                if key is None:
                    continue
                sample = members.setdefault(key, {})
                if ext in sample:
                    skipped["duplicate_member"] += 1
                    continue
                sample[ext] = info
                if ext == LABEL_EXT:
                    labels[key] = tar.extractfile(info).read().decode("utf-8", errors="replace").strip()
        except (tarfile.TarError, OSError) as e:
            raise DownstreamDataError(f"{path} is damaged: {e}") from None
    out = []
    for key, sample in members.items():
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if image is None:
            skipped["missing_image"] += 1
            continue
        if key not in labels:
            skipped["missing_label"] += 1
            continue
        text = labels[key]
        try:
            label = int(text)
        except ValueError:
            raise DownstreamDataError(f"{path}: sample {key!r} has label {text!r} in {key}.{LABEL_EXT}, not an "
                                      "integer class index") from None
        out.append(Sample(str(path), image.offset_data, image.size, label, f"{path.name}/{key}"))
    return out


def _check_wds_labels(splits: dict[str, list[Sample] | None], num_classes: int, names_file: Path) -> None:
    for samples in splits.values():
        for s in samples or ():
            if not 0 <= s.label < num_classes:
                raise DownstreamDataError(f"{s.source}: sample {s.key.split('/', 1)[1]!r} has label {s.label}, outside "
                                          f"[0, {num_classes}) for the {num_classes} class names of {names_file}")


# -- loading --------------------------------------------------------------------------------------------------


def _rng(seed: int, epoch: int, index: int) -> random.Random:
    return random.Random(f"clipkit.finetune.augment:{seed}:{epoch}:{index}")


class LabelledImages(Dataset):
    """(image tensor, label, key) per sample, or None for a sample that does not decode (counted by the collate).
    A sample's random augmentation is drawn from an RNG seeded by (seed, epoch, its index in `samples`)."""

    def __init__(self, samples: list[Sample], transform: Callable, *, seed: int = 0,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.samples = samples
        self.images = image_pipeline(transform, max_image_pixels)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Before the loader's iterator is made (workers copy the dataset then)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        try:
            return self.images(s.read(), _rng(self.seed, self.epoch, i)), s.label, s.key
        except Exception as e:  # unreadable, corrupt or oversized image: skipped and counted by the collate
            log.warning("skipping %s (%s): %r", s.key, s.source, e)
            return None


class RankBatches(Sampler):
    """One rank's batches of one epoch: the samples permuted by (seed, epoch), the tail short of a global batch
    dropped; global batch b is rows [b*G, (b+1)*G) of the permutation, and this rank takes [r*L, (r+1)*L) of it."""

    def __init__(self, num_samples: int, global_batch_size: int, rank: int, world_size: int, seed: int,
                 epoch: int) -> None:
        self.n, self.global_batch = num_samples, global_batch_size
        self.local = global_batch_size // world_size
        self.rank, self.seed, self.epoch = rank, seed, epoch

    def permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(int.from_bytes(
            random.Random(f"clipkit.finetune.order:{self.seed}:{self.epoch}").randbytes(8), "little") >> 1)
        return torch.randperm(self.n, generator=g)

    def __len__(self) -> int:
        return self.n // self.global_batch

    def __iter__(self):
        perm = self.permutation()
        for b in range(len(self)):
            start = b * self.global_batch + self.rank * self.local
            yield perm[start:start + self.local].tolist()


def train_loader(samples: list[Sample], transform: Callable, *, global_batch_size: int, rank: int, world_size: int,
                 seed: int, epoch: int, workers: int = 1,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> DataLoader:
    """One epoch of this rank's batches: Batch(images, targets=labels, keys, skipped). len() = steps per epoch.
    With world_size 1 each batch equals the rank-order concatenation of the ranks' batches of a larger world."""
    if global_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"bad batch layout: global batch size {global_batch_size}, rank {rank} of {world_size}")
    if global_batch_size % world_size:
        raise UserError(f"the global batch size {global_batch_size} is not divisible by the {world_size} ranks: "
                        f"use a multiple of {world_size}")
    if len(samples) < global_batch_size:
        raise UserError(f"the training split has {len(samples)} samples, fewer than one global batch of "
                        f"{global_batch_size}: lower the global batch size")
    dataset = LabelledImages(samples, transform, seed=seed, max_image_pixels=max_image_pixels)
    dataset.set_epoch(epoch)
    sampler = RankBatches(len(samples), global_batch_size, rank, world_size, seed, epoch)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=LabelledCollate(dataset.images))


def eval_loader(samples: list[Sample], transform: Callable, *, batch_size: int, workers: int = 1,
                max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> DataLoader:
    """One ordered pass over all samples: Batch(images, targets=labels, keys, skipped)."""
    if batch_size < 1:
        raise UserError(f"the batch size must be positive, not {batch_size}")
    dataset = LabelledImages(samples, transform, max_image_pixels=max_image_pixels)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=LabelledCollate(dataset.images))
