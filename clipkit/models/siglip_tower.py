"""SigLIP image towers of any shape as timm models, named by their shape.

open_clip builds a timm image tower by name only (vision_cfg.timm_model_name), and timm registers SigLIP
towers of a few fixed shapes, with exact (erf) GELU. A transformers SiglipModel may have any width, depth,
head count, MLP width, LayerNorm eps and image size, and uses the tanh GELU: the tower that computes what it
computes is timm's VisionTransformer (no class token, MAP attention pooling) with those settings. It is
registered in timm under a name that spells every setting,

    clipkit_siglip_vit_p16_i224_w768_d12_h12_m3072_eps1em06_gelu_tanh

so a model config that names it is complete data: any process that builds it (factory.create_model)
registers the name from the name itself, and the same name always gives the same tower. Outside clipkit,
`from clipkit.models.siglip_tower import register; register(name)` makes it buildable by open_clip.
"""
from __future__ import annotations

import re
from functools import partial

import torch.nn as nn

PREFIX = "clipkit_siglip_vit"
ACTIVATIONS = ("gelu", "gelu_tanh")  # timm's layer names for exact and tanh-approximated GELU
NAME = re.compile(rf"{PREFIX}_p(\d+)_i(\d+)_w(\d+)_d(\d+)_h(\d+)_m(\d+)_eps([0-9a-z]+)_({'|'.join(ACTIVATIONS)})")


def _eps_text(eps: float) -> str:
    # timm reads '.' in a model name as a tag separator, and '-' would read as a range: spell them p and m
    return repr(float(eps)).replace(".", "p").replace("-", "m").replace("+", "")


def _eps_value(text: str) -> float:
    return float(text.replace("p", ".").replace("m", "-"))


def tower_name(*, patch: int, image: int, width: int, depth: int, heads: int, mlp: int, eps: float,
               act: str) -> str | None:
    """The registered name of this tower; None when its eps cannot be spelt back exactly."""
    name = f"{PREFIX}_p{patch}_i{image}_w{width}_d{depth}_h{heads}_m{mlp}_eps{_eps_text(eps)}_{act}"
    if act not in ACTIVATIONS or not NAME.fullmatch(name) or _eps_value(_eps_text(eps)) != float(eps):
        return None
    return name


def mlp_ratio(width: int, hidden: int) -> float:
    """A ratio r with int(width * r) == hidden, as timm and open_clip size their MLPs (hidden / width itself
    when it gives hidden back; some widths round down one short, e.g. SO400M's 4304 / 1152)."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def tower_settings(name: str) -> dict | None:
    """The settings a tower name spells, or None when it is not one of these names."""
    match = NAME.fullmatch(name or "")
    if match is None:
        return None
    patch, image, width, depth, heads, mlp, eps, act = match.groups()
    return {"patch": int(patch), "image": int(image), "width": int(width), "depth": int(depth),
            "heads": int(heads), "mlp": int(mlp), "eps": _eps_value(eps), "act": act}


def register(name: str) -> bool:
    """Make the tower `name` spells buildable by timm.create_model (and so by open_clip); False when `name`
    is not a SigLIP tower name (nothing is registered)."""
    import timm
    from timm.models import register_model

    settings = tower_settings(name)
    if settings is None:
        return False
    if timm.is_model(name):
        return True

    def entrypoint(pretrained: bool = False, **kwargs):
        return _build(name, settings, **kwargs)

    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    register_model(entrypoint)
    return True


def _build(name: str, s: dict, **kwargs):
    from timm.models import build_model_with_cfg
    from timm.models.vision_transformer import VisionTransformer

    kwargs.pop("pretrained_cfg", None)  # timm.create_model passes its (empty) pretrained config lookups on
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    width, mlp = s["width"], s["mlp"]
    args = dict(img_size=s["image"], patch_size=s["patch"], embed_dim=width, depth=s["depth"], num_heads=s["heads"],
                mlp_ratio=mlp_ratio(width, mlp), class_token=False, global_pool="map", act_layer=s["act"],
                norm_layer=partial(nn.LayerNorm, eps=s["eps"]))
    # weights are never fetched: the pretrained config only records the input size for timm's helpers
    cfg = {"architecture": name, "input_size": (3, s["image"], s["image"]), "fixed_input_size": True,
           "num_classes": 0}
    return build_model_with_cfg(VisionTransformer, name, pretrained=False, pretrained_cfg=cfg,
                                **dict(args, **kwargs))
