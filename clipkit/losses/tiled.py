"""Memory-flat InfoNCE: the same loss and gradients as `InfoNCELoss`, without materialising the logits.

The CLIP loss is, per direction, mean_i [logsumexp_j(s * a_i . c_j + b) - (s * a_i . c_i' + b)]. The
positive term is a row-wise dot product (O(B*D)); only the log-sum-exp needs the B_rows x B_cols
similarity matrix. `tiled_logsumexp` computes it in tile x tile blocks with an online (running max,
running sum) log-sum-exp, and its backward recomputes each block to form softmax probabilities on the fly.
Peak extra memory is O((B_rows + B_cols) * D + tile^2) instead of O(B_rows * B_cols); the price is one
extra matmul per block in the backward (4 instead of 3).

Distributed: features are gathered with `all_gather_with_grad` exactly as in `InfoNCELoss`. The gathered
copies and their gradients are B_global x D, the same order as the features themselves, so the gather
stays memory-flat; its backward (reduce-scatter) returns each rank the summed gradient of its slice.
The gradient convention is `InfoNCELoss`'s (see clipkit/losses/infonce.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..config.schema import DEFAULT_TILE_SIZE  # the one default, in the config schema; re-exported here
from .infonce import contrastive_block


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Reductions over tens of thousands of exponentials need at least fp32, even for bf16 features.
    return torch.promote_types(x.dtype, torch.float32)


def _lse_forward(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, tile: int) -> torch.Tensor:
    """Row-wise logsumexp of scale * rows @ cols.T, one tile x tile block at a time."""
    lse = rows.new_empty(rows.shape[0])
    for r0 in range(0, rows.shape[0], tile):
        a = rows[r0:r0 + tile] * scale  # scaling the T x D rows is cheaper than the T x T logits
        run_max = a.new_full((a.shape[0],), float("-inf"))
        run_sum = a.new_zeros(a.shape[0])
        for c0 in range(0, cols.shape[0], tile):
            logits = a @ cols[c0:c0 + tile].T
            new_max = torch.maximum(run_max, logits.amax(dim=1))
            # Rescale the running sum to the new maximum before adding this block's terms.
            run_sum = run_sum * torch.exp(run_max - new_max) + logits.sub_(new_max[:, None]).exp_().sum(dim=1)
            run_max = new_max
        lse[r0:r0 + tile] = run_max + run_sum.log()
    return lse


def _lse_backward(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor,
                  grad_lse: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i grad_lse[i] * lse[i] w.r.t. rows, cols and scale, recomputing each block.

    With p = softmax over columns and g = grad_lse: d/drows_i = s g_i sum_j p_ij cols_j,
    d/dcols_j = s sum_i g_i p_ij rows_i, d/ds = sum_i g_i rows_i . (sum_j p_ij cols_j)."""
    grad_rows = torch.empty_like(rows)
    grad_cols = torch.zeros_like(cols)
    grad_scale = rows.new_zeros(())
    for r0 in range(0, rows.shape[0], tile):
        r_rows, g = rows[r0:r0 + tile], grad_lse[r0:r0 + tile, None]
        a, a_weighted = r_rows * scale, r_rows * g  # g folded into the T x D side, never the T x T block
        expected_cols = a.new_zeros(a.shape)  # sum_j p_ij cols_j for this row tile
        for c0 in range(0, cols.shape[0], tile):
            c = cols[c0:c0 + tile]
            p = (a @ c.T).sub_(lse[r0:r0 + tile, None]).exp_()
            # addmm(out=) rather than addmm_: the same in-place kernel, but FlopCounterMode counts it.
            torch.addmm(expected_cols, p, c, out=expected_cols)
            block_grad = grad_cols[c0:c0 + tile]
            torch.addmm(block_grad, p.T, a_weighted, out=block_grad)
        grad_rows[r0:r0 + tile] = expected_cols * g * scale
        grad_scale += (expected_cols * a_weighted).sum()
    return grad_rows, grad_cols.mul_(scale), grad_scale


class _TiledLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, cols, scale, tile):
        dtype = _compute_dtype(rows)
        rows_c, cols_c, scale_c = rows.to(dtype), cols.to(dtype), scale.detach().to(dtype).reshape(())
        lse = _lse_forward(rows_c, cols_c, scale_c, tile)
        ctx.save_for_backward(rows_c, cols_c, scale_c, lse)
        ctx.tile, ctx.dtypes = tile, (rows.dtype, cols.dtype, scale.dtype, scale.shape)
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lse):
        rows, cols, scale, lse = ctx.saved_tensors
        grad_rows, grad_cols, grad_scale = _lse_backward(rows, cols, scale, lse, grad_lse.to(rows.dtype), ctx.tile)
        rows_dtype, cols_dtype, scale_dtype, scale_shape = ctx.dtypes
        return (grad_rows.to(rows_dtype), grad_cols.to(cols_dtype),
                grad_scale.to(scale_dtype).reshape(scale_shape), None)


def tiled_logsumexp(rows: torch.Tensor, cols: torch.Tensor, logit_scale: torch.Tensor,
                    logit_bias: torch.Tensor | None = None, tile_size: int = DEFAULT_TILE_SIZE) -> torch.Tensor:
    """logsumexp over j of (logit_scale * rows_i . cols_j + logit_bias), for every row i, in O(tile^2) extra
    memory; differentiable w.r.t. rows, cols, logit_scale and logit_bias (not twice)."""
    if tile_size < 1:
        raise ValueError(f"tile_size must be a positive number of rows, got {tile_size}")
    logit_scale = torch.as_tensor(logit_scale, dtype=rows.dtype, device=rows.device)
    lse = _TiledLogSumExp.apply(rows, cols, logit_scale, tile_size)
    # lse(x + b) = lse(x) + b: the bias enters outside the kernel, and autograd gives it gradient sum(grad_lse).
    return lse if logit_bias is None else lse + logit_bias


class TiledInfoNCELoss(nn.Module):
    """`InfoNCELoss` (same arguments, same modes, same value and gradients) computed in tiles.

    tile_size trades speed for memory: blocks of tile_size x tile_size logits are live at a time. 1024
    keeps the matmuls efficient on CPU and GPU while a block is only 4 MiB in fp32."""

    def __init__(self, local_loss: bool = False, tile_size: int = DEFAULT_TILE_SIZE,
                 group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if tile_size < 1:
            raise ValueError(f"tile_size must be a positive number of rows, got {tile_size}")
        self.local_loss = local_loss
        self.tile_size = tile_size
        self.group = group

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        block = contrastive_block(image_features, text_features, self.local_loss, self.group)
        lse_i2t = tiled_logsumexp(block.image_rows, block.text_cols, logit_scale, logit_bias, self.tile_size)
        lse_t2i = tiled_logsumexp(block.text_rows, block.image_cols, logit_scale, logit_bias, self.tile_size)
        # Row i's positive (column offset + i) pairs image_rows[i] with text_rows[i] in both directions.
        positives = logit_scale * (block.image_rows * block.text_rows).sum(dim=1)
        if logit_bias is not None:
            positives = positives + logit_bias
        return (lse_i2t.mean() + lse_t2i.mean()) / 2 - positives.mean()
