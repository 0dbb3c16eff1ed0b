"""Reading a labelled image set, as zero-shot evaluation and fine-tuning both do: its class-name and
template files, and image folders with torchvision's ImageFolder semantics:

    ROOT/<class a>/x.jpg, ROOT/<class a>/more/y.png, ROOT/<class b>/z.webp, ...

classes are the sub-folders in sorted name order (label = position), samples are the image files under
each, walked in sorted order, so labels and sample order equal `torchvision.datasets.ImageFolder(ROOT)`'s.
Unlike ImageFolder, a class folder with no images is allowed: in zero-shot classification it is still a
candidate class. Images decode through the same pipeline as shards, so a folder and a shard holding the
same image files give the same tensors. (Labelled shards, KEY.jpg + KEY.cls, are read by
eval_loaders.build_labelled_loader.)
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ..errors import UserError
from .decode import DEFAULT_MAX_IMAGE_PIXELS, image_pipeline
from .sample import Batch

log = logging.getLogger("clipkit.data")

__all__ = ["IMG_EXTENSIONS", "PLACEHOLDER", "FolderImages", "LabelledCollate", "LabelledDataError",
           "build_folder_loader", "default_templates", "find_classes", "folder_samples", "read_lines",
           "read_templates"]

# torchvision.datasets.folder.IMG_EXTENSIONS, matched case-insensitively as ImageFolder does
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PLACEHOLDER = "{c}"  # where a template takes the class name


class LabelledDataError(UserError):
    """A labelled set's file is missing, empty or malformed (the message names the file)."""


# -- class names and templates ---------------------------------------------------------------------------


def default_templates() -> list[str]:
    """The 80 ImageNet templates of the CLIP paper's notebook, as open_clip ships them."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    # open_clip keeps them as callables (lambda c: f"a photo of a {c}."): called with the placeholder,
    # each gives back its template text.
    return [t(PLACEHOLDER) if callable(t) else str(t).replace("{}", PLACEHOLDER) for t in OPENAI_IMAGENET_TEMPLATES]


def read_lines(path: Path, what: str, error: type[Exception] = LabelledDataError) -> list[str]:
    """The non-blank lines of a names or templates file, stripped; `error` (the caller's kind of
    LabelledDataError) when the file is missing or holds none."""
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise error(f"{what} file {path} is empty")
    return lines


def read_templates(path: str | Path | None, error: type[Exception] = LabelledDataError) -> list[str]:
    """The templates of a file (each with the {c} placeholder); the OpenAI ImageNet set for None."""
    if path is None:
        return default_templates()
    tmpl = read_lines(Path(path), "templates", error)
    bad = [t for t in tmpl if PLACEHOLDER not in t]
    if bad:
        raise error(f"template {bad[0]!r} in {path} has no {{c}} placeholder")
    return tmpl


# -- image folders ---------------------------------------------------------------------------------------


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


class LabelledCollate:
    """(image, label, key) items, None for an image that did not decode, -> one Batch whose `skipped`
    counts the undecodable ones (a batch of nothing but those is empty, not an error)."""

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
                      collate_fn=LabelledCollate(dataset.images))
