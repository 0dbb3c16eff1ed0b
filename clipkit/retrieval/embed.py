"""Image and text embeddings of shards, written in clip-retrieval's layout: `clipkit embed`.

    clipkit embed --checkpoint CK --data SPEC --out DIR [--batch-size 256] [--part-size 10000] [--workers 1]
    torchrun --nproc_per_node=8 -m clipkit embed ...      # each rank embeds its own shards

    embed_shards("runs/x/checkpoints/step_00001000", "s3://bucket/{00000..00999}.tar", "emb/")

What it writes (what `clip-retrieval index`, autofaiss and embedding-reader read):

    OUT/img_emb/img_emb_{N}.npy          float16 [rows, dim], L2-normalised image embeddings
    OUT/text_emb/text_emb_{N}.npy        float16 [rows, dim], L2-normalised caption embeddings
    OUT/metadata/metadata_{N}.parquet    key, image_path (= key, clip-retrieval's name), caption, and the
                                         fields of the sample's KEY.json (nested ones flattened as a.b)
    OUT/clipkit_embed.json               checkpoint, weights_sha256, model_name, dim, count, skipped by reason, ...

Part N holds the samples of one fixed range of one shard: shard s, sample indices [c*P, (c+1)*P) with P
= --part-size, bad samples left out; N is s then c as one zero-padded integer (shard digits, then 4 chunk
digits), the same in the three folders. Parts therefore never collide across ranks, and a re-run knows
which part every sample belongs to without reading anything. A part's three files are written complete
under hidden temporary names, then renamed into place, its metadata last; if a rename fails the part's
renamed files are removed again (clip-retrieval's readers pair .npy and .parquet files by sorted position:
a lone .npy would shift every later pair). A part whose three files exist is finished. Parts with no good
rows are not written (embedding-reader drops empty .npy files, which would shift the pairs the same way).

Finished parts are keyed by the model that made them: the sha256 of its weights as loaded
(clipkit.models.digest) and of its architecture, recorded in every part's parquet footer, every shard
record and OUT/clipkit_embed.json, with the checkpoint they were read from (a run directory resolved to its
step). A re-run with the same model (whatever path names it) and the same spec and part size skips
finished parts, and a shard whose parts are all finished is not even opened; a re-run with other weights
(the run trained on) discards the parts made with the old ones, says so in one log line, and recomputes.
`clipkit search` and `clipkit serve` refuse to encode queries with weights of another digest.

Bookkeeping lives in OUT/.clipkit_embed/ (hidden from consumers that glob *.npy / *.parquet): the
settings a re-run must share (plan.json) and one record per finished shard (its parts and skip counts).
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import itertools
import json
import logging
import os
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_write, publish, write_temporary
from ..config import DEFAULT_IMAGE_KEY
from ..distributed import resolve_device
from ..errors import UserError

log = logging.getLogger("clipkit.embed")
INFO_FILE = "clipkit_embed.json"
STATE_DIR = ".clipkit_embed"
FOLDERS = ("img_emb", "text_emb", "metadata")
CHUNK_DIGITS = 4  # parts per shard: at most 10**4 (shard samples / part size)
RESERVED = ("key", "image_path", "caption")  # metadata columns of ours; a json field of that name is dropped


# ----------------------------------------------------------------------------------------- the layout

class Layout:
    """Names and states of the parts under OUT."""

    def __init__(self, out: Path, num_shards: int) -> None:
        self.out = out
        self.shard_digits = max(5, len(str(num_shards - 1)))
        self.state = out / STATE_DIR

    def name(self, shard: int, chunk: int) -> str:
        if chunk >= 10 ** CHUNK_DIGITS:
            raise UserError(f"shard #{shard} holds more than {10 ** CHUNK_DIGITS} parts of --part-size samples: "
                            "use a larger --part-size (in a new --out)")
        return f"{shard:0{self.shard_digits}d}{chunk:0{CHUNK_DIGITS}d}"

    def chunk_of(self, name: str) -> tuple[int, int]:
        return int(name[:-CHUNK_DIGITS]), int(name[-CHUNK_DIGITS:])

    def paths(self, name: str) -> tuple[Path, Path, Path]:
        return (self.out / "img_emb" / f"img_emb_{name}.npy", self.out / "text_emb" / f"text_emb_{name}.npy",
                self.out / "metadata" / f"metadata_{name}.parquet")

    def record(self, shard: int) -> Path:
        return self.state / "shards" / f"{shard:0{self.shard_digits}d}.json"

    def create(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out} exists and is not a folder")
        for sub in (*FOLDERS, f"{STATE_DIR}/shards"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)

    def finished_parts(self) -> set[str]:
        """Names of the parts whose three files exist (the metadata, written last, included)."""
        names = []
        for folder, suffix in zip(FOLDERS, (".npy", ".npy", ".parquet")):
            prefix = f"{folder}_"  # img_emb/img_emb_N.npy, ...
            names.append({f[len(prefix):-len(suffix)] for f in os.listdir(self.out / folder)
                          if f.startswith(prefix) and f.endswith(suffix)})
        return names[0] & names[1] & names[2]

    def remove_part(self, name: str) -> None:
        """Metadata first: from its removal on, the part no longer counts as finished."""
        for path in reversed(self.paths(name)):
            path.unlink(missing_ok=True)


def _write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()))


# ------------------------------------------------------------------------------------- the parquet rows

def _flatten(meta: dict, prefix: str = "") -> dict:
    """Nested json objects as dotted columns, as clip-retrieval's json_normalize does."""
    flat = {}
    for k, v in meta.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _column(values: list):
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        # mixed types across rows (a width that is sometimes a string): keep every value, as JSON text
        return pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string())


def metadata_table(keys: list[str], captions: list[str], metas: list[dict], info: dict):
    """The part's parquet table: our columns, then the json fields in first-seen order; `info` (the part's
    skip counts) goes into the file's key-value metadata."""
    import pyarrow as pa

    flat = [_flatten(m) for m in metas]
    fields = [f for f in dict.fromkeys(itertools.chain.from_iterable(flat)) if f not in RESERVED]
    columns = {"key": pa.array(keys, pa.string()), "image_path": pa.array(keys, pa.string()),
               "caption": pa.array(captions, pa.string())}
    for name in fields:
        columns[name] = _column([row.get(name) for row in flat])
    return pa.table(columns).replace_schema_metadata({"clipkit": json.dumps(info)})


def read_part_info(path: Path) -> dict:
    """rows, skip counts and model of a finished part, from its parquet footer (no rows read); model is None
    for a part written before parts recorded theirs."""
    import pyarrow.parquet as pq

    md = pq.read_metadata(path)
    info = json.loads((md.metadata or {}).get(b"clipkit", b"{}"))
    return {"rows": md.num_rows, "skipped": info.get("skipped", {}), "model": info.get("model")}


# -------------------------------------------------------------------------------------------- encoding

@torch.inference_mode()
def encode_batch(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised (in fp32) image and text embeddings as float16 arrays. A model from clipkit.models runs
    its text tower only up to the batch's longest caption where that is exact (clipkit.models.trim)."""
    img = F.normalize(model.encode_image(images).float(), dim=-1)
    txt = F.normalize(model.encode_text(tokens).float(), dim=-1)
    return img.half().cpu().numpy(), txt.half().cpu().numpy()


# ---------------------------------------------------------------------------------------- parts in flight

@dataclass
class _Open:
    """Rows of one chunk received so far."""
    img: list = field(default_factory=list)
    txt: list = field(default_factory=list)
    keys: list = field(default_factory=list)
    captions: list = field(default_factory=list)
    meta: list = field(default_factory=list)


@dataclass
class _Shard:
    """What is known of one shard of this rank: its finished parts (rows, skips) and other skips."""
    parts: dict[str, dict] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)


class PartWriter:
    """Collects rows by chunk, writes each chunk as a part once its worker has moved past it, and a shard's
    record once all its chunks are in."""

    def __init__(self, layout: Layout, shards: dict[int, _Shard], urls: list[str], model: dict) -> None:
        self.layout, self.shards, self.urls, self.model = layout, shards, urls, model
        self.open: dict[tuple[int, int], _Open] = {}
        self.rows = self.parts_written = 0

    def add(self, batch, img: np.ndarray, txt: np.ndarray) -> None:
        start = 0
        for chunk, run in itertools.groupby(batch.chunks):  # a batch holds runs of rows of one chunk each
            end = start + len(list(run))
            part = self.open.setdefault(chunk, _Open())
            part.img.append(img[start:end])
            part.txt.append(txt[start:end])
            part.keys += batch.keys[start:end]
            part.captions += batch.captions[start:end]
            part.meta += batch.meta[start:end]
            start = end

    def close_chunk(self, shard: int, chunk: int, skipped: dict) -> None:
        part = self.open.pop((shard, chunk), None)
        if part is None:  # every sample of the chunk was skipped: nothing to write
            self.shards[shard].skipped.update(skipped)
            return
        name = self.layout.name(shard, chunk)
        img, txt = np.concatenate(part.img), np.concatenate(part.txt)
        info = {"shard": self.urls[shard], "chunk": chunk, "skipped": skipped, "model": self.model}
        write_part(self.layout.paths(name), img, txt, metadata_table(part.keys, part.captions, part.meta, info))
        self.shards[shard].parts[name] = {"rows": len(img), "skipped": skipped}
        self.rows += len(img)
        self.parts_written += 1

    def close_shard(self, shard: int, skipped: dict) -> None:
        state = self.shards[shard]
        state.skipped.update(skipped)
        # A shard that could not be opened is tried again by the next run; its count is kept meanwhile.
        complete = not skipped.get("shard_open_error")
        total = state.skipped + _part_skips(state.parts)
        _write_json(self.layout.record(shard), {"url": self.urls[shard], "complete": complete, "model": self.model,
                                                "parts": state.parts, "skipped": dict(total)})


def write_part(paths: tuple[Path, Path, Path], img: np.ndarray, txt: np.ndarray, table) -> None:
    """All three files are complete before any is renamed, and a failed rename takes the renamed ones back,
    so no lone embedding file is left (readers pair .npy and .parquet files by position); the metadata goes
    last: its presence marks the part finished."""
    import pyarrow.parquet as pq

    writes = (lambda f: np.save(f, img), lambda f: np.save(f, txt), lambda f: pq.write_table(table, f))
    temps = []
    try:
        for path, write in zip(paths, writes):
            temps.append(write_temporary(path, write))
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    publish(list(zip(temps, paths)))


# -------------------------------------------------------------------------------------- resume and plan

def _plan(urls: list[str], part_size: int, draft_margin: int) -> dict:
    return {"shards": len(urls), "urls_sha256": hashlib.sha256("\n".join(urls).encode()).hexdigest(),
            "part_size": part_size, "draft_margin": draft_margin}


def model_identity(loaded) -> dict:
    """What the vectors depend on besides the data: the weights as loaded and the architecture. Parts,
    shard records and clipkit_embed.json carry it; a part made by another model is stale."""
    from ..models.digest import weights_sha256

    cfg = json.dumps(loaded.model_cfg, sort_keys=True)
    return {"weights_sha256": weights_sha256(loaded.model),
            "model_cfg_sha256": hashlib.sha256(cfg.encode()).hexdigest()}


def check_plan(layout: Layout, plan: dict, is_main: bool) -> None:
    """A re-run must embed the same shards with the same part size (and decoding), or parts would mix. (The
    model may change: parts record theirs, and scan() discards the stale ones.)"""
    path = layout.state / "plan.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = [k for k in plan if saved.get(k) != plan[k]]
        if diff:
            raise UserError(f"{layout.out} holds embeddings made with other settings ({', '.join(diff)} differ: "
                            f"{', '.join(f'{k}={saved.get(k)!r}' for k in diff)}): use a new --out, or the same "
                            "--data, --part-size and --draft-margin to resume")
    elif is_main:
        _write_json(path, plan)


@dataclass
class Scan:
    states: dict[int, _Shard]  # what each of this rank's shards holds
    todo: list[int]  # the shards still to read
    done_chunks: dict[int, set[int]]  # their finished chunks
    discarded: int = 0  # parts made by another model, removed
    stale_weights: set[str] = field(default_factory=set)  # their weights' digests ("not recorded": older parts)


def scan(layout: Layout, shards: list[int], model: dict) -> Scan:
    """What OUT holds for `shards`, made by `model`; parts made by another model are removed."""
    finished = layout.finished_parts()
    by_shard: dict[int, list[str]] = {}
    for name in sorted(finished):
        by_shard.setdefault(layout.chunk_of(name)[0], []).append(name)
    result = Scan({}, [], {})
    for shard in shards:
        record = layout.record(shard)
        saved = json.loads(record.read_text()) if record.is_file() else None
        if saved and saved.get("model") == model and saved["complete"] and set(saved["parts"]) <= finished:
            other_skips = Counter(saved["skipped"]) - _part_skips(saved["parts"])
            result.states[shard] = _Shard(dict(saved["parts"]), other_skips)
            continue
        # To be read: its record goes (a crash from here on must not leave it vouching for parts being
        # replaced); its finished parts made by this model stay (skip counts are in their footers), the rest
        # is redone.
        record.unlink(missing_ok=True)
        kept = {}
        for name in by_shard.get(shard, []):
            info = read_part_info(layout.paths(name)[2])
            made_by = info.pop("model")
            if made_by == model:
                kept[name] = info
            else:
                layout.remove_part(name)
                result.discarded += 1
                result.stale_weights.add((made_by or {}).get("weights_sha256") or "not recorded")
        result.states[shard] = _Shard(kept)
        result.done_chunks[shard] = {layout.chunk_of(n)[1] for n in kept}
        result.todo.append(shard)
    return result


def _part_skips(parts: dict) -> Counter:
    total = Counter()
    for p in parts.values():
        total.update(p["skipped"])
    return total


def _totals(states: dict[int, _Shard]) -> tuple[int, Counter]:
    rows, skipped = 0, Counter()
    for s in states.values():
        rows += sum(p["rows"] for p in s.parts.values())
        skipped.update(_part_skips(s.parts))
        skipped.update(s.skipped)
    return rows, skipped


@contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_info(layout: Layout, plan: dict, made_by: dict, dim: int, num_shards: int) -> dict:
    """OUT/clipkit_embed.json from every shard record on disk made by this model (so each rank can write it,
    and the last one to finish writes the complete totals; the lock orders their writes). `made_by`: the
    model's identity, checkpoint and name."""
    with _locked(layout.state / "lock"):
        rows = parts = complete = 0
        skipped: Counter = Counter()
        for shard in range(num_shards):
            path = layout.record(shard)
            if not path.is_file():
                continue
            rec = json.loads(path.read_text())
            if rec.get("model") != made_by["model"]:  # another rank's shard, not yet redone with this model
                continue
            rows += sum(p["rows"] for p in rec["parts"].values())
            parts += len(rec["parts"])
            complete += rec["complete"]
            skipped.update(rec["skipped"])
        info = {"checkpoint": made_by["checkpoint"], "model_name": made_by["model_name"], **made_by["model"],
                "dim": dim, "count": rows, "parts": parts, "skipped": dict(sorted(skipped.items())),
                "shards": num_shards, "shards_complete": complete, "complete": complete == num_shards,
                "part_size": plan["part_size"], "draft_margin": plan["draft_margin"], "layout": "clip-retrieval"}
        _write_json(layout.out / INFO_FILE, info)
    return info


# ---------------------------------------------------------------------------------------------- the run

@dataclass
class EmbedResult:
    out: Path
    info: dict  # what OUT/clipkit_embed.json holds (totals over every rank whose shards are done)
    rows: int  # rows of this rank's shards on disk (embedded now or before)
    rows_embedded: int  # rows embedded by this call
    parts_written: int
    parts_reused: int
    skipped: dict[str, int]  # this rank's shards, by reason
    seconds: float


def _load(checkpoint):
    from ..models import LoadedModel, load_model

    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_model(checkpoint)
    made_by = {"model": model_identity(loaded), "checkpoint": str(Path(loaded.checkpoint).resolve()),
               "model_name": loaded.model_name}
    return loaded, made_by


def _progress(enabled: bool, total_shards: int):
    from tqdm import tqdm

    return tqdm(desc="embed", unit="img", disable=not enabled, dynamic_ncols=True,
                postfix={"shards": f"0/{total_shards}"})


def embed_shards(checkpoint, spec: str | list[str], out: str | Path, *, batch_size: int = 256,
                 part_size: int = 10_000, workers: int = 1, progress: bool = True, draft_margin: int = 2,
                 image_key: str = DEFAULT_IMAGE_KEY, caption_key: str = "txt", device: str | torch.device | None = None,
                 rank: int = 0, world_size: int = 1) -> EmbedResult:
    """Embed every (image, caption) sample of the shards in `spec` with a checkpoint (a path load_model reads,
    or a LoadedModel) into OUT in clip-retrieval's layout; shards s with s % world_size == rank are this
    process's. Finished parts of an earlier run into the same OUT are kept when the same weights made them
    (whatever path named them), and discarded and recomputed when other weights did."""
    from ..data import expand_shards
    from ..data.embed_stream import build_embed_loader

    if batch_size < 1 or part_size < 1 or workers < 0 or draft_margin < 0:
        raise UserError("batch size and part size must be >= 1, workers and draft margin >= 0")
    started = time.perf_counter()
    urls = expand_shards(spec)
    loaded, made_by = _load(checkpoint)
    layout = Layout(Path(out).absolute(), len(urls))
    layout.create()
    plan = _plan(urls, part_size, draft_margin)
    check_plan(layout, plan, rank == 0)
    found = scan(layout, list(range(rank, len(urls), world_size)), made_by["model"])
    states, todo, done_chunks = found.states, found.todo, found.done_chunks
    dim = int(loaded.model_cfg.get("embed_dim") or loaded.model.text_projection.shape[-1])
    if found.discarded:
        log.warning("%s: discarded %d parts made by another model (weights sha256 %s); recomputing them with "
                    "%s (weights sha256 %s)", layout.out, found.discarded, ", ".join(sorted(found.stale_weights)),
                    made_by["checkpoint"], made_by["model"]["weights_sha256"])
        # Until the new parts are in, OUT must not claim the old totals and digest: `clipkit index` reads them.
        write_info(layout, plan, made_by, dim, len(urls))
    reused = sum(len(s.parts) for s in states.values())
    writer = PartWriter(layout, states, urls, made_by["model"])
    device = resolve_device(device)
    model = loaded.model.to(device).eval()
    if todo:
        loader = build_embed_loader(urls, loaded.eval_transform, loaded.tokenizer, batch_size, todo,
                                    part_size, done_chunks, workers=workers, draft_margin=draft_margin,
                                    image_keys=image_key, text_key=caption_key)
        _run(model, loader, writer, device, _progress(progress and rank == 0, len(todo)), len(todo))
    info = write_info(layout, plan, made_by, dim, len(urls))
    rows, skipped = _totals(states)
    return EmbedResult(layout.out, info, rows, writer.rows, writer.parts_written, reused,
                       dict(sorted(skipped.items())), time.perf_counter() - started)


def _run(model, loader, writer: PartWriter, device: torch.device, bar, total_shards: int) -> None:
    normalize = getattr(loader.dataset.images, "normalize", None)
    on_device = device.type == "cuda" and hasattr(loader.dataset.images, "defer_normalization")
    if on_device:  # uint8 batches to the GPU (a quarter of the bytes), normalised there
        loader.dataset.images.defer_normalization()
    shards_done = 0
    with bar:
        for batch in loader:
            if batch.images is not None:
                images = batch.images.to(device, non_blocking=True)
                img, txt = encode_batch(model, normalize(images) if on_device else images, batch.tokens.to(device))
                writer.add(batch, img, txt)
                bar.update(len(batch.keys))
            for shard, chunk, skipped in batch.closed_chunks:
                writer.close_chunk(shard, chunk, skipped)
            for shard, skipped in batch.closed_shards:
                writer.close_shard(shard, skipped)
                shards_done += 1
                bar.set_postfix(shards=f"{shards_done}/{total_shards}")


# ---------------------------------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="CKPT",
                   required=True, help="a checkpoint or run directory, a .safetensors weights file, "
                                       "an open_clip or transformers CLIPModel directory, or an "
                                       "OpenCLIP epoch_N.pt / state dict with --model")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="the architecture of a checkpoint that does not carry one (epoch_N.pt, a bare state dict)")
    p.add_argument("--data", metavar="DATA",
                   required=True, help="shard spec: local paths, fsspec URLs (s3://...) or pipe:CMD, "
                                       "with {000..999} braces, several joined by '::'")
    p.add_argument("--out", metavar="DIR",
                   required=True, help="output folder (re-running into it skips the parts finished with "
                                       "the same weights, and recomputes those made with other weights)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--part-size", type=int, default=10_000, help="most rows per part (a part never spans shards)")
    p.add_argument("--workers", type=int, default=1, help="loader processes per rank (decoding, tokenising)")
    p.add_argument("--draft-margin", type=int, default=2,
                   help="decode JPEGs at reduced scale while keeping this many times the model's input size "
                        "(2: within ~1 grey level of a full decode; 1: faster; 0: full decode)")
    p.add_argument("--image-key", default=DEFAULT_IMAGE_KEY, help="image members tried in order (data.image_key)")
    p.add_argument("--caption-key", default="txt")
    p.add_argument("--device", default=None, help="default: this rank's GPU if there is one, else cpu")
    p.add_argument("--no-progress", action="store_true")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="clipkit embed", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    for name in ("batch_size", "part_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers < 0 or args.draft_margin < 0:
        p.error("--workers and --draft-margin must be >= 0")
    return args


def report(result: EmbedResult) -> str:
    info = result.info
    lines = [f"embedded      : {result.rows_embedded} rows now ({result.parts_written} parts written, "
             f"{result.parts_reused} kept from an earlier run) in {result.seconds:.1f} s",
             f"output        : {result.out} ({info['count']} rows in {info['parts']} parts, dim {info['dim']}, "
             f"{info['shards_complete']}/{info['shards']} shards complete)"]
    skipped = info["skipped"]
    lines.append("skipped       : " + (", ".join(f"{k} {v}" for k, v in skipped.items()) if skipped else "none"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..distributed import cleanup, init_distributed
    from ..models import load_model

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    env = init_distributed()
    try:
        device = resolve_device(args.device, env.local_rank)
        checkpoint = load_model(args.checkpoint, model_name=args.model) if args.model else args.checkpoint
        result = embed_shards(checkpoint, args.data, args.out, batch_size=args.batch_size,
                              part_size=args.part_size, workers=args.workers, progress=not args.no_progress,
                              draft_margin=args.draft_margin, image_key=args.image_key,
                              caption_key=args.caption_key, device=device, rank=env.rank, world_size=env.world_size)
    finally:
        cleanup()
    if env.is_main:
        print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
