"""Statistics of embeddings on (and off) the sphere, logged by every run with or without a regulariser."""

from __future__ import annotations

from typing import Dict

import torch


@torch.no_grad()
def norm_stats(z: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Mean and std of the row norms of z: (B, D). Device tensors (no host sync)."""
    n = z.detach().float().norm(dim=1)
    return {"norm_mean": n.mean(), "norm_std": n.std(unbiased=False)}
