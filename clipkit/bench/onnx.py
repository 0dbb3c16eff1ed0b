"""ONNX export accuracy and speed: zero-shot classification with torch fp32, ONNX Runtime fp32 and int8.

    clipkit bench onnx --checkpoint CKPT --data ZEROSHOT_ROOT [--out bench_onnx.json] [--batch-size 64]
                       [--threads N] [--max-samples N] [--speed-samples 512] [--repeats 3]
                       [--export-dir DIR | --onnx-dir DIR]

The checkpoint is exported with `--format onnx` (clipkit.export.onnx_format: image and text encoders, fp32,
and int8 by onnxruntime.quantization.quantize_dynamic), or --onnx-dir names such an export of it already
written (`clipkit export --format onnx`), to measure the very files that ship; an export of another model
is refused. Each backend then classifies the same images
zero-shot with its own encoders: the classifier is built from that backend's text encoder (per class, the
mean of its normalised template embeddings, as clipkit zeroshot and CLIP_benchmark do) and the images go
through that backend's image encoder. The images are decoded and preprocessed once, with open_clip's
validation transform, so every backend sees the same pixel tensors and decoding stays out of the timings.

Speed is image-encoder images/s on CPU with --threads threads for torch and ONNX Runtime alike, over the
first --speed-samples images in batches of --batch-size, after one warm-up batch; the median of --repeats
passes, the backends alternating within each pass so a busy machine favours none.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cliargs import THREADS_HELP, default_threads
from .harness import BenchError, bench_main, command_line, machine_facts, median, orders

BACKENDS = ("torch_fp32", "onnx_fp32", "onnx_int8")

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="CKPT", required=True,
                   help="a checkpoint or run directory, a .safetensors weights file, an open_clip or transformers "
                        "CLIPModel directory, or an OpenCLIP epoch_N.pt / state dict with --model")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="the architecture of a checkpoint that does not carry one (epoch_N.pt, a bare state dict)")
    p.add_argument("--data", metavar="DATA", required=True, help="a CLIP_benchmark zero-shot root (or a shard spec)")
    p.add_argument("--classnames", default=None)
    p.add_argument("--templates", default=None)
    p.add_argument("--out", metavar="FILE.json", default="bench_onnx.json")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--speed-samples", type=int, default=512, help="images per timed pass")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per backend (median reported)")
    p.add_argument("--workers", type=int, default=1, help="data loader processes for the one decoding pass")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--export-dir", default=None, help="write the ONNX export here (default: a temporary folder)")
    where.add_argument("--onnx-dir", default=None, help="measure this existing ONNX export of the checkpoint")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="clipkit bench onnx", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    args.threads = args.threads or default_threads()  # torch and ONNX Runtime intra-op threads alike
    for name in ("batch_size", "threads", "speed_samples", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_samples is not None and args.max_samples < 1:
        p.error("--max-samples must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------- encoders

class TorchEncoders:
    """The model itself, fp32, as clipkit zeroshot runs it."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(ids)


class OrtEncoders:
    """The exported graphs in ONNX Runtime sessions, with the model's encode_* interface."""

    def __init__(self, image_path: Path, text_path: Path, threads: int) -> None:
        from clipkit.export.onnx_format import session

        self.image, self.text = session(image_path, threads), session(text_path, threads)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.image.run(None, {"pixel_values": pixels.numpy()})[0])

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.text.run(None, {"input_ids": ids.numpy()})[0])


# -------------------------------------------------------------------------------------------- the work

def load_images(zs, transform, batch_size: int, workers: int, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (or the first `limit`) image of the set, preprocessed once: [N, 3, H, W] and labels [N]."""
    from clipkit.data import build_labelled_loader

    images, labels, count = [], [], 0
    for batch in build_labelled_loader(zs.shards, transform, batch_size, workers=workers):
        images.append(batch.images)
        labels.append(batch.targets)
        count += len(batch.targets)
        if limit is not None and count >= limit:
            break
    if not labels:
        raise BenchError(f"no readable samples in {zs.shards}")
    return torch.cat(images)[:limit], torch.cat(labels)[:limit]


def encode_images(encoders, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([encoders.encode_image(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])


def evaluate(encoders, tokenizer, zs, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int) -> dict:
    """Zero-shot metrics of one backend, with its image features and top-1 predictions for comparison."""
    from clipkit.evaluation.zeroshot import build_classifier, classification_metrics

    classifier = build_classifier(encoders, tokenizer, zs.classnames, zs.templates)
    features = encode_images(encoders, pixels, batch_size)
    logits = F.normalize(features, dim=-1) @ classifier
    if labels.max() >= len(zs.classnames) or labels.min() < 0:
        raise BenchError(f"labels in {zs.shards} fall outside the {len(zs.classnames)} class names")
    metrics = classification_metrics(logits, labels, len(zs.classnames))
    return {"metrics": metrics, "features": features, "classifier": classifier, "pred": logits.argmax(dim=1)}


def images_per_s(encoders, pixels: torch.Tensor, batch_size: int) -> float:
    encoders.encode_image(pixels[:batch_size])  # warm-up: first-call allocations and kernel selection
    start = time.perf_counter()
    encode_images(encoders, pixels, batch_size)
    return len(pixels) / (time.perf_counter() - start)


def measure_speed(backends: dict, pixels: torch.Tensor, batch_size: int, repeats: int) -> dict[str, list[float]]:
    runs = {name: [] for name in backends}
    for _, order in orders(list(backends), repeats, rotate=True):
        for name in order:
            runs[name].append(images_per_s(backends[name], pixels, batch_size))
    return runs


def existing_export(directory: str, model_cfg: dict) -> dict[str, Path]:
    """The files of an ONNX export already on disk, when it is one of this architecture."""
    from clipkit.export.onnx_format import CONFIG_NAME

    config_path = Path(directory) / CONFIG_NAME
    if not config_path.is_file():
        raise BenchError(f"{directory} is not an ONNX export (no {CONFIG_NAME}): write one with "
                         "clipkit export --format onnx")
    config = json.loads(config_path.read_text())
    if config.get("model_cfg") != model_cfg:
        raise BenchError(f"{directory} holds an export of another architecture than the checkpoint")
    enc = config["encoders"]
    return {"image": Path(directory) / enc["image"]["fp32"], "text": Path(directory) / enc["text"]["fp32"],
            "image_int8": Path(directory) / enc["image"]["int8"], "text_int8": Path(directory) / enc["text"]["int8"]}


def _check_same_model(results: dict) -> None:
    """fp32 ONNX must reproduce the checkpoint: an export of other weights would measure another model."""
    diff = (results["onnx_fp32"]["features"] - results["torch_fp32"]["features"]).abs().max().item()
    scale = results["torch_fp32"]["features"].abs().max().item()
    if diff > 1e-3 * max(1.0, scale):
        raise BenchError(f"the fp32 ONNX image encoder differs from the checkpoint by {diff:.2e}: the export is "
                         "not of this checkpoint")


# ------------------------------------------------------------------------------------------------ report

def _file_sizes(files: dict[str, Path]) -> dict[str, int]:
    return {path.name: path.stat().st_size for kind, path in files.items() if path.suffix == ".onnx"}


def compare(results: dict, reference: str = "torch_fp32") -> dict:
    """Each backend against torch fp32: embedding differences, prediction agreement, accuracy change."""
    ref = results[reference]
    out = {}
    for name, res in results.items():
        if name == reference:
            continue
        cos = F.cosine_similarity(res["features"], ref["features"], dim=-1)
        out[name] = {
            "image_embeds_max_abs_diff": (res["features"] - ref["features"]).abs().max().item(),
            "image_embeds_cosine_min": cos.min().item(),
            "classifier_max_abs_diff": (res["classifier"] - ref["classifier"]).abs().max().item(),
            "top1_agreement": (res["pred"] == ref["pred"]).float().mean().item(),
            "acc1_change": res["metrics"]["acc1"] - ref["metrics"]["acc1"],
            "acc5_change": res["metrics"]["acc5"] - ref["metrics"]["acc5"],
        }
    return out


def summarize(args, argv, loaded, zs, results, speeds, files, speed_n) -> dict:
    import onnx
    import onnxruntime

    backends = {}
    for name in BACKENDS:
        backends[name] = dict(results[name]["metrics"]) | {
            "images_per_s": median(speeds[name]), "images_per_s_runs": speeds[name]}
    torch_speed = backends["torch_fp32"]["images_per_s"]
    for name in BACKENDS[1:]:
        backends[name]["speedup_vs_torch"] = backends[name]["images_per_s"] / torch_speed
    versus = compare(results)
    return {
        "benchmark": "zero-shot classification and image-encoder throughput: torch fp32 vs ONNX Runtime fp32 "
                     "and int8 (dynamic quantisation), CPU",
        "command": command_line("onnx", argv),
        "checkpoint": str(args.checkpoint), "model": loaded.model_name,
        "dataset": {"name": zs.name, "num_samples": int(results["torch_fp32"]["metrics"]["num_samples"]),
                    "num_classes": len(zs.classnames), "num_templates": len(zs.templates)},
        "config": {"batch_size": args.batch_size, "threads": args.threads, "speed_samples": speed_n,
                   "repeats": args.repeats},
        "machine": machine_facts(onnxruntime=onnxruntime.__version__, onnx=onnx.__version__),
        "files_bytes": _file_sizes(files),
        "backends": backends,
        "versus_torch_fp32": versus,
        "onnx_fp32_accuracy_equals_torch": all(
            backends["onnx_fp32"][k] == backends["torch_fp32"][k] for k in ("acc1", "acc5", "mean_per_class_recall")),
        "int8_accuracy_change": {"acc1": versus["onnx_int8"]["acc1_change"],
                                 "acc5": versus["onnx_int8"]["acc5_change"]},
    }


def format_table(report: dict) -> str:
    rows = [f"{'backend':<11} {'top-1':>7} {'top-5':>7} {'images/s':>9} {'vs torch':>8}"]
    for name, b in report["backends"].items():
        rows.append(f"{name:<11} {b['acc1']:>7.4f} {b['acc5']:>7.4f} {b['images_per_s']:>9.1f} "
                    f"{b.get('speedup_vs_torch', 1.0):>7.2f}x")
    change = report["int8_accuracy_change"]
    rows.append(f"int8 accuracy change: top-1 {100 * change['acc1']:+.2f} points, top-5 {100 * change['acc5']:+.2f} "
                f"points over {report['dataset']['num_samples']} images; ONNX fp32 accuracy equals torch: "
                f"{report['onnx_fp32_accuracy_equals_torch']}")
    return "\n".join(rows)


def run(args: argparse.Namespace, argv: list[str], export_dir: Path) -> dict:
    from clipkit.evaluation import load_zeroshot_set
    from clipkit.export.onnx_format import export_onnx
    from clipkit.models import load_model

    torch.set_num_threads(args.threads)
    zs = load_zeroshot_set(args.data, args.classnames, args.templates)
    loaded = load_model(args.checkpoint, model_name=args.model)
    model = loaded.model.eval()
    pixels, labels = load_images(zs, loaded.eval_transform, args.batch_size, args.workers, args.max_samples)
    files = existing_export(args.onnx_dir, loaded.model_cfg) if args.onnx_dir else \
        export_onnx(model, loaded.model_name, loaded.model_cfg, export_dir)
    backends = {"torch_fp32": TorchEncoders(model),
                "onnx_fp32": OrtEncoders(files["image"], files["text"], args.threads),
                "onnx_int8": OrtEncoders(files["image_int8"], files["text_int8"], args.threads)}
    tokenizer = loaded.tokenizer
    results = {name: evaluate(enc, tokenizer, zs, pixels, labels, args.batch_size) for name, enc in backends.items()}
    _check_same_model(results)
    speed_pixels = pixels[:args.speed_samples]
    speeds = measure_speed(backends, speed_pixels, args.batch_size, args.repeats)
    return summarize(args, argv, loaded, zs, results, speeds, files, len(speed_pixels))


def drive(args: argparse.Namespace, argv: list[str]) -> dict:
    from clipkit.extras import require

    for module in ("onnx", "onnxruntime", "onnxscript"):
        require(module, "clipkit bench onnx")
    with tempfile.TemporaryDirectory(prefix="clipkit_bench_onnx_") as tmp:
        return run(args, argv, Path(args.export_dir or tmp))


def main(argv: list[str] | None = None) -> int:
    from clipkit.checkpoint import CheckpointError
    from clipkit.errors import UserError
    from clipkit.evaluation import ZeroShotDataError

    return bench_main("onnx", argv, parse_args, drive, lambda report: print(format_table(report)),
                      errors=(UserError, ZeroShotDataError, CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
