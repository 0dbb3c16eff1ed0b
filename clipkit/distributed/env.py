"""Rank and world from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or SLURM (SLURM_PROCID/...)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


def resolve_device(requested: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """The one rule for where a command computes: the device asked for (--device), else this rank's GPU when
    there is one, else the CPU. Every command that picks a device, and every rank of a process group, asks here."""
    if requested is not None:
        return torch.device(requested)
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


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
        if self.backend == "nccl":  # a GPU process group: each rank on its own GPU
            return torch.device("cuda", self.local_rank)
        if self.backend == "gloo":  # a CPU process group: every rank on the CPU
            return torch.device("cpu")
        return resolve_device(local_rank=self.local_rank)


def _from_environment() -> tuple[int, int, int]:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed(timeout_s: float | None = None) -> DistEnv:
    """Join the process group when launched with several processes: nccl on GPU, gloo on CPU.

    timeout_s (the run's dist.timeout_s): how long any collective of this group may wait for the other
    ranks before it fails with an error, instead of the backend's default (30 min for gloo, 10 min for
    NCCL); a rank that died or hangs then ends the job in that time rather than idling the others.
    None keeps the backend's default."""
    rank, world, local_rank = _from_environment()
    if world == 1:
        return DistEnv()
    backend = "nccl" if resolve_device(local_rank=local_rank).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # Binding the process group to this rank's GPU lets NCCL set up its communicator for the right
        # device (instead of guessing it from the global rank, which hangs on uneven mappings).
        device_id = torch.device("cuda", local_rank) if backend == "nccl" else None
        timeout = None if timeout_s is None else timedelta(seconds=float(timeout_s))
        dist.init_process_group(backend=backend, rank=rank, world_size=world, device_id=device_id, timeout=timeout,
                                store=_attempt_store(rank, world, timeout))
    return DistEnv(rank, world, local_rank, backend)


def _attempt_store(rank: int, world: int, timeout: timedelta | None):
    """Under torchrun, the rendezvous store with keys private to this attempt (None elsewhere: env://).

    torchrun --max-restarts keeps its store across restarts: without a per-attempt prefix, a restarted
    rank can read the address a peer of the failed attempt published and fail to connect to it."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    kwargs = {} if timeout is None else {"timeout": timeout}
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, **kwargs))
    return dist.PrefixStore(f"clipkit/attempt_{attempt}", store)


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
