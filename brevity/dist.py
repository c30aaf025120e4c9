"""The process group: the same code runs under `python` (one process) and `torchrun` (many), NCCL
on CUDA, gloo on CPU. On one process every function here is a no-op or the identity.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Initialise torch.distributed from torchrun's environment: NCCL on CUDA, gloo on CPU."""
    if "RANK" not in os.environ:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return Dist(device=device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, local, device)


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(d: Dist, obj):
    """Gather a picklable object from every rank; returns the list on every rank."""
    if d.world_size == 1:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(d: Dist, tensor: torch.Tensor) -> torch.Tensor:
    if d.world_size > 1:
        dist.all_reduce(tensor)
    return tensor
