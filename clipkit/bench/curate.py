"""Curation speed and memory: every stage of `clipkit curate` timed on its own, beside `clipkit embed`'s rate.

    clipkit bench curate [--model clipkit-tiny] [--sizes 1000,2000,4000] [--stages STAGE,...] [--per-shard 100]
                         [--batch-size 64] [--workers 1] [--threads N] [--eval-images 100] [--repeats 3]
                         [--cache DIR] [--out bench_curate.json]

The shards are the photo shards of `clipkit bench data` and `bench embed` (JPEGs of 640x480 to 1280x960 with
captions; cached), written once for the largest size in --sizes; a smaller size reads their first shards. The
scoring model is `--model` with seed-0 random weights (the file bench embed writes). Every stage runs in a fresh
process of its own, one per stage, size and repeat, so that one stage's memory peak cannot hide another's:

- scan            the scan as `clipkit curate` runs it (decode, filters' features, hashes and embeddings in one
                  pass, the feature files written); it also writes the features the global stages below read.
- decode_filters  read the tar, decode the image to RGB, the caption's language (lingua), tokens and words;
                  then the basic filters over those columns.
- hashing         SHA-256 of the image bytes and the pHash of the image and of its mirror (images decoded first,
                  untimed).
- embedding       image and text embeddings with the scoring model (clipkit.curate.scan.Embedder; images decoded
                  first, untimed).
- hash_dedup      exact then near duplicates over the whole set.
- semantic_dedup  SemDeDup: faiss spherical k-means (about sqrt(N) clusters) and the greedy walk per cluster.
- decontam        the evaluation set's hashes and embeddings (--eval-images photos of another seed) and the
                  training set matched against them by pHash and by embedding cosine >= DECONTAM_COSINE.
- clip_score      image-text cosine of every sample, threshold 0.28 (the config's default).
- balance         MetaCLIP balancing with the bench captions' subjects as entries, t = N / 20.
- write           every sample copied into output shards of 1,000 (the config's default), as if all were kept.

Each global stage runs over all N samples (none dropped before it), so that every stage's time and memory is of
the same N. Per-shard stages are timed shard by shard (decoding for the stage is outside the clock where it is
not the stage). samples/s per core = samples/s / --threads (the stage processes use that many threads; the
Python-bound ones use one); samples per CPU-second (every thread of the process) holds on a shared machine where
wall-clock rates move. Memory: the largest growth of the process's RSS over its RSS just before the stage ran
(the free heap trimmed and Linux's peak RSS reset before each timed span), and the bytes of the inputs a global
stage holds.

`clipkit embed` (bench embed's clipkit worker: its own loader processes, both towers, parts written) runs on the
same shards in the same invocation, alternating with the stages over the repeats; its rate stands beside them.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..cliargs import THREADS_HELP, default_threads
from ..config.schema import CurateConfig
from .embed import model_file
from .harness import (CACHE, bench_main, command_line, emit_result, home_as_tilde, machine_facts, orders,
                      proc_status_bytes, reset_peak_rss, run_worker, runs_and_median, trim_heap, worker_env)
from .shards import SHARD_FORMAT, photo_shards, write_bench_shards

STAGES = ("decode_filters", "hashing", "embedding", "hash_dedup", "semantic_dedup", "decontam", "clip_score",
          "balance", "write")
PER_SHARD = ("scan", "decode_filters", "hashing", "embedding", "write")
METHODS = ("scan", *STAGES)  # what a worker process measures; the scan runs first, the others read its features
EMBED = "clipkit_embed"
CONFIG = CurateConfig()  # every stage's settings are the config's defaults, but for those below
DECONTAM_COSINE = 0.95  # the default (null) matches by hash only; the bench times the embedding match too
FEATURES = "features.npz"  # the scan's features as plain arrays: global-stage workers need no torch to read them
# The bench captions are "a photo of the coffee, 1024x768": their subjects and nouns are the balancing entries.
ENTRIES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble deep field", "photo",
           "picture", "snapshot")


# ----------------------------------------------------------------------------------------- measurements

def _cpu_seconds() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


class _Meter:
    """Wall and CPU seconds (every thread of this process) summed over the spans it times, and the largest growth
    of the RSS within one span over the RSS just before it (None where the peak cannot be reset)."""

    def __init__(self) -> None:
        self.seconds = self.cpu = 0.0
        self.growth: int | None = 0
        self.rss_before = 0

    @contextmanager
    def span(self):
        gc.collect()
        trim_heap()
        before = proc_status_bytes("VmRSS")
        resettable = reset_peak_rss() and before is not None
        wall, cpu = time.perf_counter(), _cpu_seconds()
        yield
        self.seconds += time.perf_counter() - wall
        self.cpu += _cpu_seconds() - cpu
        peak = proc_status_bytes("VmHWM")
        if not resettable or peak is None or self.growth is None:
            self.growth = None
        else:
            self.growth = max(self.growth, peak - before)
            self.rss_before = max(self.rss_before, before)


def _held_bytes(*arrays) -> int:
    """What arrays hold: their buffers, and for object arrays each Python object too (strings)."""
    total = 0
    for a in arrays:
        a = np.asarray(a)
        total += a.nbytes + (sum(sys.getsizeof(v) for v in a) if a.dtype == object else 0)
    return total


def _urls(args) -> list[str]:
    from ..data import expand_shards

    return expand_shards(args.spec)


def _loaded(args):
    from ..models import load_model

    loaded = load_model(args.weights, model_name=args.model)
    loaded.model.eval()
    return loaded


def _warm_up(detector=None, count_tokens=None, embedder=None) -> None:
    """One-time start-up outside the clock: lingua loads its language models and torch sets up its kernels on
    first use, once per process, not per sample."""
    from PIL import Image

    text = "a photo of a cat on a table"
    if detector is not None:
        detector(text)
    if count_tokens is not None:
        count_tokens(text)
    if embedder is not None:
        embedder([Image.new("RGB", (64, 64))], [text])


def _scan(args, meter: _Meter) -> dict:
    from ..curate.hashing import thumbs_array
    from ..curate.scan import Embedder, LanguageDetector, load_features, scan_shard, token_counter

    c = CONFIG
    loaded, urls, work = _loaded(args), _urls(args), Path(args.work)
    detector = LanguageDetector(c.filters.detector_languages)
    embedder = Embedder(loaded, "cpu", args.batch_size)
    work.mkdir(parents=True, exist_ok=True)
    count_tokens = token_counter(loaded.tokenizer)
    _warm_up(detector, count_tokens, embedder)
    samples = 0
    for s, url in enumerate(urls):
        with meter.span():
            samples += scan_shard(url, s, work, c, detector, count_tokens, embedder)["samples"]
    cols, emb = load_features(work, len(urls), with_embeddings=True)
    thumbs = thumbs_array(cols.pop("thumb"))  # bytes per sample: kept as uint8 rows (bytes(row) is the thumbnail)
    plain = {k: (np.asarray(v, dtype=str) if v.dtype == object else v) for k, v in cols.items()} | {"thumb": thumbs}
    np.savez(work / FEATURES, **plain, **emb)
    return {"samples": samples, "embedding_dim": int(emb["image_emb"].shape[1])}


def _decode_filters(args, meter: _Meter) -> dict:
    from ..curate.filters import basic_filters
    from ..curate.scan import LanguageDetector, decoded_samples, token_counter
    from ..data.skips import SkipCounter

    c = CONFIG
    detector, count_tokens = LanguageDetector(c.filters.detector_languages), token_counter(_loaded(args).tokenizer)
    _warm_up(detector, count_tokens)
    names = ("width", "height", "caption", "words", "tokens", "language", "language_confidence")
    cols: dict[str, list] = {k: [] for k in names}
    for url in _urls(args):
        with meter.span():
            for d in decoded_samples(url, c, SkipCounter()):
                lang, conf = detector(d.caption)
                for k, v in zip(names, (d.rgb.width, d.rgb.height, d.caption, len(d.caption.split()),
                                        count_tokens(d.caption), lang, conf)):
                    cols[k].append(v)
    n = len(cols["caption"])
    with meter.span():
        table = {k: np.asarray(v, dtype=object if k in ("caption", "language") else None) for k, v in cols.items()}
        result = basic_filters(table, np.ones(n, dtype=bool), c.filters)
    return {"samples": n, "dropped": int(result.drop.sum())}


def _decoded_shards(args):
    """Each shard's decoded samples in turn (decoding is not what the stage that reads them measures)."""
    from ..curate.scan import decoded_samples
    from ..data.skips import SkipCounter

    c = CONFIG
    for url in _urls(args):
        yield list(decoded_samples(url, c, SkipCounter()))


def _hashing(args, meter: _Meter) -> dict:
    from ..curate.hashing import perceptual_hashes, sha256_hex, thumbnail

    samples = 0
    for decoded in _decoded_shards(args):
        with meter.span():
            for d in decoded:
                sha256_hex(d.data)
                perceptual_hashes(d.rgb)
                thumbnail(d.rgb)
        samples += len(decoded)
    return {"samples": samples}


def _embedding(args, meter: _Meter) -> dict:
    from ..curate.scan import Embedder

    embedder = Embedder(_loaded(args), "cpu", args.batch_size)
    _warm_up(embedder=embedder)
    samples = 0
    for decoded in _decoded_shards(args):
        with meter.span():
            images, _ = embedder([d.rgb for d in decoded], [d.caption for d in decoded])
        samples += len(images)
    return {"samples": samples}


def _features(args) -> dict[str, np.ndarray]:
    """The scan's features as clipkit curate holds them (strings as object arrays)."""
    with np.load(Path(args.work) / FEATURES) as f:
        return {k: (f[k].astype(object) if f[k].dtype.kind == "U" else f[k]) for k in f.files}


def _hash_dedup(f: dict, args, meter: _Meter) -> dict:
    from ..curate.hashdedup import exact_dedup, near_dedup

    alive = np.ones(len(f["key"]), dtype=bool)
    with meter.span():
        exact = exact_dedup(f["sha256"], alive, f["key"])
        near = near_dedup(f["phash"], f["phash_flip"], alive & ~exact.drop, f["key"], CONFIG.dedup.phash_max_distance,
                          thumbs=f["thumb"], min_similarity=CONFIG.dedup.phash_verify)
    return {"dropped": int(exact.drop.sum() + near.drop.sum()),
            "held_input_bytes": _held_bytes(f["sha256"], f["phash"], f["phash_flip"], f["key"], f["thumb"])}


def _semantic_dedup(f: dict, args, meter: _Meter) -> dict:
    from ..curate.semdedup import semantic_dedup

    with meter.span():
        r = semantic_dedup(f["image_emb"], np.ones(len(f["key"]), dtype=bool), f["key"],
                           threshold=CONFIG.dedup.semantic_threshold, clusters=None, seed=CONFIG.seed)
    return {"dropped": int(r.drop.sum()), "clusters": r.summary["clusters"],
            "held_input_bytes": _held_bytes(f["image_emb"], f["key"])}


def _decontam(f: dict, args, meter: _Meter) -> dict:
    from ..curate.decontam import decontaminate, eval_set_features

    loaded = _loaded(args)
    with meter.span():
        sets = eval_set_features([args.eval_set], loaded, batch_size=args.batch_size,
                                 max_image_pixels=CONFIG.max_image_pixels)
        r = decontaminate(f["phash"], f["phash_flip"], f["image_emb"], np.ones(len(f["key"]), dtype=bool), sets,
                          max_distance=CONFIG.decontam.phash_max_distance, cosine=DECONTAM_COSINE)
    return {"dropped": int(r.drop.sum()), "eval_images": sum(len(s.keys) for s in sets),
            "held_input_bytes": _held_bytes(f["phash"], f["phash_flip"], f["image_emb"])}


def _clip_score(f: dict, args, meter: _Meter) -> dict:
    from ..curate.clipscore import clip_score_filter

    with meter.span():
        r = clip_score_filter(f["image_emb"], f["text_emb"], np.ones(len(f["key"]), dtype=bool),
                              threshold=CONFIG.score.threshold, top_fraction=None)
    return {"dropped": int(r.drop.sum()), "held_input_bytes": _held_bytes(f["image_emb"], f["text_emb"])}


def _balance(f: dict, args, meter: _Meter) -> dict:
    from ..curate.balance import balance, read_entries

    entries, n = read_entries(args.entries), len(f["key"])
    with meter.span():
        r = balance(list(f["caption"]), np.ones(n, dtype=bool), list(f["key"]), entries, t=max(1, n // 20),
                    seed=CONFIG.seed)
    return {"dropped": int(r.drop.sum()), "held_input_bytes": _held_bytes(f["caption"], f["key"])}


def _write(f: dict, args, meter: _Meter) -> dict:
    from ..curate.run import write_shard

    rows = list(zip(f["shard"], f["index"].tolist(), f["key"]))
    per = CONFIG.samples_per_shard
    out = Path(args.result_dir) / "shards"
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for o, s in enumerate(range(0, len(rows), per)):
        with meter.span():
            written += write_shard(out / f"{o:05d}.tar", rows[s:s + per])
    return {"written": written, "held_input_bytes": _held_bytes(f["shard"], f["index"], f["key"])}


GLOBAL = {"hash_dedup": _hash_dedup, "semantic_dedup": _semantic_dedup, "decontam": _decontam,
          "clip_score": _clip_score, "balance": _balance, "write": _write}
SHARDWISE = {"scan": _scan, "decode_filters": _decode_filters, "hashing": _hashing, "embedding": _embedding}


def _measure(args: argparse.Namespace) -> int:
    meter = _Meter()
    if args.worker in SHARDWISE:
        out = SHARDWISE[args.worker](args, meter)
    else:
        f = _features(args)
        out = {"samples": len(f["key"]), **GLOBAL[args.worker](f, args, meter)}
        if "written" in out:
            out["samples"] = out.pop("written")
    emit_result({"method": args.worker, **out, "seconds": meter.seconds, "cpu_seconds": meter.cpu,
                 "peak_rss_growth_bytes": meter.growth, "rss_before_bytes": meter.rss_before})
    return 0


# ---------------------------------------------------------------------------------------------- driver

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="clipkit-tiny", help="the scoring model's architecture (random weights)")
    p.add_argument("--sizes", default="1000,2000,4000", metavar="N,N,...",
                   help="photos in the benchmark shards: every stage is measured at each size")
    p.add_argument("--stages", default=",".join(STAGES), metavar="STAGE,...",
                   help=f"the stages to measure, of {', '.join(STAGES)} (the scan and clipkit embed always run)")
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="loader processes of clipkit embed (one core each)")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--eval-images", type=int, default=100, help="photos in the decontamination stage's eval set")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="folder for the generated benchmark data (default: folders under ~/.cache/clipkit)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one measurement process may run")
    p.add_argument("--out", metavar="FILE.json", default="bench_curate.json")
    for hidden in ("--worker", "--spec", "--work", "--weights", "--eval-set", "--entries", "--result-dir"):
        p.add_argument(hidden, help=argparse.SUPPRESS, **({"choices": METHODS} if hidden == "--worker" else {}))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="clipkit bench curate", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    args.threads = args.threads or default_threads(workers=args.workers)
    try:
        args.sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        p.error(f"--sizes takes whole numbers joined by commas, got {args.sizes!r}")
    if not args.sizes or args.sizes[0] < 1 or any(n % args.per_shard for n in args.sizes):
        p.error(f"--sizes must name at least one size, each a multiple of --per-shard ({args.per_shard})")
    wanted = {s.strip() for s in args.stages.split(",") if s.strip()}
    if not wanted or wanted - set(STAGES):
        p.error(f"--stages takes names of {', '.join(STAGES)} joined by commas, got {args.stages!r}")
    args.stages = [s for s in STAGES if s in wanted]
    for name in ("per_shard", "batch_size", "threads", "eval_images", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers < 0:
        p.error("--workers must be >= 0")
    return args


def _inputs(args) -> tuple[dict[int, str], Path, Path]:
    """(size -> photo shard spec, the eval set's root, the scoring model's weights), written once."""
    folder = Path(args.cache) if args.cache else None
    largest = photo_shards(folder / "photos" if folder else None, args.sizes[-1], args.per_shard)
    # A smaller size is the first shards of the largest set (the same photos for the seed): written once.
    specs = {n: str(Path(largest).parent / f"{{00000..{n // args.per_shard - 1:05d}}}.tar") for n in args.sizes}
    eval_root = (folder or CACHE / "bench_curate") / f"eval-{SHARD_FORMAT}-{args.eval_images}"
    write_bench_shards(eval_root / "test", args.eval_images, args.eval_images, seed=1)  # a CLIP_benchmark root
    return specs, eval_root, model_file(args.model, CACHE / "bench_embed")


def _run_one(method: str, args, spec: str, work: Path, weights: Path, eval_root: Path, tmp: Path) -> dict:
    result_dir = tmp / f"{method}-{work.name}"
    result_dir.mkdir(parents=True, exist_ok=True)
    if method == EMBED:
        r = run_worker("clipkit.bench.embed", "clipkit",
                       ["--spec", spec, "--weights", weights, "--result-dir", result_dir, "--model", args.model,
                        "--batch-size", args.batch_size, "--workers", args.workers, "--threads", args.threads],
                       env=worker_env(args.threads), timeout=args.timeout)
        return {**r, "samples": r["images"]}
    return run_worker("clipkit.bench.curate", method,
                      ["--spec", spec, "--work", work, "--weights", weights, "--model", args.model,
                       "--batch-size", args.batch_size, "--threads", args.threads, "--eval-set", eval_root,
                       "--entries", tmp / "entries.txt", "--result-dir", result_dir],
                      env=worker_env(args.threads), timeout=args.timeout)


def _drive(args: argparse.Namespace, argv: list[str]) -> dict:
    specs, eval_root, weights = _inputs(args)
    runs: dict[str, dict[int, list[dict]]] = {m: {n: [] for n in args.sizes} for m in ("scan", *args.stages, EMBED)}
    for repeat, order in orders([*args.stages, EMBED], args.repeats, rotate=True):
        with tempfile.TemporaryDirectory(prefix="clipkit-bench-curate-") as tmp_s:
            tmp = Path(tmp_s)
            (tmp / "entries.txt").write_text("\n".join(ENTRIES) + "\n")
            for n in args.sizes:
                for method in ("scan", *order):  # the scan first: it writes the features the global stages read
                    r = _run_one(method, args, specs[n], tmp / f"work-{n}", weights, eval_root, tmp)
                    runs[method][n].append(r)
                    print(f"repeat {repeat + 1}/{args.repeats} size {n} {method}: {r['samples']} samples in "
                          f"{r['seconds']:.2f} s", flush=True)
    return _report(args, argv, specs, eval_root, runs)


# ---------------------------------------------------------------------------------------------- report

def _median_or_none(values: list) -> float | None:
    return None if any(v is None for v in values) else statistics.median(values)


def _figures(rs: list[dict], cores: int) -> dict:
    """One stage at one size over the repeats: rates, per core, per CPU-second, memory (None where a span was too
    short for the clock, or the peak could not be reset)."""
    rates = [r["samples"] / r["seconds"] if r["seconds"] > 0 else None for r in rs]
    per_cpu = [r["samples"] / r["cpu_seconds"] if r["cpu_seconds"] > 0 else None for r in rs]
    growth = [r.get("peak_rss_growth_bytes") for r in rs]
    median_rate = _median_or_none(rates)
    out = {"samples": rs[0]["samples"], **runs_and_median("seconds", [r["seconds"] for r in rs]),
           "samples_per_s": rates, "samples_per_s_median": median_rate,
           "samples_per_s_per_core": median_rate / cores if median_rate else None, "cores": cores,
           "samples_per_cpu_second": per_cpu, "samples_per_cpu_second_median": _median_or_none(per_cpu),
           "peak_rss_growth_bytes": growth, "peak_rss_growth_bytes_median": _median_or_none(growth)}
    for extra in ("dropped", "clusters", "eval_images", "held_input_bytes", "embedding_dim"):
        if extra in rs[0]:
            out[extra] = rs[0][extra]
    return out


def _memory(stages: dict, sizes: list[int]) -> dict:
    """Per stage: peak RSS growth at each size, and its growth per sample between the smallest and largest."""
    out = {}
    for name, s in stages.items():
        growth = {str(n): s["sizes"][str(n)]["peak_rss_growth_bytes_median"] for n in sizes}
        lo, hi = growth[str(sizes[0])], growth[str(sizes[-1])]
        slope = (hi - lo) / (sizes[-1] - sizes[0]) if len(sizes) > 1 and None not in (lo, hi) else None
        held = s["sizes"][str(sizes[-1])].get("held_input_bytes")
        out[name] = {"peak_rss_growth_bytes": growth, "growth_bytes_per_sample": slope,
                     "held_input_bytes_per_sample": held / sizes[-1] if held is not None else None}
    return out


def _report(args, argv, specs: dict[int, str], eval_root: Path, runs: dict) -> dict:
    stages = {}
    for m in runs:
        cores = runs[m][args.sizes[0]][0]["cores"] if m == EMBED else args.threads
        stages[m] = {"kind": "per_shard" if m in PER_SHARD or m == EMBED else "global", "cores": cores,
                     "sizes": {str(n): _figures(runs[m][n], cores) for n in args.sizes}}
    largest = str(args.sizes[-1])
    embed = stages[EMBED]["sizes"][largest]
    throughput = {m: {k: s["sizes"][largest][k] for k in ("samples", "samples_per_s_median", "samples_per_s_per_core",
                                                          "samples_per_cpu_second_median")} for m, s in stages.items()}
    for t in throughput.values():  # a ratio to clipkit embed: wall-clock per core, and per CPU-second used
        for key, over in (("samples_per_s_per_core", "per_core_over_embed"),
                          ("samples_per_cpu_second_median", "per_cpu_second_over_embed")):
            t[over] = t[key] / embed[key] if t[key] and embed[key] else None
    return {
        "benchmark": "clipkit curate, each stage in its own process on photo shards, beside clipkit embed",
        "command": command_line("curate", argv),
        "config": {"model": args.model, "sizes": args.sizes, "per_shard": args.per_shard,
                   "batch_size": args.batch_size, "workers": args.workers, "threads": args.threads,
                   "repeats": args.repeats, "stages": args.stages, "eval_images": args.eval_images,
                   "eval_set": home_as_tilde(str(eval_root)),
                   "decontam_cosine": DECONTAM_COSINE, "balance_entries": list(ENTRIES), "balance_t": "samples // 20",
                   "shards": {str(n): home_as_tilde(s) for n, s in specs.items()}},
        "machine": machine_facts(peak_rss_reset=reset_peak_rss()),
        "stages": stages,
        "throughput": {"size": args.sizes[-1], "stages": throughput},
        "memory": _memory({m: s for m, s in stages.items() if m != EMBED}, args.sizes),
    }


def _show(report: dict) -> None:
    t = report["throughput"]
    print(f"at {t['size']} samples:  samples/s   per core   per CPU-second   per core / clipkit embed   "
          "per CPU-second / clipkit embed")
    for m, r in t["stages"].items():
        cells = [r["samples_per_s_median"], r["samples_per_s_per_core"], r["samples_per_cpu_second_median"],
                 r["per_core_over_embed"], r["per_cpu_second_over_embed"]]
        print(f"{m:<15}" + "".join(f"{v:12.1f}" if v is not None else f"{'-':>12}" for v in cells))
    print("peak RSS growth (MB) by size: " + ", ".join(str(n) for n in report["config"]["sizes"]))
    for m, r in report["memory"].items():
        cells = [v / 1e6 if v is not None else None for v in r["peak_rss_growth_bytes"].values()]
        print(f"{m:<15}" + "".join(f"{v:10.1f}" if v is not None else f"{'-':>10}" for v in cells))


def main(argv: list[str] | None = None) -> int:
    return bench_main("curate", argv, parse_args, _drive, _show, worker=_measure)


if __name__ == "__main__":
    sys.exit(main())
