"""An image folder as a classification set, with torchvision's ImageFolder semantics:

    ROOT/<class a>/x.jpg, ROOT/<class a>/more/y.png, ROOT/<class b>/z.webp, ...

classes are the sub-folders in sorted name order (label = position), samples are the image files under
each, walked in sorted order, so labels and sample order equal `torchvision.datasets.ImageFolder(ROOT)`'s.
Unlike ImageFolder, a class folder with no images is allowed: in zero-shot classification it is still a
candidate class. Images decode through the same pipeline as shards, so a folder and a shard holding the
same image files give the same tensors.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ..data.decode import DEFAULT_MAX_IMAGE_PIXELS, image_pipeline
from ..data.pipeline import Batch

log = logging.getLogger("clipkit.evaluation")

# torchvision.datasets.folder.IMG_EXTENSIONS, matched case-insensitively as ImageFolder does
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def find_classes(root: str | Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


def folder_samples(root: str | Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path relative to ROOT, label) for every image file, in ImageFolder's order."""
    samples = []
    for label, name in enumerate(classes):
        for directory, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(IMG_EXTENSIONS):
                    samples.append((Path(os.path.relpath(os.path.join(directory, file), root)).as_posix(), label))
    return samples


class FolderImages(Dataset):
    """(image tensor, label, relative path) per file; None for a file that does not decode."""

    def __init__(self, root: str | Path, samples: list[tuple[str, int]], transform: Callable,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.root, self.samples = Path(root), samples
        self.images = image_pipeline(transform, max_image_pixels)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            # the RNG only matters to random transforms; seeding it by path keeps any such one reproducible
            return self.images((self.root / path).read_bytes(), random.Random(path)), label, path
        except Exception as e:  # unreadable, corrupt or oversized image: skipped and counted, as in shards
            log.warning("skipping %s: %r", self.root / path, e)
            return None


class _Collate:
    def __init__(self, images) -> None:
        self.images = images

    def __call__(self, items: list) -> Batch:
        good = [item for item in items if item is not None]
        skipped = {"image_decode_error": len(items) - len(good)} if len(good) < len(items) else {}
        if not good:
            return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), [], skipped)
        images, labels, keys = zip(*good)
        return Batch(self.images.collate(list(images), get_worker_info() is not None), torch.tensor(labels),
                     list(keys), skipped)


def build_folder_loader(root: str | Path, samples: list[tuple[str, int]], transform: Callable, batch_size: int,
                        workers: int = 1) -> DataLoader:
    """One ordered pass: Batch(images, labels, relative paths, skipped counts)."""
    dataset = FolderImages(root, samples, transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=_Collate(dataset.images))
