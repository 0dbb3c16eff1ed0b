"""Training speed: `clipkit train` against OpenCLIP's trainer (`open_clip_train.main`), same work.

    clipkit bench train [--model ViT-S-32] [--batch-size 32] [--precision fp32] [--workers 1] [--threads N]
                        [--steps 18] [--skip-steps 4] [--repeats 3] [--data SPEC | --images 600 --cache DIR]
                        [--buckets 12,16,24,32,48] [--compile model] [--out bench_train.json] [key=value ...]

Both trainers train `--model` from scratch (random weights, seed 0) on the same shards with the same global
batch, precision, loader workers, torch threads (OMP_NUM_THREADS and torch.set_num_threads), optimiser
(AdamW, lr, warm-up + cosine, weight decay 0.1, betas 0.9/0.98, eps 1e-6, gradient clipping at norm 1),
sample shuffle buffer (1000) and logging (every step), each in a fresh process of its own; the methods
alternate over the repeats.

- clipkit:  what `clipkit train` runs (clipkit.run.run, on the config of dotted overrides), in-process, with no
  evaluation or export at the end (its final checkpoint, which it always writes, comes after the timed steps),
  with its defaults otherwise: the exact speed-ups only (model.trim_text: the text tower runs up to the batch's
  longest caption, the same numbers as at full length). Positional `key=value` words add overrides (e.g.
  model.trim_text=false to measure without).
- clipkit_buckets: the same plus caption-length bucketing, data.length_buckets=[--buckets] (batches of similar
  caption length: a different sampling of the same epoch, not the same numbers). `--buckets ''` leaves it out.
- clipkit_compile (with `--compile MODE`): the clipkit run with train.compile=MODE (the towers' transformer
  blocks compiled). Its torch compile caches are kept in one folder beside the benchmark data (under --cache),
  so the first repeat compiles and the later ones load the graphs, as a resumed run does; each repeat reports
  the compile seconds and graphs of its run (from its metrics.jsonl) and its samples/s over the timed steps
  with the compile seconds that fell among them taken out (`samples_per_s_without_compile`).
- openclip: `open_clip_train.main.main(argv)` of the installed open_clip_torch, from scratch (no pretrained
  weights), `--dataset-type webdataset --train-num-samples STEPS x BATCH --epochs 1 --save-frequency 0 --logs
  none` (no checkpoint; the text log still goes to none/NAME/ under the run's temporary folder). Its data
  pipeline needs webdataset<=0.2.86 and pandas, installed once into a folder placed ahead on its path (as
  `clipkit bench data` does); `open_clip.add_model_config` is given clipkit's model configs first, so that
  clipkit's own architectures (clipkit-nano, ...) train there too.

The shards (unless `--data` names the user's own) are realistic: JPEG photographs of 640x480 to 1280x960
pixels (the photo recipe of `clipkit bench data`) with web-like captions of long-tailed length (median 11
words, about 5% over 29, at most 63), written once into a cache.

Timing. Each trainer process records, for every batch its DataLoader hands out, when the trainer asked for
it and when it got it (a wrapper on torch's DataLoader iterator, the same in both processes; nothing else is
changed). The steady state is the steps after `--skip-steps` (start-up, loader warm-up, first steps): from
the moment step skip+1 asks for its batch to the moment the last step asks for its batch, i.e. steps
skip+1 .. steps-1 whole. samples/s = their samples / that time; the time blocked waiting for batches is the
data wait, the rest is compute (forward, backward, optimiser, logging). Each trainer's own per-step times
from its own log over the same steps are reported beside it as a cross-check.

FLOPs per sample are counted with torch's FlopCounterMode for forward + backward of the model at its full
context length (77 for OpenAI-style text towers) plus the contrastive loss at the batch size: "model FLOPs",
the same for both trainers whatever either executes (a trainer that cuts the text tower at the longest
caption executes fewer). MFU = achieved model FLOP/s / the measured fp32 matmul peak of the same threads (also
for --precision bf16/fp16, whose own peak on a CPU may be lower or higher).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from ..cliargs import THREADS_HELP, default_threads, deprecated, renamed
from .harness import (BenchError, bench_main, command_line, emit_result, home_as_tilde, machine_facts, orders,
                      peer_site, read_result, runs_and_median, worker_command, worker_env)
from .shards import caption_shards

# clipkit: its defaults (exact speed-ups only: the same numbers as a full-length text tower);
# clipkit_buckets: the same plus caption-length bucketing (data.length_buckets, a different batching);
# clipkit_compile: the defaults plus train.compile=--compile; openclip: OpenCLIP's trainer.
METHODS = ("clipkit", "clipkit_buckets", "clipkit_compile", "openclip")
DEFAULT_BUCKETS = "12,16,24,32,48"  # data.length_buckets edges (tokens) of clipkit_buckets
TARGET = 1.5  # clipkit >= 1.5x OpenCLIP's samples/s
# clipkit's precision -> OpenCLIP's --precision of the same arithmetic (autocast, fp32 master weights)
OPENCLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}
SHUFFLE_BUFFER = 1000  # samples; OpenCLIP's trainer hard-codes 1000, clipkit's is set to match


def caption_token_stats(spec: str, model: str, batch_size: int, limit: int) -> dict | None:
    """Token counts (start and end tokens included, capped at the context) of the first `limit` captions of
    local shards: how much of the context real captions fill. None for shards that are not local files."""
    from ..data import expand_shards
    from ..models import get_tokenizer

    try:
        paths = [Path(p) for p in expand_shards(spec)]
    except Exception:
        return None
    if not all(p.is_file() for p in paths):
        return None
    captions = []
    for path in paths:
        with tarfile.open(path) as tar:
            captions += [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
        if len(captions) >= limit:
            break
    tokens = get_tokenizer(model)(captions[:limit])
    lengths = [int(n) for n in (tokens != 0).sum(dim=1)]  # padding is token 0
    ordered = sorted(lengths)
    # The longest caption of each batch (in shard order: the captions are drawn independently of it)
    # is how far a text tower cut at the longest caption has to run.
    longest = [max(lengths[i:i + batch_size]) for i in range(0, len(lengths), batch_size)]
    return {"captions": len(lengths), "context_length": int(tokens.shape[1]), "median": statistics.median(lengths),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1],
            "mean": statistics.fmean(lengths), "batch_longest_mean": statistics.fmean(longest)}


# ----------------------------------------------------------------------------------- the two trainers

def clipkit_command(args: argparse.Namespace, spec: str, run_dir: Path, buckets: bool = False,
                    compile_mode: str | None = None) -> list[str]:
    """The dotted overrides of `clipkit train` for the run's settings (no evaluation, export or progress bar),
    then the positional key=value overrides; with `buckets`, data.length_buckets from --buckets; with
    `compile_mode`, train.compile."""
    extra = [f"data.length_buckets=[{args.buckets}]"] if buckets else []
    extra += [f"train.compile={compile_mode}"] if compile_mode else []
    return [f"run.dir={run_dir}", f"data.train={spec}", f"model.name={args.model}",
            f"train.global_batch_size={args.batch_size}", f"train.steps={args.steps}",
            f"train.precision={args.precision}", f"data.workers={args.workers}",
            f"data.shuffle_buffer={SHUFFLE_BUFFER}", f"train.lr={args.lr}", f"train.warmup_steps={args.skip_steps}",
            "train.weight_decay=0.1", "train.beta1=0.9", "train.beta2=0.98", "train.eps=1e-6", "train.grad_clip=1.0",
            f"train.checkpoint_every={args.steps}", "run.seed=0", "run.log_every=1", "run.progress=false",
            "eval.zeroshot_at_end=false", "eval.retrieval_at_end=false", "export.at_end=false", *extra,
            *args.overrides]


def openclip_command(args: argparse.Namespace, spec: str) -> list[str]:
    """open_clip_train.main's arguments for the same run (one epoch of exactly steps x batch samples)."""
    return ["--train-data", spec, "--train-num-samples", str(args.steps * args.batch_size),
            "--dataset-type", "webdataset", "--model", args.model, "--batch-size", str(args.batch_size),
            "--workers", str(args.workers), "--precision", OPENCLIP_PRECISION[args.precision], "--epochs", "1",
            "--lr", str(args.lr), "--warmup", str(args.skip_steps), "--wd", "0.1", "--beta1", "0.9",
            "--beta2", "0.98", "--eps", "1e-6", "--grad-clip-norm", "1.0", "--seed", "0",
            "--log-every-n-steps", "1", "--save-frequency", "0", "--logs", "none", "--name", "bench"]


class BatchClock:
    """When the trainer asked its DataLoader for each batch, when it got it, the batch's size, and the CPU time
    the training process (all its threads; not the loader workers) had used when it asked.

    Installed on torch's DataLoader iterator, which both trainers' loaders use (OpenCLIP's WebLoader wraps a
    torch DataLoader; clipkit's StreamLoader is one), so both are timed by the same code."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self.got: list[float] = []
        self.sizes: list[int] = []
        self.cpu: list[float] = []

    def install(self) -> None:
        from torch.utils.data.dataloader import _BaseDataLoaderIter

        original, clock = _BaseDataLoaderIter.__next__, self

        def timed_next(iterator):
            asked, cpu = time.perf_counter(), time.process_time()
            batch = original(iterator)
            clock.asked.append(asked)
            clock.cpu.append(cpu)
            clock.got.append(time.perf_counter())
            clock.sizes.append(_batch_size(batch))
            return batch

        _BaseDataLoaderIter.__next__ = timed_next

    def to_dict(self) -> dict:
        return {"asked": self.asked, "got": self.got, "sizes": self.sizes, "cpu": self.cpu}


def _batch_size(batch) -> int:
    images = batch.images if hasattr(batch, "images") else batch[0]  # clipkit's Batch; OpenCLIP's (images, texts)
    return int(images.shape[0])


def _launch(args: argparse.Namespace) -> int:
    """The measured process: one trainer's own entry point, with the batch clock on its loader."""
    import torch

    torch.set_num_threads(args.threads)
    clock = BatchClock()
    clock.install()
    trainer_args = json.loads(args.trainer_args)
    try:
        if args.worker.startswith("clipkit"):
            from ..config import load_config
            from ..run import run

            run(load_config(None, trainer_args))  # what `clipkit train OVERRIDES` runs
            rc = 0
        else:
            import open_clip
            from open_clip_train.main import main as openclip_main

            open_clip.add_model_config(args.model_configs)  # clipkit's architectures, by name
            rc = openclip_main(trainer_args)
            rc = 0 if rc is None else rc
    finally:
        emit_result(clock.to_dict())
    return rc


# ------------------------------------------------------------------------------------ reading the runs

_OPENCLIP_STEP = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Batch \(t\): ([\d.]+),.*? Loss: (\S+) \(")


def read_openclip_log(text: str, batch_size: int) -> list[dict]:
    """Per step (OpenCLIP logs every step here): samples trained so far, the step's time, its loss."""
    steps = []
    for samples, seconds, loss in _OPENCLIP_STEP.findall(text):
        steps.append({"step": int(samples) // batch_size, "samples": int(samples), "seconds": float(seconds),
                      "loss": float(loss)})
    return steps


def read_clipkit_metrics(path: Path, batch_size: int) -> list[dict]:
    """The same from clipkit's metrics.jsonl (run.log_every=1): its samples/s of each one-step window."""
    steps = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            steps.append({"step": record["step"], "samples": record["step"] * batch_size,
                          "seconds": batch_size / record["samples_per_s"], "loss": record["loss"]})
    return steps


def compile_cache(args: argparse.Namespace) -> Path:
    """The torch compile cache of the clipkit_compile runs: beside the benchmark data."""
    from .shards import CACHE

    return (Path(args.cache) if args.cache else CACHE / "bench_train") / "compile-cache"


def compile_figures(metrics: Path, skip: int, steady: dict) -> dict:
    """A compiled run's compiles (train.compile), from its metrics.jsonl: graphs, recompiles and seconds over the
    run, the seconds that fell in the timed steps, and the steady-state samples/s without them. {} when the run
    did not compile."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    records = [r for r in records if "compile" in r]
    if not records:
        return {}
    last_timed = skip + steady["steps_timed"]  # steps skip+1 .. N-1 are timed
    in_window = sum(r["compile"]["window_seconds"] for r in records if skip < r["step"] <= last_timed)
    return {"compile": {**{k: records[-1]["compile"][k] for k in ("graphs", "recompiles", "seconds")},
                        "seconds_in_timed_steps": in_window},
            "samples_per_s_without_compile": steady["samples_timed"] / max(steady["seconds"] - in_window, 1e-9)}


def steady_state(clock: dict, skip: int, threads: int) -> dict:
    """samples/s and data wait of steps skip+1 .. N-1 (N: the batches handed out), from the batch clock, and how
    much of its `threads` threads' time the training process got (below 1: waits, or other jobs on the CPUs)."""
    asked, got, sizes = clock["asked"], clock["got"], clock["sizes"]
    first, last = skip, len(asked) - 1  # 0-based: step skip+1 asks at asked[skip]; step N at asked[N-1]
    if last <= first:
        raise BenchError(f"only {len(asked)} batches were handed out: too few to skip {skip} steps")
    seconds = asked[last] - asked[first]
    samples = sum(sizes[first:last])
    wait = sum(got[k] - asked[k] for k in range(first, last))
    cpu = clock["cpu"][last] - clock["cpu"][first]
    return {"steps_timed": last - first, "samples_timed": samples, "seconds": seconds,
            "samples_per_s": samples / seconds, "data_wait_s_per_step": wait / (last - first),
            "compute_s_per_step": (seconds - wait) / (last - first), "data_wait_fraction": wait / seconds,
            "cpu_s_per_sample": cpu / samples, "cpu_utilisation": cpu / (seconds * threads),
            "batches": len(asked), "samples_trained": sum(sizes)}


def _own_log_rate(steps: list[dict], skip: int, last_step: int, batch_size: int) -> float | None:
    """samples/s over steps skip+1 .. last_step from the trainer's own per-step times."""
    window = [s["seconds"] for s in steps if skip < s["step"] <= last_step]
    return batch_size * len(window) / sum(window) if window and sum(window) > 0 else None


def _run_one(method: str, args: argparse.Namespace, spec: str, folder: Path) -> dict:
    from ..models import MODEL_CONFIG_DIR

    folder.mkdir(parents=True)
    log_file, run_dir = folder / "trainer.log", folder / "run"
    trainer_args = (clipkit_command(args, spec, run_dir, buckets=method == "clipkit_buckets",
                                    compile_mode=args.compile if method == "clipkit_compile" else None)
                    if method.startswith("clipkit") else openclip_command(args, spec))
    env = worker_env(args.threads, peer=method == "openclip")
    if method == "clipkit_compile":  # one compile cache over the repeats (a run.dir's own would start empty)
        env["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache(args))
    cmd = worker_command("clipkit.bench.train", method, ["--threads", args.threads, "--model-configs",
                                                         MODEL_CONFIG_DIR, "--trainer-args", json.dumps(trainer_args)])
    start, load = time.perf_counter(), os.getloadavg()[0]
    with open(log_file, "w") as log:  # cwd: OpenCLIP's `--logs none` still writes none/NAME/out.log there
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder, timeout=args.timeout)
    wall = time.perf_counter() - start
    text = log_file.read_text(errors="replace")
    clock = read_result(text)  # the batch clock: the trainer's log is the process's output, the clock its RESULT
    if proc.returncode != 0 or clock is None:
        raise BenchError(f"{method} trainer failed ({proc.returncode}); the end of its output:\n{text[-3000:]}")
    steps = (read_clipkit_metrics(run_dir / "metrics.jsonl", args.batch_size) if method.startswith("clipkit")
             else read_openclip_log(text, args.batch_size))
    result = steady_state(clock, args.skip_steps, args.threads)
    if method.startswith("clipkit"):  # what the run resolved, from the config it wrote into its run.dir
        import yaml

        resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
        result["settings"] = {"model.trim_text": resolved["model"]["trim_text"],
                              "data.length_buckets": resolved["data"]["length_buckets"]}
        if resolved["train"].get("compile", "off") != "off":
            result["settings"]["train.compile"] = resolved["train"]["compile"]
        result.update(compile_figures(run_dir / "metrics.jsonl", args.skip_steps, result))
    losses = [s["loss"] for s in steps]
    return {**result, "method": method, "process_seconds": wall, "load_average_1min": [load, os.getloadavg()[0]],
            "steps_logged": len(steps),
            "samples_logged": steps[-1]["samples"] if steps else 0,
            "own_log_samples_per_s": _own_log_rate(steps, args.skip_steps, result["batches"] - 1, args.batch_size),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses)}


# ----------------------------------------------------------------------------------------- FLOPs, peak

def model_flops_per_sample(model_name: str, batch_size: int) -> dict:
    """Forward + backward FLOPs per sample of each tower at its full input (image size, context length),
    plus the contrastive loss over a batch of batch_size (its share per sample)."""
    import torch

    from ..losses import create_loss
    from ..models import create_model
    from ..models.flops import count_flops, tower_train_flops_per_sample

    torch.manual_seed(0)
    model = create_model(model_name, trim_text=False).train()  # model FLOPs: the text at its full context
    towers = tower_train_flops_per_sample(model)
    dim = model.encode_text(torch.ones(1, model.context_length, dtype=torch.long)).shape[-1]
    feats = [torch.nn.functional.normalize(torch.randn(batch_size, dim), dim=-1).requires_grad_() for _ in "it"]
    scale = torch.tensor(10.0, requires_grad=True)
    loss = count_flops(lambda: create_loss("infonce")(feats[0], feats[1], scale, None).backward()) / batch_size
    size = model.visual.image_size
    return {"total": towers["image_tower"] + towers["text_tower"] + loss, **towers, "loss": loss,
            "image_size": list(size) if isinstance(size, (tuple, list)) else [size, size],
            "context_length": model.context_length}


def fp32_matmul_peak(threads: int, tries: int = 3) -> float:
    """The best of a few measurements (other jobs only lower it) of the fp32 matmul FLOP/s of `threads` threads:
    the trainer's own MFU denominator."""
    import torch

    from ..models.flops import matmul_peak

    torch.set_num_threads(threads)
    return max(matmul_peak(torch.device("cpu"), torch.float32) for _ in range(tries))


# ---------------------------------------------------------------------------------------------- driver

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="ViT-S-32", help="an architecture both open_clip and clipkit build by name")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="fp32", choices=sorted(OPENCLIP_PRECISION))
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes of each trainer")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--steps", type=int, default=18, help="optimiser steps per run")
    p.add_argument("--skip-steps", type=int, default=4, help="first steps left out of the timing (start-up)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (warm-up: --skip-steps steps)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", metavar="DATA",
                   default=None, help="the user's own shards (spec); default: the benchmark's photos")
    p.add_argument("--images", type=int, default=600, help="photos in the benchmark shards")
    p.add_argument("--per-shard", type=int, default=100)
    renamed(p, "--cache", "--shards", default=None, metavar="DIR",
            help="folder for the generated benchmark data (default: a folder under ~/.cache/clipkit)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one trainer run may take")
    p.add_argument("--buckets", default=DEFAULT_BUCKETS,
                   help="data.length_buckets edges of the clipkit_buckets run ('' leaves that run out)")
    p.add_argument("--compile", default=None, choices=["model"],
                   help="add a clipkit_compile run: clipkit's defaults with train.compile=MODE")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides for clipkit's runs, e.g. model.trim_text=false")
    deprecated(p, "--set", "a positional key=value", action="append", default=[], dest="set_overrides",
               metavar="KEY=VALUE")
    p.add_argument("--out", metavar="FILE.json", default="bench_train.json")
    for hidden in ("--worker", "--model-configs", "--trainer-args"):
        p.add_argument(hidden, help=argparse.SUPPRESS, **({"choices": METHODS} if hidden == "--worker" else {}))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="clipkit bench train", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        edges = [int(e) for e in args.buckets.split(",") if e.strip()]
    except ValueError:
        p.error(f"--buckets must be comma-separated integers (got {args.buckets!r})")
    args.buckets = ",".join(map(str, edges))
    args.methods = tuple(m for m in METHODS if (edges or m != "clipkit_buckets")
                         and (args.compile or m != "clipkit_compile"))
    args.overrides = args.set_overrides + args.overrides  # --set (deprecated) first: the order it always had
    del args.set_overrides
    for item in args.overrides:
        if "=" not in item:
            p.error(f"overrides take key=value (got {item!r})")
    args.threads = args.threads or default_threads(workers=args.workers)
    for name in ("batch_size", "threads", "steps", "repeats", "images", "per_shard"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers < 0 or args.skip_steps < 0:
        p.error("--workers and --skip-steps must be 0 or more")
    if args.steps < args.skip_steps + 2:
        p.error(f"--steps {args.steps} leaves no step to time after --skip-steps {args.skip_steps} "
                "(the last step's end is not observed): use at least skip + 2")
    if args.data is None and args.images < args.steps * args.batch_size:
        p.error(f"--images {args.images} is fewer than the {args.steps * args.batch_size} samples of one run "
                "(--steps x --batch-size; each trainer makes one pass): raise --images")
    if args.data is None and args.images // args.per_shard < max(1, args.workers):
        p.error(f"{args.images // args.per_shard} shards cannot feed {args.workers} workers: lower --per-shard")
    return args


def _shards(args: argparse.Namespace) -> str:
    if args.data:
        return args.data
    t0 = time.perf_counter()
    spec = caption_shards(args.cache, args.images, args.per_shard)
    print(f"shards: {spec} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return spec


def _drive(args: argparse.Namespace, argv: list[str]) -> dict:
    spec = _shards(args)
    peer_site()
    flops = model_flops_per_sample(args.model, args.batch_size)
    peaks = [fp32_matmul_peak(args.threads)]  # measured again after every repeat: other jobs only lower it
    print(f"model FLOPs: {flops['total'] / 1e9:.2f} GFLOP per sample (forward + backward, context "
          f"{flops['context_length']}); fp32 matmul peak {peaks[0] / 1e9:.1f} GFLOP/s on {args.threads} threads",
          flush=True)
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for repeat, order in orders(args.methods, args.repeats):
        with tempfile.TemporaryDirectory(prefix="clipkit-bench-train-") as tmp:
            for method in order:
                r = _run_one(method, args, spec, Path(tmp) / method)
                runs[method].append(r)
                print(f"repeat {repeat + 1}/{args.repeats} {method}: {r['samples_per_s']:.2f} samples/s over "
                      f"{r['steps_timed']} steps{_compile_note(r)} (data wait {100 * r['data_wait_fraction']:.0f}%, the trainer's "
                      f"threads busy {100 * r['cpu_utilisation']:.0f}%, load {r['load_average_1min'][0]:.1f}), loss "
                      f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}", flush=True)
        peaks.append(fp32_matmul_peak(args.threads))
    expected = args.steps * args.batch_size
    for m, rs in runs.items():
        for r in rs:
            if r["samples_trained"] != expected or r["samples_logged"] != expected:
                raise BenchError(f"{m} trained {r['samples_trained']} samples ({r['samples_logged']} by its log), not "
                                 f"--steps x --batch-size = {expected}: do the shards hold that many?")
    return _report(args, argv, spec, flops, peaks, runs)


def _compile_note(r: dict) -> str:
    if "compile" not in r:
        return ""
    c = r["compile"]
    return (f" ({r['samples_per_s_without_compile']:.2f} without the {c['seconds_in_timed_steps']:.1f} s of compile "
            f"among them; compile {c['seconds']:.1f} s, {c['graphs']} graphs, {c['recompiles']} recompiles)")


def _summary(rs: list[dict], flops: float, peak: float) -> dict:
    rates = runs_and_median("samples_per_s", [r["samples_per_s"] for r in rs])
    median = rates["samples_per_s_median"]
    own = [r["own_log_samples_per_s"] for r in rs]
    return {**rates, "model_gflop_per_s": median * flops / 1e9, "mfu_model_flops": median * flops / peak,
            "data_wait_fraction": statistics.median(r["data_wait_fraction"] for r in rs),
            "data_wait_s_per_step": statistics.median(r["data_wait_s_per_step"] for r in rs),
            "compute_s_per_step": statistics.median(r["compute_s_per_step"] for r in rs),
            "cpu_s_per_sample": statistics.median(r["cpu_s_per_sample"] for r in rs),
            "cpu_utilisation": [r["cpu_utilisation"] for r in rs],
            "load_average_1min": [r["load_average_1min"] for r in rs],
            "own_log_samples_per_s": own,
            "own_log_samples_per_s_median": statistics.median(own) if None not in own else None,
            "samples_trained": rs[0]["samples_trained"], "steps_timed": rs[0]["steps_timed"],
            "samples_timed": rs[0]["samples_timed"], "losses_finite": all(r["losses_finite"] for r in rs),
            "loss_first": [r["loss_first"] for r in rs], "loss_last": [r["loss_last"] for r in rs],
            "process_seconds": [r["process_seconds"] for r in rs],
            **({"compile": [r["compile"] for r in rs],
                "samples_per_s_without_compile": [r["samples_per_s_without_compile"] for r in rs],
                "samples_per_s_without_compile_median": statistics.median(
                    r["samples_per_s_without_compile"] for r in rs)} if "compile" in rs[0] else {}),
            **({"settings": rs[0]["settings"]} if "settings" in rs[0] else {})}


def _report(args, argv, spec: str, flops: dict, peaks: list[float], runs: dict[str, list[dict]]) -> dict:
    peak = max(peaks)
    methods = {m: _summary(rs, flops["total"], peak) for m, rs in runs.items()}
    peer = methods["openclip"]["samples_per_s_median"]
    ratios = {m: methods[m]["samples_per_s_median"] / peer for m in methods if m != "openclip"}
    ratio = ratios["clipkit"]
    return {
        "benchmark": "training samples/s, steady state: clipkit train vs OpenCLIP's open_clip_train.main",
        "command": command_line("train", argv),
        "config": {"model": args.model, "batch_size": args.batch_size, "precision": args.precision,
                   "workers": args.workers, "threads": args.threads, "steps": args.steps,
                   "skip_steps": args.skip_steps, "lr": args.lr, "repeats": args.repeats, "data": home_as_tilde(spec),
                   "openclip_precision": OPENCLIP_PRECISION[args.precision],
                   "clipkit_overrides": list(args.overrides), "compile": args.compile,
                   "clipkit_buckets_length_buckets": [int(e) for e in args.buckets.split(",")] if args.buckets else None},
        "machine": machine_facts(fp32_matmul_peak_gflop_per_s=peak / 1e9,
                                 fp32_matmul_peak_measurements_gflop_per_s=[x / 1e9 for x in peaks]),
        "model_flops_per_sample": {
            "gflop": flops["total"] / 1e9, "image_tower_gflop": flops["image_tower"] / 1e9,
            "text_tower_gflop": flops["text_tower"] / 1e9, "loss_gflop": flops["loss"] / 1e9,
            "counted_at": f"forward + backward, images {flops['image_size'][0]}x{flops['image_size'][1]}, text at "
                          f"the full context {flops['context_length']}, loss over a batch of {args.batch_size}"},
        "captions_tokens": caption_token_stats(spec, args.model, args.batch_size, args.steps * args.batch_size),
        "methods": methods,
        "ratio_clipkit_over_openclip": ratio,
        "ratios_over_openclip": ratios,
        "target": {"ratio_min": TARGET, "met": {m: r >= TARGET for m, r in ratios.items()}},
    }


def _show(report: dict) -> None:
    for m, r in report["methods"].items():
        print(f"{m:<15} {r['samples_per_s_median']:7.2f} samples/s  {r['model_gflop_per_s']:7.1f} GFLOP/s  "
              f"MFU {r['mfu_model_flops']:.2f}  data wait {100 * r['data_wait_fraction']:.0f}%")
    for m, r in report["methods"].items():
        if "compile" in r:
            print(f"{m}: {r['samples_per_s_without_compile_median']:.2f} samples/s without compile; compile per "
                  "repeat " + ", ".join(f"{c['seconds']:.1f} s ({c['graphs']} graphs, {c['recompiles']} recompiles)"
                                        for c in r["compile"]))
    for m, ratio in report["ratios_over_openclip"].items():
        print(f"{m}/openclip: {ratio:.2f}x (target >= {TARGET}x, {'met' if report['target']['met'][m] else 'NOT met'})")


def main(argv: list[str] | None = None) -> int:
    return bench_main("train", argv, parse_args, _drive, _show, worker=_launch, errors=(subprocess.TimeoutExpired,))


if __name__ == "__main__":
    sys.exit(main())
