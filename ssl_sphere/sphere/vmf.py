"""The vMF loss (Zhe, Chen, Yan, "Directional statistics-based deep metric learning"): a mixture of
von Mises-Fisher distributions with a shared concentration, whose mean directions are re-estimated
from the whole embedding set ("global structure learning"); here on spherical k-means pseudo-classes."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.numerics import float32


@float32
def vmf_loss(z: torch.Tensor, means: torch.Tensor, labels: torch.Tensor, kappa: float) -> torch.Tensor:
    """vMF mixture with shared concentration (Zhe, Chen, Yan): the normaliser C_d(kappa)
    cancels, leaving -log softmax_c(kappa <mu_c, z_hat>)[y], mean over rows.

    z: (B, D) raw embeddings; means: (C, D) mean directions (normalised here);
    labels: (B,) class / pseudo-class of each row."""
    z = F.normalize(z.float(), dim=1)
    mu = F.normalize(means.float(), dim=1)
    return F.cross_entropy(kappa * z @ mu.T, labels)


@torch.no_grad()
def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """x: (N, d) embeddings (normalised here). Returns (means (k, d) unit, labels (N,)).
    Deterministic under ``seed``: k-means++-style seeding by cosine distance, then
    alternate argmax-cosine assignment and mean = normalised sum; empty clusters
    are re-seeded with the points farthest from their means."""
    x = F.normalize(x.float(), dim=1)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"spherical_kmeans: k={k} must be in [1, {n}] (the number of embeddings)")
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx = [int(torch.randint(n, (1,), generator=g))]
    best = x @ x[idx[0]]
    for _ in range(1, k):
        dist2 = (1 - best).clamp_min(0) + 1e-12
        nxt = int(torch.multinomial(dist2.cpu(), 1, generator=g))
        idx.append(nxt)
        best = torch.maximum(best, x @ x[nxt])
    means = x[idx].clone()
    for _ in range(iters):
        sim = x @ means.T
        labels = sim.argmax(1)
        sums = torch.zeros_like(means).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            far = sim.max(1).values.argsort()[: len(empty)]
            sums[empty] = x[far]
        means = F.normalize(sums, dim=1)
    return means, (x @ means.T).argmax(1)


class VMF(nn.Module):
    """vMF auxiliary loss with periodically refreshed mean directions ("global
    structure learning"). Buffers (checkpointed): means (k, d), labels (N,) pseudo-label
    of every training image, and whether they were initialised."""

    def __init__(self, k: int, dim: int, n_train: int, kappa: float, weight: float):
        super().__init__()
        self.kappa, self.weight = kappa, weight
        self.register_buffer("means", torch.zeros(k, dim))
        self.register_buffer("labels", torch.zeros(n_train, dtype=torch.long))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def refresh(self, embeddings: torch.Tensor, seed: int) -> None:
        """embeddings: (N_train, d) momentum/eval embeddings of the whole training set."""
        means, labels = spherical_kmeans(embeddings, self.means.shape[0], seed=seed)
        self.means.copy_(means)
        self.labels.copy_(labels)
        self.initialised.fill_(True)

    def forward(self, z: torch.Tensor, idx: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """z: (V*B, d) raw embeddings of V views of the images with dataset indices idx: (B,)."""
        y = self.labels[idx].repeat(z.shape[0] // idx.shape[0])
        loss = vmf_loss(z, self.means, y, self.kappa)
        return self.weight * loss, {"vmf_loss": loss.detach()}
