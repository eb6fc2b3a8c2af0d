"""DDP helpers that degrade to no-ops in a single process.

Only the training loop, the queue and SEC call these; methods and losses stay
unaware of distribution apart from the gather helpers they are handed.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist
from lightly.utils import dist as lightly_dist


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return lightly_dist.rank()


def world_size() -> int:
    return lightly_dist.world_size()


def is_main() -> bool:
    return rank() == 0


def setup(device_type: str) -> int:
    """Initialise the process group from torchrun's environment; returns local rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_initialized():
        tdist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return int(os.environ.get("LOCAL_RANK", "0"))


def cleanup() -> None:
    if is_initialized():
        tdist.destroy_process_group()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) local -> (world*B, ...) global; gradients flow back to each rank's part."""
    if world_size() == 1:
        return x
    return torch.cat(lightly_dist.gather(x), 0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) local -> (world*B, ...) global, no autograd (queue keys, kNN banks)."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    tdist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    x = x.clone()
    tdist.all_reduce(x)
    return x
