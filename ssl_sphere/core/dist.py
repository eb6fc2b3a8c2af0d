"""DDP helpers that degrade to no-ops in a single process.

The bottom layer: the engine sets the process group up and tears it down; methods, the queue,
SEC and the evaluation gather through these helpers, which are identities in one process.
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


def setup(device_type: str) -> bool:
    """Initialise the process group from torchrun's environment (nccl on CUDA, else gloo).
    Returns True when this call created it (the caller then ends it with :func:`teardown`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_initialized():
        tdist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        return True
    return False


def teardown() -> None:
    """destroy_process_group() at the end of a DDP run (no-op in a single process)."""
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


@torch.no_grad()
def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    x = x.clone()
    tdist.all_reduce(x, op=tdist.ReduceOp.MAX)
    return x


def cpu_group():
    """A gloo process group over all ranks for small host-side decisions (stop, save): an
    all-reduce there never waits on the GPU stream. None in a single process. Collective:
    every rank must call it at the same point."""
    if world_size() == 1:
        return None
    return tdist.new_group(backend="gloo")


@torch.no_grad()
def all_reduce_max_cpu(values, group) -> list:
    """Element-wise max over ranks of a list of ints, on the host (``group`` from cpu_group)."""
    t = torch.tensor(values, dtype=torch.long)
    if group is not None:
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=group)
    return t.tolist()


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` on every rank, in rank order ([obj] in a single process)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (e.g. the run directory rank 0 chose)."""
    if world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        tdist.barrier()


@torch.no_grad()
def gather_sharded(local: torch.Tensor, n: int) -> torch.Tensor:
    """Reassemble rows computed round-robin (rank r holds global rows r, r+W, r+2W, ...)
    into the (n, ...) global tensor on every rank."""
    w = world_size()
    if w == 1:
        return local
    m = (n + w - 1) // w
    pad = local.new_zeros((m - local.shape[0], *local.shape[1:]))
    stacked = gather_no_grad(torch.cat([local, pad])).view(w, m, *local.shape[1:])
    return stacked.transpose(0, 1).reshape(w * m, *local.shape[1:])[:n]
