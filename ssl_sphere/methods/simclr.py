"""SimCLR (Chen, Kornblith, Norouzi, Hinton 2020): NT-Xent over both views, negatives gathered
across ranks; SEC on both views' projector outputs; SEE as an auxiliary InfoNCE on synthetic anchors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from lightly.models.modules.heads import SimCLRProjectionHead

from ..core import dist
from .base import Method, StepOutput, register
from .losses import nt_xent, see_anchor_loss


@dataclass
class SimCLRConfig:
    """SimCLR (Chen et al. 2020): 2-layer MLP projector, NT-Xent."""

    name: str = "simclr"  # --method simclr
    temperature: float = 0.5  # [simclr] Appendix B.9 (CIFAR-10); the LARS recipes use 0.2
    proj_hidden_dim: int = 2048  # [simclr] projector 512-2048-128 on a ResNet-18
    proj_dim: int = 128  # [simclr]


@register
class SimCLR(Method):
    Config = SimCLRConfig
    weight_keys = ("proj_hidden_dim", "proj_dim")
    sec_target = "the projector outputs of both views"
    see_unsupported = None

    def __init__(self, backbone, feature_dim, cfg, see=None):
        super().__init__(backbone, feature_dim, cfg, see)
        self.projector = SimCLRProjectionHead(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)

    def forward(self, views: Sequence[torch.Tensor]) -> StepOutput:
        """views: two (B, 3, H, W) augmented views. embeddings: (2B, proj_dim) raw projections."""
        x1, x2 = views
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        loss = nt_xent(z1, z2, self.cfg.temperature, gather=dist.gather_with_grad, rank=dist.rank())
        logs = {}
        frac = self.see_fraction()
        if frac > 0:
            n, t = self.see.n, self.cfg.temperature
            see_loss = see_anchor_loss(z1, z2, n, frac, t) + see_anchor_loss(z2, z1, n, frac, t)
            loss = loss + self.see.weight * see_loss
            logs["see_loss"] = see_loss.detach()
        return StepOutput(loss, torch.cat([z1, z2], 0), logs)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))
