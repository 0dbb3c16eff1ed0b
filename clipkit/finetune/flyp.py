"""FLYP ("Finetune like you pretrain", Goyal et al. 2022): fine-tune both towers with the pretraining loss.

    objective = FlypObjective(tokenizer, classnames, templates, seed=0)
    fit(FlypClassifier.from_zeroshot(clip, zeroshot_weights), ..., objective=objective)

Each training image is paired with a prompt of its class: one template per sample, drawn from the task's templates
(seeded by run seed, epoch and sample key, so the draw does not depend on ranks or workers), with the class name
filled in. The loss is clipkit's symmetric InfoNCE over the batch with the model's own temperature, exactly as in
pretraining: the other samples' prompts are the negatives, those of another sample of the same class included (as
in the reference code, which feeds image/prompt pairs to open_clip's ClipLoss). The temperature trains and is
clamped as in pretraining. The classifier is zero-shot's: before every validation the head is rebuilt from the
current text tower (class embeddings averaged over all templates, clipkit.evaluation.build_classifier) times the
current temperature, zero bias; it is never a trained parameter.
"""
from __future__ import annotations

import random

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data.labelled import PLACEHOLDER
from ..errors import UserError
from ..evaluation import build_classifier
from ..losses import InfoNCELoss
from ..models import eval_mode
from ..training.trainer import MAX_LOGIT_SCALE
from .model import ImageClassifier


class FlypClassifier(ImageClassifier):
    """An ImageClassifier whose forward also takes the prompts: model(images) classifies with the head,
    model(images, texts) gives what the contrastive loss takes (through DDP's forward, so gradients sync)."""

    def forward(self, images: torch.Tensor, texts: torch.Tensor | None = None):
        if texts is None:
            return super().forward(images)
        text_features = F.normalize(self.clip.encode_text(texts), dim=-1)
        return self.features(images), text_features, self.clip.logit_scale.exp()


def train_both_towers(model: ImageClassifier) -> None:
    """FLYP trains the whole CLIP model (both towers and the temperature); the head is computed, never trained."""
    for p in model.clip.parameters():
        p.requires_grad_(True)
    model.head.requires_grad_(False)


def _check_equal_slices(size: int, device: torch.device) -> None:
    """Under torchrun the loss gathers every rank's features, which needs slices of one size; a slice short of an
    image that did not decode would make the gather wrong, so every rank stops with the same error instead."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    sizes = torch.tensor([size, -size], device=device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    if sizes[0].item() != -sizes[1].item():
        raise UserError(f"flyp under torchrun: this step's slices hold {-sizes[1].item()} to {sizes[0].item()} "
                        "images (a training image did not decode); the contrastive loss gathers equal slices from "
                        "every rank: remove the unreadable images or train in one process")


class FlypObjective:
    """FLYP's training step and the zero-shot head it validates with (see the module docstring)."""

    def __init__(self, tokenizer, classnames: list[str], templates: list[str], *, seed: int) -> None:
        self.tokenizer, self.classnames, self.templates, self.seed = tokenizer, classnames, templates, seed
        self.loss_fn = InfoNCELoss()

    def template_index(self, key: str, epoch: int) -> int:
        return random.Random(f"clipkit.finetune.flyp:{self.seed}:{epoch}:{key}").randrange(len(self.templates))

    def prompts(self, targets: torch.Tensor, keys: list[str], epoch: int) -> list[str]:
        """Each sample's prompt: a template drawn for it, filled with its class name."""
        return [self.templates[self.template_index(key, epoch)].replace(PLACEHOLDER, self.classnames[label])
                for label, key in zip(targets.tolist(), keys)]

    def forward(self, model, images: torch.Tensor, targets: torch.Tensor, keys: list[str], epoch: int):
        texts = self.tokenizer(self.prompts(targets, keys, epoch)).to(images.device)
        return model(images, texts)

    def loss(self, out, targets: torch.Tensor) -> torch.Tensor:
        image_features, text_features, scale = out
        _check_equal_slices(len(targets), targets.device)
        return self.loss_fn(image_features.float(), text_features.float(), scale.float())

    def after_step(self, model: ImageClassifier) -> None:
        with torch.no_grad():
            model.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    @torch.no_grad()
    def prepare_eval(self, model: ImageClassifier) -> None:
        """The head := zero-shot's classifier from the current text tower, times the current temperature."""
        device = model.head.weight.device
        with eval_mode(model.clip):
            weights = build_classifier(model.clip, self.tokenizer, self.classnames, self.templates, device)
        model.head.weight.copy_(weights.T.float() * model.clip.logit_scale.exp())
        model.head.bias.zero_()
