"""`clipkit inspect PATH [--model NAME] [--json]`: what a path holds and what clipkit can do with it.

    format          how it was detected (clipkit, open_clip, transformers, open_clip-trainer, state-dict,
                    openai-torchscript)
    architecture    the model's name and its towers' shapes
    parameters      per tower (image, text, other: temperature, bias)
    tokenizer       which one captions go through, at which context length
    preprocessing   image size, resize, crop, interpolation, mean and std
    commands        whether each clipkit command can use it, and why not where it cannot

The path is loaded as every command loads it (clipkit.models.load_model), so what this says is what the
commands will do; a path they refuse is refused here with the same one line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

TEXT_PREFIXES = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection",
                 "text.", "attn_mask")


def parameters(model) -> dict[str, int]:
    counts = {"image": 0, "text": 0, "other": 0}
    for name, p in model.named_parameters():
        tower = "image" if name.startswith("visual.") else "text" if name.startswith(TEXT_PREFIXES) else "other"
        counts[tower] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def _tokenizer(loaded) -> str:
    tok = loaded.tokenizer
    inner = getattr(tok, "tokenizer", None)
    if inner is not None and getattr(tok, "path", None):  # a directory's own transformers tokenizer
        where = "the weights file's header" if loaded.format == "clipkit" else tok.path  # (tokenizer_files.py)
        return f"{type(inner).__name__} from {where} (vocabulary {len(inner)})"
    return f"open_clip {type(tok).__name__}"


def _architecture(loaded) -> str:
    cfg = loaded.model_cfg
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    image = vision.get("timm_model_name") or (
        f"ViT width {vision.get('width')}, {vision.get('layers')} layers, patch {vision.get('patch_size')}, "
        f"{vision.get('image_size')}px" if isinstance(vision.get("layers"), int) else f"ResNet {vision.get('layers')}")
    words = text.get("hf_model_name") or f"transformer width {text.get('width')}, {text.get('layers')} layers"
    approximate = (text.get("act_kwargs") or {}).get("approximate", "none")
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu" if approximate == "none" else f"gelu ({approximate})"
    if cfg.get("init_logit_bias") is not None:
        act += "; sigmoid loss (logit bias)"
    return f"{loaded.model_name}: image {image}; text {words}; embedding {cfg.get('embed_dim')}; {act}"


def commands(loaded, model_flag: str | None) -> dict[str, str]:
    """Each command: 'yes', or 'no: why'."""
    from .export.hf_format import NotExpressible, hf_config

    needs_name = loaded.format in ("open_clip-trainer", "state-dict")
    flag = f"yes, with --model {model_flag or loaded.model_name}" if needs_name else "yes"
    out = {c: flag for c in ("zeroshot", "retrieval", "embed", "export --format open_clip", "bench onnx")}
    out["finetune"] = f"yes (model.name={loaded.model_name})" if needs_name else "yes"
    out["train model.pretrained"] = f"yes (model.name={loaded.model_name})" if needs_name else \
        "yes (its own architecture: leave model.name out)"
    if getattr(loaded.model, "logit_bias", None) is not None:  # see training.trainer._keep_sigmoid_loss
        out["train model.pretrained"] += "; trains on with train.loss=siglip and its logit bias"
    # embed records the name it was given; search and serve reuse it (or take their own --model)
    out["index / search / serve"] = flag
    try:
        hf_config(loaded.model, loaded.model_cfg)
        out["export --format hf"] = "yes"
    except NotExpressible as e:
        out["export --format hf"] = f"no: {e}"
    except Exception as e:  # transformers missing or too old: the export says the same
        out["export --format hf"] = f"no: {e}"
    out["export --format onnx"] = "tried at export (the model is traced; an op ONNX cannot express is named)"
    return out


def inspect_path(path: str, model_name: str | None = None) -> dict:
    from .models import load_model

    loaded = load_model(path, model_name=model_name)
    pp = dict(loaded.model.visual.preprocess_cfg)
    return {"path": str(path), "format": loaded.format, "source": loaded.description,
            "architecture": _architecture(loaded), "model_cfg": loaded.model_cfg,
            "parameters": parameters(loaded.model),
            "tokenizer": _tokenizer(loaded), "context_length": loaded.context_length,
            "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in pp.items()},
            "commands": commands(loaded, model_name),
            **({"trainer": {k: v for k, v in loaded.extra.items() if k in ("epoch", "name")}}
               if loaded.format == "open_clip-trainer" else {})}


def report(info: dict) -> str:
    p, pp = info["parameters"], info["preprocessing"]
    lines = [f"path          : {info['path']}", f"format        : {info['format']} ({info['source']})",
             f"architecture  : {info['architecture']}",
             f"parameters    : image {p['image']:,}, text {p['text']:,}, other {p['other']:,} "
             f"(total {p['total']:,})",
             f"tokenizer     : {info['tokenizer']}, context length {info['context_length']}",
             f"preprocessing : {pp.get('size')}px, resize {pp.get('resize_mode')}, {pp.get('interpolation')}, "
             f"mean {pp.get('mean')}, std {pp.get('std')}"]
    if "trainer" in info:
        lines.append(f"trainer       : {info['trainer']}")
    lines.append("commands      :")
    lines += [f"  {name:26s}{verdict}" for name, verdict in info["commands"].items()]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH",
                   help="a checkpoint, run directory, weights file, open_clip or transformers directory, "
                        "OpenCLIP epoch_N.pt or state dict")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="the architecture of a file that does not carry one (epoch_N.pt, a bare state dict)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="clipkit inspect", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    # what libraries print while loading (deepspeed's accelerator notice, ...) goes to stderr: stdout holds
    # only the report, so --json output parses
    with contextlib.redirect_stdout(sys.stderr):
        info = inspect_path(args.path, args.model)
    print(json.dumps(info, indent=2) if args.json else report(info))
    return 0
