"""BYOL (Grill et al. 2020): online network + predictor regress the EMA target's projection;
SEC on the online predictor outputs. No SEE: it has neither negatives nor proxies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
from torch import nn

from .base import EMAPair, MomentumMethod, StepOutput, asymmetric_views, register
from .losses import byol_regression


@dataclass
class BYOLConfig:
    """BYOL (Grill et al. 2020): projector and predictor MLPs with BN, EMA target."""

    name: str = "byol"  # --method byol
    proj_hidden_dim: int = 4096  # [byol] Sec. 3.3: projector 4096-256
    proj_dim: int = 256  # [byol]
    pred_hidden_dim: int = 4096  # [byol] predictor 256-4096-256
    momentum: float = 0.99  # [byol] Sec. 3.2 / [lightly] tau_base (0.996 on ImageNet); cosine to momentum_final
    momentum_final: float = 1.0  # [byol]


@register
class BYOL(MomentumMethod):
    Config = BYOLConfig
    weight_keys = ("proj_hidden_dim", "proj_dim", "pred_hidden_dim")
    sec_target = "the online predictor outputs of both views"
    see_unsupported = ("its synthetic points serve as extra negatives (MoCo) or as anchors of an InfoNCE over the "
                       "batch (SimCLR), and BYOL has neither negatives nor proxies; use --method moco or simclr")

    @classmethod
    def configure(cls, cfg, d) -> None:
        asymmetric_views(cfg, d, "BYOL", blur_small=True)
        super().configure(cfg, d)

    def __init__(self, backbone, feature_dim, cfg, see=None):
        super().__init__(backbone, feature_dim, cfg, see)
        projector = BYOLProjectionHead(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.encoder = EMAPair(nn.Sequential(backbone, projector))
        self.predictor = BYOLPredictionHead(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)

    def forward(self, views: Sequence[torch.Tensor]) -> StepOutput:
        """views: two (B, 3, H, W). embeddings: (2B, proj_dim) raw online predictor outputs."""
        x1, x2 = views
        p1 = self.predictor(self.encoder.online(x1))
        p2 = self.predictor(self.encoder.online(x2))
        with torch.no_grad():
            t1, t2 = self.encoder.target(x1), self.encoder.target(x2)
        # symmetrised loss (BYOL Sec. 3.1, Eq. 2): each view's prediction of the other's target
        loss = byol_regression(p1, t2) + byol_regression(p2, t1)
        return StepOutput(loss, torch.cat([p1, p2], 0))

    @property
    def loss_directions(self) -> int:
        return 2  # byol_regression(p1, t2) + byol_regression(p2, t1)
