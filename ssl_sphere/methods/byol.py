"""BYOL (Grill et al. 2020): online network + predictor regress the EMA target's projection."""

from __future__ import annotations

import torch
from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
from torch import nn

from ..losses import byol_regression
from .base import EMAPair, Method, StepOutput


class BYOL(Method):
    def __init__(self, backbone, feature_dim, cfg, see=None):
        super().__init__(backbone, feature_dim, cfg, see)
        projector = BYOLProjectionHead(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.encoder = EMAPair(nn.Sequential(backbone, projector))
        self.predictor = BYOLPredictionHead(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> StepOutput:
        """x1, x2: (B, 3, H, W). embeddings: (2B, proj_dim) raw online predictor outputs."""
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

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.target(x)

    def after_step(self, progress: float) -> None:
        super().after_step(progress)
        self.encoder.update(self.momentum_at(progress))
