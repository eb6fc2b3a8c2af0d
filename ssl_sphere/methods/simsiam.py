"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021): one encoder
(backbone + projector) on both views, a predictor on one side and a stop-gradient on the other,
symmetric negative cosine (Eq. 1-2). No negatives, no momentum encoder: the stop-gradient alone
prevents collapse (Sec. 4.1). SEC on the raw predictor outputs of both views; no SEE.

Reference code: the authors' simsiam/builder.py and main_simsiam.py (facebookresearch/simsiam).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from lightly.models.modules.heads import SimSiamPredictionHead
from torch import nn

from .base import Method, StepOutput, check, register
from .heads import mlp
from .losses import byol_regression


@dataclass
class SimSiamConfig:
    """SimSiam (Chen & He 2021): projector MLP ending in BN, bottleneck predictor MLP, stop-gradient."""

    name: str = "simsiam"  # --method simsiam
    proj_hidden_dim: int = 2048  # [paper] Sec. 3 "Baseline settings": hidden fc 2048-d ([lightly] / [solo] CIFAR too)
    proj_dim: int = 2048  # [paper] Sec. 3: d = 2048, the dimension of z and p ([lightly] / [solo] CIFAR too)
    # None: 2 at <= 64 px ([paper] Appendix D, the CIFAR variant: "the projection MLP has 2 layers"), else 3
    # ([paper] Sec. 3, ImageNet); derived in configure
    proj_layers: Optional[int] = None
    pred_hidden_dim: int = 512  # [paper] Sec. 3: h is a 2048-512-2048 bottleneck (Appendix B ablation)
    # [paper] Sec. 4.2 / Table 1: the predictor's lr is not decayed (authors' --fix-pred-lr); false = lightly's
    # CIFAR-10 benchmark, which decays it with the rest
    fix_pred_lr: bool = True


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2 with D(p, z) = -cos(p, z) (Eq. 1-2), batch means:
    a MEAN over the two directions, in [-1, 1].

    p1, p2: (B, D) raw predictor outputs of the two views; z1, z2: (B, D) raw projector outputs (their
    gradient is stopped here). D = byol_regression / 2 - 1 (2 - 2 cos = 2 (1 + D)), so BYOL's float32
    regression serves: same value as lightly's NegativeCosineSimilarity (tests), same gradient in p."""
    return (byol_regression(p1, z2.detach()) + byol_regression(p2, z1.detach())) / 4 - 1


@register
class SimSiam(Method):
    Config = SimSiamConfig
    weight_keys = ("proj_hidden_dim", "proj_dim", "proj_layers", "pred_hidden_dim",
                   "fix_pred_lr")  # the last: the optimiser's parameter groups
    sec_target = "the predictor outputs of both views"
    base_lr = 0.015  # [paper] Sec. 3: lr = 0.03 x B / 256 (= 0.015 x B / 128; 0.05 x B / 256 on ImageNet)
    see_unsupported = ("its synthetic points serve as extra negatives (MoCo) or as anchors of an InfoNCE over the "
                       "batch (SimCLR), and SimSiam has neither negatives nor prototypes (only the stop-gradient "
                       "keeps it from collapsing); use --method moco or simclr")

    @classmethod
    def configure(cls, cfg, d) -> None:
        # the augmentation is the base's: the authors' main_simsiam.py uses SimCLR's views (blur p 0.5,
        # no solarisation) and Appendix D drops the blur on CIFAR, as the base does at <= 64 px
        small = cfg.data.image_size <= 64
        d.fill("method.proj_layers", 2 if small else 3,
               "SimSiam projector: 2 layers on small images (Appendix D, CIFAR), 3 above (Sec. 3, ImageNet)")
        super().configure(cfg, d)
        check(cfg.method.proj_layers >= 1, "method.proj_layers", "needs at least 1 layer")

    def __init__(self, backbone, feature_dim, cfg, see=None):
        super().__init__(backbone, feature_dim, cfg, see)
        # f: the authors' builder.py projector (heads.mlp; SimSiamProjectionHead when 3 layers, Appendix D: 2 on CIFAR)
        self.projector = mlp(cfg.proj_layers, feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, last_bn=True)
        # h: BN on the hidden fc, output fc with bias and without BN / ReLU (Sec. 3; builder.py)
        self.predictor = SimSiamPredictionHead(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)

    def forward(self, views: Sequence[torch.Tensor]) -> StepOutput:
        """views: two (B, 3, H, W), each through the encoder on its own (its own BN statistics, as the
        authors' code). embeddings: (2B, proj_dim) raw predictor outputs [p1; p2]."""
        x1, x2 = views
        z1, z2 = self.embed(x1), self.embed(x2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return StepOutput(simsiam_loss(p1, p2, z1, z2), torch.cat([p1, p2], 0))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, proj_dim) raw projector outputs z: the stop-gradient side that p regresses
        onto (BYOL's target projection, without an EMA copy), the space vMF's means are estimated in."""
        return self.projector(self.backbone(x))

    def fixed_lr_modules(self) -> List[nn.Module]:
        return [self.predictor] if self.cfg.fix_pred_lr else []
