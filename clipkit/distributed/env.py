"""Rank and world from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or SLURM (SLURM_PROCID/...)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        if self.backend == "nccl" or (self.backend is None and torch.cuda.is_available()):
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def _from_environment() -> tuple[int, int, int]:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed() -> DistEnv:
    """Join the process group when launched with several processes: nccl on GPU, gloo on CPU."""
    rank, world, local_rank = _from_environment()
    if world == 1:
        return DistEnv()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # Binding the process group to this rank's GPU lets NCCL set up its communicator for the right
        # device (instead of guessing it from the global rank, which hangs on uneven mappings).
        device_id = torch.device("cuda", local_rank) if backend == "nccl" else None
        dist.init_process_group(backend=backend, rank=rank, world_size=world, device_id=device_id)
    return DistEnv(rank, world, local_rank, backend)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] in one process."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
