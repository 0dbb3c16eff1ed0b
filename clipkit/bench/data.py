"""Data loading speed: tar shards -> batched, augmented 224-pixel tensors, clipkit against OpenCLIP.

    clipkit bench data [--images 1200] [--batch-size 64] [--batches 12] [--workers 1] [--repeats 3]
                       [--cache DIR] [--out bench_data.json]
    clipkit bench data --data SPEC [--image-key jpg;png;webp;jpeg] [--caption-key txt] [...]

By default the shards are realistic: JPEG photographs of 640x480 to 1280x960 pixels, each a random crop,
scale, flip and colour shift of one of the sample photographs scikit-image ships (written once, into
~/.cache/clipkit/bench_data/ unless --cache names a folder), with captions, in img2dataset's layout.

`--data SPEC` measures your own shards instead: any spec data.train takes (a path, a brace pattern, an
fsspec URL such as s3://bucket/{00000..00099}.tar or file:///data/{0..9}.tar, pipe:CMD, several joined
by "::"), or a local folder, whose *.tar files are read in name order. `--image-key`/`--caption-key` are
data.image_key/data.caption_key. A spec that names no shard stops the benchmark with one line.

Both methods read the same shards with open_clip's own training transform (RandomResizedCrop to 224,
ToTensor, Normalize) and tokenizer, with `--workers` DataLoader worker processes, one thread each:

- clipkit:  clipkit.data.build_train_loader, given the spec as data.train (a folder: its shards, "::"-joined)
- openclip: open_clip_train.data.get_wds_dataset, as OpenCLIP's trainer builds it, given the shard list
  "::"-joined, as `--train-data` takes it (webdataset splits it on "::" and expands braces). It reads
  jpg/png/jpeg/webp images and txt captions only (hard-coded there). Its webdataset (0.2.86) opens local
  paths, file://, pipe: and http(s):// by itself; for other fsspec schemes (s3://, gs://, ...) the
  benchmark registers clipkit's own shard opener (fsspec, the same read-ahead) with webdataset, so both
  read the bytes the same way. It needs webdataset<=0.2.86 (clipkit uses 1.0.2) and pandas, so it runs
  in its own environment: those packages are installed once into ~/.cache/clipkit/bench_peer/, placed
  ahead of clipkit's on the peer process's path.

Each measurement is its own process; methods alternate over the repeats. After one warm-up batch (pool
start, first shard open), the time to receive `--batches` batches is measured; samples/s per core is
samples/s divided by the worker processes (each single-threaded; the main process only receives). Both
loaders go on to a next pass over the data when a pass ends, so a small spec is read more than once.
The report gives every repeat and the median of the repeats per method, and their ratio; the target
(clipkit >= 3x OpenCLIP per core) is judged on a median of at least 3 repeats.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..cliargs import renamed
from .harness import (BenchError, bench_main, command_line, emit_result, home_as_tilde, machine_facts,
                      orders, run_worker, runs_and_median, worker_env)
from .shards import photo_shards

METHODS = ("clipkit", "openclip")
TARGET = 3.0  # clipkit >= 3x OpenCLIP per core
TARGET_MIN_REPEATS = 3  # the target is judged on a median of at least this many repeats
# open_clip_train.data reads these members and no others (wds.rename(image="jpg;png;jpeg;webp", text="txt")).
OPENCLIP_IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")
OPENCLIP_CAPTION_KEY = "txt"
# ------------------------------------------------------------------------------------- a user's shards

def _folder(data: str) -> Path | None:
    """The local folder a --data spec names, if it names one (rather than shards)."""
    if not data.strip() or "::" in data:
        return None
    path = Path(data[len("file://"):] if data.startswith("file://") else data).expanduser()
    return path if path.is_dir() else None


def shard_urls(data: str) -> list[str]:
    """The shard files a --data spec names, in order: a local folder's *.tar files, else the spec expanded
    as data.train expands it (local shards checked to exist). ShardSpecError (one line) if it names none."""
    from clipkit.data import ShardSpecError, expand_shards

    folder = _folder(data)
    if folder is None:
        return expand_shards(data)
    tars = sorted(str(p) for p in folder.glob("*.tar") if p.is_file())
    if not tars:
        raise ShardSpecError(f"--data {data}: the folder holds no .tar shards")
    return tars


def clipkit_train_spec(data: str) -> str:
    """What goes into data.train: the spec itself, or a folder's shards joined by '::' (data.train names
    shards, not folders)."""
    return "::".join(shard_urls(data)) if _folder(data) else data


def _check_openclip_keys(image_key: str, caption_key: str) -> None:
    images = [k for k in image_key.split(";") if k]
    if caption_key != OPENCLIP_CAPTION_KEY or not set(images) & set(OPENCLIP_IMAGE_KEYS):
        raise BenchError(f"OpenCLIP's pipeline reads only {'/'.join(OPENCLIP_IMAGE_KEYS)} images with "
                         f"{OPENCLIP_CAPTION_KEY} captions (open_clip_train.data hard-codes them), not "
                         f"--image-key {image_key} --caption-key {caption_key}: add --methods clipkit")


def _open_with_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    from clipkit.data import open_shard

    return open_shard(url)


def _let_webdataset_open(urls: list[str]) -> None:
    """webdataset 0.2.86 opens local, file://, pipe: and http(s):// itself; give it clipkit's fsspec opener for
    the other URL schemes (s3://, gs://, ...), so that OpenCLIP reads the same remote bytes the same way."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the module (the package re-exports its function)
    for proto in {u.split("://", 1)[0] for u in urls if "://" in u and not u.startswith("pipe:")}:
        if proto != "file" and proto not in gopen.gopen_schemes:
            gopen.gopen_schemes[proto] = _open_with_fsspec


# --------------------------------------------------------------------------------------- one measurement

def _loader(args: argparse.Namespace):
    import open_clip

    transform = open_clip.image_transform(224, is_train=True)  # open_clip's training transform
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    if args.worker == "clipkit":
        from clipkit.config import DataConfig
        from clipkit.data import build_train_loader

        cfg = DataConfig(train=clipkit_train_spec(args.spec), workers=args.workers, shuffle_buffer=1000,
                         image_key=args.image_key, caption_key=args.caption_key)
        return build_train_loader(cfg, transform=transform, tokenizer=tokenizer, local_batch_size=args.batch_size,
                                  seed=0)
    from open_clip_train.data import get_wds_dataset

    urls = shard_urls(args.spec)
    _let_webdataset_open(urls)
    # train_num_samples only sets where OpenCLIP's nominal epoch ends (its pipeline then starts the next).
    peer = argparse.Namespace(train_data="::".join(urls), val_data=None,
                              train_num_samples=args.epoch_samples or args.images, dataset_resampled=False,
                              train_data_upsampling_factors=None, seed=0, batch_size=args.batch_size,
                              workers=args.workers, world_size=1)
    return get_wds_dataset(peer, transform, is_train=True, epoch=0, tokenizer=tokenizer).dataloader


def _measure(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    loader = _loader(args)
    batches = (b.images if args.worker == "clipkit" else b[0] for b in loader)  # OpenCLIP: (images, texts)
    images = next(batches, None)  # warm-up: worker start, first shard
    start, samples = time.perf_counter(), 0
    for i in range(args.batches):
        batch = next(batches, None) if images is not None else None
        if batch is None:
            raise BenchError(f"the {args.worker} loader ended after {i + (images is not None)} batches of "
                             f"{args.batch_size}; the spec holds too few usable samples")
        samples += batch.shape[0]
    seconds = time.perf_counter() - start
    emit_result({"method": args.worker, "samples": samples, "seconds": seconds, "samples_per_s": samples / seconds,
                 "image_shape": list(images.shape[1:]), "image_dtype": str(images.dtype),
                 "pixel_mean": images.float().mean().item(), "pixel_std": images.float().std().item()})
    return 0


def _run_one(method: str, args: argparse.Namespace, spec: str, epoch_samples: int) -> dict:
    return run_worker("clipkit.bench.data", method,
                      ["--spec", spec, "--epoch-samples", epoch_samples, "--batch-size", args.batch_size,
                       "--batches", args.batches, "--workers", args.workers, "--image-key", args.image_key,
                       "--caption-key", args.caption_key],
                      env=worker_env(threads=1, peer=method == "openclip"), timeout=args.timeout,
                      timeout_hint=" (a spec whose samples are all unusable never yields a batch to OpenCLIP's "
                                   "loader)")


# ---------------------------------------------------------------------------------------------- driver

def add_arguments(p: argparse.ArgumentParser) -> None:
    from clipkit.config import DataConfig

    p.add_argument("--data", metavar="DATA", default=None,
                   help="measure these shards: any data.train spec (paths, brace patterns, s3:// or other fsspec "
                        "URLs, '::'-joined sources) or a folder of .tar files (default: generated photo shards)")
    p.add_argument("--image-key", default=DataConfig.image_key, help="data.image_key: image extensions, in order")
    p.add_argument("--caption-key", default=DataConfig.caption_key, help="data.caption_key")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--images", type=int, default=1200, help="photos in the generated shards")
    p.add_argument("--per-shard", type=int, default=100, help="photos per generated shard")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=12, help="batches timed per measurement")
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes (= cores used)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per method, alternating; medians reported")
    renamed(p, "--cache", "--shards", default=None, metavar="DIR",
            help="folder for the generated benchmark data (default: a folder under ~/.cache/clipkit)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per measurement")
    p.add_argument("--out", metavar="FILE.json", default="bench_data.json")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--epoch-samples", type=int, help=argparse.SUPPRESS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from clipkit.config import DataConfig

    p = argparse.ArgumentParser(prog="clipkit bench data", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    for name in ("images", "per_shard", "batch_size", "batches", "workers", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not args.methods or set(args.methods) - set(METHODS) or len(set(args.methods)) < len(args.methods):
        p.error(f"--methods takes one or both of {', '.join(METHODS)}, comma-separated")
    if args.worker:
        return args
    if args.data is not None and args.cache is not None:
        p.error("--data measures existing shards and --cache names where generated ones go: give one")
    if args.data is None:
        needed = (args.batches + 1) * args.batch_size
        if needed > args.images:
            p.error(f"--images {args.images} is fewer than the {needed} samples one measurement reads "
                    f"((--batches + 1) x --batch-size): raise --images")
        if args.images // args.per_shard < args.workers:
            p.error(f"{args.images // args.per_shard} shards cannot feed {args.workers} workers: lower --per-shard")
    return args


def _shards(args: argparse.Namespace) -> tuple[str, int, int]:
    """(spec, shard files, OpenCLIP's nominal epoch in samples) of the shards to measure."""
    if args.data is None:
        t0 = time.perf_counter()
        spec = photo_shards(args.cache, args.images, args.per_shard)
        print(f"shards: {spec} ({time.perf_counter() - t0:.1f} s)", flush=True)
        return spec, -(-args.images // args.per_shard), args.images
    count = len(shard_urls(args.data))
    if count < args.workers:
        raise BenchError(f"--data {args.data} names {count} shard(s), too few for --workers {args.workers} "
                         "(each loader worker reads whole shards)")
    if "openclip" in args.methods:
        _check_openclip_keys(args.image_key, args.caption_key)
    print(f"shards: {args.data} ({count} files)", flush=True)
    # The sample count of a user's spec is unknown: OpenCLIP's nominal epoch is what one measurement reads.
    return args.data, count, (args.batches + 1) * args.batch_size


def _method_summary(runs: list[dict], workers: int) -> dict:
    rates = [r["samples_per_s"] for r in runs]
    figures = runs_and_median("samples_per_s", rates)
    return {**figures, "samples_per_s_per_core": figures["samples_per_s_median"] / workers,  # the median's
            "samples_per_s_per_core_runs": [r / workers for r in rates],
            "image_shape": runs[0]["image_shape"], "pixel_mean": runs[0]["pixel_mean"],
            "pixel_std": runs[0]["pixel_std"]}


def _target(methods: dict, repeats: int) -> tuple[float | None, dict]:
    if set(methods) != set(METHODS):
        return None, {"ratio_min": TARGET, "met": None, "why_not_judged": "only one method measured"}
    ratio = methods["clipkit"]["samples_per_s_per_core"] / methods["openclip"]["samples_per_s_per_core"]
    if repeats < TARGET_MIN_REPEATS:
        return ratio, {"ratio_min": TARGET, "met": None,
                       "why_not_judged": f"a median of {repeats} repeat(s); the target needs >= {TARGET_MIN_REPEATS}"}
    return ratio, {"ratio_min": TARGET, "met": ratio >= TARGET}


def _drive(args: argparse.Namespace, argv: list[str]) -> dict:
    spec, shard_count, epoch_samples = _shards(args)
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for repeat, order in orders(args.methods, args.repeats):
        for method in order:
            r = _run_one(method, args, spec, epoch_samples)
            runs[method].append(r)
            print(f"repeat {repeat + 1}/{args.repeats} {method}: {r['samples_per_s']:.1f} samples/s", flush=True)
    methods = {m: _method_summary(rs, args.workers) for m, rs in runs.items()}
    ratio, target = _target(methods, args.repeats)
    return {
        "benchmark": "tar shards -> augmented 224px batches (open_clip train transform) + tokens",
        "command": command_line("data", argv),
        "config": {"data": args.data and home_as_tilde(args.data), "shards": home_as_tilde(spec),
                   "shard_files": shard_count, "image_key": args.image_key, "caption_key": args.caption_key,
                   "images": None if args.data else args.images,
                   "per_shard": None if args.data else args.per_shard, "batch_size": args.batch_size,
                   "batches": args.batches, "workers": args.workers, "repeats": args.repeats,
                   "methods": list(args.methods)},
        "machine": machine_facts(),
        "methods": methods,
        "ratio_clipkit_over_openclip": ratio,
        "target": target,
    }


def _print_report(report: dict) -> None:
    for m, r in report["methods"].items():
        runs = ", ".join(f"{x:.1f}" for x in r["samples_per_s_per_core_runs"])
        print(f"{m:<9} {r['samples_per_s_median']:8.1f} samples/s  {r['samples_per_s_per_core']:8.1f} per core "
              f"(median of {runs})")
    target, ratio = report["target"], report["ratio_clipkit_over_openclip"]
    if ratio is not None:
        verdict = {True: "met", False: "NOT met", None: f"not judged: {target.get('why_not_judged')}"}[target["met"]]
        print(f"clipkit/openclip per core: {ratio:.2f}x (target >= {TARGET}x, {verdict})")


def main(argv: list[str] | None = None) -> int:
    from clipkit.data import ShardSpecError

    return bench_main("data", argv, parse_args, _drive, _print_report, worker=_measure, errors=(ShardSpecError,))


if __name__ == "__main__":
    sys.exit(main())
