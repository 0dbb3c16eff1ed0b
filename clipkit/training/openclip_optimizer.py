"""AdamW moments from an OpenCLIP trainer checkpoint (epoch_N.pt), for a run that continues it.

open_clip_train builds its AdamW over two groups of the model's trainable parameters, in
`model.named_parameters()` order: first those it excludes from weight decay (fewer than 2 dims, or "bn",
"ln", "bias" or "logit_scale" in the name), then the rest. Its optimizer state is indexed by position in
those groups, so each saved moment is matched back to its parameter's name, and from there to clipkit's
optimizer, which groups the same parameters its own way. The moments come over only when everything
matches (AdamW state, the same trainable parameters with the same shapes); otherwise the optimizer starts
fresh, and the reason is returned to be said in the log.
"""
from __future__ import annotations

import torch
from torch import nn

from .fsdp import shard_like

ADAM_STATE = {"step", "exp_avg", "exp_avg_sq"}


def _excluded(name: str, p: torch.Tensor) -> bool:
    # open_clip_train/main.py's `exclude`
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def openclip_order(model: nn.Module) -> list[str]:
    """The names of the trainable parameters in the order open_clip_train's optimizer holds them."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, p in named if _excluded(n, p)] + [n for n, p in named if not _excluded(n, p)]


def _moments_by_name(saved: dict, model: nn.Module) -> dict[str, dict] | str:
    """{parameter name: its AdamW state} from the saved optimizer, or why it does not fit."""
    if not isinstance(saved, dict) or "state" not in saved or "param_groups" not in saved:
        return "the checkpoint holds no optimizer state dict"
    groups = saved["param_groups"]
    if any("betas" not in g for g in groups):
        return "its optimizer is not Adam/AdamW"
    ids = [i for g in groups for i in g["params"]]
    names = openclip_order(model)
    if len(ids) != len(names):
        return f"its optimizer holds {len(ids)} parameters, this model trains {len(names)}"
    params = dict(model.named_parameters())
    out = {}
    for index, name in zip(ids, names):
        state = saved["state"].get(index)
        if state is None:
            continue  # a parameter that never had a gradient: no moments yet
        if set(state) != ADAM_STATE:
            return f"its state for {name} has {sorted(state)}, not AdamW's {sorted(ADAM_STATE)}"
        if state["exp_avg"].shape != params[name].shape:
            return (f"its moments for {name} have shape {tuple(state['exp_avg'].shape)}, the parameter "
                    f"{tuple(params[name].shape)}")
        out[name] = state
    return out


def load_openclip_moments(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict) -> str | None:
    """Put the saved AdamW moments into `optimizer` (built over `model`); None when done, else why not."""
    if not isinstance(optimizer, torch.optim.AdamW):
        return f"this run's optimizer is {type(optimizer).__name__}, not torch's AdamW"
    moments = _moments_by_name(saved, model)
    if isinstance(moments, str):
        return moments
    by_param = {p: n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = moments.get(by_param[p])
            if state is not None:
                # the step count as AdamW keeps it (a float tensor), moments in the parameter's dtype and device
                on_device = group.get("fused") or group.get("capturable")  # else torch keeps the step on the CPU
                step = torch.as_tensor(state["step"], dtype=torch.float32).clone()
                optimizer.state[p] = {"step": step.to(p.device) if on_device else step.cpu(),
                                      "exp_avg": shard_like(state["exp_avg"], p),
                                      "exp_avg_sq": shard_like(state["exp_avg_sq"], p)}
    return None
