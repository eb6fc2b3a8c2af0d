"""Negatives queue / memory bank (MoCo, He et al. 2020, Sec. 3.2).

Hand-written rather than lightly's MemoryBankModule (lightly 1.6): that one
drops the keys that do not fit before the end of the bank at wrap-around (when
the size is not a multiple of the batch) and reads its pointer with int(), a
host sync every step. Here the ring buffer writes modulo its size on the
device, and the dim is checked with a clear error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core import dist


class NegativeQueue(nn.Module):
    """Persistent FIFO ring buffer of L2-normalised keys.

    keys: (size, dim) buffer, initialised with random unit vectors as in MoCo's
    reference code; ptr: () next write position. Both live in ``state_dict``.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"NegativeQueue needs size >= 1 and dim >= 1, got size={size}, dim={dim}")
        self.size, self.dim = size, dim
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def negatives(self) -> torch.Tensor:
        """(size, dim) snapshot; a copy, so enqueueing later never breaks autograd."""
        return self.keys.clone()

    @torch.no_grad()
    def enqueue(self, k: torch.Tensor, gather: bool = True) -> None:
        """k: (B, dim) keys of this rank (normalised here). Under DDP the keys of all
        ranks are gathered first so every rank holds the same queue."""
        if k.ndim != 2 or k.shape[1] != self.dim:
            raise ValueError(
                f"NegativeQueue of dim {self.dim} got keys of shape {tuple(k.shape)}; "
                f"the projector output dim (method.proj_dim) must equal the queue dim"
            )
        if gather:
            k = dist.gather_no_grad(k)
        if k.shape[0] > self.size:
            raise ValueError(
                f"cannot enqueue {k.shape[0]} keys into a queue of size {self.size}: "
                f"raise method.queue_size to at least {k.shape[0]}"
            )
        k = F.normalize(k.detach().float(), dim=1)
        idx = (self.ptr + torch.arange(k.shape[0], device=k.device)) % self.size
        self.keys.index_copy_(0, idx, k.to(self.keys.dtype))
        self.ptr.copy_((self.ptr + k.shape[0]) % self.size)
