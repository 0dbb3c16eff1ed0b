"""Decontamination: drop training samples whose image is a near copy of an image of an evaluation set, so
that zero-shot and retrieval numbers measure generalisation, not memorisation.

Evaluation sets are read once into EvalFeatures (eval_set_features): CLIP_benchmark webdataset roots
(ROOT/test/N.tar with KEY.jpg|png|webp, classification and retrieval alike) or plain folders of images
(searched recursively). Each eval image gets its 64-bit pHash (clipkit.curate.hashing) and, when a model is
given, its L2-normalised image embedding.

A training sample matches an eval image when
- hash: hamming(train pHash, eval pHash) <= max_distance, or hamming(train mirror pHash, eval pHash) <=
  max_distance (a flipped copy), or
- embedding (when `cosine` is set): the cosine of the two image embeddings is >= cosine (exact search,
  faiss IndexFlatIP).
The comparison is exact and blocked (a block of training hashes against every eval hash at once, popcount
of the XOR): about N * M / 4e9 seconds on one core for N training and M eval images. `detail` names the
match as "SETNAME:KEY" (a hash match first, the nearest; else the embedding's nearest), `score` is the
smallest Hamming distance from the sample (or its mirror) to any eval image.
"""
from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.decode import open_image
from ..errors import UserError
from ..extras import require
from .hashing import hamming, perceptual_hashes
from .result import StageResult
from .scan import Embedder

log = logging.getLogger(__name__)

STAGE = "decontam"
REASON = "eval_near_duplicate"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
HASH_BLOCK = 2048  # training rows against all eval hashes at a time


@dataclass
class EvalFeatures:
    """One evaluation set: its name (the root's folder name), the keys of its images, their pHash and mirror
    pHash (uint64 [M]) and image embeddings (float32 [M, D], L2-normalised; None without a model)."""

    name: str
    keys: list[str]
    phash: np.ndarray
    phash_flip: np.ndarray
    emb: np.ndarray | None


def _tar_images(root: Path) -> list[tuple[str, bytes]]:
    test = root / "test"
    tars = sorted(test.glob("*.tar"), key=lambda p: (0, int(p.stem)) if p.stem.isdigit() else (1, p.stem))
    out = []
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                stem, dot, ext = member.name.rpartition(".")
                if dot and "." + ext.lower() in IMAGE_EXTS:
                    out.append((stem, tar.extractfile(member).read()))
    return out


def _folder_images(root: Path) -> list[tuple[str, bytes]]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    return [(p.relative_to(root).as_posix(), p.read_bytes()) for p in files]


def _read_set(root: Path) -> list[tuple[str, bytes]]:
    if not root.is_dir():
        raise UserError(f"evaluation set {root}: not a directory")
    if (root / "test").is_dir() and any((root / "test").glob("*.tar")):
        return _tar_images(root)
    images = _folder_images(root)
    if not images:
        raise UserError(f"evaluation set {root}: no test/*.tar shards (CLIP_benchmark layout) and no "
                        f"{'/'.join(e[1:] for e in IMAGE_EXTS)} images under it")
    return images


def eval_set_features(roots: list[str], loaded, *, batch_size: int,
                      max_image_pixels: int | None) -> list[EvalFeatures]:
    """Read every evaluation set under `roots` into EvalFeatures (hashes; embeddings when `loaded`, a
    clipkit.models.load_model bundle, is given). An image that does not decode is skipped with a warning."""
    sets, names = [], set()
    for root_s in roots:
        root = Path(root_s)
        name = root.resolve().name
        if name in names:
            raise UserError(f"evaluation sets: two roots are named {name!r}; each set is reported by its folder name")
        names.add(name)
        keys, hashes, flips, images = [], [], [], []
        for key, data in _read_set(root):
            try:
                img = open_image(data, max_image_pixels).convert("RGB")
            except Exception as e:  # a broken eval image cannot leak into training in a recognisable form
                log.warning("evaluation set %s: image %s skipped (%s)", name, key, e)
                continue
            h, hf = perceptual_hashes(img)
            keys.append(key)
            hashes.append(h)
            flips.append(hf)
            if loaded is not None:
                images.append(img)
        emb = None
        if loaded is not None:
            emb = Embedder(loaded, next(loaded.model.parameters()).device, batch_size).images(images)
        sets.append(EvalFeatures(name, keys, np.array(hashes, dtype=np.uint64), np.array(flips, dtype=np.uint64),
                                 emb))
    return sets


def nearest_hash(train: np.ndarray, train_flip: np.ndarray, eval_hash: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(smallest Hamming distance from each training hash or its mirror to any eval hash, the eval index of
    the first one at that distance), blocked. Distance 65 and index -1 where there are no eval hashes."""
    n = len(train)
    dist = np.full(n, 65, dtype=np.int16)
    arg = np.full(n, -1, dtype=np.int64)
    if len(eval_hash) == 0:
        return dist, arg
    ev = np.asarray(eval_hash, dtype=np.uint64)[None, :]
    block = max(1, HASH_BLOCK * 1024 // max(1, len(eval_hash)))
    for s in range(0, n, block):
        a = np.asarray(train[s:s + block], dtype=np.uint64)[:, None]
        b = np.asarray(train_flip[s:s + block], dtype=np.uint64)[:, None]
        d = np.minimum(hamming(a, ev), hamming(b, ev))
        j = d.argmin(axis=1)
        arg[s:s + block] = j
        dist[s:s + block] = d[np.arange(len(j)), j]
    return dist, arg


def decontaminate(phash: np.ndarray, phash_flip: np.ndarray, emb: np.ndarray | None, alive: np.ndarray,
                  eval_sets: list[EvalFeatures], *, max_distance: int, cosine: float | None) -> StageResult:
    """Drop alive training samples that match an evaluation image (module docstring)."""
    alive = np.asarray(alive, dtype=bool)
    n = len(alive)
    if len(phash) != n or len(phash_flip) != n:
        raise ValueError(f"decontam: {len(phash)} hashes and {len(phash_flip)} mirror hashes for {n} samples")
    if not 0 <= max_distance <= 64:
        raise ValueError(f"decontam: max_distance is a number of bits, 0..64, got {max_distance}")
    result = StageResult.empty(STAGE, n)
    idx = np.flatnonzero(alive)
    set_of = np.concatenate([np.full(len(s.keys), i, dtype=np.int64) for i, s in enumerate(eval_sets)]
                            or [np.zeros(0, np.int64)])
    keys = [k for s in eval_sets for k in s.keys]
    labels = np.array([f"{eval_sets[i].name}:{k}" for i, k in zip(set_of, keys)], dtype=object)
    all_hash = np.concatenate([s.phash for s in eval_sets] or [np.zeros(0, np.uint64)]).astype(np.uint64)

    dist, arg = nearest_hash(np.asarray(phash)[idx], np.asarray(phash_flip)[idx], all_hash)
    result.score[idx] = np.where(arg >= 0, dist, np.nan)
    hash_hit = (dist <= max_distance) & (arg >= 0)
    match = np.where(hash_hit, arg, -1)

    emb_hits = 0
    if cosine is not None:
        if emb is None or any(s.emb is None for s in eval_sets):
            raise ValueError("decontam: cosine matching needs training and evaluation image embeddings")
        eval_emb = [s.emb for s in eval_sets if len(s.keys)]
        if eval_emb and len(idx):
            faiss = require("faiss", "embedding decontamination (clipkit curate)")
            ev = np.ascontiguousarray(np.concatenate(eval_emb), dtype=np.float32)
            index = faiss.IndexFlatIP(ev.shape[1])
            index.add(ev)
            for s in range(0, len(idx), 65536):
                rows = idx[s:s + 65536]
                sims, nn = index.search(np.ascontiguousarray(np.asarray(emb)[rows], dtype=np.float32), 1)
                hit = (sims[:, 0] >= cosine) & (match[s:s + 65536] < 0)
                match[s:s + 65536][hit] = nn[hit, 0]
                emb_hits += int(hit.sum())

    dropped = idx[match >= 0]
    result.drop[dropped] = True
    result.reason[dropped] = REASON
    result.detail[dropped] = labels[match[match >= 0]]
    per_set = np.bincount(set_of[match[match >= 0]], minlength=len(eval_sets))
    result.summary = {
        "max_distance": int(max_distance), "cosine": None if cosine is None else float(cosine),
        "eval_images": {s.name: len(s.keys) for s in eval_sets},
        "matches": {s.name: int(c) for s, c in zip(eval_sets, per_set)},
        "hash_matches": int(hash_hit.sum()), "embedding_matches": emb_hits,
        "dropped": {REASON: int(len(dropped))},
    }
    return result
