"""One rank of the distributed loss tests: every loss on this rank's slice of a seeded global batch.

    python -m torch.distributed.run --standalone --nproc_per_node=W tests/dist/losses_worker.py \
        --out DIR --batch-per-rank B --dim D --seed S --tile-size T

Writes DIR/rank{r}.pt: {case: {"loss", "image_grad", "text_grad", "scale_grad", "bias_grad"}} for the
local features, in float64 (tiled cases also record their "tile_size"). The test compares them with the
single-process loss on the whole batch.
"""
from __future__ import annotations

from clipkit.startup import paused_collection

with paused_collection():  # start-up imports, as the CLI makes them (clipkit/startup.py)
    import argparse

    import torch
    import torch.distributed as dist

    from clipkit.distributed.gather import world_info
    from clipkit.losses import create_loss


def global_batch(world: int, batch_per_rank: int, dim: int, seed: int):
    """The same inputs the test builds: L2-normalised float64 features, temperature and bias."""
    g = torch.Generator().manual_seed(seed)
    n = world * batch_per_rank
    img = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    # Correlate the pairs so that positives matter and the loss is not near its random value.
    txt = torch.nn.functional.normalize(txt + 2 * img, dim=-1)
    return img, txt, torch.tensor(7.5, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)


CASES = {  # case name -> create_loss arguments
    "infonce_full": ("infonce", {"local_loss": False}),
    "infonce_local": ("infonce", {"local_loss": True}),
    "tiled_full": ("infonce_tiled", {"local_loss": False}),
    "tiled_local": ("infonce_tiled", {"local_loss": True}),
    "siglip": ("siglip", {}),
}


def run_case(name: str, kwargs: dict, local: tuple[torch.Tensor, ...]) -> dict:
    img, txt, scale, bias = (t.clone().requires_grad_() for t in local)
    loss_fn = create_loss(name, **kwargs)
    loss = loss_fn(img, txt, scale, bias)
    grads = torch.autograd.grad(loss, [img, txt, scale, bias])
    result = dict(zip(["loss", "image_grad", "text_grad", "scale_grad", "bias_grad"], [loss.detach(), *grads]))
    if hasattr(loss_fn, "tile_size"):
        result["tile_size"] = loss_fn.tile_size  # what the loss really used, for the test to check
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--batch-per-rank", type=int, default=6)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile-size", type=int, default=5)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = world_info()
    img, txt, scale, bias = global_batch(world, args.batch_per_rank, args.dim, args.seed)
    rows = slice(rank * args.batch_per_rank, (rank + 1) * args.batch_per_rank)
    local = (img[rows], txt[rows], scale, bias)
    results = {}
    for case, (name, kwargs) in CASES.items():
        if name == "infonce_tiled":
            kwargs = kwargs | {"tile_size": args.tile_size}
        results[case] = run_case(name, kwargs, local)
    torch.save(results, f"{args.out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
