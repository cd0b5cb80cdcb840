"""One process or many under `torchrun`: this process's rank and device, the process group, FSDP2 sharding.

The same command runs both ways: WORLD_SIZE > 1 (set by torchrun) makes a process group, NCCL on GPUs and gloo
on CPUs, and each rank trains on the GPU its LOCAL_RANK names.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ..device import resolve_device


def setup_distributed(device: str | None = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device). `device` is --device: cpu, cuda or auto (CUDA when a GPU is usable); asking
    for cuda without one is a clear error, raised before anything loads."""
    chosen = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, chosen
    cuda = chosen.type == "cuda"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    return rank, world, torch.device("cpu")


def teardown() -> None:
    """Leave the process group (if one was made), so torchrun sees a clean exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(model: nn.Module, device: torch.device) -> None:
    """FSDP2: each decoder block a unit of its own, then the rest (embeddings, final norm, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
