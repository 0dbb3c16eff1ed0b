"""`clipkit` command line: a thin layer over the library. docs/cli.md is the contract: what --checkpoint,
--data and --out mean, every command's options, and the old spellings still accepted.

    clipkit train [key=value ...]
    clipkit data synth --out DIR
    clipkit data make-shards --data DATA --out DIR
    clipkit zeroshot --checkpoint CKPT --data DATA [--out FILE.json]
    clipkit export --checkpoint CKPT --out DIR
    clipkit retrieval-eval --checkpoint CKPT --data DATA [--out FILE.json]
    clipkit embed --checkpoint CKPT --data DATA --out DIR
    clipkit index --embeddings DIR --out DIR
    clipkit search --index DIR
    clipkit serve --index DIR
    clipkit curate --data DATA --out DIR [key=value ...]
    clipkit finetune [key=value ...] [--out DIR]
    clipkit finetune-report RUN_DIR ... [--out FILE.json]
    clipkit report RUN_DIR
    clipkit convert-checkpoint --checkpoint CKPT --to ENGINE --out DIR
    clipkit inspect PATH
    clipkit bench loss [--out FILE.json]
    clipkit bench data [--out FILE.json]
    clipkit bench embed [--out FILE.json]
    clipkit bench train [key=value ...] [--out FILE.json]
    clipkit bench onnx --checkpoint CKPT --data DATA [--out FILE.json]
    clipkit bench text [--out FILE.json]
    clipkit bench memory [--out FILE.json]
    clipkit bench serve [--out FILE.json]
    clipkit bench curate [--out FILE.json]
    clipkit config [key=value ...]
    clipkit models

The lines above are generated: python -c "from clipkit.cli import usage_block; print(usage_block())".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Nothing may reach a hub at run time: models are built from configs, weights come from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _train(args: argparse.Namespace) -> int:
    """Exit status: 0 trained to train.steps; 2 a one-line error (config, data, run.dir not writable, a
    diverged run: TrainingDiverged); 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (continue with
    train.resume=latest); 3 ended by the stall watchdog (train.stall_timeout_s)."""
    from .run import run
    from .training.trainer import EXIT_PREEMPTED

    summary = run(_load_config(args))
    if summary.get("stopped"):
        stopped = summary["stopped"]
        print(f"clipkit: stopped by {stopped['signal']} at step {stopped['step']}: checkpoint {summary['checkpoint']}; "
              f"continue with train.resume=latest", file=sys.stderr)
        return EXIT_PREEMPTED
    if "zeroshot" in summary or "export" in summary or summary.get("checkpoint"):
        _print_summary(summary)
    if summary.get("nonfinite_steps"):
        print(f"non-finite    : {summary['nonfinite_steps']} steps skipped (loss or gradients not finite)")
    return 0


def _print_summary(summary: dict) -> None:
    print(f"\nrun directory : {summary['run_dir']}")
    print(f"checkpoint    : {summary.get('checkpoint')}")
    pretrained = summary.get("pretrained") or {}
    if pretrained.get("source"):
        print(f"started from  : {pretrained['source']}")
    for tower, path in pretrained.get("towers", {}).items():
        print(f"{tower} tower    : {path}" if tower == "text" else f"{tower} tower   : {path}")
    done = summary["steps"] - summary.get("start_step", 0)
    resumed = f", resumed at step {summary['start_step']}" if summary.get("start_step") else ""
    print(f"trained       : {done} steps in {summary['train_seconds']:.0f} s (step {summary['steps']}{resumed})")
    if summary.get("skipped_samples"):
        print(f"skipped       : {summary['skipped_samples']}")
    if "zeroshot" in summary:
        z = summary["zeroshot"]
        print(f"zero-shot     : top-1 {z['acc1']:.3f}, top-5 {z['acc5']:.3f}, mean per-class recall "
              f"{z['mean_per_class_recall']:.3f} over {z['num_classes']} classes "
              f"(chance {z['chance_acc1']:.3f}) -> {z['result_file']}")
    if "retrieval" in summary:
        r = summary["retrieval"]
        print(f"retrieval     : image R@1/5/10 {r['image_retrieval_recall@1']:.3f}/{r['image_retrieval_recall@5']:.3f}/"
              f"{r['image_retrieval_recall@10']:.3f}, text R@1/5/10 {r['text_retrieval_recall@1']:.3f}/"
              f"{r['text_retrieval_recall@5']:.3f}/{r['text_retrieval_recall@10']:.3f} over {r['num_images']} "
              f"images -> {r['result_file']}")
    if "report" in summary:
        print(f"report        : {summary['report']}")
    if "export" in summary:
        print(f"exported      : {Path(next(iter(summary['export'].values()))).parent} ({summary['export_format']} format)")


def _synth(args: argparse.Namespace) -> int:
    from .data import write_synth_dataset

    if args.noisy:
        from .data.noisy import write_noisy_dataset

        manifest = write_noisy_dataset(args.out, samples=args.train_samples, seed=args.seed,
                                       samples_per_shard=args.samples_per_shard, image_size=args.image_size,
                                       eval_samples=args.eval_samples, style=args.style or "photo")
        print(f"train shards : {Path(args.out) / manifest['train']} ({manifest['params']['samples']} samples)")
        print(f"zero-shot set: {Path(args.out) / manifest['eval']} ({manifest['params']['eval_samples']} samples)")
        print(f"planted      : {Path(args.out) / manifest['planted']} "
              + " ".join(f"{k}={v}" for k, v in manifest["counts"].items()))
        return 0

    ds = write_synth_dataset(args.out, train_samples=args.train_samples, eval_samples=args.eval_samples,
                             samples_per_shard=args.samples_per_shard, image_size=args.image_size,
                             seed=args.seed, workers=args.workers,
                             downstream_train_samples=args.downstream_train_samples,
                             downstream_test_samples=args.downstream_test_samples, style=args.style or "flat")
    print(f"train shards : {ds.train_spec} ({ds.num_train} samples)")
    print(f"zero-shot set: {ds.eval_root} ({ds.num_eval} samples)")
    print(f"retrieval set: {ds.retrieval_root} ({ds.num_retrieval} images)")
    print(f"downstream   : {ds.downstream_root} ({ds.num_downstream_train} train, {ds.num_downstream_test} test)")
    return 0


def _zeroshot(args: argparse.Namespace) -> int:
    from .distributed import resolve_device
    from .evaluation import evaluate_zeroshot, load_zeroshot_set, write_result
    from .models import load_model

    zs = load_zeroshot_set(args.data, args.classnames, args.templates)  # bad data fails before the model loads
    device = resolve_device(args.device)
    loaded = load_model(args.checkpoint, device=device, model_name=args.model)
    metrics = evaluate_zeroshot(loaded.model, loaded.tokenizer, loaded.eval_transform, zs,
                                batch_size=args.batch_size, workers=args.workers, device=device,
                                predictions_csv=args.dump_predictions)
    checkpoint = Path(args.checkpoint)
    out = args.out or str(checkpoint.with_suffix("").as_posix() + f"_zeroshot_{zs.name}.json")
    result = write_result(out, metrics, zs.name, loaded.model_name, str(checkpoint))
    print(json.dumps(result, indent=2))
    print(f"written to {out}")
    if args.dump_predictions:
        print(f"per-image predictions: {args.dump_predictions}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    files = export_checkpoint(args.checkpoint, args.out, args.format, model_name=args.model)
    for kind, path in files.items():
        print(f"{kind:13s}: {path}")
    return 0


def _load_config(args: argparse.Namespace):
    from .config import ConfigError, load_config

    files = [a for a in args.overrides if "=" not in a]
    overrides = [a for a in args.overrides if "=" in a]
    if len(files) > 1 or (files and not files[0].endswith((".yaml", ".yml"))):
        raise ConfigError(f"expected at most one CONFIG.yaml and dotted.key=value overrides, got {' '.join(files)}")
    return load_config(files[0] if files else None, overrides)


def _config(args: argparse.Namespace) -> int:
    import yaml

    from .config import config_to_dict

    print(yaml.safe_dump(config_to_dict(_load_config(args)), sort_keys=False), end="")
    return 0


def _models(args: argparse.Namespace) -> int:
    from .models import list_models

    print("\n".join(list_models()))
    return 0


MODEL_HELP = ("the architecture of a checkpoint that does not carry one (an OpenCLIP epoch_N.pt, a bare state "
              "dict): an open_clip or clipkit name, or a JSON config")


# Commands whose options live with their implementation: each module has add_arguments(parser) and main(argv).
DELEGATED = {
    ("data", "make-shards"): ("clipkit.data.make_shards",
                              "turn an image folder or a CSV/parquet of (path, caption) into shards"),
    ("retrieval-eval",): ("clipkit.evaluation.retrieval", "image-text retrieval recall@k of a checkpoint"),
    ("embed",): ("clipkit.retrieval.embed", "image and text embeddings of shards, in clip-retrieval's layout"),
    ("index",): ("clipkit.retrieval.index", "a faiss index over exported embeddings"),
    ("search",): ("clipkit.retrieval.search", "nearest neighbours of a text or image query in an index"),
    ("serve",): ("clipkit.retrieval.serve", "an HTTP retrieval service over an index"),
    ("curate",): ("clipkit.curate.run", "filter, deduplicate, decontaminate, score and balance image-text shards "
                                        "into new shards (docs/curation.md)"),
    ("finetune",): ("clipkit.finetune.run", "adapt a checkpoint to a labelled task: linear probe, full/partial "
                                            "fine-tuning, WiSE-FT, LoRA, FLYP"),
    ("finetune-report",): ("clipkit.finetune.report", "zero-shot vs fine-tuning methods, side by side"),
    ("report",): ("clipkit.report", "a run's report.html: loss, LR, throughput, MFU, evaluation over time"),
    ("convert-checkpoint",): ("clipkit.training.convert", "a torch-engine (DDP) checkpoint as an FSDP2 one, or the "
                                                          "reverse (docs/distributed.md)"),
    ("inspect",): ("clipkit.inspect", "what a checkpoint or pretrained model path holds, and which commands can "
                                      "use it"),
    ("bench", "loss"): ("clipkit.bench.loss", "contrastive loss peak memory and time, clipkit vs OpenCLIP"),
    ("bench", "data"): ("clipkit.bench.data", "data loading samples/s per core, clipkit vs OpenCLIP"),
    ("bench", "embed"): ("clipkit.bench.embed", "embedding images/s per core, clipkit embed vs a plain open_clip loop"),
    ("bench", "train"): ("clipkit.bench.train", "training samples/s and MFU, clipkit train vs OpenCLIP's trainer"),
    ("bench", "onnx"): ("clipkit.bench.onnx", "ONNX Runtime fp32 and int8 exports: zero-shot accuracy and speed vs "
                                              "torch"),
    ("bench", "text"): ("clipkit.bench.text", "training step time: text tower cut at the longest caption, length "
                                              "buckets"),
    ("bench", "memory"): ("clipkit.bench.memory", "peak memory per rank of one model under DDP, ZeRO-2, ZeRO-3 and "
                                                  "FSDP2"),
    ("bench", "serve"): ("clipkit.bench.serve", "the retrieval service under load on loopback, with hostile requests "
                                                "mixed in"),
    ("bench", "curate"): ("clipkit.bench.curate", "samples/s per core and memory of each curate stage at several "
                                                  "sizes, beside clipkit embed"),
}
# Old command names, accepted for one release with a notice (`retrieval` collided with the clipkit.retrieval
# package, which embeds, indexes, searches and serves; the command evaluates recall@k).
DEPRECATED_COMMANDS = {"retrieval": "retrieval-eval"}


def _add_delegated(subparsers_by_group: dict, path: tuple[str, ...]) -> None:
    import importlib

    module, help_text = DELEGATED[path]
    sp = subparsers_by_group[path[:-1]].add_parser(path[-1], help=help_text, description=help_text)
    importlib.import_module(module).add_arguments(sp)  # main() hands such a command to the module's main(argv)


def build_parser() -> argparse.ArgumentParser:
    """Every command with every option: what `clipkit --help` shows and docs/cli.md is checked against."""
    from .export import EXPORT_FORMATS

    p = argparse.ArgumentParser(prog="clipkit", description="CLIP-style contrastive image-text pretraining")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (default config: tiny model on the built-in dataset)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="[CONFIG.yaml] then dotted.key=value overrides")
    t.set_defaults(func=_train)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write the built-in synthetic dataset as webdataset shards")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--train-samples", type=int, default=20000)
    s.add_argument("--eval-samples", type=int, default=1500)
    s.add_argument("--samples-per-shard", type=int, default=1000)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--downstream-train-samples", type=int, default=2000)
    s.add_argument("--downstream-test-samples", type=int, default=1000)
    s.add_argument("--noisy", action="store_true",
                   help="write the noisy set with planted truth for curation instead (clipkit.data.noisy: "
                        "train/, eval/, planted.jsonl; no retrieval or downstream split)")
    s.add_argument("--style", default=None, choices=["flat", "photo"],
                   help="how scenes are drawn: flat backgrounds, or with a photograph's structure (textured "
                        "background, clutter, uneven light); default flat, photo with --noisy")
    s.set_defaults(func=_synth)

    z = sub.add_parser("zeroshot", help="zero-shot classification of a checkpoint")
    z.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a checkpoint or run directory, a .safetensors weights file, an open_clip or transformers "
                        "CLIPModel directory, an OpenCLIP epoch_N.pt or a state dict (see docs/pretrained.md)")
    z.add_argument("--model", default=None, metavar="NAME", help=MODEL_HELP)
    z.add_argument("--data", required=True, metavar="DATA",
                   help="CLIP_benchmark wds root, an image folder with one sub-folder per class, or a shard spec of "
                        "KEY.jpg + KEY.cls samples (with --classnames)")
    z.add_argument("--classnames", default=None,
                   help="class names, one per line in label order (for a folder: sorted folder-name order); "
                        "default: the root's classnames.txt or the folder names")
    z.add_argument("--templates", default=None,
                   help="prompt templates with {c}, one per line; default: the root's templates file, else the "
                        "80 OpenAI ImageNet templates")
    z.add_argument("--out", default=None, metavar="FILE.json",
                   help="result JSON (CLIP_benchmark schema; default: next to the checkpoint)")
    z.add_argument("--dump-predictions", default=None, metavar="FILE.csv",
                   help="per-image predictions: key or path, true and predicted label, score, top-5")
    z.add_argument("--batch-size", type=int, default=256)
    z.add_argument("--workers", type=int, default=1)
    z.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    z.set_defaults(func=_zeroshot)

    e = sub.add_parser("export", help="export a checkpoint")
    e.add_argument("--checkpoint", required=True, metavar="CKPT", help="as for zeroshot")
    e.add_argument("--model", default=None, metavar="NAME", help=MODEL_HELP)
    e.add_argument("--format", default="open_clip", choices=sorted(EXPORT_FORMATS))
    e.add_argument("--out", required=True, metavar="DIR")
    e.set_defaults(func=_export)

    groups = {(): sub, ("data",): dsub}
    for path in [path for path in DELEGATED if path[0] != "bench"]:
        _add_delegated(groups, path)
    b = sub.add_parser("bench", help="benchmarks (results written as JSON)")
    groups[("bench",)] = b.add_subparsers(dest="bench_command", required=True)
    for path in [path for path in DELEGATED if path[0] == "bench"]:
        _add_delegated(groups, path)

    c = sub.add_parser("config", help="print the resolved config (the defaults, or a file with overrides)")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="[CONFIG.yaml] then dotted.key=value overrides")
    c.set_defaults(func=_config)

    m = sub.add_parser("models", help="list the architectures that can be built by name")
    m.set_defaults(func=_models)
    return p


def commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(path, sub-parser) of every command that runs something, in the order the parser lists them."""
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for name, sp in action.choices.items():
            if sp._subparsers is None:
                yield prefix + (name,), sp
            else:
                yield from commands(sp, prefix + (name,))


def usage_line(path: tuple[str, ...], sp: argparse.ArgumentParser) -> str:
    """`clipkit PATH` with its positionals, required options and --out: the docstring's line of a command."""
    words = ["clipkit", *path]
    for a in sp._actions:
        if not a.option_strings:
            words.append(f"[{a.metavar} ...]" if a.nargs == "*" else f"{a.metavar} ..." if a.nargs == "+"
                         else a.metavar)
        elif a.required:
            words.append(f"{a.option_strings[0]} {a.metavar}")
    out = next((a for a in sp._actions if "--out" in a.option_strings and not a.required), None)
    if out is not None:
        words.append(f"[--out {out.metavar}]")
    return " ".join(words)


def usage_block() -> str:
    """The usage lines of cli.py's docstring, generated from the parser (tests/test_cli_contract.py checks them)."""
    return "\n".join("    " + usage_line(path, sp) for path, sp in commands(build_parser()))


def _current_spelling(argv: list[str]) -> list[str]:
    """argv with a deprecated command name replaced by the current one (and a one-line notice)."""
    if argv and argv[0] in DEPRECATED_COMMANDS:
        from .cliargs import deprecation_notice

        deprecation_notice(f"clipkit {argv[0]}", f"clipkit {DEPRECATED_COMMANDS[argv[0]]}")
        return [DEPRECATED_COMMANDS[argv[0]], *argv[1:]]
    return argv


def _dispatch(argv: list[str]) -> int:
    import importlib

    # A delegated command parses its own options (one parse: each deprecation notice is printed once).
    for depth in (2, 1):
        if tuple(argv[:depth]) in DELEGATED:
            return importlib.import_module(DELEGATED[tuple(argv[:depth])][0]).main(argv[depth:])
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    argv = _current_spelling(list(sys.argv[1:] if argv is None else argv))
    from .startup import paused_collection

    with paused_collection():  # these pull in torch and open_clip: see clipkit/startup.py
        from .config import ConfigError
        from .data import ShardSpecError
        from .evaluation import ZeroShotDataError
        from .models import ModelNotFoundError
        from .checkpoint import CheckpointError
        from .errors import UserError

    try:
        return _dispatch(argv)
    except (ConfigError, ShardSpecError, ZeroShotDataError, ModelNotFoundError, CheckpointError, UserError) as e:
        print(f"clipkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
