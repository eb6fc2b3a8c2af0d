"""SimCLR (Chen et al. 2020): NT-Xent over both views, negatives gathered across ranks."""

from __future__ import annotations

import torch
from lightly.models.modules.heads import SimCLRProjectionHead

from .. import dist
from ..losses import nt_xent
from .base import Method, StepOutput


class SimCLR(Method):
    def __init__(self, backbone, feature_dim, cfg):
        super().__init__(backbone, feature_dim, cfg)
        self.projector = SimCLRProjectionHead(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> StepOutput:
        """x1, x2: (B, 3, H, W) two augmented views. embeddings: (2B, proj_dim) raw projections."""
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        loss = nt_xent(z1, z2, self.cfg.temperature, gather=dist.gather_with_grad, rank=dist.rank())
        return StepOutput(loss, torch.cat([z1, z2], 0))
