"""A transformers CLIPModel directory read as open_clip's CLIP: the reverse of the `hf` export's mapping.

    DIR/config.json                    CLIPConfig (model_type "clip"): the architecture
    DIR/model.safetensors              the weights (or pytorch_model.bin, read with torch.load(weights_only=True))
    DIR/tokenizer.json, or             the tokenizer clipkit tokenises captions with
      vocab.json + merges.txt
    DIR/preprocessor_config.json, or   image size, resize, crop, mean and std
      processor_config.json

transformers' CLIP is one fixed architecture, and each of its parts has an exact place in open_clip's CLIP:
a ViT pooled at its class token with LayerNorms before and after the transformer, a causal text
transformer pooled at the end-of-text token, and bias-free projections. What has no exact place (another
activation per tower, dropout, a crop smaller than the resize, another resampling filter...) is refused
with HFImportError naming it, so a model that loads is the model the directory holds.

Only JSON and tensors are read: config.json is parsed as JSON, the tokenizer is built by transformers from
its JSON/text files with remote code off, and a pickled weights file is read with weights_only.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..checkpoint import CheckpointError

HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
MODEL_TYPES = ("clip", "siglip")  # CLIPModel (this module), SiglipModel (hf_siglip.py)
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
OPEN_CLIP_LN_EPS = 1e-5  # open_clip's LayerNorm default; any other eps goes in norm_kwargs
INTERPOLATION = {3: "bicubic", 2: "bilinear"}  # PIL resample codes open_clip's transforms also use
LEGACY_EOS_ID = 2  # transformers pools at argmax(input_ids) when eos_token_id is 2 (configs before 4.x fixes)


class HFImportError(CheckpointError):
    """A transformers directory clipkit cannot read exactly; the message names the part and why."""


def _refuse(path: Path, reason: str) -> None:
    raise HFImportError(f"{path}: cannot import this transformers model: {reason}")


def is_hf_directory(path: Path) -> bool:
    return path.is_dir() and (path / HF_CONFIG).is_file()


def read_config(path: Path) -> dict:
    """config.json as a dict, with model_type checked: CLIPModel and SiglipModel directories are read."""
    try:
        config = json.loads((path / HF_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise HFImportError(f"{path / HF_CONFIG} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        _refuse(path, f"{HF_CONFIG} holds no JSON object")
    model_type = config.get("model_type")
    if model_type in MODEL_TYPES:
        return config
    if model_type == "siglip2":
        _refuse(path, "model_type 'siglip2' (SigLIP 2, NaFlex: each image at its own resolution and aspect ratio "
                      "with resized position embeddings) has no exact open_clip equivalent; SiglipModel "
                      "(model_type 'siglip') directories are read")
    if model_type in ("clip_vision_model", "clip_text_model", "siglip_vision_model", "siglip_text_model"):
        _refuse(path, f"model_type {model_type!r} is a single tower; clipkit needs a full CLIPModel or SiglipModel")
    _refuse(path, f"unknown model_type {model_type!r} in {HF_CONFIG} (clipkit reads model_type 'clip': a "
                  "transformers CLIPModel, and 'siglip': a SiglipModel)")


def _towers(config: dict) -> tuple[dict, dict]:
    """The two towers' settings with transformers' defaults filled in (CLIPConfig parses config.json)."""
    from transformers import CLIPConfig

    cfg = CLIPConfig.from_dict(config)
    return cfg.vision_config.to_dict(), cfg.text_config.to_dict() | {"projection_dim": cfg.projection_dim}


def _mlp_ratio(path: Path, tower: dict, name: str) -> float:
    width, hidden = tower["hidden_size"], tower["intermediate_size"]
    ratio = hidden / width
    if int(width * ratio) != hidden:  # open_clip builds the MLP as int(width * mlp_ratio)
        _refuse(path, f"the {name} MLP width {hidden} is not int({width} * r) for any float r")
    return ratio


def _check_tower(path: Path, tower: dict, name: str) -> None:
    if tower["hidden_size"] % tower["num_attention_heads"]:
        _refuse(path, f"the {name} width {tower['hidden_size']} does not split into "
                      f"{tower['num_attention_heads']} heads")
    for key in ("dropout", "attention_dropout"):
        if tower.get(key):
            _refuse(path, f"{name}_config.{key} is {tower[key]}: open_clip's CLIP blocks have no dropout")


def _norm_kwargs(tower: dict) -> dict:
    eps = float(tower.get("layer_norm_eps", OPEN_CLIP_LN_EPS))
    return {} if eps == OPEN_CLIP_LN_EPS else {"norm_kwargs": {"eps": eps}}


def model_config(path: Path, config: dict) -> dict:
    """open_clip's model_cfg for this CLIPConfig (HFImportError naming what has no exact equivalent)."""
    vision, text = _towers(config)
    acts = {vision["hidden_act"], text["hidden_act"]}
    if len(acts) != 1:
        _refuse(path, f"the towers use different activations ({vision['hidden_act']}, {text['hidden_act']}); "
                      "open_clip's CLIP has one for both")
    act = acts.pop()
    if act not in ("quick_gelu", "gelu"):
        _refuse(path, f"hidden_act {act!r}: open_clip's CLIP blocks use quick_gelu or exact (erf) gelu")
    for tower, name in ((vision, "vision"), (text, "text")):
        _check_tower(path, tower, name)
    if vision.get("num_channels", 3) != 3:
        _refuse(path, f"the image tower takes {vision['num_channels']} channels; open_clip's takes RGB")
    if vision["image_size"] % vision["patch_size"]:
        _refuse(path, f"image_size {vision['image_size']} is not a multiple of patch_size {vision['patch_size']}")
    eos = text.get("eos_token_id")
    # transformers pools at argmax(input_ids) when eos_token_id is 2 (old configs), else at the first eos
    pool = {"pool_type": "argmax"} if eos == LEGACY_EOS_ID else {"pool_type": "eos", "eos_id": int(eos)}
    vision_cfg = {"image_size": vision["image_size"], "patch_size": vision["patch_size"],
                  "width": vision["hidden_size"], "layers": vision["num_hidden_layers"],
                  "head_width": vision["hidden_size"] // vision["num_attention_heads"],
                  "mlp_ratio": _mlp_ratio(path, vision, "vision")} | _norm_kwargs(vision)
    text_cfg = {"context_length": text["max_position_embeddings"], "vocab_size": text["vocab_size"],
                "width": text["hidden_size"], "heads": text["num_attention_heads"],
                "layers": text["num_hidden_layers"], "mlp_ratio": _mlp_ratio(path, text, "text")} \
        | pool | _norm_kwargs(text)
    cfg = {"embed_dim": text["projection_dim"], "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if act == "quick_gelu":
        cfg["quick_gelu"] = True
    return cfg


# ---------------------------------------------------------------------------------------------- the weights

def _block(prefix: str, hf: str) -> dict[str, tuple]:
    """open_clip key -> (HF keys, how to combine them) for one residual block."""
    return {
        f"{prefix}.ln_1.weight": ((f"{hf}.layer_norm1.weight",), None),
        f"{prefix}.ln_1.bias": ((f"{hf}.layer_norm1.bias",), None),
        f"{prefix}.attn.in_proj_weight": (tuple(f"{hf}.self_attn.{p}_proj.weight" for p in "qkv"), "cat"),
        f"{prefix}.attn.in_proj_bias": (tuple(f"{hf}.self_attn.{p}_proj.bias" for p in "qkv"), "cat"),
        f"{prefix}.attn.out_proj.weight": ((f"{hf}.self_attn.out_proj.weight",), None),
        f"{prefix}.attn.out_proj.bias": ((f"{hf}.self_attn.out_proj.bias",), None),
        f"{prefix}.ln_2.weight": ((f"{hf}.layer_norm2.weight",), None),
        f"{prefix}.ln_2.bias": ((f"{hf}.layer_norm2.bias",), None),
        f"{prefix}.mlp.c_fc.weight": ((f"{hf}.mlp.fc1.weight",), None),
        f"{prefix}.mlp.c_fc.bias": ((f"{hf}.mlp.fc1.bias",), None),
        f"{prefix}.mlp.c_proj.weight": ((f"{hf}.mlp.fc2.weight",), None),
        f"{prefix}.mlp.c_proj.bias": ((f"{hf}.mlp.fc2.bias",), None),
    }


def key_map(model_cfg: dict) -> dict[str, tuple]:
    """Every open_clip CLIP key with the HF keys it is made of (the reverse of hf_format's mapping)."""
    v, t = "vision_model", "text_model"
    keys = {
        "visual.class_embedding": ((f"{v}.embeddings.class_embedding",), None),
        "visual.positional_embedding": ((f"{v}.embeddings.position_embedding.weight",), None),
        "visual.conv1.weight": ((f"{v}.embeddings.patch_embedding.weight",), None),
        "visual.ln_pre.weight": ((f"{v}.pre_layrnorm.weight",), None),  # HF's spelling
        "visual.ln_pre.bias": ((f"{v}.pre_layrnorm.bias",), None),
        "visual.ln_post.weight": ((f"{v}.post_layernorm.weight",), None),
        "visual.ln_post.bias": ((f"{v}.post_layernorm.bias",), None),
        "visual.proj": (("visual_projection.weight",), "t"),  # x @ P with P [in, out]; HF Linear is [out, in]
        "token_embedding.weight": ((f"{t}.embeddings.token_embedding.weight",), None),
        "positional_embedding": ((f"{t}.embeddings.position_embedding.weight",), None),
        "ln_final.weight": ((f"{t}.final_layer_norm.weight",), None),
        "ln_final.bias": ((f"{t}.final_layer_norm.bias",), None),
        "text_projection": (("text_projection.weight",), "t"),
        "logit_scale": (("logit_scale",), None),
    }
    for i in range(model_cfg["vision_cfg"]["layers"]):
        keys |= _block(f"visual.transformer.resblocks.{i}", f"{v}.encoder.layers.{i}")
    for i in range(model_cfg["text_cfg"]["layers"]):
        keys |= _block(f"transformer.resblocks.{i}", f"{t}.encoder.layers.{i}")
    return keys


IGNORED = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")  # index buffers


def to_open_clip_state(path: Path, hf_state: dict, model_cfg: dict, shapes: dict) -> dict:
    """open_clip's state dict from HF's; every HF tensor must be used and fit (else the first is named)."""
    return convert_state(path, hf_state, key_map(model_cfg), shapes, "CLIPModel")


def convert_state(path: Path, hf_state: dict, keys: dict[str, tuple], shapes: dict, layout: str) -> dict:
    """open_clip's state dict from HF's by a key map (open_clip key -> (HF keys, how they combine)): every
    HF tensor must be used and fit its place (else the first that does not is named)."""
    used = {k for sources, _ in keys.values() for k in sources}
    extra = [k for k in hf_state if k not in used and not k.endswith(IGNORED)]
    if extra:
        _refuse(path, f"tensor '{extra[0]}' has no place in {layout}'s layout ({len(extra)} unexpected)")
    state = {}
    for key, (sources, how) in keys.items():
        missing = [s for s in sources if s not in hf_state]
        if missing:
            _refuse(path, f"tensor '{missing[0]}' is missing from the weights")
        parts = [hf_state[s] for s in sources]
        expected = _expected_shape(shapes[key], how, len(sources))
        for s, p in zip(sources, parts):
            if tuple(p.shape) != expected:
                _refuse(path, f"tensor '{s}' has shape {tuple(p.shape)}, the config says {expected}")
        state[key] = _combine(parts, how).reshape(shapes[key]).contiguous()
    return state


# How HF tensors become one open_clip tensor: None (as it is), "cat" (q, k, v stacked), "t" (a Linear's
# weight as open_clip's x @ P matrix), "q" / "kv" (the query rows / key and value rows of a packed
# in-projection), "unsqueeze" (a leading batch axis, as timm keeps pos_embed), "scalar" (a 1-element vector
# as a 0-d parameter).
def _combine(parts: list, how: str | None) -> torch.Tensor:
    if how == "cat":
        return torch.cat(parts)
    if how == "t":
        return parts[0].t()
    if how in ("q", "kv"):
        third = parts[0].shape[0] // 3
        return parts[0][:third] if how == "q" else parts[0][third:]
    return parts[0]


def _expected_shape(shape: torch.Size, how: str | None, n: int) -> tuple:
    if how == "cat":
        return (shape[0] // n, *shape[1:])
    if how == "t":
        return tuple(reversed(shape))
    if how == "q":
        return (3 * shape[0], *shape[1:])
    if how == "kv":
        return (shape[0] // 2 * 3, *shape[1:])
    if how == "unsqueeze":
        return tuple(shape[1:])
    if how == "scalar":
        return (1,)
    return tuple(shape) if shape != torch.Size([]) else ()


# -------------------------------------------------------------------------------- tokenizer and processor

def has_tokenizer(path: Path, files: tuple = TOKENIZER_FILES) -> bool:
    return any(all((path / f).is_file() for f in names) for names in files)


def check_tokenizer(path: Path, files: tuple = TOKENIZER_FILES) -> None:
    if not has_tokenizer(path, files):
        named = ", or ".join(" with ".join(names) for names in files)
        _refuse(path, f"it holds weights but no tokenizer ({named}): copy the model's tokenizer files into "
                      "the directory")


class DirectoryTokenizer:
    """The directory's own tokenizer, called as open_clip's: list of texts -> LongTensor [n, context_length]
    (padded and truncated to the model's context, ending with end-of-text). Picklable for loader workers."""

    def __init__(self, path: str | Path, context_length: int) -> None:
        from transformers import AutoTokenizer

        self.path = str(path)
        self.context_length = context_length
        # remote code stays off: only tokenizer classes that ship with transformers are built
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=False, local_files_only=True)

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = self.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=context_length or self.context_length, return_tensors="pt")
        return out["input_ids"].long()


def check_tokenizer_fits(path: Path, tokenizer: DirectoryTokenizer, model_cfg: dict) -> None:
    """Ids the text tower has embeddings for, and the end-of-text id it pools at."""
    text = model_cfg["text_cfg"]
    size = len(tokenizer.tokenizer)
    if size > text["vocab_size"]:
        _refuse(path, f"the tokenizer has {size} tokens, the text tower embeds {text['vocab_size']}")
    eos = tokenizer.tokenizer.eos_token_id
    if text.get("pool_type") == "eos" and eos != text["eos_id"]:
        _refuse(path, f"the tokenizer ends texts with id {eos}, the config's eos_token_id is {text['eos_id']}")


def _processor_settings(path: Path) -> dict:
    for name in PROCESSOR_FILES:
        file = path / name
        if file.is_file():
            try:
                data = json.loads(file.read_text())
            except ValueError as e:
                raise HFImportError(f"{file} is not valid JSON: {e}") from None
            # transformers 5 writes the image processor inside processor_config.json
            return data.get("image_processor", data) if isinstance(data, dict) else {}
    _refuse(path, "it has no image processor settings (preprocessor_config.json): without them the "
                  "image size, resize, crop, mean and std are unknown")


def _side(path: Path, size, what: str) -> tuple[str, int]:
    if isinstance(size, int):
        return "shortest_edge", size
    if isinstance(size, dict) and "shortest_edge" in size and len(size) == 1:
        return "shortest_edge", int(size["shortest_edge"])
    if isinstance(size, dict) and size.get("height") and size.get("height") == size.get("width"):
        return "square", int(size["height"])
    _refuse(path, f"the image processor's {what} {size!r} is not a square or a shortest-edge size")


def preprocess_config(path: Path, image_size: int) -> dict:
    """open_clip's preprocess_cfg equal to the directory's CLIPImageProcessor settings."""
    p = _processor_settings(path)
    if p.get("do_resize", True) is False:
        _refuse(path, "the image processor does not resize (do_resize false); open_clip's transforms always do")
    if not p.get("do_normalize", True) or not p.get("do_rescale", True) or \
            not math.isclose(float(p.get("rescale_factor", 1 / 255)), 1 / 255):
        _refuse(path, "the image processor does not rescale by 1/255 and normalise, as open_clip's transforms do")
    resample = p.get("resample", 3)
    if resample not in INTERPOLATION:
        _refuse(path, f"the image processor resamples with PIL filter {resample}; open_clip's transforms use "
                      "bicubic (3) or bilinear (2)")
    kind, size = _side(path, p.get("size", {"shortest_edge": image_size}), "size")
    crop = p.get("do_center_crop", True)
    if kind == "shortest_edge":
        if not crop:
            _refuse(path, "the image processor resizes the shortest edge without a center crop; open_clip's "
                          "transforms crop to a square")
        crop_kind, crop_size = _side(path, p.get("crop_size", size), "crop_size")
        if crop_size != size:
            _refuse(path, f"the image processor resizes to {size} then crops {crop_size}; open_clip's transforms "
                          "crop what they resize to")
        mode = "shortest"
    else:
        mode = "squash"  # resized to height x width, a center crop of the same size does nothing
    if size != image_size:
        _refuse(path, f"the image processor makes {size}px images, the vision tower takes {image_size}px")
    mean, std = p.get("image_mean"), p.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3):
        _refuse(path, "the image processor has no 3-channel image_mean and image_std")
    return {"size": size, "mode": "RGB", "mean": tuple(float(m) for m in mean),
            "std": tuple(float(s) for s in std), "interpolation": INTERPOLATION[resample], "resize_mode": mode}


def weights_file(path: Path) -> Path:
    for name in HF_WEIGHTS:
        if (path / name).is_file():
            return path / name
    if (path / "model.safetensors.index.json").is_file() or (path / "pytorch_model.bin.index.json").is_file():
        _refuse(path, "its weights are sharded (model-0000N-of-M files); save it unsharded first "
                      "(AutoModel.from_pretrained(dir).save_pretrained(out, max_shard_size='100GB'))")
    _refuse(path, "it has a config.json but no weights (model.safetensors or pytorch_model.bin)")


class ProcessorCenterCrop:
    """CLIPImageProcessor's center crop: the top-left corner at floor((side - crop) / 2). torchvision's
    CenterCrop rounds instead, which moves the crop of an odd margin by one pixel."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img):
        width, height = img.size
        top, left = (height - self.size) // 2, (width - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))

    def __repr__(self) -> str:
        return f"ProcessorCenterCrop(size={self.size})"


def processor_eval_transform(transform):
    """open_clip's eval transform with CLIPImageProcessor's crop placement (the rest is the same)."""
    from torchvision.transforms import CenterCrop, Compose

    return Compose([ProcessorCenterCrop(t.size[0]) if isinstance(t, CenterCrop) else t
                    for t in transform.transforms])
