"""Export to a Hugging Face transformers CLIPModel + CLIPProcessor directory.

    OUT/config.json, OUT/model.safetensors      CLIPModel.from_pretrained(OUT)
    OUT/tokenizer.json, tokenizer_config.json,   CLIPProcessor.from_pretrained(OUT) (its tokenizer and
    OUT/vocab.json, merges.txt                   image processor); vocab.json/merges.txt are the BPE files
    OUT/processor_config.json,                   built from open_clip's own vocabulary, for tools that read
    OUT/preprocessor_config.json                 those rather than tokenizer.json

transformers' CLIP is one fixed architecture: a ViT image tower pooled at its class token and open_clip's
standard causal text transformer pooled at the end-of-text token, each with a bias-free linear projection.
open_clip models outside it (timm, ResNet or custom text towers, average or attentional pooling, ...) have
no CLIPModel equivalent: they raise UserError naming the reason (transformers has no open_clip converter;
open_clip#766, transformers#28072).
"""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import LayerNorm, LayerNormFp32, LayerScale, QuickGELU, ResidualAttentionBlock
from torch import nn

from ..errors import UserError

EOT_ID = 49407  # open_clip's end-of-text id, which HF pools at (its first occurrence)
SOT_ID = 49406
TOKENIZER_VOCAB = 49408
# open_clip spells its special tokens differently from every HF CLIP tokenizer.
SPECIAL_TOKENS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
RESAMPLE = {"bicubic": 3, "bilinear": 2, "random": 3}  # PIL codes; open_clip evaluates "random" as bicubic


class NotExpressible(UserError):
    """The model has a part transformers' CLIPModel has no place for."""


def _fail(reason: str) -> None:
    raise NotExpressible(f"cannot export to transformers CLIPModel: {reason} (transformers' CLIP has no "
                         "equivalent; use --format open_clip or onnx)")


# ------------------------------------------------------------------------------------------ what CLIP can hold

def _activation(block: ResidualAttentionBlock, tower: str) -> str:
    act = block.mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if type(act) is nn.GELU:  # HF's "gelu" is exact erf GELU, "gelu_pytorch_tanh" torch's tanh approximation
        return "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    _fail(f"the {tower} tower's MLP activation is {type(act).__name__}")


def _check_blocks(blocks, tower: str) -> tuple[str, float]:
    """(hidden_act, layer_norm_eps) shared by every block: HF has one of each per tower."""
    acts, eps = set(), set()
    for block in blocks:
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            _fail(f"the {tower} tower uses {type(block).__name__} blocks (qk-norm, scaled cosine or head "
                  "scaling attention)")
        if list(block.mlp._modules) != ["c_fc", "gelu", "c_proj"]:
            _fail(f"the {tower} tower's MLP has extra layers ({', '.join(block.mlp._modules)})")
        acts.add(_activation(block, tower))
        eps |= {_norm_eps(block.ln_1, tower), _norm_eps(block.ln_2, tower)}
    if len(acts) != 1 or len(eps) != 1:
        _fail(f"the {tower} tower mixes activations or LayerNorm eps across blocks")
    return acts.pop(), eps.pop()


def _norm_eps(norm: nn.Module, tower: str) -> float:
    if not isinstance(norm, (LayerNorm, LayerNormFp32, nn.LayerNorm)) or norm.weight is None or norm.bias is None:
        _fail(f"the {tower} tower uses {type(norm).__name__} where CLIP has an affine LayerNorm")
    return norm.eps


def _check_vision(visual: nn.Module) -> tuple[str, float]:
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        _fail(f"the image tower is {type(visual).__name__}, not open_clip's VisionTransformer (CLIP's image "
              "tower is a plain ViT)")
    if visual.attn_pool is not None:
        _fail("the image tower uses attentional pooling")
    if visual.pool_type != "tok":
        _fail(f"the image tower pools with {visual.pool_type!r}, CLIP pools its class token")
    if isinstance(visual.ln_pre, nn.Identity):
        _fail("the image tower has no LayerNorm before its transformer (no_ln_pre)")
    if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
        _fail(f"the image tower is not square (image {visual.image_size}, patch {visual.patch_size})")
    act, eps = _check_blocks(visual.transformer.resblocks, "image")
    if {_norm_eps(visual.ln_pre, "image"), _norm_eps(visual.ln_post, "image")} != {eps}:
        _fail("the image tower mixes LayerNorm eps")
    # patch dropout needs no check: open_clip applies it only in training mode, HF never.
    return act, eps


def _check_text(model: nn.Module, model_cfg: dict) -> tuple[str, float]:
    text_cfg = model_cfg.get("text_cfg", {})
    if not isinstance(model, open_clip.CLIP):  # TrimmedTextCLIP included: same modules and weights
        _fail(f"the model is {type(model).__name__}, not open_clip's CLIP with its standard text transformer "
              "(a custom or Hugging Face text tower)")
    for key in ("hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "embed_cls"):
        if text_cfg.get(key):
            _fail(f"text_cfg.{key} is set: the text side is not open_clip's standard CLIP tokenizer and tower")
    if model.attn_mask is None:
        _fail("the text tower is bidirectional (no_causal_mask); CLIP's text attention is causal")
    if not (model.text_pool_type == "argmax" or (model.text_pool_type == "eos" and model.text_eos_id == EOT_ID)):
        _fail(f"the text tower pools with {model.text_pool_type!r}; CLIP pools at the end-of-text token")
    if model.vocab_size < TOKENIZER_VOCAB:
        _fail(f"the text vocabulary ({model.vocab_size}) is smaller than the CLIP tokenizer's ({TOKENIZER_VOCAB})")
    if isinstance(model.text_projection, nn.Linear) and model.text_projection.bias is not None:
        _fail("the text projection has a bias; CLIP's projections are bias-free")
    act, eps = _check_blocks(model.transformer.resblocks, "text")
    if _norm_eps(model.ln_final, "text") != eps:
        _fail("the text tower mixes LayerNorm eps")
    return act, eps


def _check_model(model: nn.Module) -> None:
    if getattr(model, "logit_bias", None) is not None:
        _fail("the model has a logit bias (sigmoid-loss training); CLIPModel's logits have none")


def _check_preprocess(pp: dict) -> None:
    size = pp["size"] if isinstance(pp["size"], (tuple, list)) else (pp["size"], pp["size"])
    if size[0] != size[1]:
        _fail(f"the preprocessing size {tuple(size)} is not square")
    if pp.get("resize_mode", "shortest") not in ("shortest", "squash"):
        _fail(f"resize_mode {pp['resize_mode']!r} (CLIPImageProcessor cannot letterbox)")
    if pp.get("interpolation", "bicubic") not in RESAMPLE:
        _fail(f"interpolation {pp['interpolation']!r}")


# --------------------------------------------------------------------------------------------- the weights

def _projection(proj, in_dim: int, out_dim: int) -> torch.Tensor:
    """open_clip keeps x @ P with P [in, out] (or an nn.Linear, or none); HF a bias-free Linear [out, in]."""
    if proj is None:
        if in_dim != out_dim:
            _fail(f"a tower without projection has width {in_dim} but the shared embedding is {out_dim}")
        return torch.eye(out_dim)  # the identity keeps "no projection" exact
    return proj.weight if isinstance(proj, nn.Linear) else proj.t()


def _block_state(block: ResidualAttentionBlock, prefix: str) -> dict[str, torch.Tensor]:
    """One block. Layer scale (x + g * f(x)) folds exactly into the output projections f ends with."""
    g1 = block.ls_1.gamma if isinstance(block.ls_1, LayerScale) else None
    g2 = block.ls_2.gamma if isinstance(block.ls_2, LayerScale) else None
    q, k, v = block.attn.in_proj_weight.chunk(3)
    qb, kb, vb = _bias(block.attn.in_proj_bias, 3 * q.shape[0]).chunk(3)
    out = {
        "layer_norm1.weight": block.ln_1.weight, "layer_norm1.bias": block.ln_1.bias,
        "self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
        "self_attn.q_proj.bias": qb, "self_attn.k_proj.bias": kb, "self_attn.v_proj.bias": vb,
        "self_attn.out_proj.weight": _scaled(block.attn.out_proj.weight, g1),
        "self_attn.out_proj.bias": _scaled(_bias(block.attn.out_proj.bias, q.shape[0]), g1),
        "layer_norm2.weight": block.ln_2.weight, "layer_norm2.bias": block.ln_2.bias,
        "mlp.fc1.weight": block.mlp.c_fc.weight, "mlp.fc1.bias": block.mlp.c_fc.bias,
        "mlp.fc2.weight": _scaled(block.mlp.c_proj.weight, g2), "mlp.fc2.bias": _scaled(block.mlp.c_proj.bias, g2),
    }
    return {f"{prefix}.{k}": v for k, v in out.items()}


def _bias(bias: torch.Tensor | None, size: int) -> torch.Tensor:
    """HF's attention projections always have biases: a bias-free one is exactly a zero bias."""
    return torch.zeros(size) if bias is None else bias


def _scaled(t: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    if gamma is None:
        return t
    return t * (gamma[:, None] if t.ndim == 2 else gamma)


def _vision_state(visual: nn.Module, embed_dim: int) -> dict[str, torch.Tensor]:
    state = {
        "vision_model.embeddings.class_embedding": visual.class_embedding,
        "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
        "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight,
        "vision_model.pre_layrnorm.weight": visual.ln_pre.weight,  # HF's spelling
        "vision_model.pre_layrnorm.bias": visual.ln_pre.bias,
        "vision_model.post_layernorm.weight": visual.ln_post.weight,
        "vision_model.post_layernorm.bias": visual.ln_post.bias,
        "visual_projection.weight": _projection(visual.proj, visual.transformer.width, embed_dim),
    }
    for i, block in enumerate(visual.transformer.resblocks):
        state |= _block_state(block, f"vision_model.encoder.layers.{i}")
    return state


def _text_state(model: nn.Module, embed_dim: int) -> dict[str, torch.Tensor]:
    state = {
        "text_model.embeddings.token_embedding.weight": model.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": model.positional_embedding,
        "text_model.final_layer_norm.weight": model.ln_final.weight,
        "text_model.final_layer_norm.bias": model.ln_final.bias,
        "text_projection.weight": _projection(model.text_projection, model.transformer.width, embed_dim),
        "logit_scale": model.logit_scale.reshape(()),
    }
    for i, block in enumerate(model.transformer.resblocks):
        state |= _block_state(block, f"text_model.encoder.layers.{i}")
    return state


# ---------------------------------------------------------------------------------------------- the config

def _embed_dim(model: nn.Module) -> int:
    return model.visual.output_dim


def _tower_config(blocks, width: int, act: str, eps: float) -> dict:
    block = blocks[0]
    return {"hidden_size": width, "intermediate_size": block.mlp.c_fc.out_features,
            "num_hidden_layers": len(blocks), "num_attention_heads": block.attn.num_heads,
            "hidden_act": act, "layer_norm_eps": eps}


def hf_config(model: nn.Module, model_cfg: dict):
    """The CLIPConfig of an expressible model (raises NotExpressible otherwise)."""
    import transformers
    from transformers import CLIPConfig

    if int(transformers.__version__.split(".")[0]) < 5:  # the tokenizer and processor are built with 5.x's API
        raise UserError(f"--format hf needs transformers >= 5 (installed: {transformers.__version__})")
    _check_model(model)
    v_act, v_eps = _check_vision(model.visual)
    t_act, t_eps = _check_text(model, model_cfg)
    embed_dim, visual = _embed_dim(model), model.visual
    vision = _tower_config(visual.transformer.resblocks, visual.transformer.width, v_act, v_eps) | {
        "image_size": visual.image_size[0], "patch_size": visual.patch_size[0], "projection_dim": embed_dim}
    text = _tower_config(model.transformer.resblocks, model.transformer.width, t_act, t_eps) | {
        "vocab_size": model.vocab_size, "max_position_embeddings": model.positional_embedding.shape[0],
        "projection_dim": embed_dim, "bos_token_id": SOT_ID, "eos_token_id": EOT_ID, "pad_token_id": 0}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim,
                      logit_scale_init_value=float(model.logit_scale.detach().reshape(()).item()))


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    embed_dim = _embed_dim(model)
    state = _vision_state(model.visual, embed_dim) | _text_state(model, embed_dim)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def to_hf_model(model: nn.Module, model_cfg: dict):
    """transformers CLIPModel with this model's weights; every HF parameter must be filled, none left over."""
    from transformers import CLIPModel

    hf = CLIPModel(hf_config(model, model_cfg)).eval()
    result = hf.load_state_dict(hf_state_dict(model), strict=False)
    if result.missing_keys or result.unexpected_keys:  # a transformers version that renamed CLIP's modules
        raise UserError(f"transformers' CLIPModel layout changed: missing {result.missing_keys[:4]}, "
                        f"unexpected {result.unexpected_keys[:4]}")
    return hf


# ------------------------------------------------------------------------------------------- the processor

def write_bpe_files(out: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of open_clip's BPE (the vocabulary that ships inside open_clip)."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    vocab = {SPECIAL_TOKENS.get(token, token): i for token, i in bpe.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def build_tokenizer(out: Path, context_length: int):
    from transformers import CLIPTokenizer

    vocab, merges = write_bpe_files(out)
    # open_clip pads with id 0 ("!"). As an ordinary special token "!" would also be cut out of the text
    # ("wow!!" -> "!", "!" instead of "!!"); split_special_tokens keeps text tokenised as plain BPE, as
    # open_clip does, while padding still writes id 0.
    return CLIPTokenizer(vocab=str(vocab), merges=str(merges), pad_token="!", model_max_length=context_length,
                         split_special_tokens=True)


def build_image_processor(pp: dict):
    from transformers import CLIPImageProcessor

    _check_preprocess(pp)
    size = pp["size"][0] if isinstance(pp["size"], (tuple, list)) else pp["size"]
    shortest = pp.get("resize_mode", "shortest") == "shortest"
    return CLIPImageProcessor(
        size={"shortest_edge": size} if shortest else {"height": size, "width": size},
        crop_size={"height": size, "width": size}, do_center_crop=shortest,
        resample=RESAMPLE[pp.get("interpolation", "bicubic")],
        image_mean=list(pp["mean"]), image_std=list(pp["std"]), do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, do_convert_rgb=True)


def export_hf(model, model_name: str, model_cfg: dict, out: str | Path,
              tokenizer_files: dict | None = None) -> dict[str, Path]:
    """Write OUT as a CLIPModel + CLIPProcessor directory (see the module docstring). tokenizer_files: the
    transformers tokenizer the model was trained with (LoadedModel.tokenizer_files), written in place of the BPE."""
    from transformers import AutoTokenizer, CLIPProcessor

    from ..models.tokenizer_files import materialize

    out = Path(out)
    hf = to_hf_model(model, model_cfg)  # every check runs before anything is written
    image_processor = build_image_processor(dict(model.visual.preprocess_cfg))
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_files:
        tokenizer = AutoTokenizer.from_pretrained(materialize(tokenizer_files), trust_remote_code=False,
                                                  local_files_only=True)
    else:
        tokenizer = build_tokenizer(out, model.positional_embedding.shape[0])
    hf.save_pretrained(out, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    # transformers 5 keeps the image processor inside processor_config.json; earlier releases and
    # AutoImageProcessor read preprocessor_config.json: write both.
    image_processor.save_pretrained(out)
    files = {"config": out / "config.json", "weights": out / "model.safetensors",
             "tokenizer": out / "tokenizer.json", "vocab": out / "vocab.json", "merges": out / "merges.txt",
             "preprocessor": out / "preprocessor_config.json"}
    files = {k: v for k, v in files.items() if v.is_file()}  # another tokenizer may keep no vocab.json/merges.txt
    if (out / "processor_config.json").is_file():
        files["processor"] = out / "processor_config.json"
    return files
