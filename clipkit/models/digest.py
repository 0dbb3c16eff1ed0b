"""The digest that names a model's weights: what embeddings, feature caches and the retrieval service compare.

    weights_sha256(load_model("runs/x").model)   # the same for runs/x, its step directory, its exported
                                                 # model.safetensors and its open_clip export

Definition (version 1): sha256 over the model's state dict (parameters and persistent buffers, as
`model.state_dict()` returns them after loading), its entries in sorted key order; each entry contributes

    f"{key}\\t{dtype}\\t{shape}\\n"  (UTF-8; dtype as torch prints it, e.g. torch.float32; shape as a tuple,
                                   e.g. (512, 768), () for a scalar)
    then the tensor's bytes: C-contiguous, the machine's (little-endian) byte order.

It depends on the weights as loaded, not on the file they came from (its header, name, tensor order or
container), so the same weights give the same digest whichever form they are given in; a tensor changed by
one bit, renamed, reshaped or cast changes it.
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import torch


def weights_sha256(model: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """The hex sha256 of a model's (or a state dict's) weights, as defined above."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    h = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach()
        h.update(f"{key}\t{tensor.dtype}\t{tuple(tensor.shape)}\n".encode())
        flat = tensor.cpu().contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy())  # the raw bytes of any dtype (bfloat16 included), no copy
    return h.hexdigest()
