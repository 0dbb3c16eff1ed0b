"""`clipkit search`: the nearest neighbours of a text or image query in an index built by `clipkit index`.

    clipkit search --index IDX --text "a red circle" [-k 10] [--modality image|text] [--checkpoint CK [--model NAME]]
    clipkit search --index IDX --image query.jpg

    searcher = Searcher("IDX")                      # the checkpoint recorded in IDX/clipkit_embed.json
    searcher.search_text("a red circle", k=5)        # -> [{"id", "key", "caption", "score", ...}, ...]

Queries are encoded with the checkpoint that produced the embeddings (or --checkpoint), L2-normalised and
searched by inner product (cosine). Query vectors are only comparable with the index's vectors when both
come from the same weights: the sha256 of the weights that made the embeddings (recorded by `clipkit embed`
in clipkit_embed.json, which `clipkit index` copies) must equal that of the weights loaded to encode
queries, or queries are refused with the reason, unless --allow-other-weights (allow_other_weights=True).
An index with no clipkit_embed.json (embeddings from another tool) records nothing to compare: the
checkpoint given is trusted. `modality` names the index searched: "image" finds images, "text"
finds captions, whatever the query is. Results are ordered by score, ties by row.
"""
from __future__ import annotations

import argparse
import base64
import json
import math
import sys
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..errors import UserError
from ..extras import require
from .index import EMBED_INFO, INDEX_FORMAT, INFO_FILE, KINDS, set_search_params

# Search parameters each index type takes; an override meant for another type (--nprobe on an exact
# index beside an IVF one) is left out rather than refused.
MODEL_HELP = ("the architecture of a checkpoint that does not carry one (an OpenCLIP epoch_N.pt, a bare state "
              "dict): an open_clip or clipkit name, or a JSON config; default: the one `clipkit embed` recorded")
TUNABLE = {"ivf_flat": ("nprobe",), "ivf_pq": ("nprobe",), "hnsw": ("efSearch",)}
MAX_TEXT_CHARS = 10_000  # a caption-sized query; the tokenizer keeps only its context length anyway


class MetadataStore:
    """Rows of IDX/metadata.parquet by index row, reading only the row groups that hold them."""

    def __init__(self, path: Path, cached_groups: int = 64) -> None:
        self.file = pq.ParquetFile(path)
        sizes = [self.file.metadata.row_group(i).num_rows for i in range(self.file.metadata.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.count = int(self.starts[-1])
        self.cache: OrderedDict[int, list[dict]] = OrderedDict()
        self.cached_groups = cached_groups
        self.lock = threading.Lock()  # one ParquetFile is not safe to read from several threads

    def rows(self, ids: list[int]) -> list[dict]:
        out = []
        with self.lock:
            for i in ids:
                group = int(np.searchsorted(self.starts, i, side="right") - 1)
                out.append(self._group(group)[i - int(self.starts[group])])
        return out

    def _group(self, group: int) -> list[dict]:
        if group in self.cache:
            self.cache.move_to_end(group)
        else:
            self.cache[group] = [_jsonable_row(r) for r in self.file.read_row_group(group).to_pylist()]
            if len(self.cache) > self.cached_groups:
                self.cache.popitem(last=False)
        return self.cache[group]


def _jsonable(value):
    """Parquet values as JSON can carry them (NaN as null, bytes as base64, dates as ISO text)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _jsonable_row(row: dict) -> dict:
    return {k: _jsonable(v) for k, v in row.items()}


def read_index_info(index_dir: str | Path) -> dict:
    info_path = Path(index_dir) / INFO_FILE
    if not info_path.is_file():
        raise UserError(f"{index_dir} is not an index directory (no {INFO_FILE}): build one with `clipkit index`")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{info_path} is not valid JSON: {e}") from None
    if info.get("format") != INDEX_FORMAT:
        raise UserError(f"{info_path}: format {info.get('format')!r}, expected {INDEX_FORMAT!r}")
    return info


class Searcher:
    """Text, image and vector queries against the faiss indexes of one index directory.

    The model is loaded on the first text or image query (vector queries need none). Safe to share between
    threads: faiss searches are read-only, and model loading and metadata reads are serialised."""

    def __init__(self, index_dir: str | Path, checkpoint: str | Path | None = None,
                 search_params: dict | None = None, device: str = "cpu", allow_other_weights: bool = False,
                 model_name: str | None = None) -> None:
        faiss = require("faiss", "searching an index")

        self.dir = Path(index_dir)
        self.info = read_index_info(self.dir)
        self.dim, self.count = int(self.info["dim"]), int(self.info["count"])
        self.indexes = {}
        for kind, entry in self.info["indexes"].items():
            self.indexes[kind] = faiss.read_index(str(self.dir / entry["file"]))
            overrides = {k: v for k, v in (search_params or {}).items() if k in TUNABLE.get(entry["type"], ())}
            set_search_params(self.indexes[kind], {**entry.get("search_params", {}), **overrides})
        self.metadata = MetadataStore(self.dir / self.info["metadata"])
        self.embed_info = self._embed_info()
        self.checkpoint = str(checkpoint) if checkpoint else (self.embed_info or {}).get("checkpoint")
        self.allow_other_weights = allow_other_weights
        # The architecture of a checkpoint that does not carry one (an OpenCLIP epoch_N.pt, a bare state dict):
        # the name given, else the one `clipkit embed` recorded (used only where the file leaves it open).
        self.model_name = model_name
        self.device = device
        self._model = None
        self._model_lock = threading.Lock()

    @property
    def modalities(self) -> list[str]:
        return list(self.indexes)

    def _embed_info(self) -> dict | None:
        """What `clipkit embed` recorded about the vectors (None: embeddings from another tool)."""
        path = self.dir / EMBED_INFO
        if not path.is_file():
            return None
        try:
            info = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not the JSON object `clipkit embed` writes: {e}") from None
        if not isinstance(info, dict):
            raise UserError(f"{path} is not the JSON object `clipkit embed` writes")
        return info

    # -- encoding queries ------------------------------------------------------------------------------

    def load_model(self):
        """(model, tokenizer, image transform), loaded once from the checkpoint."""
        with self._model_lock:
            if self._model is None:
                self._model = self._load_model()
        return self._model

    def _load_model(self):
        from ..models import load_model
        from ..models.weights import load_any

        if not self.checkpoint:
            raise UserError(f"{self.dir} records no checkpoint to encode queries with (no {EMBED_INFO}): pass "
                            "--checkpoint, or query with vectors")
        if not Path(self.checkpoint).exists():
            raise UserError(f"checkpoint {self.checkpoint} (recorded in {self.dir / EMBED_INFO}) not found: pass "
                            "--checkpoint")
        if self.model_name:
            loaded = load_model(self.checkpoint, device=self.device, model_name=self.model_name)
        else:
            loaded = load_any(self.checkpoint, (self.embed_info or {}).get("model_name"), device=self.device)
        loaded.model.eval()
        width = loaded.model_cfg.get("embed_dim")
        if width is not None and width != self.dim:
            raise UserError(f"checkpoint {self.checkpoint} encodes {width}-d embeddings; {self.dir} holds "
                            f"{self.dim}-d vectors: pass the checkpoint that made them")
        self._check_weights(loaded.model)
        return loaded.model, loaded.tokenizer, loaded.eval_transform

    def _check_weights(self, model) -> None:
        """Refuse weights other than the ones the vectors were made with: their queries would land anywhere."""
        from ..models.digest import weights_sha256

        if self.embed_info is None or self.allow_other_weights:
            return
        made_with = self.embed_info.get("weights_sha256")
        loaded = weights_sha256(model)
        if made_with == loaded:
            return
        where = self.dir / EMBED_INFO
        if made_with is None:
            raise UserError(f"{where} records no weights digest (embeddings from a clipkit that did not record it), "
                            f"so checkpoint {self.checkpoint} cannot be checked against them: re-run `clipkit embed` "
                            "and `clipkit index`, or pass --allow-other-weights")
        raise UserError(f"checkpoint {self.checkpoint} holds other weights (sha256 {loaded[:16]}) than the ones "
                        f"{self.dir}'s vectors were made with (sha256 {str(made_with)[:16]}, from "
                        f"{self.embed_info.get('checkpoint')}): pass that checkpoint, re-embed, or pass "
                        "--allow-other-weights")

    def encode_text(self, texts: list[str]) -> np.ndarray:
        import torch

        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise UserError("text query is empty")
            if len(text) > MAX_TEXT_CHARS:
                raise UserError(f"text query has {len(text)} characters; at most {MAX_TEXT_CHARS} are accepted")
        model, tokenizer, _ = self.load_model()
        with torch.no_grad():
            features = model.encode_text(tokenizer(texts).to(self.device))
        return _normalised(features)

    def encode_image(self, images: list) -> np.ndarray:
        """Images as bytes, paths or PIL images."""
        import torch

        model, _, transform = self.load_model()
        pixels = torch.stack([transform(decode_image(im)) for im in images]).to(self.device)
        with torch.no_grad():
            return _normalised(model.encode_image(pixels))

    # -- searching -------------------------------------------------------------------------------------

    def search_vectors(self, queries: np.ndarray, k: int = 10, modality: str = "image") -> list[list[dict]]:
        """For each query row: up to k results {"id", "score", metadata columns...}, best first."""
        index = self._index(modality)
        queries = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if queries.shape[1] != self.dim or not np.isfinite(queries).all():
            raise UserError(f"query vectors must be finite and {self.dim}-d; got shape {queries.shape}")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise UserError(f"k must be a positive integer, got {k!r}")
        scores, ids = index.search(queries, int(min(k, self.count)))
        return [self._results(s, i) for s, i in zip(scores, ids)]

    def _results(self, scores: np.ndarray, ids: np.ndarray) -> list[dict]:
        found = ids >= 0  # an approximate index may find fewer than k
        order = np.lexsort((ids[found], -scores[found]))  # by score, then by row: a stable order for ties
        ids, scores = ids[found][order], scores[found][order]
        rows = self.metadata.rows([int(i) for i in ids])
        # "id" and "score" are the service's own fields: a metadata column of the same name does not shadow them.
        return [{"id": int(i), **{c: v for c, v in row.items() if c not in ("id", "score")}, "score": float(s)}
                for i, s, row in zip(ids, scores, rows)]

    def _index(self, modality: str):
        if modality not in self.indexes:
            raise UserError(f"no {modality!r} index in {self.dir}: it holds {', '.join(self.indexes) or 'none'}")
        return self.indexes[modality]

    def search_text(self, text: str, k: int = 10, modality: str = "image") -> list[dict]:
        return self.search_vectors(self.encode_text([text]), k, modality)[0]

    def search_image(self, image, k: int = 10, modality: str = "image") -> list[dict]:
        return self.search_vectors(self.encode_image([image]), k, modality)[0]

    def rows(self, ids: list[int]) -> list[dict]:
        """Metadata of index rows."""
        bad = [i for i in ids if not isinstance(i, (int, np.integer)) or not 0 <= i < self.count]
        if bad:
            raise UserError(f"ids out of range [0, {self.count}): {bad[:5]}")
        return self.metadata.rows([int(i) for i in ids])


def _normalised(features) -> np.ndarray:
    x = features.float().cpu().numpy()
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def decode_image(image):
    """bytes, a path or a PIL image -> RGB PIL image, with one clear error for anything undecodable."""
    from PIL import Image

    from ..data.decode import DEFAULT_MAX_IMAGE_PIXELS, open_image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        try:
            image = Path(image).read_bytes()
        except OSError as e:
            raise UserError(f"cannot read image {image}: {e.strerror or e}") from None
    try:
        im = open_image(bytes(image), DEFAULT_MAX_IMAGE_PIXELS)
        return im.convert("RGB")  # decodes the pixels: truncated files fail here
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise UserError(f"the image could not be decoded: {type(e).__name__}: {e}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, metavar="DIR", help="index directory written by `clipkit index`")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a text query")
    query.add_argument("--image", help="an image file as query")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--modality", default="image", choices=sorted(KINDS),
                   help="which index to search: image (default) finds images, text finds captions")
    p.add_argument("--checkpoint", metavar="CKPT", default=None,
                   help="encode the query with this checkpoint instead of the one recorded in the index (its "
                        "weights must be the ones the embeddings were made with)")
    p.add_argument("--model", default=None, metavar="NAME", help=MODEL_HELP)
    p.add_argument("--allow-other-weights", action="store_true", help="encode the query even with weights "
                   "whose sha256 differs from the one recorded with the embeddings (results may be meaningless)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists to visit (overrides index_info.json)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW search breadth (overrides index_info.json)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="clipkit search", description="nearest neighbours of a query, as JSON")
    add_arguments(p)
    args = p.parse_args(argv)
    params = {k: v for k, v in (("nprobe", args.nprobe), ("efSearch", args.ef_search)) if v is not None}
    searcher = Searcher(args.index, args.checkpoint, params, allow_other_weights=args.allow_other_weights,
                        model_name=args.model)
    if args.text is not None:
        results = searcher.search_text(args.text, args.k, args.modality)
    else:
        results = searcher.search_image(args.image, args.k, args.modality)
    json.dump(results, sys.stdout, indent=2, ensure_ascii=False)
    print()
    return 0
