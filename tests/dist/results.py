"""Run the distributed loss worker once per world size per test session and load every rank's results."""
from __future__ import annotations

import functools
import tempfile

import torch

from .losses_worker import global_batch
from .torchrun import run_torchrun

BATCH_PER_RANK, DIM, SEED, TILE = 6, 8, 0, 5  # TILE divides neither the local (6) nor the global batch


@functools.lru_cache(maxsize=None)
def distributed_results(world: int) -> tuple[list[dict], str]:
    """([rank 0 results, rank 1 results, ...], the launcher's stderr) for a `world`-rank gloo job."""
    with tempfile.TemporaryDirectory() as out:
        proc = run_torchrun("losses_worker.py", world, "--out", out, "--batch-per-rank", str(BATCH_PER_RANK),
                            "--dim", str(DIM), "--seed", str(SEED), "--tile-size", str(TILE))
        ranks = [torch.load(f"{out}/rank{r}.pt") for r in range(world)]
    return ranks, proc.stderr


def reference_inputs(world: int):
    """The global batch the workers sliced, as float64 leaves for the single-process reference."""
    return tuple(t.clone().requires_grad_() for t in global_batch(world, BATCH_PER_RANK, DIM, SEED))


def compare_with_single_process(ranks: list[dict], case: str, loss_fn, tol: float = 1e-10) -> None:
    """Assert the gradient convention of clipkit.losses against `loss_fn` on the whole batch:
    mean of per-rank losses == L; rank r's feature gradient / W == dL/d(slice r);
    mean of per-rank scale and bias gradients == dL/ds, dL/db."""
    world = len(ranks)
    img, txt, scale, bias = reference_inputs(world)
    loss = loss_fn(img, txt, scale, bias)
    g_img, g_txt, g_scale, g_bias = torch.autograd.grad(loss, [img, txt, scale, bias])
    per_rank = [r[case] for r in ranks]
    mean = lambda key: torch.stack([r[key] for r in per_rank]).mean(0)  # noqa: E731
    assert abs(mean("loss").item() - loss.item()) < tol, (case, mean("loss").item(), loss.item())
    for r, res in enumerate(per_rank):
        rows = slice(r * BATCH_PER_RANK, (r + 1) * BATCH_PER_RANK)
        torch.testing.assert_close(res["image_grad"] / world, g_img[rows], rtol=0, atol=tol)
        torch.testing.assert_close(res["text_grad"] / world, g_txt[rows], rtol=0, atol=tol)
    torch.testing.assert_close(mean("scale_grad"), g_scale, rtol=0, atol=tol)
    torch.testing.assert_close(mean("bias_grad"), g_bias, rtol=0, atol=tol)
