"""`clipkit index`: faiss indexes over embeddings exported in clip-retrieval's layout.

    clipkit index --embeddings EMB --out IDX [--memory-budget 4GB] [--kind image|text|both]

EMB holds img_emb/img_emb_{N}.npy, text_emb/text_emb_{N}.npy (L2-normalised rows), metadata/metadata_{N}.parquet
and clipkit_embed.json. IDX receives clip-retrieval's index names (image.index, text.index), one
metadata.parquet whose row i describes index row i, a copy of clipkit_embed.json (the checkpoint that
encodes queries) and index_info.json (which index was chosen, why, and its search parameters).

The index type follows autofaiss's heuristics: exact search (IndexFlatIP) for small sets; above that the
best structure that fits the memory budget: HNSW while full vectors plus graph links fit, then IVF-Flat,
then IVF-PQ with the largest code the budget allows. Scores are inner products of normalised vectors
(cosine). Parts are streamed: a part is memory-mapped, added in chunks and released; only the training
sample of a compressed index is held in memory at once.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_path, atomic_write_text
from ..errors import UserError
from ..extras import require

KINDS = {"image": ("img_emb", "image.index"), "text": ("text_emb", "text.index")}
METADATA_FILE = "metadata.parquet"
INFO_FILE = "index_info.json"
EMBED_INFO = "clipkit_embed.json"
INDEX_FORMAT = "clipkit-index-v1"

EXACT_BELOW = 10_000  # below this, exact search costs well under a millisecond a query: nothing to gain
IVF_FLAT_BELOW = 1_000_000  # autofaiss's threshold for trying an uncompressed IVF
PQ_SIZES = (256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4)  # bytes per vector; each must divide dim
MIN_PQ_SUBDIM = 4  # narrower sub-vectors cost more to train than a plain scalar code would save
MAX_HNSW_M = 32
ADD_CHUNK = 65_536  # rows converted to float32 at a time while adding
NORM_TOLERANCE = 0.02  # float16 storage moves a unit norm by ~1e-3; anything further was not normalised
METADATA_ROW_GROUP = 4096  # small row groups: a query's hits read a few KB each, not whole parts


@dataclass
class IndexChoice:
    """What to build for one modality, and what it should cost in memory."""
    type: str  # flat | hnsw | ivf_flat | ivf_pq
    factory: str  # faiss.index_factory description
    estimated_bytes: int
    search_params: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Choosing the index


def parse_memory(text: str | int) -> int:
    """'4GB', '512MB', '1.5G', '300KiB' or a number of bytes -> bytes (binary units, as autofaiss)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B?)\s*", str(text).upper())
    if not m or (m.group(3) == "I"):
        raise UserError(f"memory budget {text!r}: expected a size such as 4GB, 512MB or 300KB")
    value = float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " ")
    if value < 1:
        raise UserError(f"memory budget {text!r} must be positive")
    return int(value)


def _nlist(n: int) -> int:
    """Inverted lists: autofaiss's first choice (the power of two nearest 4*sqrt(n) below 1M vectors), kept
    to at least 39 training points a list (faiss's minimum for stable k-means)."""
    if n < 1_000_000:
        nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    elif n < 10_000_000:
        nlist = 16_384
    elif n < 300_000_000:
        nlist = 65_536
    else:
        nlist = 131_072
    return max(1, min(nlist, 2 ** int(math.log2(max(n // 39, 1)))))


def _ivf_prefix(nlist: int) -> str:
    # Beyond ~10k lists a brute-force coarse assignment dominates query time: autofaiss uses an HNSW quantizer.
    return f"IVF{nlist}_HNSW32" if nlist >= 16_384 else f"IVF{nlist}"


def _ivf_overhead(nlist: int, dim: int) -> int:
    quantizer = nlist * dim * 4 + (nlist * (8 * MAX_HNSW_M + 16) if nlist >= 16_384 else 0)
    return quantizer + nlist * 48  # two vectors (codes, ids) per list


def _nprobe(nlist: int) -> int:
    # An eighth of the lists for small indexes (recall first), at most 256 for large ones (latency).
    return min(nlist, max(16, min(256, nlist // 8)))


def choose_index(n: int, dim: int, budget: int, exact_below: int = EXACT_BELOW) -> IndexChoice:
    """The index autofaiss's heuristics pick for n vectors of dim under a memory budget (bytes)."""
    flat = n * dim * 4
    if n < exact_below:
        if flat > budget:
            raise UserError(f"an exact index of {n} x {dim} vectors needs {_size(flat)}; the memory budget is "
                            f"{_size(budget)}: raise --memory-budget")
        return IndexChoice("flat", "Flat", flat)
    hnsw_m = min(MAX_HNSW_M, (budget // n - 4 * dim - 24) // 8)
    if hnsw_m >= 8:  # graph search on full vectors: the best recall/latency while it fits
        return IndexChoice("hnsw", f"HNSW{hnsw_m}", n * (4 * dim + 8 * hnsw_m + 24), {"efSearch": 128},
                           {"M": int(hnsw_m), "efConstruction": 40})
    nlist = _nlist(n)
    overhead = _ivf_overhead(nlist, dim)
    params = {"nlist": nlist}
    if n < IVF_FLAT_BELOW and n * (4 * dim + 8) + overhead <= budget:
        return IndexChoice("ivf_flat", f"{_ivf_prefix(nlist)},Flat", n * (4 * dim + 8) + overhead,
                           {"nprobe": _nprobe(nlist)}, params)
    for m in PQ_SIZES:
        if dim % m or dim // m < MIN_PQ_SUBDIM:
            continue
        cost = n * (m + 8) + overhead + 256 * dim * 4  # codes and ids, coarse and PQ centroids
        if cost <= budget:
            return IndexChoice("ivf_pq", f"{_ivf_prefix(nlist)},PQ{m}x8", cost, {"nprobe": _nprobe(nlist)},
                               {**params, "pq_bytes": m, "pq_bits": 8})
    smallest = min((m for m in PQ_SIZES if dim % m == 0), default=None)
    need = n * ((smallest or dim) + 8) + overhead + 256 * dim * 4
    raise UserError(f"{n} x {dim} vectors need at least {_size(need)} even as the smallest compressed index; "
                    f"the memory budget is {_size(budget)}: raise --memory-budget")


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f}{unit}" if unit == "B" else f"{nbytes:.1f}{unit}"
        nbytes /= 1024
    return f"{nbytes:.1f}GB"


# ---------------------------------------------------------------------------------------------------------
# Reading the export


@dataclass
class Part:
    suffix: str  # the zero-padded N shared by the three folders
    rows: int
    files: dict  # kind -> .npy path, plus "metadata" -> parquet path


def _part_files(folder: Path, prefix: str, ext: str) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    pattern = re.compile(rf"{re.escape(prefix)}_(\d+)\.{ext}")
    found = {m.group(1): p for p in folder.iterdir() if (m := pattern.fullmatch(p.name))}
    return dict(sorted(found.items(), key=lambda kv: int(kv[0])))


def _npy_shape(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable .npy array: {e}") from None
    return arr.shape, arr.dtype


def find_parts(embeddings: str | Path, kinds: list[str]) -> tuple[list[Part], int]:
    """The export's parts in order, checked: the same N in every folder, the same rows per N, one dim."""
    root = Path(embeddings)
    if not root.is_dir():
        raise UserError(f"embeddings directory not found: {root}")
    meta = _part_files(root / "metadata", "metadata", "parquet")
    per_kind = {k: _part_files(root / KINDS[k][0], KINDS[k][0], "npy") for k in kinds}
    for kind, files in per_kind.items():
        if not files:
            other = "--kind text" if kind == "image" else "--kind image"
            raise UserError(f"no {KINDS[kind][0]}/{KINDS[kind][0]}_N.npy files in {root} (for {kind} only, "
                            f"pass {other})")
        if set(files) != set(meta):
            raise UserError(f"{root}: {KINDS[kind][0]}/ and metadata/ hold different parts "
                            f"({sorted(set(files) ^ set(meta))[:5]} in only one of them)")
    parts, dim = [], None
    for suffix, meta_path in meta.items():
        rows = _metadata_rows(meta_path)
        files = {"metadata": meta_path}
        for kind in kinds:
            path = per_kind[kind][suffix]
            shape, dtype = _npy_shape(path)
            if len(shape) != 2 or shape[0] != rows or dtype.kind != "f":
                raise UserError(f"{path}: expected {rows} rows of floats (as in {meta_path.name}), found an "
                                f"array of shape {shape} and type {dtype}")
            if dim is not None and shape[1] != dim:
                raise UserError(f"{path} holds {shape[1]}-d vectors; earlier parts hold {dim}-d")
            dim = shape[1]
            files[kind] = path
        parts.append(Part(suffix, rows, files))
    if not sum(p.rows for p in parts):
        raise UserError(f"{root} holds no embeddings")
    return parts, dim


def _metadata_rows(path: Path) -> int:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable parquet file: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# Building


def _chunks(parts: list[Part], kind: str):
    """(global row of the chunk's first row, float32 rows) over all parts, a chunk at a time."""
    start = 0
    for part in parts:
        arr = np.load(part.files[kind], mmap_mode="r", allow_pickle=False)
        for lo in range(0, part.rows, ADD_CHUNK):
            chunk = np.ascontiguousarray(arr[lo:lo + ADD_CHUNK], dtype=np.float32)
            _check_normalised(chunk, part.files[kind], lo)
            yield start + lo, chunk
        start += part.rows
        del arr  # release the mapping before the next part


def _check_normalised(chunk: np.ndarray, path: Path, offset: int) -> None:
    norms = np.linalg.norm(chunk, axis=1)
    bad = np.flatnonzero(~(np.abs(norms - 1) <= NORM_TOLERANCE))  # NaN counts as bad
    if bad.size:
        raise UserError(f"{path}: row {offset + bad[0]} has norm {norms[bad[0]]:.4g}; rows must be L2-normalised "
                        "(cosine similarity is searched as an inner product)")


def _training_sample(parts: list[Part], kind: str, n: int, size: int, seed: int) -> np.ndarray:
    """A uniform sample of rows, gathered part by part from the memory maps."""
    rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)) if size < n else np.arange(n)
    out, start = [], 0
    for part in parts:
        local = rows[(rows >= start) & (rows < start + part.rows)] - start
        if local.size:
            arr = np.load(part.files[kind], mmap_mode="r", allow_pickle=False)
            out.append(np.asarray(arr[local], dtype=np.float32))
        start += part.rows
    return np.ascontiguousarray(np.concatenate(out))


def _train_size(choice: IndexChoice, n: int) -> int:
    # faiss's k-means keeps at most 256 points a centroid; 64 a list is plenty, 2**16 covers the PQ codebooks.
    return min(n, max(64 * choice.params.get("nlist", 0), 2 ** 16), 2 ** 20)


def set_search_params(index, params: dict) -> None:
    import faiss

    space = faiss.ParameterSpace()  # reaches through wrappers (pre-transforms, IVF quantizers)
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def build_one(parts: list[Part], kind: str, n: int, dim: int, choice: IndexChoice, seed: int):
    """Build and fill one faiss index; returns it and how many vectors trained it."""
    import faiss

    index = faiss.index_factory(dim, choice.factory, faiss.METRIC_INNER_PRODUCT)
    if choice.type == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = choice.params["efConstruction"]
    trained_on = 0
    if not index.is_trained:
        if choice.type == "ivf_pq":
            # Polysemous training only serves Hamming-filtered search, which is never used here, and costs
            # more than the rest of training together.
            faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
        sample = _training_sample(parts, kind, n, _train_size(choice, n), seed)
        _check_normalised(sample, Path(f"the training sample of {kind} embeddings"), 0)
        index.train(sample)
        trained_on = len(sample)
        del sample
    for _, chunk in _chunks(parts, kind):
        index.add(chunk)
    set_search_params(index, choice.search_params)
    return index, trained_on


def _write_metadata(parts: list[Part], path: Path) -> list[str]:
    """All parts' metadata, in part order, as one parquet (row i describes index row i)."""
    schemas = [pq.read_schema(p.files["metadata"]) for p in parts]
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")  # e.g. an all-null column in a part
    except pa.ArrowException as e:
        raise UserError(f"metadata parts disagree on column types: {e}") from None
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for part in parts:
            table = pq.read_table(part.files["metadata"])
            for name in schema.names:
                if name not in table.column_names:
                    table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
            writer.write_table(table.select(schema.names).cast(schema), row_group_size=METADATA_ROW_GROUP)
    return schema.names


def build_index(embeddings: str | Path, out: str | Path, memory_budget: str | int = "4GB", kind: str = "both",
                exact_below: int = EXACT_BELOW, seed: int = 0, allow_incomplete: bool = False) -> dict:
    """Build IDX from an embeddings export; returns what index_info.json records."""
    kinds = list(KINDS) if kind == "both" else [kind]
    if any(k not in KINDS for k in kinds):
        raise UserError(f"--kind {kind!r}: expected image, text or both")
    budget = parse_memory(memory_budget)
    require("faiss", "building an index")
    parts, dim = find_parts(embeddings, kinds)
    embed_info = _embed_info(Path(embeddings), allow_incomplete)
    n = sum(p.rows for p in parts)
    choice = choose_index(n, dim, budget, exact_below)  # an impossible budget is refused before anything is written
    out = _prepare(Path(out), kinds)
    info = {"format": INDEX_FORMAT, "count": n, "dim": dim, "memory_budget_bytes": budget,
            "metadata": METADATA_FILE, "parts": [{"part": p.suffix, "rows": p.rows} for p in parts], "indexes": {},
            "checkpoint": embed_info["checkpoint"] if embed_info else None}
    info["metadata_columns"] = _write_metadata(parts, out / METADATA_FILE)
    for k in kinds:
        info["indexes"][k] = _write_index(parts, k, n, dim, choice, seed, out)
    if embed_info:  # carried along, so queries are encoded by the model that made the embeddings
        atomic_write_text(out / EMBED_INFO, json.dumps(embed_info, indent=2))
    else:  # (none in the export, so OUT is not the export itself: an earlier build's copy would mislead)
        (out / EMBED_INFO).unlink(missing_ok=True)
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=2))  # last: its presence marks a complete index
    return info


def _prepare(out: Path, kinds: list[str]) -> Path:
    """Create OUT, and clear what an earlier build left that this one will not rewrite."""
    out.mkdir(parents=True, exist_ok=True)
    (out / INFO_FILE).unlink(missing_ok=True)  # a rebuild that fails must not leave the old one looking complete
    for k, (_, name) in KINDS.items():
        if k not in kinds:
            (out / name).unlink(missing_ok=True)
    return out


def _write_index(parts: list[Part], kind: str, n: int, dim: int, choice: IndexChoice, seed: int, out: Path) -> dict:
    import faiss

    started = time.perf_counter()
    index, trained_on = build_one(parts, kind, n, dim, choice, seed)
    name = KINDS[kind][1]
    with atomic_path(out / name) as tmp:
        faiss.write_index(index, str(tmp))
    return {"file": name, **asdict(choice), "train_vectors": trained_on, "file_bytes": (out / name).stat().st_size,
            "build_seconds": round(time.perf_counter() - started, 3)}


def _embed_info(embeddings: Path, allow_incomplete: bool) -> dict | None:
    """The export's own record (its checkpoint encodes queries); an export still missing shards is refused."""
    src = embeddings / EMBED_INFO
    if not src.is_file():
        return None
    try:
        info = json.loads(src.read_text())
        checkpoint = info.get("checkpoint")
    except (json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"{src} is not the JSON object `clipkit embed` writes: {e}") from None
    if info.get("complete") is False and not allow_incomplete:
        raise UserError(f"{src}: the export is incomplete ({info.get('shards_complete')}/{info.get('shards')} shards "
                        "embedded): finish it by running `clipkit embed` again, or pass --allow-incomplete")
    return {**info, "checkpoint": checkpoint}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", required=True, metavar="DIR", help="the export: img_emb/, text_emb/, metadata/")
    p.add_argument("--out", metavar="DIR", required=True, help="index directory to write")
    p.add_argument("--memory-budget", default="4GB", help="memory each index may use when searched (default 4GB)")
    p.add_argument("--kind", default="both", choices=["image", "text", "both"])
    p.add_argument("--exact-below", type=int, default=EXACT_BELOW,
                   help=f"use exact search below this many vectors (default {EXACT_BELOW})")
    p.add_argument("--seed", type=int, default=0, help="seed of the training sample")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="index an export whose clipkit_embed.json says some shards are not embedded yet")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="clipkit index", description="faiss indexes over a clip-retrieval-style "
                                "embeddings export (image.index, text.index, metadata.parquet, index_info.json)")
    add_arguments(p)
    args = p.parse_args(argv)
    info = build_index(args.embeddings, args.out, args.memory_budget, args.kind, args.exact_below, args.seed,
                       args.allow_incomplete)
    for k, entry in info["indexes"].items():
        print(f"{k:5s} index : {Path(args.out) / entry['file']} ({entry['factory']}, {info['count']} x "
              f"{info['dim']}, {_size(entry['file_bytes'])}, search {entry['search_params'] or 'exact'})")
    print(f"metadata    : {Path(args.out) / METADATA_FILE}")
    if not info["checkpoint"]:
        print("note        : no clipkit_embed.json in the export: pass --checkpoint to `clipkit search`")
    return 0
