"""Embedding speed: photo shards -> L2-normalised embeddings, `clipkit embed` against a plain open_clip loop.

    clipkit bench embed [--model clipkit-tiny] [--images 1200] [--per-shard 100] [--batch-size 64] [--workers 1]
                        [--threads N] [--repeats 3] [--cache DIR] [--out bench_embed.json]

The shards are the realistic ones of `clipkit bench data` (JPEG photographs of 640x480 to 1280x960 pixels with
captions and json, in img2dataset's layout; cached). The model is `--model` built from its config with
random weights (seed 0; no download), saved once as a clipkit weights file that both methods load.

- clipkit:  clipkit.retrieval.embed.embed_shards: image and caption embeddings, parts and metadata written in
            clip-retrieval's layout (its fast evaluation decode, batched tokenising, text tower cut at the
            longest caption, `--workers` loader processes).
- openclip: the loop most scripts run: webdataset 1.0.2 (`WebDataset(...).decode("pil")`, open_clip's own
            validation transform, `.batched`, `WebLoader` with the same `--workers`), then
            `model.encode_image` + normalise under torch.no_grad(); images only, nothing written.

Both run in their own process with the same cores: `--workers` single-threaded loader processes plus a main
process of `--threads` threads; images/s per core = images/s / (workers + threads). Each measurement is the
whole job (loader start to last embedding, the model already loaded); methods alternate over the repeats.
The CPU time the job used (its process and its loader workers) is reported too: images per CPU-second
measures the work per image even on a machine other jobs share, where wall-clock rates move.
Both methods' image embeddings are compared by key (cosine), so the speed is of the same work.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..cliargs import THREADS_HELP, default_threads, renamed
from .harness import (CACHE, BenchError, bench_main, command_line, emit_result, machine_facts, orders, run_worker,
                      runs_and_median, worker_env)
from .shards import photo_shards

METHODS = ("clipkit", "openclip")
TARGET = 2.0  # clipkit embed >= 2x the plain loop, images/s per core


# ---------------------------------------------------------------------------------------------- the model

def model_file(name: str, folder: Path) -> Path:
    """A clipkit weights file of `name` with seed-0 random weights (written once)."""
    import torch

    from ..models import create_model, get_model_config, save_weights

    path = folder / f"{name}-seed0.safetensors"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        with atomic_path(path) as tmp:
            save_weights(create_model(name).state_dict(), tmp, name, get_model_config(name))
    return path


# ----------------------------------------------------------------------------------------- measurements

class _Clock:
    """Wall time and CPU time of this process and of its children (loader workers, counted once joined)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, self._cpu() - self.cpu

    @staticmethod
    def _cpu() -> float:
        import resource

        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _clipkit(args: argparse.Namespace, out: Path) -> tuple[int, _Clock]:
    from ..models import load_model
    from ..retrieval.embed import embed_shards

    loaded = load_model(args.weights)
    with _Clock() as clock:  # embed_shards returns once its loader workers are joined
        result = embed_shards(loaded, args.spec, out / "clipkit", batch_size=args.batch_size, workers=args.workers,
                              progress=False)
    return result.rows_embedded, clock


def _openclip(args: argparse.Namespace, out: Path) -> tuple[int, _Clock]:
    import open_clip
    import torch
    import torch.nn.functional as F
    import webdataset as wds
    from safetensors.torch import load_file

    from ..config import DEFAULT_IMAGE_KEY
    from ..models import MODEL_CONFIG_DIR

    open_clip.add_model_config(MODEL_CONFIG_DIR)  # clipkit's architectures (clipkit-tiny, ...) by name
    # pretrained_text=False: no Hugging Face text-tower weights fetched before the file's weights replace them
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=None, pretrained_text=False)
    model.load_state_dict(load_file(args.weights))
    model.eval()
    feats, keys = [], []
    with _Clock() as clock:
        dataset = (wds.WebDataset(args.spec, shardshuffle=False).decode("pil")
                   .to_tuple(DEFAULT_IMAGE_KEY, "__key__").map_tuple(preprocess, lambda k: k)
                   .batched(args.batch_size, partial=True))
        loader = wds.WebLoader(dataset, batch_size=None, num_workers=args.workers)
        with torch.no_grad():
            for images, batch_keys in loader:
                feats.append(F.normalize(model.encode_image(images), dim=-1))
                keys += batch_keys
        del loader  # joins its workers, so that their CPU time is counted
    np.save(out / "openclip.npy", torch.cat(feats).half().numpy())
    (out / "openclip_keys.json").write_text(json.dumps(keys))
    return len(keys), clock


def _measure(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.result_dir)
    images, clock = (_clipkit if args.worker == "clipkit" else _openclip)(args, out)
    cores = args.workers + args.threads
    emit_result({"method": args.worker, "images": images, "seconds": clock.wall, "images_per_s": images / clock.wall,
                 "images_per_s_per_core": images / clock.wall / cores, "cores": cores, "cpu_seconds": clock.cpu,
                 "images_per_cpu_second": images / clock.cpu})
    return 0


def _run_one(method: str, args: argparse.Namespace, spec: str, weights: Path, result_dir: Path) -> dict:
    return run_worker("clipkit.bench.embed", method,
                      ["--spec", spec, "--weights", weights, "--result-dir", result_dir, "--model", args.model,
                       "--batch-size", args.batch_size, "--workers", args.workers, "--threads", args.threads],
                      env=worker_env(args.threads), timeout=args.timeout)


# ------------------------------------------------------------------------------------- the two outputs

def compare_outputs(result_dir: Path) -> dict:
    """clipkit's image embeddings (read as clip-retrieval reads them) against the loop's, matched by key."""
    import pyarrow.parquet as pq

    imgs = sorted((result_dir / "clipkit" / "img_emb").glob("*.npy"))
    metas = sorted((result_dir / "clipkit" / "metadata").glob("*.parquet"))
    ours = np.concatenate([np.load(p) for p in imgs]).astype(np.float32)
    our_keys = [k for p in metas for k in pq.read_table(p).column("key").to_pylist()]
    theirs = np.load(result_dir / "openclip.npy").astype(np.float32)
    their_keys = json.loads((result_dir / "openclip_keys.json").read_text())
    if sorted(our_keys) != sorted(their_keys):
        raise BenchError(f"the methods embedded different samples ({len(our_keys)} vs {len(their_keys)})")
    index = {k: i for i, k in enumerate(their_keys)}
    theirs = theirs[[index[k] for k in our_keys]]
    cosine = np.sum(ours * theirs, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    return {"images": len(our_keys), "cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()),
            "max_abs_diff": float(np.abs(ours - theirs).max())}


# ---------------------------------------------------------------------------------------------- driver

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="clipkit-tiny",
                   help="architecture (random weights, built from its config); on CPUs a ViT-B-32 leaves the time to "
                        "the model, and the loaders barely matter")
    p.add_argument("--images", type=int, default=1200, help="photos in the benchmark shards")
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="loader processes (one core each)")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--repeats", type=int, default=3)
    renamed(p, "--cache", "--shards", default=None, metavar="DIR",
            help="folder for the generated benchmark data (default: a folder under ~/.cache/clipkit)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", metavar="FILE.json", default="bench_embed.json")
    for hidden in ("--worker", "--spec", "--weights", "--result-dir"):
        p.add_argument(hidden, help=argparse.SUPPRESS, **({"choices": METHODS} if hidden == "--worker" else {}))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="clipkit bench embed", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    args.threads = args.threads or default_threads(workers=args.workers)
    for name in ("images", "per_shard", "batch_size", "threads", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers < 0:
        p.error("--workers must be >= 0")
    return args


def _summary(runs: dict[str, list[dict]]) -> dict:
    methods = {}
    for m, rs in runs.items():
        rates = runs_and_median("images_per_s", [r["images_per_s"] for r in rs])
        methods[m] = {"images": rs[0]["images"], **rates,
                      "images_per_s_per_core": rates["images_per_s_median"] / rs[0]["cores"], "cores": rs[0]["cores"],
                      **runs_and_median("images_per_cpu_second", [r["images_per_cpu_second"] for r in rs])}
    return methods


def _drive(args: argparse.Namespace, argv: list[str]) -> dict:
    spec = photo_shards(args.cache, args.images, args.per_shard)  # shared with bench data
    weights = model_file(args.model, CACHE / "bench_embed")
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    agreement = []
    for repeat, order in orders(METHODS, args.repeats):
        with tempfile.TemporaryDirectory(prefix="clipkit-bench-embed-") as tmp:
            for method in order:
                r = _run_one(method, args, spec, weights, Path(tmp))
                runs[method].append(r)
                print(f"repeat {repeat + 1}/{args.repeats} {method}: {r['images_per_s']:.1f} images/s "
                      f"({r['images']} in {r['seconds']:.1f} s)", flush=True)
            agreement.append(compare_outputs(Path(tmp)))
    return _report(args, argv, spec, weights, _summary(runs), agreement)


def _report(args, argv, spec: str, weights: Path, methods: dict, agreement: list[dict]) -> dict:
    import torch

    from ..models import load_model
    from ..models.flops import image_inference_flops, matmul_peak

    loaded = load_model(weights)
    size = loaded.model.visual.image_size
    flops = image_inference_flops(loaded.model, tuple(size) if isinstance(size, (tuple, list)) else (size, size))
    torch.set_num_threads(1)  # the peak of one thread: the rates are per core
    peak = matmul_peak(torch.device("cpu"), torch.float32)
    for m in methods.values():
        m["image_tower_gflop_per_s_per_core"] = m["images_per_s_per_core"] * flops / 1e9
        m["image_tower_mfu"] = m["images_per_s_per_core"] * flops / peak
    ratio = methods["clipkit"]["images_per_s_per_core"] / methods["openclip"]["images_per_s_per_core"]
    cpu_ratio = methods["clipkit"]["images_per_cpu_second_median"] / methods["openclip"]["images_per_cpu_second_median"]
    return {
        "benchmark": "photo shards -> L2-normalised embeddings: clipkit embed vs a plain open_clip loop",
        "command": command_line("embed", argv),
        "config": {"model": args.model, "images": args.images, "per_shard": args.per_shard,
                   "batch_size": args.batch_size, "workers": args.workers, "threads": args.threads,
                   "repeats": args.repeats, "shards": spec},
        "machine": machine_facts(fp32_matmul_peak_gflop_per_s_one_thread=peak / 1e9),
        "image_tower_gflop_per_image": flops / 1e9,
        "methods": methods,
        "agreement": {"images": agreement[0]["images"], "cosine_min": min(a["cosine_min"] for a in agreement),
                      "max_abs_diff": max(a["max_abs_diff"] for a in agreement)},
        "ratio_clipkit_over_openclip_per_core": ratio,
        "ratio_clipkit_over_openclip_per_cpu_second": cpu_ratio,
        "target": {"ratio_min": TARGET, "met": ratio >= TARGET},
    }


def _show(report: dict) -> None:
    for m, r in report["methods"].items():
        print(f"{m:<9} {r['images_per_s_median']:8.1f} images/s  {r['images_per_s_per_core']:8.1f} per core  "
              f"{r['images_per_cpu_second_median']:8.1f} per CPU-second")
    a = report["agreement"]
    print(f"agreement: {a['images']} images, cosine >= {a['cosine_min']:.6f}")
    print(f"clipkit/openclip per core: {report['ratio_clipkit_over_openclip_per_core']:.2f}x (target >= {TARGET}x, "
          f"{'met' if report['target']['met'] else 'NOT met'}); per CPU-second used: "
          f"{report['ratio_clipkit_over_openclip_per_cpu_second']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    return bench_main("embed", argv, parse_args, _drive, _show, worker=_measure)


if __name__ == "__main__":
    sys.exit(main())
