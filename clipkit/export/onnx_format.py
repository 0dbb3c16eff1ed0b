"""Export the image and text encoders as ONNX graphs that ONNX Runtime runs, with int8 variants.

    OUT/image.onnx        pixel_values float32 [batch, 3, H, W] -> image_embeds float32 [batch, D]
    OUT/text.onnx         input_ids int64 [batch, context_length] -> text_embeds float32 [batch, D]
    OUT/image.int8.onnx   the same graphs, dynamically quantised to int8 weights
    OUT/text.int8.onnx    (onnxruntime.quantization.quantize_dynamic)
    OUT/onnx_config.json  inputs, outputs, preprocessing, tokenizer and logit scale
    OUT/tokenizer/        CLIP tokenizer files (tokenizer.json, vocab.json, merges.txt), when the model
                          uses open_clip's standard tokenizer, or the transformers tokenizer it was
                          trained with (tokenizer_files)

The outputs equal open_clip's encode_image / encode_text (not L2-normalised). Each file is self-contained
(weights inside, no .onnx.data), the batch axis is dynamic, and every graph is run once through ONNX
Runtime against the model before the export reports success.
"""
from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..extras import require
from ..models import eval_mode

CONFIG_NAME = "onnx_config.json"
TOLERANCE = 1e-4  # fp32 graph vs the torch model, relative to the largest output magnitude


class _ImageEncoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class _TextEncoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids)


def image_size(model: nn.Module) -> tuple[int, int]:
    size = model.visual.preprocess_cfg["size"]
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def context_length(model: nn.Module) -> int:
    return int(getattr(model, "context_length", None) or model.text.context_length)


def example_inputs(model: nn.Module, model_cfg: dict, batch: int = 2,
                   tokenizer_files: dict | None = None) -> dict[str, torch.Tensor]:
    """Inputs to trace and to check with. Batch 2: the exporter would specialise a batch of 1."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, *image_size(model), generator=gen)
    ctx = context_length(model)
    captions = ["a photo of a red circle.", "two small blue stars!"]
    if tokenizer_files:  # the model's own transformers tokenizer
        ids = _hf_tokenizer(tokenizer_files)([captions[i % 2] for i in range(batch)], padding="max_length",
                                             max_length=ctx, truncation=True, return_tensors="pt")["input_ids"]
        return {"pixel_values": pixels, "input_ids": ids.long()}
    if _standard_tokenizer(model_cfg):  # real captions: start, words, end-of-text, padding
        from open_clip.tokenizer import SimpleTokenizer

        ids = SimpleTokenizer(context_length=ctx)([captions[i % 2] for i in range(batch)])
        return {"pixel_values": pixels, "input_ids": ids}
    vocab = int(model_cfg.get("text_cfg", {}).get("vocab_size", 1000))
    return {"pixel_values": pixels, "input_ids": torch.randint(1, vocab, (batch, ctx), generator=gen)}


def export_encoder(encoder: nn.Module, example: torch.Tensor, input_name: str, output_name: str,
                   path: Path) -> Path:
    """One encoder as a single-file ONNX graph with a dynamic batch axis (torch.onnx's dynamo exporter)."""
    batch = torch.export.Dim("batch")
    # onnxscript's optimiser warns of each multi-output Split it leaves unfolded (ResNet attention pooling):
    # nothing is wrong with the graph.
    try:
        with _drop_log("onnxscript.optimizer._constant_folding", "Skipping constant folding"):
            torch.onnx.export(encoder.eval(), (example,), str(path), input_names=[input_name],
                              output_names=[output_name], dynamic_shapes={input_name: {0: batch}},
                              external_data=False, verbose=False)
    except Exception as e:  # the exporter raises many types; the first line names the untraceable op
        image = input_name == "pixel_values"
        tower = type(encoder.model.visual if image else encoder.model).__name__
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot export the {'image' if image else 'text'} encoder ({tower}) to ONNX: "
                        f"{first}") from e
    return path


@contextmanager
def _drop_log(logger: str, text: str):
    """Drop one known, harmless log message (only it) while the block runs."""
    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return text not in record.getMessage()

    target, drop = logging.getLogger(logger), Drop()
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


def quantize(src: Path, dst: Path) -> Path:
    """int8 weights, activations quantised on the fly: no calibration data needed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic logs "consider to run pre-processing" (on the root logger) on every call; that
    # pre-processing (quant_pre_process) fails on these graphs and changes nothing dynamic quantisation needs.
    with _drop_log("", "pre-processing"):
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst


def session(path: str | Path, threads: int = 0):
    """An ONNX Runtime CPU session (threads 0: ONNX Runtime's own default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only: keep the tensor-name warnings of quantised graphs out of logs
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def check_graph(path: Path, example: torch.Tensor, reference: torch.Tensor) -> float:
    """Max abs difference of the graph's output from the model's; raises when beyond TOLERANCE."""
    sess = session(path)
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: example.numpy()})[0])
    diff = (out - reference).abs().max().item()
    if not diff <= TOLERANCE * max(1.0, reference.abs().max().item()):
        raise UserError(f"the exported {path.name} differs from the model by {diff:.2e} (ONNX Runtime "
                        f"{_ort_version()}): the graph does not reproduce the model")
    return diff


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _opset(path: Path) -> int:
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    return next(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx"))


def _standard_tokenizer(model_cfg: dict) -> bool:
    text_cfg = model_cfg.get("text_cfg", {})
    return not any(text_cfg.get(k) for k in ("hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs"))


def _tokenizer_info(model: nn.Module, model_cfg: dict, out: Path, tokenizer_files: dict | None = None) -> dict:
    text_cfg = model_cfg.get("text_cfg", {})
    info = {"context_length": context_length(model)}
    if tokenizer_files:  # the transformers tokenizer the model was trained with (models/tokenizer_files.py)
        return info | _recorded_tokenizer(tokenizer_files, out / "tokenizer")
    if not _standard_tokenizer(model_cfg):
        return info | {"type": "open_clip tokenizer from the model config",
                       **{k: text_cfg[k] for k in ("hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs")
                          if text_cfg.get(k)}}
    from .hf_format import build_tokenizer

    (out / "tokenizer").mkdir(exist_ok=True)
    build_tokenizer(out / "tokenizer", info["context_length"]).save_pretrained(out / "tokenizer")
    return info | {"type": "CLIP byte-level BPE, lower-cased (open_clip SimpleTokenizer)", "files": "tokenizer",
                   "sot_id": 49406, "eot_id": 49407, "pad_id": 0,
                   "layout": "[sot, tokens..., eot, 0...] padded to context_length; a longer text keeps its "
                             "first context_length - 1 ids and ends with eot"}


def _hf_tokenizer(tokenizer_files: dict):
    from transformers import AutoTokenizer

    from ..models.tokenizer_files import materialize

    return AutoTokenizer.from_pretrained(materialize(tokenizer_files), trust_remote_code=False, local_files_only=True)


def _recorded_tokenizer(tokenizer_files: dict, directory: Path) -> dict:
    tokenizer = _hf_tokenizer(tokenizer_files)
    directory.mkdir(exist_ok=True)
    tokenizer.save_pretrained(directory)
    return {"type": f"the model's transformers tokenizer ({type(tokenizer).__name__}: "
                    "AutoTokenizer.from_pretrained('tokenizer'))", "files": "tokenizer",
            "pad_id": tokenizer.pad_token_id, "eot_id": tokenizer.eos_token_id,
            "layout": "the tokenizer's ids, padded with pad_id and truncated to context_length"}


def _preprocess_info(model: nn.Module) -> dict:
    pp, (h, w) = dict(model.visual.preprocess_cfg), image_size(model)
    resize_mode, interpolation = pp.get("resize_mode", "shortest"), pp.get("interpolation", "bicubic")
    resize = {"shortest": "resize the shorter side to the size and centre-crop",
              "squash": "resize to exactly the size", "longest": "resize the longer side to the size and pad "
              "(fill_color) to a centred square"}[resize_mode]
    return {"size": [h, w], "mode": pp.get("mode", "RGB"), "resize_mode": resize_mode,
            "interpolation": interpolation, "fill_color": pp.get("fill_color", 0), "scale": 1 / 255,
            "mean": list(pp["mean"]), "std": list(pp["std"]),
            "steps": f"{resize} ({interpolation}); convert to {pp.get('mode', 'RGB')}; divide by 255; "
                     "subtract mean and divide by std per channel; NCHW float32"}


def describe(model: nn.Module, model_name: str, model_cfg: dict, out: Path, files: dict[str, Path],
             diffs: dict[str, float], dim: int, tokenizer_files: dict | None = None) -> dict:
    """The JSON a consumer needs to feed the graphs and compare their outputs."""
    h, w = image_size(model)
    bias = getattr(model, "logit_bias", None)
    return {
        "format": "clipkit-onnx-v1", "model_name": model_name, "model_cfg": model_cfg,
        "opset": _opset(files["image"]), "exported_with": {"torch": torch.__version__, "onnxruntime": _ort_version()},
        "encoders": {
            "image": {"fp32": files["image"].name, "int8": files["image_int8"].name,
                      "inputs": [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, h, w]}],
                      "outputs": [{"name": "image_embeds", "dtype": "float32", "shape": ["batch", dim]}],
                      "max_abs_diff_vs_torch": diffs["image"]},
            "text": {"fp32": files["text"].name, "int8": files["text_int8"].name,
                     "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", context_length(model)]}],
                     "outputs": [{"name": "text_embeds", "dtype": "float32", "shape": ["batch", dim]}],
                     "max_abs_diff_vs_torch": diffs["text"]},
        },
        "embeddings": "not L2-normalised: normalise both before cosine similarity",
        "logit_scale": math.exp(float(model.logit_scale.detach().reshape(-1)[0])),
        "logit_bias": None if bias is None else float(bias.detach().reshape(-1)[0]),
        "preprocess": _preprocess_info(model),
        "tokenizer": _tokenizer_info(model, model_cfg, out, tokenizer_files),
    }


def export_onnx(model, model_name: str, model_cfg: dict, out: str | Path,
                tokenizer_files: dict | None = None) -> dict[str, Path]:
    for module in ("onnx", "onnxruntime", "onnxscript"):
        require(module, "the ONNX export")
    """Write OUT (see the module docstring) and return the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with eval_mode(model):  # patch dropout and dropout are training-only: the graphs are the inference model
        return _export(model, model_name, model_cfg, out, tokenizer_files)


def _export(model: nn.Module, model_name: str, model_cfg: dict, out: Path,
            tokenizer_files: dict | None = None) -> dict[str, Path]:
    inputs = example_inputs(model, model_cfg, tokenizer_files=tokenizer_files)
    with torch.no_grad():
        reference = {"image": model.encode_image(inputs["pixel_values"]),
                     "text": model.encode_text(inputs["input_ids"])}
    files, diffs = {}, {}
    for name, encoder, input_name, output_name in [("image", _ImageEncoder(model), "pixel_values", "image_embeds"),
                                                   ("text", _TextEncoder(model), "input_ids", "text_embeds")]:
        files[name] = export_encoder(encoder, inputs[input_name], input_name, output_name, out / f"{name}.onnx")
        diffs[name] = check_graph(files[name], inputs[input_name], reference[name])
        files[f"{name}_int8"] = quantize(files[name], out / f"{name}.int8.onnx")
    config = describe(model, model_name, model_cfg, out, files, diffs, reference["image"].shape[-1], tokenizer_files)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    files["config"] = out / CONFIG_NAME
    if "files" in config["tokenizer"]:
        files["tokenizer"] = out / "tokenizer" / "tokenizer.json"
    return files
