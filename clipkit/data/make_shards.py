"""Turn an image folder, or a CSV/parquet table of (image path, caption), into img2dataset-style shards.

    clipkit data make-shards --data photos/ --out shards/ [--max-side 512] [--samples-per-shard 10000]
    clipkit data make-shards --data pairs.csv --out shards/ [--path-col path --caption-col caption]

Output, as img2dataset writes it (so every tool that reads LAION/DataComp shards reads these):

    OUT/00000.tar            KEY.jpg, KEY.txt (caption), KEY.json (key, caption, status, width, height,
                             original_width, original_height, path); KEY = shard (5 digits) + index (4)
    OUT/00000.parquet        one row per sample of the shard (the json fields)
    OUT/00000_stats.json     counts of the shard (successes, failures by reason)

`path` is the image's path as given: the table's string as it stands (a relative one stays relative: it is
read relative to the table's folder, but never resolved into the shards), or for a folder the image's path
below that folder. Shards carry no absolute path of the machine that made them unless the table holds one.
Each file is written under a hidden temporary name and renamed when complete (clipkit.atomic), the stats
last: a run that is interrupted leaves no truncated .tar, .parquet or stats file under a final name.

An image folder pairs IMAGE.EXT with the caption in IMAGE.txt beside it. Images are re-encoded as JPEG
(or kept as they are with --keep-original) and, like img2dataset's `keep_ratio_largest` with
`resize_only_if_bigger`, scaled down so that their longer side is at most --max-side, keeping the aspect.
A row whose image is missing or unreadable, or whose caption is empty, is skipped and counted by reason
in the stats and in the summary printed at the end; it never stops the conversion.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from ..atomic import atomic_file, atomic_write, atomic_write_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class MakeShardsError(ValueError):
    """An input the conversion cannot start from; the message names it."""


@dataclass(frozen=True)
class Pair:
    path: str  # where the image is read from (relative paths of a table resolved against the table's folder)
    caption: str | None
    given: str = ""  # the path as the input gives it: what the sample's json records


@dataclass(frozen=True)
class ShardOptions:
    max_side: int | None = 512
    quality: int = 95
    keep_original: bool = False


# ---------------------------------------------------------------------------------------------- inputs

def pairs_from_folder(root: str | Path) -> list[Pair]:
    """Every image below ROOT (sorted by path) with the caption of its IMAGE.txt sidecar, if any."""
    root = Path(root)
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    pairs = []
    for image in images:
        sidecar = image.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8", errors="replace") if sidecar.is_file() else None
        pairs.append(Pair(str(image.resolve()), caption, image.relative_to(root).as_posix()))
    return pairs


def pairs_from_table(table: str | Path, path_col: str = "path", caption_col: str = "caption") -> list[Pair]:
    """Rows of a CSV, TSV or parquet file; relative image paths are relative to the table's folder."""
    table = Path(table)
    if table.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        columns = pq.read_table(table).to_pydict()
    else:
        with open(table, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if table.suffix.lower() == ".tsv" else ","))
        columns = {name: [r.get(name) for r in rows] for name in (rows[0].keys() if rows else [])}
    for col in (path_col, caption_col):
        if col not in columns:
            raise MakeShardsError(f"{table} has no column {col!r} (columns: {', '.join(columns) or 'none'}); "
                                  f"name the right ones with --path-col / --caption-col")
    base = table.parent
    return [Pair(str((base / p).resolve()) if p else "", c, p or "")
            for p, c in zip(columns[path_col], columns[caption_col])]


def read_pairs(source: str | Path, path_col: str = "path", caption_col: str = "caption") -> list[Pair]:
    source = Path(source)
    if source.is_dir():
        pairs = pairs_from_folder(source)
    elif source.is_file() and source.suffix.lower() in (".csv", ".tsv", ".parquet"):
        pairs = pairs_from_table(source, path_col, caption_col)
    elif source.exists():
        raise MakeShardsError(f"{source} is neither a folder of images nor a .csv/.tsv/.parquet table")
    else:
        raise MakeShardsError(f"input not found: {source}")
    if not pairs:
        raise MakeShardsError(f"{source} holds no images")
    return pairs


# ---------------------------------------------------------------------------------------------- images

def resized_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """The size with the longer side at most max_side, aspect kept (never enlarged)."""
    longest = max(width, height)
    if max_side is None or longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_image(path: str, options: ShardOptions) -> tuple[bytes, str, dict]:
    """(bytes, extension, size fields) of one image, resized and re-encoded as needed."""
    with Image.open(path) as im:
        im.load()
        original = im.size
        size = resized_size(*original, options.max_side)
        ext = Path(path).suffix.lower().lstrip(".")
        ext = "jpg" if ext == "jpeg" else ext
        if options.keep_original and size == original and ext in ("jpg", "png", "webp"):
            data = Path(path).read_bytes()
        else:
            if im.mode != "RGB":
                im = im.convert("RGB")
            if size != original:
                im = im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=options.quality)
            data, ext = buf.getvalue(), "jpg"
    fields = {"width": size[0], "height": size[1], "original_width": original[0], "original_height": original[1]}
    return data, ext, fields


# ---------------------------------------------------------------------------------------------- shards

def _write_shard(args: tuple[int, list[Pair], str, ShardOptions]) -> dict:
    import webdataset as wds

    shard, pairs, out, options = args
    name = f"{shard:05d}"
    rows, failures = [], Counter()
    with atomic_file(Path(out) / f"{name}.tar") as tar, wds.TarWriter(tar) as sink:
        for index, pair in enumerate(pairs):
            key = f"{shard:05d}{index:04d}"
            caption = (pair.caption or "").strip()
            if pair.caption is None:
                failures["missing_caption"] += 1
                continue
            if not caption:
                failures["empty_caption"] += 1
                continue
            if not pair.path or not os.path.isfile(pair.path):
                failures["missing_image"] += 1
                continue
            try:
                data, ext, fields = encode_image(pair.path, options)
            except Exception:  # unreadable or corrupt image file
                failures["image_decode_error"] += 1
                continue
            meta = {"key": key, "caption": caption, "status": "success", "error_message": None, **fields,
                    "path": pair.given}
            sink.write({"__key__": key, ext: data, "txt": caption, "json": meta})
            rows.append(meta)
    _write_parquet(Path(out) / f"{name}.parquet", rows)
    stats = {"shard": name, "count": len(pairs), "successes": len(rows), "failed": sum(failures.values()),
             "failures": dict(failures)}
    atomic_write_text(Path(out) / f"{name}_stats.json", json.dumps(stats, indent=1))  # last: the shard is done
    return stats


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = ["key", "caption", "status", "error_message", "width", "height", "original_width",
              "original_height", "path"]
    table = pa.table({f: [r[f] for r in rows] for f in fields})
    atomic_write(path, lambda f: pq.write_table(table, f))


def _chunks(pairs: list[Pair], size: int) -> Iterator[tuple[int, list[Pair]]]:
    for shard, start in enumerate(range(0, len(pairs), size)):
        yield shard, pairs[start:start + size]


def make_shards(source: str | Path, out: str | Path, *, samples_per_shard: int = 10000,
                max_side: int | None = 512, quality: int = 95, keep_original: bool = False,
                path_col: str = "path", caption_col: str = "caption", workers: int = 1) -> dict:
    """Write the shards; returns a summary {"shards", "samples", "failed", "failures", "spec"}."""
    if samples_per_shard < 1:
        raise MakeShardsError("--samples-per-shard must be at least 1")
    if max_side is not None and max_side < 1:
        raise MakeShardsError("--max-side must be at least 1 (or omitted for no resizing)")
    pairs = read_pairs(source, path_col, caption_col)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = ShardOptions(max_side, quality, keep_original)
    jobs = [(shard, chunk, str(out), options) for shard, chunk in _chunks(pairs, samples_per_shard)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            stats = list(pool.map(_write_shard, jobs))
    else:
        stats = [_write_shard(job) for job in jobs]
    failures: Counter[str] = Counter()
    for s in stats:
        failures.update(s["failures"])
    last = len(stats) - 1
    return {"shards": len(stats), "samples": sum(s["successes"] for s in stats),
            "failed": sum(failures.values()), "failures": dict(failures),
            "spec": str(out / (f"{{00000..{last:05d}}}.tar" if last else "00000.tar"))}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cliargs import renamed

    renamed(p, "--data", "--input", required=True, metavar="DATA",
            help="an image folder (captions in IMAGE.txt), or a .csv/.parquet")
    p.add_argument("--out", metavar="DIR", required=True, help="output folder for 00000.tar, 00001.tar, ...")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--max-side", type=int, default=512, help="longest side after resizing (aspect kept); "
                   "0 keeps the original size")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    p.add_argument("--keep-original", action="store_true",
                   help="store jpg/png/webp files that need no resizing as they are")
    p.add_argument("--path-col", default="path")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="clipkit data make-shards", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        summary = make_shards(args.data, args.out, samples_per_shard=args.samples_per_shard,
                              max_side=args.max_side or None, quality=args.quality,
                              keep_original=args.keep_original, path_col=args.path_col,
                              caption_col=args.caption_col, workers=args.workers)
    except MakeShardsError as e:
        print(f"clipkit data make-shards: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {summary['samples']} samples in {summary['shards']} shards: {summary['spec']}")
    if summary["failed"]:
        print(f"skipped {summary['failed']}: {json.dumps(summary['failures'])}")
    return 0
