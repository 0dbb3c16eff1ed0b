"""`clipkit curate --data SPEC --out DIR [CONFIG.yaml] [curate.KEY=VALUE ...]`: the curation run.

    torchrun --nproc_per_node=8 -m clipkit curate --data 'raw/{00000..00999}.tar' --out curated/

1. SCAN: each rank computes the features of its input shards (s % world == rank) into OUT/work/ (clipkit.curate.
   scan; a re-run keeps finished shards and refuses changed feature settings). Barrier.
2. STAGES: rank 0 reads every shard's features (shard order, then sample order) and runs the stages in a fixed
   order, each optional: filters -> exact_dedup -> near_dedup -> semantic_dedup -> decontam -> clip_score ->
   balance. Each returns a StageResult over all N samples (checked against the samples still alive). It writes
   OUT/decisions.parquet (one row per scanned sample: key, shard, index, kept, the stage and reason that dropped
   it, the detail, one score column per stage that ran). Barrier.
3. WRITE: the kept samples, in set order, go into new webdataset shards OUT/shards/NNNNN.tar of
   curate.samples_per_shard samples each (output shard o written by rank o % world); the members are copied
   byte for byte, never re-encoded. Rank 0 writes OUT/manifest.json (the source shard and key of every output
   sample, in order; the resolved config; the counts), OUT/curate_summary.json and OUT/curate_report.html.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import json
import logging
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from ..atomic import atomic_write, atomic_write_text
from ..config.schema import Config, CurateConfig
from ..errors import UserError
from .result import StageResult
from .scan import (Embedder, LanguageDetector, check_fingerprint, default_tokenizer, feature_fingerprint,
                   load_features, scan_shard, shard_done, shard_paths, token_counter)

log = logging.getLogger("clipkit.curate")

STAGES = ("filters", "exact_dedup", "near_dedup", "semantic_dedup", "decontam", "clip_score", "balance")
DECISION_COLUMNS = ("key", "shard", "index", "kept", "stage", "reason", "detail")


def _stage_module(name: str, key: str):
    """A stage's module, imported only when its config switch is on."""
    try:
        return importlib.import_module(f"clipkit.curate.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"clipkit.curate.{name}":
            raise UserError(f"{key} is on, but this clipkit has no clipkit.curate.{name} stage") from None
        raise


def _progress(enabled: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="shard", disable=not enabled, dynamic_ncols=True, leave=False)


def _needs_model(c: CurateConfig) -> bool:
    return c.dedup.semantic or c.score.enabled or c.decontam.cosine is not None


def run_stages(c: CurateConfig, cols: dict[str, np.ndarray], emb: dict[str, np.ndarray], loaded,
               progress: bool = False) -> tuple[list[StageResult], np.ndarray]:
    """Every enabled stage, in order, over the scanned samples: (results, alive after the last)."""
    from .filters import basic_filters
    from .hashdedup import exact_dedup, near_dedup

    n = len(cols["key"])
    keys = cols["key"]
    alive = np.ones(n, dtype=bool)
    results: list[StageResult] = []
    plan = []
    if c.filters.enabled:
        plan.append(("filters", lambda a: basic_filters(cols, a, c.filters)))
    if c.dedup.exact:
        plan.append(("exact_dedup", lambda a: exact_dedup(cols["sha256"], a, keys)))
    if c.dedup.phash:
        plan.append(("near_dedup", lambda a: near_dedup(cols["phash"], cols["phash_flip"], a, keys,
                                                        c.dedup.phash_max_distance, thumbs=cols.get("thumb"),
                                                        min_similarity=c.dedup.phash_verify)))
    if c.dedup.semantic:
        semdedup = _stage_module("semdedup", "curate.dedup.semantic")
        plan.append(("semantic_dedup", lambda a: semdedup.semantic_dedup(emb["image_emb"], a, keys,
                                                                   threshold=c.dedup.semantic_threshold,
                                                                   clusters=c.dedup.clusters or None, seed=c.seed)))
    if c.decontam.eval_sets:
        decontam_mod = _stage_module("decontam", "curate.decontam.eval_sets")

        def decontam(a):
            scorer = loaded if c.decontam.cosine is not None else None
            sets = decontam_mod.eval_set_features(list(c.decontam.eval_sets), scorer, batch_size=c.batch_size,
                                                  max_image_pixels=c.max_image_pixels)
            return decontam_mod.decontaminate(cols["phash"], cols["phash_flip"], emb.get("image_emb"), a, sets,
                                   max_distance=c.decontam.phash_max_distance, cosine=c.decontam.cosine)
        plan.append(("decontam", decontam))
    if c.score.enabled:
        clipscore = _stage_module("clipscore", "curate.score.enabled")
        plan.append(("clip_score", lambda a: clipscore.clip_score_filter(emb["image_emb"], emb["text_emb"], a,
                                                                 threshold=c.score.threshold,
                                                                 top_fraction=c.score.top_fraction)))
    if c.balance.enabled:
        balance_mod = _stage_module("balance", "curate.balance.enabled")

        def balance(a):
            entries = (balance_mod.builtin_entries(list(c.decontam.eval_sets)) if c.balance.entries == "builtin"
                       else balance_mod.read_entries(c.balance.entries))
            return balance_mod.balance(cols["caption"], a, keys, entries, t=c.balance.t, seed=c.seed)
        plan.append(("balance", balance))
    bar = _progress(progress, len(plan), "stages")
    for name, fn in plan:
        bar.set_description(name)
        start = time.perf_counter()
        res = fn(alive.copy()).check(alive)
        res.stage = name
        res.summary = {**res.summary, "seconds": round(time.perf_counter() - start, 3),
                       "alive_before": int(alive.sum()), "dropped_total": int(res.drop.sum())}
        alive = alive & ~res.drop
        res.summary["alive_after"] = int(alive.sum())
        results.append(res)
        bar.update(1)
    bar.close()
    return results, alive


def decisions_table(cols: dict[str, np.ndarray], results: list[StageResult], alive: np.ndarray):
    """One row per scanned sample: who dropped it and why, and every stage's score."""
    import pyarrow as pa

    n = len(alive)
    stage = np.full(n, "", dtype=object)
    reason = np.full(n, "", dtype=object)
    detail = np.full(n, "", dtype=object)
    for r in results:
        stage[r.drop] = r.stage
        reason[r.drop] = r.reason[r.drop]
        detail[r.drop] = r.detail[r.drop]
    data = {"key": pa.array(list(cols["key"]), pa.string()), "shard": pa.array(list(cols["shard"]), pa.string()),
            "index": pa.array(np.asarray(cols["index"], np.int64)), "kept": pa.array(alive),
            "stage": pa.array(list(stage), pa.string()), "reason": pa.array(list(reason), pa.string()),
            "detail": pa.array(list(detail), pa.string())}
    for r in results:
        data[f"score_{r.stage}"] = pa.array(np.asarray(r.score, np.float32))
    return pa.table(data)


def output_plan(decisions, samples_per_shard: int) -> list[list[tuple[str, int, str]]]:
    """The output shards: for each, its (source shard, index in it, key) in set order."""
    kept = decisions.filter(decisions.column("kept"))
    rows = list(zip(kept.column("shard").to_pylist(), kept.column("index").to_pylist(),
                    kept.column("key").to_pylist()))
    return [rows[s:s + samples_per_shard] for s in range(0, len(rows), samples_per_shard)]


def write_shard(path: Path, samples: list[tuple[str, int, str]]) -> int:
    """Copy these samples' members, byte for byte, into one tar (members in their source order); returns the
    number of samples written."""
    from ..data.skips import SkipCounter
    from ..data.tario import read_shard

    by_shard: dict[str, set[int]] = {}
    for url, index, _ in samples:
        by_shard.setdefault(url, set()).add(index)
    found: dict[tuple[str, int], dict] = {}
    for url, wanted in by_shard.items():
        last = max(wanted)
        for index, sample in read_shard(url, SkipCounter(), want=lambda i, w=wanted: i in w, last=last):
            found[(url, index)] = sample

    def write(f) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for url, index, key in samples:
                sample = found.get((url, index))
                if sample is None or sample["__key__"] != key:
                    raise UserError(f"{url} changed since it was scanned: sample {index} is no longer {key}")
                for ext, data in sample.items():
                    if ext.startswith("__"):
                        continue
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode, info.mtime = len(data), 0o644, 0
                    tar.addfile(info, io.BytesIO(data))

    atomic_write(path, write)
    return len(samples)


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def curate(cfg: Config, rank: int = 0, world_size: int = 1, barrier=lambda: None,
           local_rank: int = 0) -> dict | None:
    """The whole run (see the module's docstring); rank 0 returns the summary, other ranks None."""
    from ..data.shards import expand_shards

    c = cfg.curate
    if c.data is None or c.out is None:
        raise UserError("clipkit curate needs --data SPEC and --out DIR (or curate.data and curate.out)")
    if not c.model and _needs_model(c):
        raise UserError("a stage that needs embeddings is on but curate.model is not set")
    urls = expand_shards(c.data)
    out = Path(c.out)
    work = out / "work"
    fingerprint = feature_fingerprint(c, urls)
    check_fingerprint(work, fingerprint, write=rank == 0)
    barrier()
    check_fingerprint(work, fingerprint, write=False)
    progress = c.progress and rank == 0 and sys.stderr.isatty()
    loaded = None
    device = None
    if c.model is not None:
        from ..distributed import resolve_device
        from ..models import load_model

        device = resolve_device(None, local_rank)
        loaded = load_model(c.model, device=device, model_name=c.model_name)
        loaded.model.eval()
    mine = [s for s in range(len(urls)) if s % world_size == rank]
    todo = [s for s in mine if not shard_done(work, s)]
    t0 = time.perf_counter()
    if todo:
        detector = LanguageDetector(c.filters.detector_languages if c.filters.languages else [])
        count_tokens = token_counter(loaded.tokenizer if loaded is not None else default_tokenizer())
        embedder = Embedder(loaded, device, c.batch_size) if loaded is not None else None
        bar = _progress(progress, len(todo), "scan")
        for s in todo:
            scan_shard(urls[s], s, work, c, detector, count_tokens, embedder)
            bar.update(1)
        bar.close()
    scan_seconds = time.perf_counter() - t0
    barrier()
    import pyarrow.parquet as pq

    if rank == 0:
        records = [json.loads(shard_paths(work, s)["record"].read_text()) for s in range(len(urls))]
        cols, emb = load_features(work, len(urls), with_embeddings=loaded is not None)
        results, alive = run_stages(c, cols, emb, loaded, progress)
        table = decisions_table(cols, results, alive)
        atomic_write(out / "decisions.parquet", lambda f: pq.write_table(table, f))
    barrier()
    decisions = pq.read_table(out / "decisions.parquet")
    plan = output_plan(decisions, c.samples_per_shard)
    shards_dir = out / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    bar = _progress(progress, len(plan), "write")
    for o in range(rank, len(plan), world_size):
        write_shard(shards_dir / f"{o:05d}.tar", plan[o])
        bar.update(world_size)
    bar.close()
    barrier()
    if rank != 0:
        return None
    for stale in shards_dir.glob("*.tar"):  # left by an earlier run that kept more samples
        if stale.stem.isdigit() and int(stale.stem) >= len(plan):
            stale.unlink()
    skipped: dict[str, int] = {}
    for rec in records:
        for k, v in rec["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    config = _json_safe(dataclasses.asdict(c))
    counts = {"input_shards": len(urls), "scanned": int(len(alive)), "skipped": skipped, "kept": int(alive.sum()),
              "output_shards": len(plan),
              "stages": {r.stage: {"dropped": int(r.drop.sum()),
                                   "reasons": _count(r.reason[r.drop])} for r in results}}
    manifest = {"format": "clipkit-curate-manifest/1", "config": config, "counts": counts,
                "shards": [{"name": f"{o:05d}.tar",
                            "samples": [{"source": url, "key": key} for url, _, key in samples]}
                           for o, samples in enumerate(plan)]}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    summary = {"out": str(out), "counts": counts, "scan_seconds": round(scan_seconds, 2),
               "stages": [{"stage": r.stage, **_json_safe(r.summary)} for r in results], "config": config}
    atomic_write_text(out / "curate_summary.json", json.dumps(summary, indent=1))
    from .report import write_report

    write_report(out / "curate_report.html", summary, cols, results, c)
    return summary


def _count(values) -> dict[str, int]:
    u, n = np.unique(np.asarray(values, dtype=str), return_counts=True) if len(values) else ([], [])
    return {str(k): int(v) for k, v in zip(u, n)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DATA", required=True,
                   help="input shard spec: paths, fsspec URLs or pipe:CMD, with {000..999} braces, joined by '::'")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="output folder: shards/, manifest.json, decisions.parquet, curate_summary.json, "
                        "curate_report.html, work/ (per-shard features; a re-run keeps finished shards)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="[CONFIG.yaml] then curate.KEY=VALUE overrides")


def main(argv: list[str] | None = None) -> int:
    from ..config import ConfigError, load_config
    from ..config.validate import validate
    from ..distributed import cleanup, gather_objects, init_distributed

    p = argparse.ArgumentParser(prog="clipkit curate", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    files = [a for a in args.overrides if "=" not in a]
    overrides = [a for a in args.overrides if "=" in a]
    if len(files) > 1 or (files and not files[0].endswith((".yaml", ".yml"))):
        raise ConfigError(f"expected at most one CONFIG.yaml and curate.key=value overrides, got {' '.join(files)}")
    cfg = load_config(files[0] if files else None, overrides)
    cfg.curate.data, cfg.curate.out = args.data, args.out  # as given: a shard spec is not YAML
    validate(cfg)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    env = init_distributed(cfg.dist.timeout_s)
    try:
        summary = curate(cfg, env.rank, env.world_size, barrier=lambda: gather_objects(None, env),
                         local_rank=env.local_rank)
    finally:
        cleanup()
    if summary is not None:
        k = summary["counts"]
        print(f"scanned       : {k['scanned']} samples in {k['input_shards']} shards"
              + (f" (skipped: {', '.join(f'{a} {b}' for a, b in k['skipped'].items())})" if k["skipped"] else ""))
        for name, s in k["stages"].items():
            reasons = ", ".join(f"{a} {b}" for a, b in s["reasons"].items())
            print(f"{name:14s}: dropped {s['dropped']}" + (f" ({reasons})" if reasons else ""))
        print(f"kept          : {k['kept']} samples in {k['output_shards']} shards -> {summary['out']}/shards")
        print(f"report        : {summary['out']}/curate_report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
