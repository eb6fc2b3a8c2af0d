"""Pure loss functions of tensors. Inputs are RAW embeddings: every loss
normalises internally, so norms stay free for SEC to act on.

Every loss computes its similarities and logits in float32 with autocast off: under bf16 autocast a
(B x K) logit matrix divided by a temperature of 0.1 would carry bf16's ~3 significant digits.
Why not lightly's modules: NTXentLoss and NegativeCosineSimilarity compute in the autocast dtype, are
modules (NTXentLoss carries a memory bank) rather than pure functions, and NegativeCosineSimilarity
is -cos where BYOL's Eq. 2 is 2 - 2cos (twice the gradient, which the BYOL lr recipes assume);
tests/test_losses.py checks each loss here against lightly's on random inputs."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..core.numerics import float32
from ..sphere.see import see_expand, see_select

Gather = Callable[[torch.Tensor], torch.Tensor]


def identity(x: torch.Tensor) -> torch.Tensor:
    """The one-process gather / all-reduce: x itself."""
    return x


@float32
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: Gather = identity,
            rank: int = 0) -> torch.Tensor:
    """SimCLR NT-Xent (Chen et al. 2020, Eq. 1), mean over the 2B anchors.

    z1, z2: (B, D) raw embeddings of the two views of the local batch.
    gather: maps (B, D) -> (world*B, D) with gradient (identity in one process);
    rank: index of the local batch inside the gathered one.
    Each anchor's candidates are all 2N-1 other views of the global batch.
    """
    b = z1.shape[0]
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    local = torch.cat([z1, z2], 0)  # (2B, D)
    g1, g2 = gather(z1), gather(z2)
    n = g1.shape[0]
    cands = torch.cat([g1, g2], 0)  # (2N, D)
    logits = local @ cands.T / temperature  # (2B, 2N)
    own = torch.arange(b, device=z1.device) + rank * b
    self_idx = torch.cat([own, own + n])  # an anchor's own column
    pos_idx = torch.cat([own + n, own])  # its other view
    logits = logits.masked_fill(F.one_hot(self_idx, 2 * n).bool(), float("-inf"))
    return F.cross_entropy(logits, pos_idx)


@float32
def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo InfoNCE (He et al. 2020, Eq. 1), mean over queries.

    q: (B, D) raw query embeddings; k: (B, D) positive keys (no grad expected);
    negatives: (K, D) e.g. the queue. Column 0 of the logits is the positive.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    negatives = F.normalize(negatives.float(), dim=1)
    pos = (q * k).sum(1, keepdim=True)
    neg = q @ negatives.T
    logits = torch.cat([pos, neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@float32
def byol_regression(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL loss 2 - 2 cos(p, z) (Grill et al. 2020, Eq. 2), mean over the batch.

    p: (B, D) raw online predictor outputs; z: (B, D) target projections (detached)."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.float().detach(), dim=1)).mean()


@float32
def info_nce_masked(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float,
                    valid: torch.Tensor) -> torch.Tensor:
    """InfoNCE with per-query negatives masks (SEE's synthetic negatives), mean over queries.

    q: (B, D) raw queries; k: (B, D) positives; negatives: (M, D); valid: (B, M) bool,
    False where a negative must not count for that query (e.g. its own instance)."""
    q = F.normalize(q.float(), dim=1)
    pos = (q * F.normalize(k.float(), dim=1)).sum(1, keepdim=True)
    neg = (q @ F.normalize(negatives.float(), dim=1).T).masked_fill(~valid, float("-inf"))
    logits = torch.cat([pos, neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


# ----------------------------------------------------------------------------- SEE (Le, Woo, PAKDD 2024)
@torch.no_grad()
def see_points(q: torch.Tensor, k: torch.Tensor, n: int, fraction: float):
    """SEE's synthetic negatives around keys (MoCo-style methods): n points on the ring of each
    confident pair's cosine around its key (anchor = key, z = the detached query), for the
    ceil(fraction * B) most confident pairs. q, k: (B, D) raw queries and their positive keys.
    Returns (points (C*n, D) unit, detached; valid (B, C*n): False where a point is the query's own
    instance's, which must not count as its negative)."""
    qn, kn = F.normalize(q.detach().float(), dim=1), F.normalize(k.float(), dim=1)
    chosen = see_select((qn * kn).sum(1), fraction)
    points = see_expand(qn[chosen], kn[chosen], n).reshape(-1, qn.shape[1])
    owner = chosen.repeat_interleave(n)
    return points, owner[None, :] != torch.arange(q.shape[0], device=q.device)[:, None]


@torch.no_grad()
def see_prototype_points(z: torch.Tensor, anchors: torch.Tensor, n: int, fraction: float):
    """SEE around prototypes (DINO, SwAV: the prototypes are SEE's proxies): n synthetic unit points
    on the ring of each confident sample's cosine to its own prototype (anchor), for the ceil(fraction
    * B) samples closest to theirs; detached, so they train only what classifies them (the prototypes).

    z: (B, D) raw embeddings; anchors: (B, D) unit prototype of each sample. Returns (points (k*n, D)
    unit, detached; chosen (k,) the expanded samples, whose targets the points take, each n times)."""
    zs = F.normalize(z.detach().float(), dim=1)
    chosen = see_select((zs * anchors).sum(1), fraction)
    return see_expand(zs[chosen], anchors[chosen], n).reshape(-1, zs.shape[1]), chosen


def see_negatives_loss(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, n: int, fraction: float,
                       temperature: float) -> torch.Tensor:
    """SEE as extra negatives (MoCo v2): InfoNCE whose negatives are ``negatives`` (the queue) plus
    the synthetic points of see_points; a query never sees the points of its own instance.

    q: (B, D) raw queries; k: (B, D) their positive keys (no grad); negatives: (K, D); n synthetic
    points per expanded pair; fraction: share of the B pairs expanded (the most confident)."""
    points, valid = see_points(q, k, n, fraction)
    valid = torch.cat([torch.ones(q.shape[0], negatives.shape[0], dtype=torch.bool, device=q.device), valid], 1)
    return info_nce_masked(q, k, torch.cat([negatives.float(), points]), temperature, valid)


@float32
def see_anchor_loss(z: torch.Tensor, anchor: torch.Tensor, n: int, fraction: float,
                    temperature: float) -> torch.Tensor:
    """SEE as an auxiliary InfoNCE on synthetic anchors (SimCLR-style methods): synthetic points
    around each confident ``anchor`` view (built from the detached other view ``z``) are detached
    queries whose positive is their own anchor and whose negatives are the other anchors of the
    batch; it trains the anchor view. z, anchor: (B, D) raw."""
    an = F.normalize(anchor.float(), dim=1)
    with torch.no_grad():
        zn, ad = F.normalize(z.detach().float(), dim=1), an.detach()
        chosen = see_select((zn * ad).sum(1), fraction)
        synth = see_expand(zn[chosen], ad[chosen], n).reshape(-1, an.shape[1])  # (k*n, D)
        target = chosen.repeat_interleave(n)
    return F.cross_entropy(synth @ an.T / temperature, target)
