"""Statistics of embeddings on (and off) the sphere, logged by every run with or without a regulariser."""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F


@torch.no_grad()
def norm_stats(z: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Mean and std of the row norms of z: (B, D). Device tensors (no host sync)."""
    n = z.detach().float().norm(dim=1)
    return {"norm_mean": n.mean(), "norm_std": n.std(unbiased=False)}


# ----------------------------------------------------------------------------- collapse (docs/guide/evaluation.md)
@torch.no_grad()
def normalised_std(z: torch.Tensor) -> torch.Tensor:
    """SimSiam's collapse signal (Sec. 4.1): the std over the batch of the L2-normalised embeddings,
    averaged over dimensions, times sqrt(D): about 1 for embeddings spread on the sphere (each
    coordinate of a random unit vector has std 1/sqrt(D)), 0 when they collapse to one point.
    z: (N, D) raw embeddings -> () device scalar."""
    u = F.normalize(z.detach().float(), dim=1)
    return u.std(dim=0).mean() * u.shape[1] ** 0.5


@torch.no_grad()
def effective_rank(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """RankMe (Garrido et al. 2023, Eq. 1): exp of the entropy of the normalised singular values of
    z: (N, D), in [1, min(N, D)]; about min(N, D) when every direction is used, 1 at a full
    collapse. () device scalar (float32 SVD)."""
    s = torch.linalg.svdvals(z.detach().float())
    p = s / s.sum().clamp_min(eps) + eps
    return torch.exp(-(p * p.log()).sum())


def code_entropy(probs: torch.Tensor) -> torch.Tensor:
    """The entropy of the batch-mean code distribution over K prototypes, divided by log K: 1 when
    every prototype is used equally often, 0 when one takes every sample (a collapse of DINO / SwAV
    codes). probs: (N, K) rows summing to 1 -> () detached device scalar."""
    p = probs.detach().float().mean(0)
    return -(p * p.clamp_min(1e-12).log()).sum() / math.log(p.shape[0])
