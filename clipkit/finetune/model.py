"""The model fine-tuning adapts: a CLIP model's image tower under a linear classification head.

    classifier = ImageClassifier.from_zeroshot(clip, zeroshot_weights)   # head = the zero-shot classifier
    logits = classifier(images)                                          # scale * normalize(f) @ W.T + b

The head starts as the zero-shot text classifier (class names x templates, see
clipkit.evaluation.build_classifier) times the model's temperature, with zero bias: before any step the
classifier predicts exactly what zero-shot classification predicts. The CLIP model is kept whole (its text
tower frozen), so the adapted model exports as an ordinary open_clip model plus the head.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..extras import require
from ..models import eval_mode
from ..training.optim import is_no_decay
from .lora_targets import auto_targets, check_coverage

# The parts of open_clip's VisionTransformer before its first block (the embedding "layer 0").
_EMBEDDING_PARTS = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.", "patch_dropout.")
_BLOCK_RE = re.compile(r"transformer\.resblocks\.(\d+)\.")


def feature_dim(clip: nn.Module) -> int:
    """The width of the image tower's features (a timm tower keeps no output_dim: one forward tells)."""
    dim = getattr(clip.visual, "output_dim", None)
    if dim is None:
        size = clip.visual.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        param = next(clip.visual.parameters())
        with torch.no_grad(), eval_mode(clip.visual):
            dim = clip.visual(torch.zeros(1, 3, *size, device=param.device, dtype=param.dtype)).shape[-1]
    return int(dim)


class ImageClassifier(nn.Module):
    def __init__(self, clip: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.clip = clip
        self.head = nn.Linear(feature_dim(clip), num_classes)
        self.prompts: torch.Tensor | None = None  # [classes, templates, context] tokens: a text-tower head

    def use_text_head(self, prompt_tokens: torch.Tensor) -> None:
        """Compute the head's weights from the text tower at every forward (zero-shot's classifier, through
        whatever adapts the text tower), instead of holding them; the bias stays a parameter."""
        self.prompts = prompt_tokens
        self.head.weight.requires_grad_(False)

    def text_head_weight(self) -> torch.Tensor:
        classes, templates, context = self.prompts.shape
        emb = F.normalize(self.clip.encode_text(self.prompts.reshape(-1, context).to(self.head.bias.device)), dim=-1)
        per_class = F.normalize(emb.reshape(classes, templates, -1).mean(dim=1), dim=-1)
        return per_class * self.clip.logit_scale.exp()

    def head_weight(self) -> torch.Tensor:
        return self.text_head_weight() if self.prompts is not None else self.head.weight

    @classmethod
    def from_zeroshot(cls, clip: nn.Module, zeroshot_weights: torch.Tensor) -> "ImageClassifier":
        """zeroshot_weights: [embed_dim, num_classes], as build_classifier returns it."""
        model = cls(clip, zeroshot_weights.shape[1])
        scale = clip.logit_scale.exp().item() if isinstance(getattr(clip, "logit_scale", None), torch.Tensor) else 1.0
        with torch.no_grad():
            model.head.weight.copy_(zeroshot_weights.T.float() * scale)
            model.head.bias.zero_()
        return model

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.visual(images), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.prompts is not None:
            return F.linear(self.features(images), self.text_head_weight(), self.head.bias)
        return self.head(self.features(images))


def vit_blocks(visual: nn.Module) -> int | None:
    """The number of transformer blocks of an open_clip ViT image tower; None for other towers."""
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    return len(blocks) if isinstance(blocks, nn.ModuleList) else None


def _tower_layer(name: str, num_blocks: int) -> int:
    """Layer id of an image-tower parameter: 0 the embeddings, i + 1 block i, num_blocks + 1 what follows."""
    if name.startswith(_EMBEDDING_PARTS):
        return 0
    m = _BLOCK_RE.match(name)
    return int(m.group(1)) + 1 if m else num_blocks + 1


def set_trainable(model: ImageClassifier, trainable_blocks: int = -1, freeze_head: bool = False) -> None:
    """Freeze the text tower (and the temperature), and, with trainable_blocks=N >= 0, the image tower's
    embeddings and all but its last N blocks (its final norm and projection stay trainable)."""
    for p in model.clip.parameters():
        p.requires_grad_(False)
    visual = model.clip.visual
    if trainable_blocks >= 0:
        n = vit_blocks(visual)
        if n is None:
            raise UserError(f"finetune.trainable_blocks={trainable_blocks} needs an open_clip ViT image tower "
                            f"(this one is {type(visual).__name__}): use -1 to train it whole")
        first = n - trainable_blocks + 1  # the first trainable layer id
        for name, p in visual.named_parameters():
            p.requires_grad_(_tower_layer(name, n) >= first)
    else:
        for p in visual.parameters():
            p.requires_grad_(True)
    model.head.requires_grad_(not freeze_head)


def optimizer_groups(model: ImageClassifier, lr: float, head_lr: float | None, weight_decay: float,
                     layer_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: no weight decay on norms, biases and embeddings;
    with layer_decay < 1, block i of an L-block ViT learns at lr * layer_decay ** (L - i) (BEiT's layer-wise
    decay: the embeddings slowest, the final norm and projection at lr); the head at head_lr (default lr)."""
    visual = model.clip.visual
    n = vit_blocks(visual)
    if layer_decay != 1.0 and n is None:
        raise UserError(f"finetune.layer_decay={layer_decay} needs an open_clip ViT image tower (this one is "
                        f"{type(visual).__name__}): use 1.0")
    explicit = set(visual.no_weight_decay()) if hasattr(visual, "no_weight_decay") else set()
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("head."):
            scale_lr = head_lr if head_lr is not None else lr
            decay = name.endswith("weight")
        else:
            tower_name = _visual_name(name)
            scale = layer_decay ** (n + 1 - _tower_layer(tower_name, n)) if n is not None else 1.0
            scale_lr = lr * scale
            decay = not is_no_decay(tower_name, p, explicit)
        groups.setdefault((scale_lr, decay), []).append(p)
    return [{"params": params, "lr": group_lr, "weight_decay": weight_decay if decay else 0.0}
            for (group_lr, decay), params in groups.items()]


def _visual_name(name: str) -> str:
    """A parameter's name inside the image tower (also through peft's LoRA wrappers)."""
    name = name.removeprefix("clip.visual.")
    for prefix in ("base_model.model.",):
        name = name.removeprefix(prefix)
    return name.replace(".base_layer.", ".")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def interpolate(zeroshot: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT: (1 - alpha) * zero-shot + alpha * fine-tuned, tensor by tensor. alpha 0 gives the zero-shot
    weights and alpha 1 the fine-tuned ones exactly (x * 1 + y * 0 == x in floating point)."""
    if zeroshot.keys() != finetuned.keys():
        missing = sorted(zeroshot.keys() ^ finetuned.keys())
        raise UserError(f"WiSE-FT needs two models of one architecture: {missing[0]} is in only one of them")
    out = {}
    for k, a in zeroshot.items():
        b = finetuned[k]
        if a.shape != b.shape:
            raise UserError(f"WiSE-FT needs two models of one architecture: {k} is {tuple(a.shape)} in the "
                            f"zero-shot model but {tuple(b.shape)} in the fine-tuned one")
        out[k] = (1.0 - alpha) * a + alpha * b if a.is_floating_point() else a.clone()
    return out


def text_tower_attr(clip: nn.Module) -> str:
    """The attribute of the CLIP model holding the text layers LoRA adapts: open_clip CLIP's `transformer` (its
    blocks), or CustomTextCLIP's whole `text` tower (an open_clip TextTransformer, or an HFTextEncoder, whose
    Hugging Face encoder `text.transformer` holds the layers its targets name)."""
    return "text" if isinstance(getattr(clip, "text", None), nn.Module) else "transformer"


def add_lora(model: ImageClassifier, rank: int, alpha: float, dropout: float, targets: list[str] | None,
             text: bool = False, min_coverage: float = 0.0) -> dict:
    """LoRA adapters (peft) on the image tower's modules named in `targets` (and the text tower's, with
    text=True); targets None or empty: chosen per tower from its architecture (lora_targets.auto_targets). A list
    covering less than min_coverage of a tower's Linear/Conv weights is refused. The adapted towers' own weights
    are frozen, the head stays as set_trainable left it. Returns {tower: its targets, architecture, coverage}."""
    peft = require("peft", "LoRA fine-tuning")
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

    towers = {"image": "visual"} | ({"text": text_tower_attr(model.clip)} if text else {})
    chosen = {}
    for which, attr in towers.items():  # check every tower before adapting any
        tower = getattr(model.clip, attr)
        chosen[which] = check_coverage(tower, list(targets) if targets else auto_targets(tower), min_coverage, which)
    for which, attr in towers.items():
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=chosen[which]["targets"],
                            bias="none")
        setattr(model.clip, attr, get_peft_model(getattr(model.clip, attr), config))
    return chosen


def trainable_by_tower(model: ImageClassifier) -> dict[str, dict]:
    """{image, text, head: {trainable, total, fraction}}: the text tower is everything of the CLIP model outside
    the image tower (its temperature included); LoRA adapters count in their tower."""
    counts = {name: [0, 0] for name in ("image", "text", "head")}
    for name, p in model.named_parameters():
        part = "head" if name.startswith("head.") else "image" if name.startswith("clip.visual.") else "text"
        counts[part][0] += p.numel() if p.requires_grad else 0
        counts[part][1] += p.numel()
    return {part: {"trainable": t, "total": n, "fraction": t / n if n else 0.0} for part, (t, n) in counts.items()}


def merge_lora(model: ImageClassifier) -> ImageClassifier:
    """Fold the adapters into the weights: plain open_clip modules again (in place, returned)."""
    from peft import PeftModel

    if isinstance(model.clip.visual, PeftModel):
        model.clip.visual = model.clip.visual.merge_and_unload()
    attr = text_tower_attr(model.clip)
    if isinstance(getattr(model.clip, attr), PeftModel):
        setattr(model.clip, attr, getattr(model.clip, attr).merge_and_unload())
    return model
