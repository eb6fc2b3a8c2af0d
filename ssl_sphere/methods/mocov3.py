"""MoCo v3 (Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021),
ResNet setting: a query encoder (backbone + projector + predictor) and its momentum key encoder (backbone +
projector, no predictor), a symmetric contrastive loss whose negatives are the other keys of the global
batch (Algorithm 1): no queue, no shuffled BN. SEC on the raw predictor outputs of both views; SEE as
MoCo v2's, synthetic negatives around the keys.

Reference code: the authors' moco/builder.py (MoCo_ResNet) and main_moco.py (facebookresearch/moco-v3).
Equivalences and deviations:

* the EMA update: the reference updates the key encoder inside forward, before the keys, with the
  momentum of the current iteration; here ``after_step`` updates it after each optimiser step with the
  momentum of the next one (progress (step + 1) / total): the same keys, the same update order as
  Algorithm 1 (optimizer update of f_q, then f_k = m f_k + (1 - m) f_q).
* the heads: the reference's ``_build_mlp`` as lightly ``ProjectionHead`` blocks (see ``mlp``).
* the ResNet: torchvision's, with zero_init_residual=True in the reference; this project's backbones
  keep the default init.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VIT_CHOICES
from ..core import dist
from ..core.numerics import float32
from .base import EMAPair, MomentumMethod, StepOutput, asymmetric_views, check, register
from .heads import mlp
from .losses import see_points


@dataclass
class MoCoV3Config:
    """MoCo v3 (Chen et al. 2021), the reference code's ResNet defaults ([ref]: facebookresearch/moco-v3)."""

    name: str = "mocov3"  # --method mocov3
    # None: [ref] 1.0 for convnets (main_moco.py --moco-t default, the ResNet-50 setting), 0.2 for ViTs
    # (every ViT command of CONFIG.md)
    temperature: Optional[float] = None
    proj_hidden_dim: int = 4096  # [paper] Appendix A "MLP heads": hidden layers 4096-d; [ref] --moco-mlp-dim
    proj_dim: int = 256  # [paper] Appendix A: output layers 256-d; [ref] --moco-dim
    pred_hidden_dim: int = 4096  # [paper] Appendix A; [ref] the predictor's hidden layer is --moco-mlp-dim too
    # None: [ref] MoCo_ResNet's 2-layer projector for convnets ([solo] too), MoCo_ViT's 3 layers for ViTs
    # (the paper's Appendix A head)
    proj_layers: Optional[int] = None
    # None: [ref] the predictor of MoCo_ViT ends in a BN (without affine parameters), MoCo_ResNet's does not
    pred_last_bn: Optional[bool] = None
    # None: for ViTs, [paper] Sec. 4.2 "random patch projection" ([ref] --stop-grad-conv1 in every ViT config):
    # the patch embedding stays at its random initialisation, which stabilises training; off for convnets
    freeze_patch_embed: Optional[bool] = None
    momentum: float = 0.99  # [ref] --moco-m (ResNet-50, 100 / 300 epochs; 0.996 for 1000); cosine to momentum_final
    momentum_final: float = 1.0  # [ref] --moco-m-cos (every CONFIG.md command): half-cycle cosine to 1


@float32
def mocov3_contrastive(q: torch.Tensor, keys: torch.Tensor, temperature: float, rank: int = 0,
                       extra: Optional[torch.Tensor] = None, extra_valid: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
    """ctr(q, k) of MoCo v3 (Algorithm 1): CrossEntropy(q k^T / tau, labels) * 2 tau, mean over the local
    queries, q and k L2-normalised. The factor 2 tau (Appendix A, "Loss") makes the gradient's scale
    independent of tau; the reference code has it too.

    q: (B, D) raw local queries (predictor outputs); keys: (N, D) raw keys of the global batch in rank order
    (the local (B, D) keys through dist.gather_no_grad, N = world * B), gradient stopped; rank: which B-block
    of ``keys`` is this rank's, so the positive of query i is keys[rank * B + i] (the reference's labels
    arange(B) + B * rank); every other key is a negative.
    extra: (M, D) further negatives (SEE's synthetic points), extra_valid: (B, M) bool, False where a point
    does not count for that query (its own instance's)."""
    b = q.shape[0]
    q = F.normalize(q.float(), dim=1)
    logits = q @ F.normalize(keys.detach().float(), dim=1).T  # (B, N)
    if extra is not None:
        more = (q @ F.normalize(extra.detach().float(), dim=1).T).masked_fill(~extra_valid, float("-inf"))
        logits = torch.cat([logits, more], 1)  # (B, N + M)
    labels = torch.arange(b, device=q.device) + rank * b
    return F.cross_entropy(logits / temperature, labels) * (2 * temperature)


@register
class MoCoV3(MomentumMethod):
    Config = MoCoV3Config
    weight_keys = ("proj_hidden_dim", "proj_dim", "pred_hidden_dim", "proj_layers", "pred_last_bn",
                   "freeze_patch_embed")  # the last: the optimiser's parameter groups
    sec_target = "the online predictor outputs (the queries q) of both views"
    see_unsupported = None

    @classmethod
    def configure(cls, cfg, d) -> None:
        asymmetric_views(cfg, d, "MoCo v3 (main_moco.py)")  # at <= 64 px no blur, as [solo]'s CIFAR recipe
        vit = cfg.model.backbone in VIT_CHOICES
        kind = "MoCo_ViT" if vit else "MoCo_ResNet"
        d.fill("method.temperature", 0.2 if vit else 1.0, "MoCo v3 reference: --moco-t of its "
               + ("ViT configs" if vit else "ResNet-50"))
        d.fill("method.proj_layers", 3 if vit else 2, f"MoCo v3 reference: {kind}'s projector")
        d.fill("method.pred_last_bn", vit, f"MoCo v3 reference: {kind}'s predictor")
        d.fill("method.freeze_patch_embed", vit, "MoCo v3 Sec. 4.2: random patch projection for ViTs"
               if vit else "MoCo v3: a convnet has no patch projection")
        super().configure(cfg, d)
        check(cfg.method.proj_layers >= 1, "method.proj_layers", "must be >= 1 (2: ResNet, 3: the paper's ViT head)")

    def __init__(self, backbone, feature_dim, cfg, see=None):
        super().__init__(backbone, feature_dim, cfg, see)
        if cfg.freeze_patch_embed and hasattr(backbone, "patch_embed"):
            backbone.patch_embed.requires_grad_(False)  # random patch projection (Sec. 4.2): out of the optimiser
        projector = mlp(cfg.proj_layers, feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, last_bn=True)
        self.encoder = EMAPair(nn.Sequential(backbone, projector))  # f_k: EMA of backbone + projector
        # [ref] a 2-layer predictor, with the output BN for ViTs (MoCo_ViT), without for convnets (MoCo_ResNet)
        self.predictor = mlp(2, cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, last_bn=cfg.pred_last_bn)

    def forward(self, views: Sequence[torch.Tensor]) -> StepOutput:
        """views: two (B, 3, H, W). embeddings: (2B, proj_dim) raw queries q1, q2 (predictor outputs).
        loss = ctr(q1, k2) + ctr(q2, k1) (Algorithm 1), a SUM of two directions, with the keys of every
        rank as in the reference (concat_all_gather, no gradient)."""
        x1, x2 = views
        q1 = self.predictor(self.encoder.online(x1))
        q2 = self.predictor(self.encoder.online(x2))
        with torch.no_grad():
            k1, k2 = self.encoder.target(x1), self.encoder.target(x2)
        g1, g2 = dist.gather_no_grad(k1), dist.gather_no_grad(k2)
        t, r = self.cfg.temperature, dist.rank()
        loss = mocov3_contrastive(q1, g2, t, r) + mocov3_contrastive(q2, g1, t, r)
        logs = {}
        frac = self.see_fraction()
        if frac > 0:
            # the same ctr with synthetic negatives around this rank's keys added (as MoCo v2 adds them to
            # its queue): an auxiliary term weighted by see.weight, on the scale of the method's own loss
            n = self.see.n
            see_loss = (mocov3_contrastive(q1, g2, t, r, *see_points(q1, k2, n, frac))
                        + mocov3_contrastive(q2, g1, t, r, *see_points(q2, k1, n, frac)))
            loss = loss + self.see.weight * see_loss
            logs["see_loss"] = see_loss.detach()
        return StepOutput(loss, torch.cat([q1, q2], 0), logs)

    @property
    def loss_directions(self) -> int:
        return 2  # ctr(q1, k2) + ctr(q2, k1)
