"""Data loading speed: tar shards -> batched, augmented 224-pixel tensors, clipkit against OpenCLIP.

    clipkit bench data [--images 1200] [--batch-size 64] [--batches 12] [--workers 1] [--repeats 3]
                       [--shards DIR] [--out bench_data.json]
    clipkit bench data --data SPEC [--image-key jpg;png;webp;jpeg] [--caption-key txt] [...]

By default the shards are realistic: JPEG photographs of 640x480 to 1280x960 pixels, each a random crop,
scale, flip and colour shift of one of the sample photographs scikit-image ships (written once, into
~/.cache/clipkit/bench_data/ unless --shards names a folder), with captions, in img2dataset's layout.

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
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

METHODS = ("clipkit", "openclip")
TARGET = 3.0  # clipkit >= 3x OpenCLIP per core
TARGET_MIN_REPEATS = 3  # the target is judged on a median of at least this many repeats
# open_clip_train.data reads these members and no others (wds.rename(image="jpg;png;jpeg;webp", text="txt")).
OPENCLIP_IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")
OPENCLIP_CAPTION_KEY = "txt"
CACHE = Path(os.environ.get("CLIPKIT_CACHE", Path.home() / ".cache" / "clipkit"))
PEER_PACKAGES = ["webdataset==0.2.86", "pandas", "python-dateutil", "pytz", "tzdata", "six"]
SHARD_FORMAT = "v1"  # bump when the photo recipe changes, so cached shards are rebuilt


class BenchError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------- shards

def _source_photos() -> list[tuple[str, np.ndarray]]:
    """The colour photographs bundled with scikit-image (no download)."""
    try:
        from skimage import data
    except ImportError as e:
        raise BenchError("the benchmark's photos come from scikit-image: pip install 'clipkit[bench]'") from e
    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        try:
            img = getattr(data, name)()
        except Exception:  # a photo this scikit-image version would have to download
            continue
        if img.ndim == 3 and img.shape[2] == 3:
            photos.append((name, img))
    if len(photos) < 3:
        raise BenchError("scikit-image ships fewer than 3 of the expected colour photographs")
    return photos


def _variant(name: str, photo: np.ndarray, rng: random.Random) -> tuple[bytes, str]:
    """A JPEG of 640x480..1280x960: random crop of the photo, scaled up, flipped, colour shifted."""
    from PIL import Image

    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    y, x = rng.randint(0, h - ch), rng.randint(0, w - cw)
    im = Image.fromarray(photo[y:y + ch, x:x + cw])
    out_w = rng.randint(640, 1280)
    out_h = max(480, min(960, int(out_w * rng.uniform(0.6, 0.9))))
    im = im.resize((out_w, out_h), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gains = np.array([rng.uniform(0.75, 1.25) for _ in range(3)], dtype=np.float32)
    arr = np.clip(np.asarray(im, dtype=np.float32) * gains, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=rng.randint(85, 95))
    caption = f"a {rng.choice(['photo', 'picture', 'snapshot'])} of the {name.replace('_', ' ')}, {out_w}x{out_h}"
    return buf.getvalue(), caption


def write_bench_shards(out: Path, images: int, per_shard: int = 100, seed: int = 0,
                       caption_for: Callable[[str], str] | None = None, caption_format: str | None = None) -> str:
    """Shards 00000.tar ... (KEY.jpg, KEY.txt, KEY.json) under OUT; returns the brace spec. Cached.
    caption_for(photo name), when given, writes its caption instead of the photo's own (the photos stay the
    same for the seed); caption_format names that recipe in the cache's manifest."""
    out = Path(out)
    manifest = out / "manifest.json"
    wanted = {"images": images, "per_shard": per_shard, "seed": seed, "format": SHARD_FORMAT}
    if caption_format:
        wanted["captions"] = caption_format
    shards = (images + per_shard - 1) // per_shard
    spec = str(out / f"{{00000..{shards - 1:05d}}}.tar")
    if manifest.is_file() and json.loads(manifest.read_text()) == wanted:
        return spec
    out.mkdir(parents=True, exist_ok=True)
    photos = _source_photos()
    rng = random.Random(seed)
    for s in range(shards):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(images, (s + 1) * per_shard)):
                name, photo = photos[i % len(photos)]
                jpg, caption = _variant(name, photo, rng)
                caption = caption if caption_for is None else caption_for(name)
                key = f"{s:05d}{i - s * per_shard:04d}"
                for ext, payload in (("jpg", jpg), ("txt", caption.encode()),
                                     ("json", json.dumps({"key": key, "caption": caption}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    manifest.write_text(json.dumps(wanted))
    return spec


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


# ------------------------------------------------------------------------------------------ the peer env

def peer_site() -> Path:
    """A folder holding webdataset 0.2.86 and pandas for OpenCLIP's pipeline (installed once)."""
    site = CACHE / "bench_peer"
    if (site / ".complete").is_file():
        return site
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), *PEER_PACKAGES]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"could not install OpenCLIP's data dependencies ({' '.join(PEER_PACKAGES)}) into "
                         f"{site}:\n{proc.stderr[-2000:]}")
    (site / ".complete").write_text(" ".join(PEER_PACKAGES))
    return site


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
    result = {"method": args.worker, "samples": samples, "seconds": seconds, "samples_per_s": samples / seconds,
              "image_shape": list(images.shape[1:]), "image_dtype": str(images.dtype),
              "pixel_mean": images.float().mean().item(), "pixel_std": images.float().std().item()}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def _run_one(method: str, args: argparse.Namespace, spec: str, epoch_samples: int) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if method == "openclip":
        env["PYTHONPATH"] = os.pathsep.join([str(peer_site()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "clipkit.bench.data", "--worker", method, "--spec", spec,
           "--epoch-samples", str(epoch_samples), "--batch-size", str(args.batch_size),
           "--batches", str(args.batches), "--workers", str(args.workers), "--image-key", args.image_key,
           "--caption-key", args.caption_key]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{method} measurement ran past --timeout {args.timeout:.0f} s (a spec whose samples "
                         f"are all unusable never yields a batch to OpenCLIP's loader)") from e
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise BenchError(f"{method} measurement failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------------------------------------- driver

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from clipkit.config import DataConfig

    p = argparse.ArgumentParser(prog="clipkit bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="measure these shards: any data.train spec (paths, brace "
                   "patterns, s3:// or other fsspec URLs, '::'-joined sources) or a folder of .tar files "
                   "(default: generated photo shards)")
    p.add_argument("--image-key", default=DataConfig.image_key, help="data.image_key: image extensions, in order")
    p.add_argument("--caption-key", default=DataConfig.caption_key, help="data.caption_key")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--images", type=int, default=1200, help="photos in the generated shards")
    p.add_argument("--per-shard", type=int, default=100, help="photos per generated shard")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=12, help="batches timed per measurement")
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes (= cores used)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per method, alternating; medians reported")
    p.add_argument("--shards", default=None, help="folder for the generated shards (default: a cache)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per measurement")
    p.add_argument("--out", default="bench_data.json")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--epoch-samples", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("images", "per_shard", "batch_size", "batches", "workers", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not args.methods or set(args.methods) - set(METHODS) or len(set(args.methods)) < len(args.methods):
        p.error(f"--methods takes one or both of {', '.join(METHODS)}, comma-separated")
    if args.worker:
        return args
    if args.data is not None and args.shards is not None:
        p.error("--data measures existing shards and --shards names where generated ones go: give one")
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
        default = CACHE / "bench_data" / f"{SHARD_FORMAT}-{args.images}-{args.per_shard}"
        folder = Path(args.shards) if args.shards else default
        t0 = time.perf_counter()
        spec = write_bench_shards(folder, args.images, args.per_shard)
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


def _home_as_tilde(spec: str) -> str:
    """The spec as the report shows it: the user's home folder as ~ (the cached shards live under it)."""
    home = str(Path.home())
    return spec.replace(home + os.sep, "~" + os.sep) if home != os.sep else spec


def _method_summary(runs: list[dict], workers: int) -> dict:
    rates = [r["samples_per_s"] for r in runs]
    return {"samples_per_s": rates, "samples_per_s_median": statistics.median(rates),
            "samples_per_s_per_core": statistics.median(rates) / workers,  # the median's
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
    for repeat in range(args.repeats):
        for method in args.methods if repeat % 2 == 0 else args.methods[::-1]:
            r = _run_one(method, args, spec, epoch_samples)
            runs[method].append(r)
            print(f"repeat {repeat + 1}/{args.repeats} {method}: {r['samples_per_s']:.1f} samples/s", flush=True)
    methods = {m: _method_summary(rs, args.workers) for m, rs in runs.items()}
    ratio, target = _target(methods, args.repeats)
    import torch

    return {
        "benchmark": "tar shards -> augmented 224px batches (open_clip train transform) + tokens",
        "command": "clipkit bench data " + " ".join(argv),
        "config": {"data": args.data and _home_as_tilde(args.data), "shards": _home_as_tilde(spec),
                   "shard_files": shard_count, "image_key": args.image_key, "caption_key": args.caption_key,
                   "images": None if args.data else args.images,
                   "per_shard": None if args.data else args.per_shard, "batch_size": args.batch_size,
                   "batches": args.batches, "workers": args.workers, "repeats": args.repeats,
                   "methods": list(args.methods)},
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__},
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

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        if args.worker:
            return _measure(args)
        report = _drive(args, argv)
    except (BenchError, ShardSpecError) as e:
        print(f"clipkit bench data: error: {e}", file=sys.stderr)
        return 2
    _print_report(report)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
