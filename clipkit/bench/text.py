"""Training step time with the text tower cut at the batch's longest caption (model.trim_text), and with
caption-length bucketing (data.length_buckets), against the full-length tower.

    clipkit bench text [--model ViT-S-32] [--batch-size 32] [--batches 6] [--repeats 3] [--threads N]
                       [--buckets 12,16,24,32,48] [--captions 1536] [--profile-steps 3] [--out bench_text.json]
    python -m clipkit.bench.text ...            (the same)

The captions are web-like (median 11 words, a long tail: about 29 at the 95th percentile, at most 63), drawn
with a fixed seed and tokenised by the model's tokenizer. They are streamed once in random order and grouped
two ways: in order (`plain`: what a training loader makes today) and through the length buckets of
data.length_buckets (`bucketed`, clipkit.data.buckets.LengthBuckets). `--batches` batches evenly spaced over
each stream are timed, each with random 224-pixel images (the step, not the loader, is measured).

One training step is what `clipkit train` runs (trainer.build_model, the torch engine's AdamW, clipkit's
InfoNCE, ContrastiveStep): forward, backward and the optimizer step, fp32, on the CPU, `--threads` threads.

- full:           plain batches, model.trim_text=false (open_clip's own encode_text, 77 positions)
- trim:           plain batches, model.trim_text=true (exact: same loss and gradients)
- trim+buckets:   bucketed batches, model.trim_text=true

Methods alternate within each repeat; the median over repeats of each batch is taken, then the mean over
the batches, of wall time and of the process's CPU time (which other jobs on a shared machine move less);
also the mean of each batch's fastest repeat, the least disturbed figure on a shared machine.
FLOPs per step are counted (torch.utils.flop_counter) and achieved GFLOP/s reported against a measured
fp32 matmul peak of the same process. Then `--profile-steps` trimmed steps run under torch.profiler: the time
per step in each phase (forward, loss, backward, gradient norm, optimizer: clipkit.training.step's
record_function ranges), the matmul/attention kernels' own time, and the ops that take the most.
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time

from ..cliargs import THREADS_HELP, default_threads, renamed
from .harness import bench_main, command_line, machine_facts

WORDS = ("a the of and with in on at near under over by two three small large old new young little big red blue "
         "green white black yellow brown dark bright wooden stone glass metal dog cat bird horse cow sheep man woman "
         "child people group boy girl family friends house building street road bridge river lake sea beach "
         "mountain forest tree trees flowers garden park city town village car bus train bicycle boat plane photo "
         "picture view image close-up portrait landscape sunset sunrise night morning winter summer snow rain sky "
         "clouds table chair kitchen room window door wall sitting standing walking running playing looking holding "
         "wearing eating vintage modern beautiful famous 2019 2021 hd stock illustration vector background pattern "
         "design logo poster print sale free shipping size cotton shirt dress shoes bag").split()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="ViT-S-32")
    renamed(p, "--batch-size", "--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=6, help="batches timed per stream, evenly spaced")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per batch and method")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--buckets", default="12,16,24,32,48", help="data.length_buckets edges, comma-separated")
    p.add_argument("--captions", type=int, default=1536, help="captions streamed (an epoch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile-steps", type=int, default=3,
                   help="steps of the default (trimmed) step profiled with torch.profiler afterwards; 0: none")
    p.add_argument("--out", metavar="FILE.json", default="bench_text.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="clipkit bench text", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    args.threads = args.threads or default_threads()
    for name in ("batch_size", "batches", "repeats", "threads", "captions"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        args.edges = [int(e) for e in args.buckets.split(",") if e.strip()]
    except ValueError:
        p.error(f"--buckets must be comma-separated integers (got {args.buckets!r})")
    return args


def web_captions(n: int, seed: int) -> list[str]:
    """Median 11 words; lognormal spread (sigma 0.59: 95th percentile ~29), at most 63."""
    rng = random.Random(seed)
    lengths = [max(1, min(63, round(rng.lognormvariate(math.log(11), 0.59)))) for _ in range(n)]
    return [" ".join(rng.choice(WORDS) for _ in range(k)) for k in lengths]


def streams(tokens, batch: int, edges: list[int]) -> dict[str, list]:
    """Index batches of the caption stream: in order, and through data.length_buckets' grouping."""
    from clipkit.data.buckets import Consecutive, LengthBuckets, caption_length

    out = {}
    for name, group in [("plain", Consecutive(batch)),
                        ("bucketed", LengthBuckets(tuple(edges), batch, lambda i: caption_length(tokens[i])))]:
        batches = [b for b in (group.add(i) for i in range(len(tokens))) if b is not None]
        batches += list(group.end_epoch())
        out[name] = batches
    return out


def image_size(model: str) -> int:
    from clipkit.models import get_model_config

    size = get_model_config(model)["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


def build_step(model: str, batch: int, trim: bool):
    import torch

    from clipkit.config import load_config
    from clipkit.distributed import DistEnv
    from clipkit.losses import create_loss
    from clipkit.models import get_model_config
    from clipkit.training.engine import build_engine
    from clipkit.training.step import ContrastiveStep
    from clipkit.training.trainer import build_model

    cfg = load_config(None, [f"model.name={model}", f"model.trim_text={str(trim).lower()}",
                             f"train.global_batch_size={batch}"])
    torch.manual_seed(0)
    module = build_model(cfg, torch.device("cpu"))
    engine = build_engine(cfg, module, DistEnv(), model, get_model_config(model))
    return ContrastiveStep(engine, create_loss(cfg.train.loss)), module


PHASES = ("clipkit.forward", "clipkit.loss", "clipkit.backward", "clipkit.grad_norm", "clipkit.optimizer")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::convolution_backward",
              "aten::mkldnn_convolution", "aten::_convolution")


def profile_steps(step, batches: list) -> dict:
    """Where a training step's time goes: torch.profiler over the steps, wall seconds per step in each phase
    (the record_function ranges of clipkit.training.step), the matmul/attention/convolution kernels' share,
    and the ops that take the most time themselves."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    step(*batches[0])  # warm
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for images, tokens in batches:
            step(images, tokens)
    wall = (time.perf_counter() - start) / len(batches)
    events = prof.key_averages()
    n = len(batches)
    phases = {name.split(".", 1)[1]: sum(e.cpu_time_total for e in events if e.key == name) / 1e6 / n for name in PHASES}
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: e.self_cpu_time_total, reverse=True)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6 / n
    return {"steps": n, "threads": torch.get_num_threads(), "step_seconds_profiled": wall,
            "phase_seconds_per_step": phases,
            "matmul_attention_conv_seconds_per_step": matmul,
            "top_ops_self_seconds_per_step": {e.key: e.self_cpu_time_total / 1e6 / n for e in ops[:15]}}


def step_flops(step, images, tokens) -> float:
    """FLOPs the step executes on this batch (a trimmed text tower executes fewer)."""
    from clipkit.models.flops import count_flops

    flops = count_flops(lambda: step.compute_gradients(images, tokens))
    step.engine.optimizer.zero_grad(set_to_none=True)
    return flops


def run(args: argparse.Namespace) -> dict:
    import torch

    from clipkit.models import get_tokenizer
    from clipkit.models.flops import matmul_peak

    torch.set_num_threads(args.threads)
    tokens = get_tokenizer(args.model)(web_captions(args.captions, args.seed))
    lengths = (tokens.argmax(dim=-1) + 1).tolist()
    groups = streams(tokens, args.batch_size, args.edges)
    size = image_size(args.model)
    plan = {"full": ("plain", False), "trim": ("plain", True), "trim+buckets": ("bucketed", True)}
    steps = {trim: build_step(args.model, args.batch_size, trim) for trim in (False, True)}
    picked = {name: [b[round(i * (len(b) - 1) / max(1, args.batches - 1))] for i in range(args.batches)]
              for name, b in groups.items()}
    gen = torch.Generator().manual_seed(args.seed)
    images = [torch.randn(args.batch_size, 3, size, size, generator=gen) for _ in range(args.batches)]
    first = {m: steps[trim][0].compute_gradients(images[0], tokens[picked[s][0]]) for m, (s, trim) in plan.items()
             if s == "plain"}
    for step, _ in steps.values():
        step.engine.optimizer.zero_grad(set_to_none=True)
    flops = {m: statistics.mean(step_flops(steps[trim][0], images[i], tokens[picked[s][i]])
                                for i in range(args.batches)) for m, (s, trim) in plan.items()}
    for m, (s, trim) in plan.items():  # warm-up: the optimizer's state is allocated on the first step
        steps[trim][0](images[0], tokens[picked[s][0]])
    times = {m: [[] for _ in range(args.batches)] for m in plan}
    cpu = {m: [[] for _ in range(args.batches)] for m in plan}
    for _ in range(args.repeats):
        for i in range(args.batches):
            for m, (s, trim) in plan.items():
                t, c = time.perf_counter(), time.process_time()
                steps[trim][0](images[i], tokens[picked[s][i]])
                times[m][i].append(time.perf_counter() - t)
                cpu[m][i].append(time.process_time() - c)
    profile = profile_steps(steps[True][0], [(images[i % args.batches], tokens[picked["plain"][i % args.batches]])
                                             for i in range(args.profile_steps)]) if args.profile_steps else None
    peak = matmul_peak(torch.device("cpu"), torch.float32) / 1e9  # GFLOP/s of this process's threads
    seconds = {m: statistics.mean(statistics.median(r) for r in per) for m, per in times.items()}
    cpu_seconds = {m: statistics.mean(statistics.median(r) for r in per) for m, per in cpu.items()}
    fastest = {m: statistics.mean(min(r) for r in per) for m, per in times.items()}
    longest = {s: statistics.mean(max(lengths[j] for j in b) for b in groups[s]) for s in groups}
    return {
        "model": args.model, "batch": args.batch_size, "threads": args.threads, "precision": "fp32",
        "captions": {"count": args.captions, "words_median": statistics.median(len(c.split()) for c in
                                                                               web_captions(args.captions, args.seed)),
                     "tokens_median": statistics.median(lengths),
                     "tokens_p95": sorted(lengths)[int(0.95 * len(lengths))], "tokens_max": max(lengths)},
        "length_buckets": args.edges,
        "mean_longest_caption_per_batch": longest,
        "timed_batches_longest": {m: [max(lengths[j] for j in b) for b in picked[s]] for m, (s, _) in plan.items()},
        "step_seconds": seconds,
        "step_seconds_runs": times,
        "speedup_vs_full": {m: seconds["full"] / seconds[m] for m in plan},
        # the fastest of the repeats of each batch: the least disturbed by other jobs
        "step_seconds_fastest": fastest,
        "fastest_speedup_vs_full": {m: fastest["full"] / fastest[m] for m in plan},
        # CPU time of the process per step: the work, less moved than wall time by other jobs on a shared machine
        "step_cpu_seconds": cpu_seconds,
        "cpu_speedup_vs_full": {m: cpu_seconds["full"] / cpu_seconds[m] for m in plan},
        "first_step_loss": first, "loss_difference_trim_vs_full": abs(first["trim"] - first["full"]),
        "gflop_per_step": {m: f / 1e9 for m, f in flops.items()},
        "flop_ratio_full_over": {m: flops["full"] / flops[m] for m in plan},
        "achieved_gflop_s": {m: flops[m] / 1e9 / seconds[m] for m in plan},
        "matmul_peak_gflop_s": peak,
        "mfu": {m: flops[m] / 1e9 / seconds[m] / peak for m in plan},
        "profile_trim": profile,
        "machine": machine_facts(),
    }


def _drive(args: argparse.Namespace, argv: list[str]) -> dict:
    return {"command": command_line("text", argv), **run(args)}


def _show(result: dict) -> None:
    s, f, g = result["step_seconds"], result["speedup_vs_full"], result["mean_longest_caption_per_batch"]
    print(f"{result['model']}, batch {result['batch']}, {result['threads']} threads; longest caption per batch "
          f"(mean): plain {g['plain']:.1f}, bucketed {g['bucketed']:.1f} tokens")
    for m in s:
        print(f"  {m:13s} {s[m]:.3f} s/step  {f[m]:.2f}x  (CPU {result['step_cpu_seconds'][m]:.2f} s, "
              f"{result['cpu_speedup_vs_full'][m]:.2f}x; fastest {result['step_seconds_fastest'][m]:.3f} s, "
              f"{result['fastest_speedup_vs_full'][m]:.2f}x)  {result['gflop_per_step'][m]:.1f} GFLOP  "
              f"MFU {result['mfu'][m]:.2f}")
    print(f"  loss trim vs full on the same batch and weights: |diff| = {result['loss_difference_trim_vs_full']:.2e}")
    if result["profile_trim"]:
        prof = result["profile_trim"]
        print(f"  profile of the trimmed step ({prof['step_seconds_profiled']:.2f} s profiled): " + ", ".join(
            f"{k} {v:.2f} s" for k, v in prof["phase_seconds_per_step"].items())
              + f"; matmul/attention kernels {prof['matmul_attention_conv_seconds_per_step']:.2f} s")


def main(argv: list[str] | None = None) -> int:
    return bench_main("text", argv, parse_args, _drive, _show)


if __name__ == "__main__":
    sys.exit(main())
