"""Collectives that the losses use, with autograd: gathered features carry gradient back to their rank."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol


def world_info(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world_size) in `group`, or (0, 1) outside a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0 (rank order). The backward pass reduce-scatters
    (sums) the gradient, so each rank receives the gradient of its own slice from every rank's loss."""
    _, world = world_info(group)
    if world == 1:
        return x
    out = funcol.all_gather_single_autograd(x.contiguous(), 0, group or dist.group.WORLD)
    return funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out


def _to_global(rank: int, group: dist.ProcessGroup | None) -> int:
    # P2P ops address peers by global rank; neighbours are computed inside `group`.
    return rank if group is None or group is dist.group.WORLD else dist.get_global_rank(group, rank)


def _exchange(send_to: tuple[int, ...], recv_from: tuple[int, ...], tensors: tuple[torch.Tensor, ...],
              group: dist.ProcessGroup | None) -> tuple[torch.Tensor, ...]:
    """Send tensors[k] to send_to[k] and receive a tensor of the same shape from recv_from[k], all at once
    (batched, so every rank posts its sends and receives together and no ordering can deadlock)."""
    tensors = tuple(t.contiguous() for t in tensors)
    received = tuple(torch.empty_like(t) for t in tensors)
    ops = [dist.P2POp(dist.isend, t, _to_global(peer, group), group) for t, peer in zip(tensors, send_to)]
    ops += [dist.P2POp(dist.irecv, r, _to_global(peer, group), group) for r, peer in zip(received, recv_from)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received


class _NeighbourExchange(torch.autograd.Function):
    """Autograd-aware point-to-point exchange: the gradient of a received tensor travels back to its
    sender, so the sender's features get the gradient of every loss term that used them on other ranks."""

    @staticmethod
    def forward(ctx, send_to, recv_from, group, *tensors):
        ctx.send_to, ctx.recv_from, ctx.group = send_to, recv_from, group
        return _exchange(send_to, recv_from, tensors, group)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, None, *_NeighbourExchange.apply(ctx.recv_from, ctx.send_to, ctx.group, *grads))


def neighbour_exchange_with_grad(send_to: list[int], recv_from: list[int], tensors: list[torch.Tensor],
                                 group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, ...]:
    """Send tensors[k] to rank send_to[k] and return what rank recv_from[k] sent, with gradient.

    Ranks are ranks in `group`. Every rank must call this with matching peers, and a received tensor has the
    shape of the tensor sent in the same slot (every rank holds the same batch size)."""
    if len(send_to) != len(tensors) or len(recv_from) != len(tensors):
        raise ValueError(f"neighbour_exchange_with_grad: got {len(tensors)} tensors for {len(send_to)} "
                         f"destinations and {len(recv_from)} sources; give one of each per tensor")
    return _NeighbourExchange.apply(tuple(send_to), tuple(recv_from), group, *tensors)
