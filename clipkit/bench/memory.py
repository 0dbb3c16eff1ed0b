"""Peak memory per rank of one model under each engine: DDP, DeepSpeed ZeRO-2, ZeRO-3 and FSDP2, in one run.

    clipkit bench memory [--model ViT-S-32] [--world 2] [--batch-size 4] [--steps 2]
                         [--engines ddp,zero2,zero3,fsdp2] [--out bench_memory.json]
    python -m clipkit.bench.memory ...            (the same)

Each engine is its own `torchrun --standalone --nproc_per_node=WORLD` job (gloo; CUDA devices when there are
some), so that no engine inherits another's heap. Every rank builds the same model (trainer.build_model, with the
engine's own model arguments), wraps it with the engine exactly as `clipkit train` does (engine.build_engine:
torch AdamW under DDP, DeepSpeed's, or FSDP2 with fully_shard per block), and trains `--steps` steps of clipkit's
gathered InfoNCE on random batches of `--batch-size` per rank (ContrastiveStep: forward, backward, clipping,
optimizer), fp32.

Memory per rank: on the CPU, the growth of the process's resident set from just before the model is built to
the end of the steps (heap trimmed and VmHWM reset to VmRSS first, as `clipkit bench loss` measures; the libraries
an engine imports are imported before that point). That is the model, its gradients, the optimizer state and
the activations and communication buffers, whatever holds them. On CUDA, torch.cuda.max_memory_allocated over
the same span. Alongside: the bytes of weights and optimizer state this rank holds after the steps, counted from
the tensors (DDP: every rank all of them; ZeRO and FSDP2: about 1/WORLD), and the model's parameter count.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .harness import BenchError, bench_main, command_line, machine_facts, proc_status_bytes, worker_env

ENGINES = {  # name -> the config overrides that choose it
    "ddp": [],
    "zero2": ["deepspeed.enabled=true", "deepspeed.zero_stage=2"],
    "zero3": ["deepspeed.enabled=true", "deepspeed.zero_stage=3"],
    "fsdp2": ["fsdp.enabled=true"],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="ViT-S-32")
    p.add_argument("--world", type=int, default=2, help="ranks per job")
    p.add_argument("--batch-size", type=int, default=4, help="samples per rank and step")
    p.add_argument("--steps", type=int, default=2, help="training steps per engine")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    p.add_argument("--timeout", type=float, default=900, help="seconds per engine's job")
    p.add_argument("--out", default="bench_memory.json", metavar="FILE.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-dir", default=None, help=argparse.SUPPRESS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="clipkit bench memory", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    args.engine_list = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in args.engine_list if e not in ENGINES]
    if unknown or not args.engine_list:
        p.error(f"--engines: {', '.join(unknown) or 'none given'}: choose from {', '.join(ENGINES)}")
    for name in ("world", "batch_size", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# ------------------------------------------------------------------------------------------------- driver

def _drive(args: argparse.Namespace, argv: list[str]) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix="clipkit-bench-memory-") as tmp:
        for engine in args.engine_list:
            results[engine] = _job(args, engine, Path(tmp) / engine)
    return {"command": command_line("memory", argv), "machine": machine_facts(),
            "model": args.model, "world": args.world, "batch_size_per_rank": args.batch_size, "steps": args.steps,
            "engines": results}


def _job(args: argparse.Namespace, engine: str, result_dir: Path) -> dict:
    """One engine's torchrun job; its ranks' measurements."""
    result_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.world}",
           "-m", "clipkit.bench.memory", "--worker", engine, "--result-dir", str(result_dir), "--model", args.model,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--world", str(args.world)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(threads=1), timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"the {engine} job ran past --timeout {args.timeout:.0f} s") from e
    ranks = [json.loads(p.read_text()) for p in sorted(result_dir.glob("rank*.json"))]
    if proc.returncode != 0 or len(ranks) != args.world:
        raise BenchError(f"the {engine} job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    ranks.sort(key=lambda r: r["rank"])
    return {"peak_bytes_per_rank": [r["peak_bytes"] for r in ranks],
            "peak_bytes_max": max(r["peak_bytes"] for r in ranks),
            "held_state_bytes_per_rank": [r["held_state_bytes"] for r in ranks],
            "parameters": ranks[0]["parameters"], "engine_name": ranks[0]["engine_name"],
            "measure": ranks[0]["measure"], "losses": ranks[0]["losses"]}


def _show(report: dict) -> None:
    print(f"{report['model']} on {report['world']} ranks, {report['batch_size_per_rank']} samples per rank, "
          f"{report['steps']} steps:")
    for engine, r in report["engines"].items():
        peaks = ", ".join(f"{b / 2 ** 20:.0f}" for b in r["peak_bytes_per_rank"])
        held = ", ".join(f"{b / 2 ** 20:.0f}" for b in r["held_state_bytes_per_rank"])
        print(f"  {engine:6s} peak MiB per rank: {peaks}; weights + optimizer state held, MiB per rank: {held}")


# ------------------------------------------------------------------------------------------------- worker

def _reset_peak() -> int:
    """Trim the heap, reset VmHWM to VmRSS; the baseline RSS (bytes)."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return proc_status_bytes("VmRSS") or 0
    except OSError:
        return proc_status_bytes("VmHWM") or 0


def _held_bytes(engine) -> int:
    """Bytes of weights and optimizer state in this rank's keeping (DTensor shards and ZeRO partitions counted
    as what this rank stores)."""
    import torch

    seen: set[int] = set()

    def size(t) -> int:
        if not torch.is_tensor(t):
            return 0
        local = t.to_local() if hasattr(t, "to_local") else t
        local = getattr(t, "ds_tensor", None) if getattr(t, "ds_tensor", None) is not None else local
        key = local.untyped_storage().data_ptr() if local.numel() else id(local)
        if key in seen:
            return 0
        seen.add(key)
        return local.untyped_storage().nbytes()

    total = sum(size(p) for p in engine.module.parameters())
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # DeepSpeed's wraps torch's
    for state in optimizer.state.values():
        total += sum(size(v) for v in state.values())
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO's fp32 masters
        total += sum(size(t) for t in getattr(engine.optimizer, name, []) or [])
    return total


def _worker(args: argparse.Namespace) -> int:
    import torch

    from ..config import load_config
    from ..distributed import init_distributed
    from ..losses import create_loss
    from ..training.engine import build_engine, engine_class
    from ..training.step import ContrastiveStep
    from ..training.trainer import build_model, seed_everything

    env = init_distributed()
    overrides = [f"model.name={args.model}", f"train.global_batch_size={args.batch_size * env.world_size}",
                 "train.warmup_steps=0", f"train.steps={args.steps}", *ENGINES[args.worker]]
    cfg = load_config(None, overrides)
    cls = engine_class(cfg)
    if cfg.deepspeed.enabled:
        from ..startup import paused_collection

        with paused_collection():
            import deepspeed  # noqa: F401  (its import is not the engine's memory)
    on_gpu = env.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(env.device)
        baseline = torch.cuda.memory_allocated(env.device)
    else:
        baseline = _reset_peak()
    seed_everything(0)
    module = build_model(cfg, env.device, **cls.model_kwargs(cfg))
    parameters = sum(p.numel() for p in module.parameters())
    engine = build_engine(cfg, module, env, args.model, {})
    step = ContrastiveStep(engine, create_loss("infonce"), device=env.device)
    size = module.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    context = module.context_length if hasattr(module, "context_length") else 77
    generator = torch.Generator().manual_seed(env.rank)
    losses = []
    for _ in range(args.steps):
        images = torch.randn(args.batch_size, 3, *size, generator=generator)
        tokens = torch.randint(1, 49406, (args.batch_size, context), generator=generator)
        tokens[:, -1] = 49407  # the end-of-text token, where the text features are read
        losses.append(step.run(images, tokens).loss)
    if on_gpu:
        peak, measure = torch.cuda.max_memory_allocated(env.device) - baseline, "torch.cuda.max_memory_allocated"
    else:
        peak, measure = max(0, (proc_status_bytes("VmHWM") or 0) - baseline), "VmHWM - baseline VmRSS"
    result = {"rank": env.rank, "peak_bytes": peak, "held_state_bytes": _held_bytes(engine), "parameters": parameters,
              "engine_name": engine.name, "measure": measure, "losses": losses}
    (Path(args.result_dir) / f"rank{env.rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main("memory", argv, parse_args, _drive, _show, worker=_worker)


if __name__ == "__main__":
    sys.exit(main())
