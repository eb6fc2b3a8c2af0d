"""Heads that lightly has no class for, shared by the methods that use them."""

from __future__ import annotations

from lightly.models.modules.heads import ProjectionHead
from torch import nn


def mlp(layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool) -> ProjectionHead:
    """The MLP of the SimSiam and MoCo v3 reference code (simsiam/builder.py, moco-v3's ``_build_mlp``):
    ``layers`` Linear layers without bias, each hidden one followed by BN and ReLU; the last followed by
    a BN without affine parameters (last_bn: the projectors) or by nothing (MoCo v3's ResNet predictor).
    (B, in_dim) -> (B, out_dim) raw.

    Why lightly's generic ProjectionHead and not its named heads: MoCoProjectionHead(batch_norm=True) ends
    in an affine BN, where MoCo v3 removes gamma and beta ("for simplicity, we further removed gamma in
    BN"); BYOLPredictionHead's last Linear has a bias, MoCo v3's has none; SimSiamProjectionHead has the 3
    layers of SimSiam's ImageNet head, its CIFAR variant has 2 (Appendix D). With 3 layers and last_bn
    this is SimSiamProjectionHead layer for layer (tests/test_method_simsiam.py)."""
    dims = [in_dim] + [hidden_dim] * (layers - 1)
    blocks = [(a, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU()) for a in dims[:-1]]
    last = nn.BatchNorm1d(out_dim, affine=False) if last_bn else None
    return ProjectionHead(blocks + [(dims[-1], out_dim, last, None, False)])
