"""A transformers SiglipModel directory read as open_clip's SigLIP (CustomTextCLIP with a timm image tower).

    DIR/config.json                    SiglipConfig (model_type "siglip"): the architecture
    DIR/model.safetensors              the weights (or pytorch_model.bin, read with torch.load(weights_only=True))
    DIR/spiece.model, or               the SentencePiece tokenizer (SiglipTokenizer) captions are tokenised with,
      tokenizer.json                     padded to the context length as SigLIP was trained
    DIR/preprocessor_config.json       image size, mean and std, resample (SiglipImageProcessor: a resize to
                                       the square, no crop)

Each part has an exact place in open_clip's SigLIP layout (its ViT-*-SigLIP configs):
  image tower   timm's VisionTransformer without class token, pooled by MAP attention pooling, under a name
                that spells its shape (siglip_tower.py), with the directory's activation and LayerNorm eps
  text tower    open_clip's TextTransformer without causal mask, pooled at the last position, LayerNorm
                after the transformer, projected by a Linear with bias (SiglipTextModel's head)
  logits        logit_scale and logit_bias (sigmoid loss): scale.exp() * img . txt + bias
What has no exact place (another activation, dropout, no pooling head, a text head that does not project
to the image width, an eps the tower name cannot spell) is refused with HFImportError naming it.
"""
from __future__ import annotations

from pathlib import Path

from .hf_clip import _block, _check_tower, _refuse, convert_state
from .siglip_tower import mlp_ratio, tower_name

TOKENIZER_FILES = (("spiece.model",), ("tokenizer.json",))
# transformers' activation names -> timm's layer name (image tower), torch GELU's `approximate` (text tower)
ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_pytorch_tanh": ("gelu_tanh", "tanh")}
LOGIT_BIAS_INIT = -10.0  # open_clip's SigLIP configs; only makes the parameter exist, the directory's replaces it


def _towers(config: dict) -> tuple[dict, dict]:
    """The two towers' settings with transformers' defaults filled in (SiglipConfig parses config.json)."""
    from transformers import SiglipConfig
    from transformers.utils import logging as hf_logging

    # SiglipTextConfig's own defaults (bos/eos ids 49406/49407 beside a 32000-token vocabulary) make
    # transformers warn on every directory whose config leaves them out, as the released ones do
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        cfg = SiglipConfig.from_dict(config)
    finally:
        hf_logging.set_verbosity(level)
    return cfg.vision_config.to_dict(), cfg.text_config.to_dict()


def _activation(path: Path, tower: dict, name: str) -> tuple[str, str]:
    act = tower.get("hidden_act")
    if act not in ACTIVATIONS:
        _refuse(path, f"{name}_config.hidden_act {act!r}: SigLIP towers map with gelu or gelu_pytorch_tanh only")
    return ACTIVATIONS[act]


def _vision_cfg(path: Path, vision: dict) -> dict:
    if not vision.get("vision_use_head", True):
        _refuse(path, "vision_config.vision_use_head is false: SiglipModel's image features come from its "
                      "attention-pooling head, which this model lacks")
    if vision.get("num_channels", 3) != 3:
        _refuse(path, f"the image tower takes {vision['num_channels']} channels; open_clip's takes RGB")
    # an image size that is not a multiple of the patch (SO400M/14 at 384px) loses its last pixels to the
    # patch convolution in transformers and timm alike: no check needed
    width, eps = vision["hidden_size"], float(vision["layer_norm_eps"])
    name = tower_name(patch=vision["patch_size"], image=vision["image_size"], width=width,
                      depth=vision["num_hidden_layers"], heads=vision["num_attention_heads"],
                      mlp=vision["intermediate_size"], eps=eps, act=_activation(path, vision, "vision")[0])
    if name is None:
        _refuse(path, f"vision_config.layer_norm_eps {eps!r} cannot be recorded exactly in the tower's name")
    return {"image_size": vision["image_size"], "timm_model_name": name, "timm_model_pretrained": False,
            "timm_pool": "map", "timm_proj": "none"}


def _text_cfg(path: Path, text: dict) -> dict:
    width, approximate = text["hidden_size"], _activation(path, text, "text")[1]
    cfg = {"context_length": text["max_position_embeddings"], "vocab_size": text["vocab_size"], "width": width,
           "heads": text["num_attention_heads"], "layers": text["num_hidden_layers"],
           "mlp_ratio": mlp_ratio(width, text["intermediate_size"]), "no_causal_mask": True, "proj_bias": True,
           "pool_type": "last", "norm_kwargs": {"eps": float(text["layer_norm_eps"])}}
    if approximate != "none":
        cfg["act_kwargs"] = {"approximate": approximate}
    return cfg


def model_config(path: Path, config: dict) -> dict:
    """open_clip's model_cfg for this SiglipConfig (HFImportError naming what has no exact equivalent)."""
    vision, text = _towers(config)
    for tower, name in ((vision, "vision"), (text, "text")):
        _check_tower(path, tower, name)
    if text["projection_size"] != vision["hidden_size"]:
        _refuse(path, f"the text head projects to {text['projection_size']} but the image features have "
                      f"{vision['hidden_size']} (the image tower has no projection): they cannot be compared")
    return {"embed_dim": vision["hidden_size"], "init_logit_bias": LOGIT_BIAS_INIT, "custom_text": True,
            "vision_cfg": _vision_cfg(path, vision), "text_cfg": _text_cfg(path, text)}


# ---------------------------------------------------------------------------------------------- the weights

def _vision_block(prefix: str, hf: str) -> dict[str, tuple]:
    """timm key -> (HF keys, how to combine them) for one ViT block."""
    return {
        f"{prefix}.norm1.weight": ((f"{hf}.layer_norm1.weight",), None),
        f"{prefix}.norm1.bias": ((f"{hf}.layer_norm1.bias",), None),
        f"{prefix}.attn.qkv.weight": (tuple(f"{hf}.self_attn.{p}_proj.weight" for p in "qkv"), "cat"),
        f"{prefix}.attn.qkv.bias": (tuple(f"{hf}.self_attn.{p}_proj.bias" for p in "qkv"), "cat"),
        f"{prefix}.attn.proj.weight": ((f"{hf}.self_attn.out_proj.weight",), None),
        f"{prefix}.attn.proj.bias": ((f"{hf}.self_attn.out_proj.bias",), None),
        f"{prefix}.norm2.weight": ((f"{hf}.layer_norm2.weight",), None),
        f"{prefix}.norm2.bias": ((f"{hf}.layer_norm2.bias",), None),
        f"{prefix}.mlp.fc1.weight": ((f"{hf}.mlp.fc1.weight",), None),
        f"{prefix}.mlp.fc1.bias": ((f"{hf}.mlp.fc1.bias",), None),
        f"{prefix}.mlp.fc2.weight": ((f"{hf}.mlp.fc2.weight",), None),
        f"{prefix}.mlp.fc2.bias": ((f"{hf}.mlp.fc2.bias",), None),
    }


def _pooling_head(prefix: str, hf: str) -> dict[str, tuple]:
    """timm's AttentionPoolLatent from SiglipMultiheadAttentionPoolingHead: the probe is the latent query,
    torch's packed in-projection splits into timm's q and kv."""
    keys = {f"{prefix}.latent": ((f"{hf}.probe",), None)}
    for part in ("weight", "bias"):
        keys |= {
            f"{prefix}.q.{part}": ((f"{hf}.attention.in_proj_{part}",), "q"),
            f"{prefix}.kv.{part}": ((f"{hf}.attention.in_proj_{part}",), "kv"),
            f"{prefix}.proj.{part}": ((f"{hf}.attention.out_proj.{part}",), None),
            f"{prefix}.norm.{part}": ((f"{hf}.layernorm.{part}",), None),
            f"{prefix}.mlp.fc1.{part}": ((f"{hf}.mlp.fc1.{part}",), None),
            f"{prefix}.mlp.fc2.{part}": ((f"{hf}.mlp.fc2.{part}",), None),
        }
    return keys


def key_map(model_cfg: dict, vision_layers: int) -> dict[str, tuple]:
    """Every open_clip SigLIP key with the HF keys it is made of."""
    v, t, trunk = "vision_model", "text_model", "visual.trunk"
    keys = {
        f"{trunk}.pos_embed": ((f"{v}.embeddings.position_embedding.weight",), "unsqueeze"),
        f"{trunk}.patch_embed.proj.weight": ((f"{v}.embeddings.patch_embedding.weight",), None),
        f"{trunk}.patch_embed.proj.bias": ((f"{v}.embeddings.patch_embedding.bias",), None),
        f"{trunk}.norm.weight": ((f"{v}.post_layernorm.weight",), None),
        f"{trunk}.norm.bias": ((f"{v}.post_layernorm.bias",), None),
        "text.token_embedding.weight": ((f"{t}.embeddings.token_embedding.weight",), None),
        "text.positional_embedding": ((f"{t}.embeddings.position_embedding.weight",), None),
        "text.ln_final.weight": ((f"{t}.final_layer_norm.weight",), None),
        "text.ln_final.bias": ((f"{t}.final_layer_norm.bias",), None),
        "text.text_projection.weight": ((f"{t}.head.weight",), None),  # both are Linear layers
        "text.text_projection.bias": ((f"{t}.head.bias",), None),
        "logit_scale": (("logit_scale",), "scalar"),
        "logit_bias": (("logit_bias",), "scalar"),
    }
    keys |= _pooling_head(f"{trunk}.attn_pool", f"{v}.head")
    for i in range(vision_layers):
        keys |= _vision_block(f"{trunk}.blocks.{i}", f"{v}.encoder.layers.{i}")
    for i in range(model_cfg["text_cfg"]["layers"]):
        keys |= _block(f"text.transformer.resblocks.{i}", f"{t}.encoder.layers.{i}")
    return keys


def to_open_clip_state(path: Path, hf_state: dict, model_cfg: dict, shapes: dict) -> dict:
    """open_clip's state dict from HF's; every HF tensor must be used and fit (else the first is named)."""
    layers = sum(1 for k in shapes if k.startswith("visual.trunk.blocks.") and k.endswith(".norm1.weight"))
    return convert_state(path, hf_state, key_map(model_cfg, layers), shapes, "SiglipModel")


def check_context(path: Path, tokenizer, context_length: int) -> None:
    """SigLIP pools the last position: its tokens must be padded to the length the text tower was trained at."""
    limit = getattr(tokenizer.tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 10**6 and limit != context_length:
        _refuse(path, f"the tokenizer pads to {limit} tokens, the text tower's max_position_embeddings is "
                      f"{context_length}: SigLIP reads the last position, so both must agree")

