"""Data loading speed: tar shards -> batched, augmented 224-pixel tensors, clipkit against OpenCLIP.

    clipkit bench data [--images 1200] [--batch-size 64] [--batches 12] [--workers 1] [--repeats 3]
                       [--shards DIR] [--out bench_data.json]

The shards are realistic: JPEG photographs of 640x480 to 1280x960 pixels, each a random crop, scale,
flip and colour shift of one of the sample photographs scikit-image ships (written once, into
~/.cache/clipkit/bench_data/ unless --shards names a folder), with captions, in img2dataset's layout.

Both methods read the same shards with open_clip's own training transform (RandomResizedCrop to 224,
ToTensor, Normalize) and tokenizer, with `--workers` DataLoader worker processes, one thread each:

- clipkit:  clipkit.data.build_train_loader
- openclip: open_clip_train.data.get_wds_dataset, as OpenCLIP's trainer builds it. It needs
  webdataset<=0.2.86 (clipkit uses 1.0.2) and pandas, so it runs in its own environment: those
  packages are installed once into ~/.cache/clipkit/bench_peer/, placed ahead of clipkit's on the
  peer process's path.

Each measurement is its own process; methods alternate over the repeats. After one warm-up batch (pool
start, first shard open), the time to receive `--batches` batches is measured; samples/s per core is
samples/s divided by the worker processes (each single-threaded; the main process only receives).
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

import numpy as np

METHODS = ("clipkit", "openclip")
TARGET = 3.0  # clipkit >= 3x OpenCLIP per core
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


def write_bench_shards(out: Path, images: int, per_shard: int = 100, seed: int = 0) -> str:
    """Shards 00000.tar ... (KEY.jpg, KEY.txt, KEY.json) under OUT; returns the brace spec. Cached."""
    out = Path(out)
    manifest = out / "manifest.json"
    wanted = {"images": images, "per_shard": per_shard, "seed": seed, "format": SHARD_FORMAT}
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
                key = f"{s:05d}{i - s * per_shard:04d}"
                for ext, payload in (("jpg", jpg), ("txt", caption.encode()),
                                     ("json", json.dumps({"key": key, "caption": caption}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    manifest.write_text(json.dumps(wanted))
    return spec


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

def _loader(method: str, spec: str, images: int, batch_size: int, workers: int):
    import open_clip

    transform = open_clip.image_transform(224, is_train=True)  # open_clip's training transform
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    if method == "clipkit":
        from clipkit.data import build_train_loader

        from clipkit.config import DataConfig

        return build_train_loader(DataConfig(train=spec, workers=workers, shuffle_buffer=1000), transform=transform,
                                  tokenizer=tokenizer, local_batch_size=batch_size, seed=0)
    from open_clip_train.data import get_wds_dataset

    args = argparse.Namespace(train_data=spec, val_data=None, train_num_samples=images, dataset_resampled=False,
                              train_data_upsampling_factors=None, seed=0, batch_size=batch_size,
                              workers=workers, world_size=1)
    return get_wds_dataset(args, transform, is_train=True, epoch=0, tokenizer=tokenizer).dataloader


def _measure(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    loader = _loader(args.worker, args.spec, args.images, args.batch_size, args.workers)
    batches = (b.images if args.worker == "clipkit" else b[0] for b in loader)  # OpenCLIP: (images, texts)
    images = next(batches)  # warm-up: worker start, first shard
    start, samples = time.perf_counter(), 0
    for _ in range(args.batches):
        samples += next(batches).shape[0]
    seconds = time.perf_counter() - start
    result = {"method": args.worker, "samples": samples, "seconds": seconds, "samples_per_s": samples / seconds,
              "image_shape": list(images.shape[1:]), "image_dtype": str(images.dtype),
              "pixel_mean": images.float().mean().item(), "pixel_std": images.float().std().item()}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def _run_one(method: str, args: argparse.Namespace, spec: str) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if method == "openclip":
        env["PYTHONPATH"] = os.pathsep.join([str(peer_site()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "clipkit.bench.data", "--worker", method, "--spec", spec, "--images",
           str(args.images), "--batch-size", str(args.batch_size), "--batches", str(args.batches),
           "--workers", str(args.workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise BenchError(f"{method} measurement failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------------------------------------- driver

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="clipkit bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1200, help="photos in the benchmark shards")
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=12, help="batches timed per measurement")
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes (= cores used)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shards", default=None, help="folder for the benchmark shards (default: a cache)")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--out", default="bench_data.json")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("images", "per_shard", "batch_size", "batches", "workers", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    needed = (args.batches + 1) * args.batch_size
    if needed > args.images:
        p.error(f"--images {args.images} is fewer than the {needed} samples one measurement reads "
                f"((--batches + 1) x --batch-size): raise --images")
    if args.images // args.per_shard < args.workers:
        p.error(f"{args.images // args.per_shard} shards cannot feed {args.workers} workers: lower --per-shard")
    return args


def _drive(args: argparse.Namespace, argv: list[str]) -> dict:
    shards = Path(args.shards) if args.shards else CACHE / "bench_data" / f"{SHARD_FORMAT}-{args.images}-{args.per_shard}"
    t0 = time.perf_counter()
    spec = write_bench_shards(shards, args.images, args.per_shard)
    print(f"shards: {spec} ({time.perf_counter() - t0:.1f} s)", flush=True)
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for repeat in range(args.repeats):
        for method in METHODS if repeat % 2 == 0 else METHODS[::-1]:
            r = _run_one(method, args, spec)
            runs[method].append(r)
            print(f"repeat {repeat + 1}/{args.repeats} {method}: {r['samples_per_s']:.1f} samples/s", flush=True)
    methods = {}
    for m, rs in runs.items():
        median = statistics.median(r["samples_per_s"] for r in rs)
        methods[m] = {"samples_per_s": [r["samples_per_s"] for r in rs], "samples_per_s_median": median,
                      "samples_per_s_per_core": median / args.workers, "image_shape": rs[0]["image_shape"],
                      "pixel_mean": rs[0]["pixel_mean"], "pixel_std": rs[0]["pixel_std"]}
    ratio = methods["clipkit"]["samples_per_s_median"] / methods["openclip"]["samples_per_s_median"]
    import torch

    return {
        "benchmark": "tar shards -> augmented 224px batches (open_clip train transform) + tokens",
        "command": "clipkit bench data " + " ".join(argv),
        "config": {"images": args.images, "per_shard": args.per_shard, "batch_size": args.batch_size,
                   "batches": args.batches, "workers": args.workers, "repeats": args.repeats, "shards": spec},
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__},
        "methods": methods,
        "ratio_clipkit_over_openclip": ratio,
        "target": {"ratio_min": TARGET, "met": ratio >= TARGET},
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return _measure(args)
    try:
        report = _drive(args, argv)
    except BenchError as e:
        print(f"clipkit bench data: error: {e}", file=sys.stderr)
        return 2
    for m, r in report["methods"].items():
        print(f"{m:<9} {r['samples_per_s_median']:8.1f} samples/s  {r['samples_per_s_per_core']:8.1f} per core")
    print(f"clipkit/openclip: {report['ratio_clipkit_over_openclip']:.2f}x (target >= {TARGET}x, "
          f"{'met' if report['target']['met'] else 'NOT met'})")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
