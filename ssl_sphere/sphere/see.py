"""SEE, spherical embedding expansion (Le, Woo, PAKDD 2024): simplex ("max-Mahalanobis") centres and
the expansion of a unit embedding into synthetic points on the ring of its cosine to an anchor."""

from __future__ import annotations

import functools
import math

import torch

from ..config import ConfigError


def check_see_dim(n: int, dim: int) -> None:
    """n synthetic points per sample need an embedding dimension of at least n + 2 (a simplex of
    n + 1 vertices in the complement of the anchor)."""
    if dim < n + 2:
        raise ConfigError(f"invalid value for 'see.n': n={n} synthetic points need embedding dim >= n + 2 = {n + 2} "
                          f"(got {dim}); lower see.n or raise method.proj_dim")

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
