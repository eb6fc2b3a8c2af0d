"""Hypersphere regularisers and their geometry: SEC, SEE (simplex centres, expansion), the vMF loss
module with spherical k-means, and embedding-norm statistics.

SEC (Zhang, Li, Zhang, "Deep Metric Learning with Spherical Embedding",
NeurIPS 2020, Sec. 3.2): for raw embeddings f_i, mu = mean_i ||f_i|| (no
gradient) and L_sec = mean_i (||f_i|| - mu)^2.  The gradient of a cosine w.r.t.
f is tangent to the sphere and scales as 1/||f||, so mixed norms give
unbalanced direction updates; SEC pulls all norms to a common value while its
own gradient is radial (it never changes a direction).
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import dist
from .losses import vmf_loss


def sec_loss(z: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """L_sec = mean_i (||z_i|| - mu)^2.

    z: (B, D) raw embeddings; mu: () target norm (treated as a constant)."""
    return (z.float().norm(dim=1) - mu.detach()).pow(2).mean()


def sec_weight(weight: float, ramp: str, progress: float) -> float:
    """eta at ``progress`` in [0, 1]: linear ramp 0 -> eta (authors' SSL code) or constant."""
    return weight * min(max(progress, 0.0), 1.0) if ramp == "linear" else weight


def ema_update(mu_prev: torch.Tensor, batch_mean: torch.Tensor, rho: float) -> torch.Tensor:
    """mu_t = (1 - rho) mu_{t-1} + rho * batch mean (rho weights the CURRENT batch)."""
    return (1.0 - rho) * mu_prev + rho * batch_mean


@torch.no_grad()
def norm_stats(z: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Mean and std of the row norms of z: (B, D). Device tensors (no host sync)."""
    n = z.detach().float().norm(dim=1)
    return {"norm_mean": n.mean(), "norm_std": n.std(unbiased=False)}


class SEC(nn.Module):
    """Stateful SEC regulariser: holds the EMA mean norm as a (checkpointed) buffer.

    Under DDP mu is the mean norm over the global batch; only local embeddings
    carry gradient.  ``forward`` returns the weighted loss eta(progress) * L_sec.
    """

    def __init__(self, weight: float, ema: float = 1.0, ramp: str = "linear"):
        super().__init__()
        self.weight, self.rho, self.ramp = weight, ema, ramp
        self.register_buffer("mu", torch.zeros(()))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self, z: torch.Tensor, progress: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """z: (B, D) raw embeddings. Returns (eta * L_sec, logs)."""
        norms = z.detach().float().norm(dim=1)
        total = dist.all_reduce_sum(torch.stack([norms.sum(), norms.new_full((), float(norms.numel()))]))
        batch_mean = total[0] / total[1]
        if self.training:
            # first step: no history to average with, so mu starts at the batch mean
            prev = torch.where(self.initialised, self.mu, batch_mean)
            self.mu.copy_(ema_update(prev, batch_mean, self.rho))
            self.initialised.fill_(True)
        # batch variant, or an EMA that has not seen a training batch yet: the batch mean
        mu = torch.where(self.initialised, self.mu, batch_mean) if self.rho < 1.0 else batch_mean
        loss = sec_loss(z, mu)
        eta = sec_weight(self.weight, self.ramp, progress)
        return eta * loss, {"sec_loss": loss.detach(), "sec_mu": mu.detach(), "sec_weight": torch.tensor(eta)}


# ----------------------------------------------------------------------------- SEE
# Spherical embedding expansion (Le, Woo, PAKDD 2024).


def simplex_centres(L: int, d: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(L, d) unit vectors with pairwise inner product -1/(L-1): the regular simplex
    ("max-Mahalanobis" centres). Recursion: mu_1 = e_1; for i > 1 the first i-1
    coordinates solve <mu_i, mu_j> = -1/(L-1) for all j < i (a triangular system),
    and mu_i[i] = sqrt(1 - ||mu_i||^2). Needs d >= L - 1."""
    if L < 2:
        raise ValueError(f"simplex_centres needs L >= 2 points, got L={L}")
    if d < L - 1:
        raise ValueError(f"simplex_centres: {L} points need d >= L - 1 = {L - 1} dimensions, got d={d}")
    m = torch.zeros(L, max(d, L), dtype=torch.float64)
    m[0, 0] = 1.0
    c = -1.0 / (L - 1)
    for i in range(1, L):
        rhs = torch.full((i, 1), c, dtype=torch.float64)
        m[i, :i] = torch.linalg.solve_triangular(m[:i, :i], rhs, upper=False).squeeze(1)
        m[i, i] = (1.0 - m[i, :i].pow(2).sum()).clamp_min(0).sqrt()
    return m[:, :d].to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def _simplex_on(L: int, d: int, device: torch.device) -> torch.Tensor:
    """simplex_centres built once per (L, d, device) and never written to: built on the host,
    its copy to a GPU would otherwise block every step."""
    return simplex_centres(L, d, device=device)


def see_expand(z: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    """Synthetic points around anchors: (B, n, d).

    z: (B, d) unit embeddings; w: (B, d) unit anchors. Each s_k = (z.w) w + ||r|| u_k,
    with r = z - (z.w) w and u_k the other n vertices of a regular (n+1)-simplex in
    w-perp whose first vertex is r/||r||: every s_k is unit, has z's cosine to w, and
    the s_k (minus their w component) have pairwise cosine -1/n with each other and
    with r. The basis of w-perp comes from one batched QR of [w, r, random] (no loop
    over samples); where z is parallel to w (r = 0) the random column takes r's place
    and every s_k equals z. Needs d >= n + 2."""
    b, d = z.shape
    if d < n + 2:
        raise ValueError(f"see_expand: n={n} synthetic points need embedding dim d >= n + 2 = {n + 2}, got d={d}; "
                         f"lower see.n or raise method.proj_dim")
    z, w = z.float(), w.float()
    cos = (z * w).sum(1, keepdim=True)  # (B, 1)
    r = z - cos * w
    rn = r.norm(dim=1, keepdim=True)
    rand = torch.randn(b, d, n, device=z.device)
    degenerate = rn < 1e-6
    r_dir = torch.where(degenerate, rand[:, :, 0], r / rn.clamp_min(1e-12))
    mat = torch.cat([w.unsqueeze(2), r_dir.unsqueeze(2), rand[:, :, 1:]], dim=2)  # (B, d, n+1)
    q, rr = torch.linalg.qr(mat)
    q = q * torch.sign(torch.diagonal(rr, dim1=1, dim2=2)).unsqueeze(1)  # columns 0, 1 = +w, +r_dir
    basis = q[:, :, 1:]  # (B, d, n): orthonormal in w-perp, first column r/||r||
    simplex = _simplex_on(n + 1, n, z.device)  # vertex 0 = e_1 -> r/||r||
    u = torch.einsum("kj,bdj->bkd", simplex[1:], basis)  # (B, n, d)
    rn = torch.where(degenerate, torch.zeros_like(rn), rn)
    return cos.unsqueeze(2) * w.unsqueeze(1) + rn.unsqueeze(2) * u


def see_select(confidence: torch.Tensor, fraction: float) -> torch.Tensor:
    """(k,) indices of the k = ceil(fraction * B) most confident rows (cosine of a sample to
    its anchor); k is known on the host, so there is no device sync."""
    k = min(confidence.shape[0], int(math.ceil(fraction * confidence.shape[0])))
    return confidence.topk(k).indices


# ----------------------------------------------------------------------------- vMF
# Directional-statistics metric learning (Zhe, Chen, Yan): a vMF mixture with shared kappa.


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
