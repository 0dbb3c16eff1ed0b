"""`clipkit` command line: a thin layer over the library.

    clipkit train [CONFIG.yaml] [dotted.key=value ...]
    clipkit data synth --out DIR [--train-samples N] [--eval-samples N] [--seed S] [--image-size PX]
    clipkit zeroshot --checkpoint CKPT --data ROOT_OR_SHARDS [--classnames F --templates F] [--out JSON]
    clipkit export --checkpoint CKPT --format open_clip --out DIR
    clipkit inspect PATH [--model NAME] [--json]              (format, architecture, tokenizer, preprocessing)
    clipkit config [CONFIG.yaml] [dotted.key=value ...]       (the resolved config, as YAML)
    clipkit data make-shards ...  /  clipkit bench loss|data|embed|onnx|train|text|serve ...   (see --help of each)
    clipkit models
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

    ds = write_synth_dataset(args.out, train_samples=args.train_samples, eval_samples=args.eval_samples,
                             samples_per_shard=args.samples_per_shard, image_size=args.image_size,
                             seed=args.seed, workers=args.workers,
                             downstream_train_samples=args.downstream_train_samples,
                             downstream_test_samples=args.downstream_test_samples)
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


def _delegate(module: str):
    """Sub-commands whose options live with their implementation (benchmarks, shard tools)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return importlib.import_module(module).main(args.rest)

    run.delegated = True
    return run


def _models(args: argparse.Namespace) -> int:
    from .models import list_models

    print("\n".join(list_models()))
    return 0


MODEL_HELP = ("the architecture of a checkpoint that does not carry one (an OpenCLIP epoch_N.pt, a bare state "
              "dict): an open_clip or clipkit name, or a JSON config")


def build_parser() -> argparse.ArgumentParser:
    from .export import EXPORT_FORMATS

    p = argparse.ArgumentParser(prog="clipkit", description="CLIP-style contrastive image-text pretraining")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (default config: tiny model on the built-in dataset)")
    t.add_argument("overrides", nargs="*", help="[CONFIG.yaml] then dotted.key=value overrides")
    t.set_defaults(func=_train)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write the built-in synthetic dataset as webdataset shards")
    s.add_argument("--out", required=True)
    s.add_argument("--train-samples", type=int, default=20000)
    s.add_argument("--eval-samples", type=int, default=1500)
    s.add_argument("--samples-per-shard", type=int, default=1000)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--downstream-train-samples", type=int, default=2000)
    s.add_argument("--downstream-test-samples", type=int, default=1000)
    s.set_defaults(func=_synth)
    ms = dsub.add_parser("make-shards", add_help=False,
                         help="turn an image folder or a CSV/parquet of (path, caption) into shards")
    ms.set_defaults(func=_delegate("clipkit.data.make_shards"))

    z = sub.add_parser("zeroshot", help="zero-shot classification of a checkpoint")
    z.add_argument("--checkpoint", required=True,
                   help="a checkpoint or run directory, a .safetensors weights file, an open_clip or transformers "
                        "CLIPModel directory, an OpenCLIP epoch_N.pt or a state dict (see docs/pretrained.md)")
    z.add_argument("--model", default=None, metavar="NAME", help=MODEL_HELP)
    z.add_argument("--data", required=True,
                   help="CLIP_benchmark wds root, an image folder with one sub-folder per class, or a shard spec of "
                        "KEY.jpg + KEY.cls samples (with --classnames)")
    z.add_argument("--classnames", default=None,
                   help="class names, one per line in label order (for a folder: sorted folder-name order); "
                        "default: the root's classnames.txt or the folder names")
    z.add_argument("--templates", default=None,
                   help="prompt templates with {c}, one per line; default: the root's templates file, else the "
                        "80 OpenAI ImageNet templates")
    z.add_argument("--out", default=None, help="result JSON (CLIP_benchmark schema)")
    z.add_argument("--dump-predictions", default=None, metavar="FILE.csv",
                   help="per-image predictions: key or path, true and predicted label, score, top-5")
    z.add_argument("--batch-size", type=int, default=256)
    z.add_argument("--workers", type=int, default=1)
    z.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    z.set_defaults(func=_zeroshot)

    e = sub.add_parser("export", help="export a checkpoint")
    e.add_argument("--checkpoint", required=True, help="as for zeroshot")
    e.add_argument("--model", default=None, metavar="NAME", help=MODEL_HELP)
    e.add_argument("--format", default="open_clip", choices=sorted(EXPORT_FORMATS))
    e.add_argument("--out", required=True)
    e.set_defaults(func=_export)

    # Commands whose options live with their implementation (each module has main(argv)).
    for name, module, help_text in [
        ("retrieval", "clipkit.evaluation.retrieval", "image-text retrieval recall@k of a checkpoint"),
        ("embed", "clipkit.retrieval.embed", "image and text embeddings of shards, in clip-retrieval's layout"),
        ("index", "clipkit.retrieval.index", "a faiss index over exported embeddings"),
        ("search", "clipkit.retrieval.search", "nearest neighbours of a text or image query in an index"),
        ("serve", "clipkit.retrieval.serve", "an HTTP retrieval service over an index"),
        ("finetune", "clipkit.finetune.run",
         "adapt a checkpoint to a labelled task: linear probe, full/partial fine-tuning, WiSE-FT, LoRA, FLYP"),
        ("finetune-report", "clipkit.finetune.report", "zero-shot vs fine-tuning methods, side by side"),
        ("report", "clipkit.report", "a run's report.html: loss, LR, throughput, MFU, evaluation over time"),
        ("inspect", "clipkit.inspect", "what a checkpoint or pretrained model path holds, and which commands "
                                       "can use it"),
    ]:
        sub.add_parser(name, add_help=False, help=help_text).set_defaults(func=_delegate(module))

    b = sub.add_parser("bench", help="benchmarks (results written as JSON)")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    for name, help_text in [("loss", "contrastive loss peak memory and time, clipkit vs OpenCLIP"),
                            ("data", "data loading samples/s per core, clipkit vs OpenCLIP"),
                            ("embed", "embedding images/s per core, clipkit embed vs a plain open_clip loop"),
                            ("train", "training samples/s and MFU, clipkit train vs OpenCLIP's trainer"),
                            ("onnx", "ONNX Runtime fp32 and int8 exports: zero-shot accuracy and speed vs torch"),
                            ("text", "training step time: text tower cut at the longest caption, length buckets"),
                            ("serve", "the retrieval service under load on loopback, with hostile requests mixed in")]:
        bp = bsub.add_parser(name, add_help=False, help=help_text)
        bp.set_defaults(func=_delegate(f"clipkit.bench.{name}"))

    c = sub.add_parser("config", help="print the resolved config (the defaults, or a file with overrides)")
    c.add_argument("overrides", nargs="*", help="[CONFIG.yaml] then dotted.key=value overrides")
    c.set_defaults(func=_config)

    m = sub.add_parser("models", help="list the architectures that can be built by name")
    m.set_defaults(func=_models)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Delegated sub-commands parse their own options (including --help); the others take no extras.
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args.func, "delegated", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    from .config import ConfigError
    from .data import ShardSpecError
    from .evaluation import ZeroShotDataError
    from .models import ModelNotFoundError
    from .checkpoint import CheckpointError
    from .errors import UserError

    try:
        return args.func(args)
    except (ConfigError, ShardSpecError, ZeroShotDataError, ModelNotFoundError, CheckpointError, UserError) as e:
        print(f"clipkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
