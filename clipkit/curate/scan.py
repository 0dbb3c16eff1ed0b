"""Scanning: one pass over each input shard computes every per-sample feature the stages read, written to one
feature file per shard (OUT/work/NNNNN.parquet, plus NNNNN.image_emb.npy / NNNNN.text_emb.npy with a model).

A shard's files are written atomically and its record (NNNNN.json: samples, skips by reason) last, so a shard
with a record is finished: a re-run keeps it. OUT/work/features.json holds the fingerprint of everything that
changes the features (the input shards, the model, the decoder's limits, the language detector's candidates);
a re-run with a different one is refused instead of mixing features of two configurations.

Bad samples (no image, no caption, a caption that is not UTF-8 or empty, an image that does not decode or is
above the pixel limit, a damaged tar) are skipped and counted by reason, as in training (clipkit.data.skips).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..atomic import atomic_write, atomic_write_text
from ..config.schema import CurateConfig
from ..data.decode import ImageTooLarge, open_image
from ..data.skips import SkipCounter
from ..data.tario import read_shard
from ..errors import UserError
from ..extras import require
from .hashing import perceptual_hashes, sha256_hex, thumbnail

log = logging.getLogger("clipkit.curate")

COLUMNS = ("key", "shard", "index", "image_member", "sha256", "width", "height", "caption", "words", "tokens",
           "language", "language_confidence", "phash", "phash_flip", "thumb")


def feature_fingerprint(cfg: CurateConfig, urls: list[str]) -> dict:
    """What the features depend on; a re-run must match it to keep finished shards."""
    model = None
    if cfg.model is not None:
        p = Path(cfg.model)
        stat = p.stat()
        model = {"path": str(p.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                 "name": cfg.model_name}
    return {"shards": list(urls), "model": model, "max_image_pixels": cfg.max_image_pixels,
            "image_key": cfg.image_key, "caption_key": cfg.caption_key,
            "detector_languages": sorted(cfg.filters.detector_languages), "version": 2}  # 2: the thumbnail column


def check_fingerprint(work: Path, fingerprint: dict, write: bool) -> None:
    """Refuse (UserError) a work folder made with other feature settings; record ours when `write`."""
    path = work / "features.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != fingerprint:
            changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            raise UserError(f"{work} holds features made with other settings ({', '.join(changed)} changed): "
                            f"use a new --out, or delete {work} to recompute them")
    elif write:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(fingerprint, indent=1, sort_keys=True))


def shard_paths(work: Path, shard: int) -> dict[str, Path]:
    stem = f"{shard:05d}"
    return {"table": work / f"{stem}.parquet", "image_emb": work / f"{stem}.image_emb.npy",
            "text_emb": work / f"{stem}.text_emb.npy", "record": work / f"{stem}.json"}


def shard_done(work: Path, shard: int) -> bool:
    return shard_paths(work, shard)["record"].exists()


class LanguageDetector:
    """lingua's detector, built once, restricted to the candidate languages (nothing downloaded: its models
    ship in the wheel)."""

    def __init__(self, codes: list[str]) -> None:
        self.codes = list(codes)
        self.detector = None
        if self.codes:
            lingua = require("lingua", "caption language detection (clipkit curate)")
            isos = [lingua.IsoCode639_1.from_str(c) for c in self.codes]
            self.detector = lingua.LanguageDetectorBuilder.from_iso_codes_639_1(*isos).build()

    def __call__(self, text: str) -> tuple[str, float]:
        """(ISO 639-1 code, confidence) of the most likely language; ("", 0.0) when none."""
        if self.detector is None:
            return "", 0.0
        values = self.detector.compute_language_confidence_values(text)
        if not values or values[0].value <= 0:
            return "", 0.0
        return values[0].language.iso_code_639_1.name.lower(), float(values[0].value)


def token_counter(tokenizer) -> Callable[[str], int]:
    """Caption -> its number of tokens (without start/end tokens, not cut at the context length)."""
    inner = getattr(tokenizer, "encode", None) or getattr(getattr(tokenizer, "tokenizer", None), "encode", None)
    if inner is not None:
        return lambda text: len(inner(text))
    return lambda text: max(int((tokenizer([text])[0] != 0).sum()) - 2, 0)


def default_tokenizer():
    import open_clip

    return open_clip.get_tokenizer("RN50")  # open_clip's default BPE tokenizer (vocabulary inside the package)


@dataclass
class Embedder:
    """Batched image and text embeddings (float32, L2-normalised) with a loaded model's towers."""

    loaded: object  # clipkit.models.LoadedModel
    device: object
    batch_size: int

    def __call__(self, images: list, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.images(images), self.texts(captions)

    def images(self, images: list) -> np.ndarray:
        """PIL images -> [N, D] through the model's eval transform and image tower."""
        return self._batched(images, lambda chunk: self.loaded.model.encode_image(
            torch.stack([self.loaded.eval_transform(im) for im in chunk]).to(self.device)))

    def texts(self, captions: list[str]) -> np.ndarray:
        """Captions -> [N, D] through the model's tokenizer and text tower."""
        return self._batched(captions, lambda chunk: self.loaded.model.encode_text(
            self.loaded.tokenizer(chunk).to(self.device)))

    def _batched(self, items: list, encode) -> np.ndarray:
        rows = []
        with torch.no_grad():
            for s in range(0, len(items), self.batch_size):
                rows.append(torch.nn.functional.normalize(encode(items[s:s + self.batch_size]).float(), dim=-1)
                            .cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


@dataclass
class DecodedSample:
    """One readable sample of a shard: where it is, its image member's bytes and decoded RGB image, its caption."""

    index: int
    key: str
    image_member: str
    data: bytes
    caption: str
    rgb: object  # PIL.Image.Image, RGB


def decoded_samples(url: str, cfg: CurateConfig, counter: SkipCounter) -> Iterator[DecodedSample]:
    """The shard's samples with an image that decodes and a caption, in shard order; the others are skipped and
    counted by reason on `counter`."""
    image_keys = cfg.image_key.split(";")
    for index, sample in read_shard(url, counter):
        where = f"{url}:{sample['__key__']}"
        img_key = next((k for k in image_keys if k in sample), None)
        if img_key is None:
            counter.skip("missing_image", where, f"no {'/'.join(image_keys)} member")
            continue
        if cfg.caption_key not in sample:
            counter.skip("missing_caption", where, f"no .{cfg.caption_key} member")
            continue
        try:
            text = sample[cfg.caption_key].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            counter.skip("caption_not_utf8", where, e)
            continue
        if not text:
            counter.skip("empty_caption", where)
            continue
        data = sample[img_key]
        try:
            im = open_image(data, cfg.max_image_pixels)
            im.load()
            rgb = im.convert("RGB")
        except ImageTooLarge as e:
            counter.skip("image_too_large", where, e)
            continue
        except Exception as e:  # corrupt or truncated image data
            counter.skip("image_decode_error", where, repr(e))
            continue
        yield DecodedSample(index, sample["__key__"], img_key, data, text, rgb)


def scan_shard(url: str, shard: int, work: Path, cfg: CurateConfig, detector: LanguageDetector,
               count_tokens: Callable[[str], int], embedder: Embedder | None) -> dict:
    """Features of one shard into `work`; returns its record (samples, skips by reason)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    counter = SkipCounter()
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    images, captions = [], []
    for d in decoded_samples(url, cfg, counter):
        try:
            phash, flip = perceptual_hashes(d.rgb)
            thumb = thumbnail(d.rgb)
        except Exception as e:  # an image that decodes but cannot be hashed counts as undecodable
            counter.skip("image_decode_error", f"{url}:{d.key}", repr(e))
            continue
        text, rgb = d.caption, d.rgb
        lang, conf = detector(text)
        for name, value in (("key", d.key), ("shard", url), ("index", d.index), ("image_member", d.image_member),
                            ("sha256", sha256_hex(d.data)), ("width", rgb.width), ("height", rgb.height),
                            ("caption", text), ("words", len(text.split())), ("tokens", count_tokens(text)),
                            ("language", lang), ("language_confidence", conf), ("phash", phash),
                            ("phash_flip", flip), ("thumb", thumb)):
            rows[name].append(value)
        if embedder is not None:
            images.append(rgb)
            captions.append(text)
    paths = shard_paths(work, shard)
    types = {"index": pa.int64(), "width": pa.int32(), "height": pa.int32(), "words": pa.int32(),
             "tokens": pa.int32(), "language_confidence": pa.float32(), "phash": pa.uint64(),
             "phash_flip": pa.uint64(), "thumb": pa.binary()}
    table = pa.table({c: pa.array(rows[c], type=types.get(c, pa.string())) for c in COLUMNS})
    if embedder is not None:
        img, txt = embedder(images, captions)
        atomic_write(paths["image_emb"], lambda f: np.save(f, img.astype(np.float32)))
        atomic_write(paths["text_emb"], lambda f: np.save(f, txt.astype(np.float32)))
    atomic_write(paths["table"], lambda f: pq.write_table(table, f))
    record = {"url": url, "samples": len(rows["key"]), "skipped": dict(counter.counts)}
    atomic_write_text(paths["record"], json.dumps(record, sort_keys=True))
    return record


def load_features(work: Path, n_shards: int, with_embeddings: bool) -> tuple[dict[str, np.ndarray], dict]:
    """Every shard's features, concatenated in shard order: (columns, {"image_emb", "text_emb"} or {})."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(shard_paths(work, s)["table"]) for s in range(n_shards)]
    table = pa.concat_tables(tables) if tables else None
    cols: dict[str, np.ndarray] = {}
    for c in COLUMNS:
        col = table.column(c).to_numpy() if table is not None else np.zeros(0)
        cols[c] = col.astype(object) if col.dtype == object or c in ("key", "shard", "caption", "language",
                                                                       "sha256", "image_member", "thumb") else col
    emb = {}
    if with_embeddings:
        for name in ("image_emb", "text_emb"):
            parts = [np.load(shard_paths(work, s)[name]) for s in range(n_shards)]
            emb[name] = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)
    return cols, emb



