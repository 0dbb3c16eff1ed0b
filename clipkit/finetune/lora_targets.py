"""Which modules of a tower LoRA adapts, chosen from its architecture, and how much of the tower they cover.

    targets = auto_targets(model.clip.visual)          # e.g. conv1,conv2,conv3,downsample.0,q_proj,... on a ResNet
    share, matched = coverage(model.clip.visual, targets)

A target list is matched the way peft matches one (a module whose name is the target or ends with "." + the
target), and its coverage is the share of the tower's adaptable weights (the weight tensors of its Linear and
convolution layers and of nn.MultiheadAttention's input and output projections) inside the modules it names.
A list that names another architecture's modules matches next to nothing: check_coverage refuses it rather than
train a fraction of a percent of the model.
"""
from __future__ import annotations

from torch import nn

from ..errors import UserError

# open_clip's own transformer towers (VisionTransformer, TextTransformer and the text tower's Transformer):
# attention (nn.MultiheadAttention: the input and output projections), the MLP's two layers.
VIT_TARGETS = ("attn", "c_fc", "c_proj")
# open_clip's ModifiedResNet: the stem's and every bottleneck's convolutions, the projection shortcuts, and the
# attention pool's query, key, value and output projections (most of a small ResNet's weights).
RESNET_TARGETS = ("conv1", "conv2", "conv3", "downsample.0", "q_proj", "k_proj", "v_proj", "c_proj")
# The layer types peft adapts and whose weights count towards a tower's coverage.
_ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)


def adaptable_weights(tower: nn.Module) -> dict[str, int]:
    """{module name: weight elements} of the tower's adaptable layers (a MultiheadAttention counts as one
    module holding its input and output projections; its out_proj child is not counted again)."""
    out: dict[str, int] = {}
    inside_attention: list[str] = []
    for name, module in tower.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_attention):
            continue
        if isinstance(module, nn.MultiheadAttention):
            inside_attention.append(name)
            weights = [module.in_proj_weight, module.q_proj_weight, module.k_proj_weight, module.v_proj_weight,
                       module.out_proj.weight]
            out[name] = sum(w.numel() for w in weights if w is not None)
        elif isinstance(module, _ADAPTABLE):
            out[name] = module.weight.numel()
    return out


def matches(name: str, target: str) -> bool:
    """peft's rule for a list of target names."""
    return name == target or name.endswith("." + target)


def coverage(tower: nn.Module, targets: list[str]) -> tuple[float, list[str]]:
    """(share of the tower's adaptable weights inside the modules the targets name, those modules' names)."""
    weights = adaptable_weights(tower)
    matched = [n for n in weights if any(matches(n, t) for t in targets)]
    total = sum(weights.values())
    return (sum(weights[n] for n in matched) / total if total else 0.0), matched


def _leaf_names(root: nn.Module, tower: nn.Module) -> list[str]:
    """The distinct last name parts of root's adaptable layers ("blocks.0.attn.qkv" -> "qkv"; a numbered
    child keeps its parent: "downsample.0"), in first-seen order, keeping only names that match nothing but
    adaptable layers anywhere in the tower (peft refuses a target that names, say, an nn.Sequential)."""
    adaptable = set(adaptable_weights(tower))
    names: list[str] = []
    for full in adaptable_weights(root):
        parts = full.split(".")
        leaf = ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
        if leaf not in names:
            names.append(leaf)
    tower_modules = [n for n, _ in tower.named_modules() if n]
    return [leaf for leaf in names if all(n in adaptable for n in tower_modules if matches(n, leaf))]


def architecture(tower: nn.Module) -> str:
    """A short name of the tower's kind: vit, resnet, timm, hf or other."""
    if hasattr(tower, "trunk"):  # open_clip's TimmModel
        return "timm"
    if hasattr(tower, "transformer") and hasattr(tower, "config") and hasattr(tower, "pooler"):  # HFTextEncoder
        return "hf"
    if isinstance(getattr(tower, "resblocks", None), nn.ModuleList) or isinstance(
            getattr(getattr(tower, "transformer", None), "resblocks", None), nn.ModuleList):
        return "vit"
    if hasattr(tower, "attnpool") and hasattr(tower, "layer1"):  # open_clip's ModifiedResNet
        return "resnet"
    return "other"


def auto_targets(tower: nn.Module) -> list[str]:
    """LoRA targets for the tower's architecture: open_clip's ViT and ResNet by their known module names;
    timm and Hugging Face towers (and anything else) by the names of the layers inside their trunk / encoder."""
    kind = architecture(tower)
    if kind == "vit":
        return list(VIT_TARGETS)
    if kind == "resnet":
        return list(RESNET_TARGETS)
    root = tower.trunk if kind == "timm" else tower.transformer if kind == "hf" else tower
    return _leaf_names(root, tower)


def check_coverage(tower: nn.Module, targets: list[str], min_share: float, which: str) -> dict:
    """Refuse (one line naming what matched) a target list covering less than min_share of the tower's adaptable
    weights; else the record result.json keeps: targets, share, how many modules matched."""
    share, matched = coverage(tower, targets)
    if share < min_share:
        shown = ", ".join(matched[:4]) + (f" and {len(matched) - 4} more" if len(matched) > 4 else "")
        raise UserError(f"finetune.lora.targets {','.join(targets)} cover {100 * share:.2f}% of the {which} tower's "
                        f"Linear/Conv weights ({architecture(tower)}: matched {shown or 'nothing'}), under "
                        f"finetune.lora.min_coverage={min_share:g}: leave finetune.lora.targets unset to choose "
                        "them from the model")
    return {"targets": list(targets), "architecture": architecture(tower), "coverage": share,
            "modules": len(matched)}
