"""Data-parallel plumbing for ``torchrun``: one process per device, found through the environment
variables torchrun sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``). A plain ``python`` run is a world of one
and never touches ``torch.distributed``.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``size`` processes, ``local_rank`` on this machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, checkpoints and plots."""
        return self.rank == 0


def is_main_process() -> bool:
    """Under torchrun every process computes the same (gathered) outputs; rank 0 alone writes them."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(device_type: str) -> World:
    """Join the process group when launched by torchrun (NCCL for CUDA, gloo for CPU); idempotent."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return world


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """Sum ``values`` over processes (in place on the tensor's device; a sync point)."""
    if world.size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather(obj: Any, world: World) -> list[Any]:
    """Every process's ``obj``, in rank order (pickled between processes, never read from a file)."""
    if world.size == 1:
        return [obj]
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(world: World) -> None:
    """Wait for every process (e.g. until rank 0 has written the files the others read next)."""
    if world.size > 1:
        dist.barrier()
