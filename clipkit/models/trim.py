"""Exact text truncation: run the text tower only up to the longest caption of the batch.

open_clip's CLIP reads one position per caption out of its text tower: the end-of-text token (`argmax`
pooling; `eos` pooling reads the first eos id). Under a causal attention mask the features at position p
depend only on positions 0..p, so every position after the last one read in the batch is computed and
thrown away (a 12-token caption padded to 77). TrimmedTextCLIP runs the tower on tokens[:, :L] with the
positional embedding and the causal mask cut to L, where L is one past the last position read in the batch:
the same features and the same gradients (to float rounding), for a fraction of the work. With
`model.trim_text_multiple = N` set on the model, L is rounded up to a multiple of N (still exact): a compiled
tower then sees a bounded set of lengths (clipkit.training.compile).

It applies to open_clip's CLIP class (every clipkit config and open_clip's ViT/ResNet/ConvNeXt CLIP
architectures) when its text attention is causal and it pools at a token. Any other text tower (a Hugging
Face or bidirectional one, CustomTextCLIP, CoCa, `last` or mean pooling) runs as it is: cutting it would
change its output. Traced or compiled (ONNX export, torch.jit, torch.compile) the tower runs full length, so
a graph never bakes in one batch's length.
"""
from __future__ import annotations

import logging

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

log = logging.getLogger("clipkit.models")

POOLED_AT_A_TOKEN = ("argmax", "eos")  # open_clip's text pool types that read one position per caption


def pooled_positions(tokens: torch.Tensor, pool_type: str, eos_id: int | None) -> torch.Tensor:
    """The position each caption's features are read from (as open_clip's text_global_pool picks it)."""
    if pool_type == "argmax":
        return tokens.argmax(dim=-1)
    if pool_type == "eos":
        return (tokens == eos_id).int().argmax(dim=-1)
    raise ValueError(f"text pool type {pool_type!r} does not read one position per caption")


def trim_unsupported(model: torch.nn.Module) -> str | None:
    """Why cutting this model's text tower would change its output; None when it is exact."""
    if not isinstance(model, open_clip.CLIP):
        return f"the model is {type(model).__name__}, not open_clip's CLIP (its text tower runs as it is)"
    mask = model.attn_mask
    if mask is None:
        return "its text attention is bidirectional (no causal mask)"
    above = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dim() != 2 or not torch.equal(torch.isneginf(mask), above) or bool(mask[~above].any()):
        return "its text attention mask is not the plain causal mask"
    if model.text_pool_type not in POOLED_AT_A_TOKEN:
        return f"it pools text features by {model.text_pool_type!r}, not at one token per caption"
    return None


def set_text_trimming(model: torch.nn.Module, enabled: bool) -> bool:
    """Switch exact text truncation on or off for this model, in place (its class changes, its parameters and
    state dict do not). Returns whether it is on: asked for on a model where it is not exact, it stays off."""
    reason = trim_unsupported(model)
    if enabled and reason is None:
        model.__class__ = TrimmedTextCLIP
        return True
    if enabled:
        log.info("text tower runs full length: %s", reason)
    if type(model) is TrimmedTextCLIP:
        model.__class__ = open_clip.CLIP
    return False


def text_trimming(model: torch.nn.Module) -> bool:
    return type(model) is TrimmedTextCLIP


class TrimmedTextCLIP(open_clip.CLIP):
    """open_clip's CLIP whose encode_text runs only up to the last position it reads (see the module doc).
    Everything else, the state dict included, is CLIP's."""

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or text.shape[0] == 0:
            return super().encode_text(text, normalize)  # a graph must serve every caption length
        eos_id = getattr(self, "text_eos_id", None)
        length = int(pooled_positions(text, self.text_pool_type, eos_id).max()) + 1
        multiple = getattr(self, "trim_text_multiple", 1)  # a bounded set of lengths (train.compile)
        length = -(-length // multiple) * multiple
        if length >= text.shape[1]:
            return super().encode_text(text, normalize)
        # CLIP.encode_text on the first `length` positions (its steps, in its order)
        text = text[:, :length]
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(text).to(cast_dtype)
        x = x + self.positional_embedding[:length].to(cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        x = text_global_pool(x, text, self.text_pool_type, eos_token_id=eos_id)
        if isinstance(self.text_projection, torch.nn.Linear):
            x = self.text_projection(x)
        elif self.text_projection is not None:
            x = x @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x
