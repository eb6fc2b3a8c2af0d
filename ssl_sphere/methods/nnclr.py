"""NNCLR (Dwibedi, Aytar, Tompson, Sermanet, Zisserman, ICCV 2021): the positive of each view is the nearest
neighbour of its projection in a support set of past projections, contrasted with the other view's
prediction; SEC on both views' raw predictions; SEE as for SimCLR (synthetic anchors around the predictions).

The step, as the paper's Algorithm 1 (and lightly's NNCLR example):
    z1, z2 = projector(backbone(x1)), projector(backbone(x2));  p1, p2 = predictor(z1), predictor(z2)
    nn1, nn2 = NN(z1, Q), NN(z2, Q)     # cosine nearest neighbour in the support set Q, no gradient
    loss = NT-Xent(nn1, p2) / 2 + NT-Xent(nn2, p1) / 2
    Q <- enqueue(z1)                    # one view's projections, after the loss (the lookup sees the old Q)

Deviation from the paper's loss, as lightly's pipeline (NNMemoryBankModule + NTXentLoss): each term is
SimCLR's NT-Xent over [nn; p] (2N - 1 candidates per anchor, both nn and p as anchors), where the paper
(Eq. 3-4), solo-learn and VISSL contrast each neighbour with the N predictions of the other view only
(a B x B cross-entropy, symmetrised). The gradient reaches only the predictions either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import NNCLRPredictionHead, NNCLRProjectionHead

from ..core import dist
from ..core.numerics import float32
from .base import Method, StepOutput, asymmetric_views, check, register
from .losses import nt_xent, see_anchor_loss
from .queue import NegativeQueue


@dataclass
class NNCLRConfig:
    """NNCLR (Dwibedi et al. 2021): 3-layer projector, 2-layer predictor, support set of past projections."""

    name: str = "nnclr"  # --method nnclr
    temperature: float = 0.1  # [paper] (lightly's CIFAR benchmark: NTXentLoss's default 0.5; solo-learn's: 0.2)
    proj_hidden_dim: int = 2048  # [paper] projection MLP [2048, 2048, d], BN after every layer (NNCLRProjectionHead)
    proj_dim: int = 256  # [paper] d = 256; the predictions and the support set have this dimension too
    pred_hidden_dim: int = 4096  # [paper] prediction MLP [4096, d] (NNCLRPredictionHead)
    # support set size: [paper] 98304 on ImageNet (7.7% of its 1.28M images); CIFAR-10 recipe 8192 [lightly].
    # [ours] digits default 256: 4 batches of 64, about 18% of its 1437 training images (lightly's 8192 is 16% of
    # CIFAR-10); below one epoch's worth, so a sample never meets its own stale projection, as in the paper
    queue_size: int = 256


@float32
@torch.no_grad()
def nearest_neighbour(z: torch.Tensor, support: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The paper's NN(z, Q): the support-set row of highest cosine to each row of z, i.e. the nearest in L2
    between unit vectors; no gradient, float32 (a bf16 argmax over thousands of rows picks wrong ones).

    z: (N, D) raw projections; support: (K, D) UNIT rows (NegativeQueue stores them normalised, so only z is
    normalised here). Returns ((N, D) the neighbours, (N,) their cosine to z)."""
    sim = F.normalize(z.detach().float(), dim=1) @ support.float().T  # (N, K)
    cos, idx = sim.max(1)
    return support[idx], cos


def nnclr_loss(nn1: torch.Tensor, nn2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, temperature: float,
               **gathered) -> torch.Tensor:
    """The symmetric NNCLR loss as lightly's pipeline computes it: NT-Xent(nn1, p2) / 2 + NT-Xent(nn2, p1) / 2,
    a MEAN of the two directions (Algorithm 1 halves each term; lightly: 0.5 * (...)).

    nn1, nn2: (B, D) support-set neighbours of the two views' projections (no gradient); p1, p2: (B, D) raw
    predictions of the two views. gathered: nt_xent's ``gather`` / ``rank`` (negatives across ranks)."""
    return 0.5 * (nt_xent(nn1, p2, temperature, **gathered) + nt_xent(nn2, p1, temperature, **gathered))


@register
class NNCLR(Method):
    Config = NNCLRConfig
    weight_keys = ("proj_hidden_dim", "proj_dim", "pred_hidden_dim", "queue_size")
    sec_target = "the predictor outputs of both views"
    see_unsupported = None

    @classmethod
    def configure(cls, cfg, d) -> None:
        # [paper] BYOL's augmentations (BYOL Table 6): asymmetric blur 1.0 / 0.1 and solarisation 0 / 0.2; at <= 64 px
        # the base's rule fills no blur (SimCLR Appendix B.9), as solo-learn's CIFAR recipe (asymmetric.yaml) has it
        asymmetric_views(cfg, d, "NNCLR")
        super().configure(cfg, d)

    @classmethod
    def derive(cls, cfg, d, machine) -> None:
        per_step = cfg.optim.batch_size * machine.world
        check(cfg.method.queue_size >= per_step, "method.queue_size",
              f"the support set must hold at least the projections of one step ({per_step} = batch x "
              f"{machine.world} processes, one view); raise it or lower the batch")

    def __init__(self, backbone, feature_dim, cfg, see=None):
        super().__init__(backbone, feature_dim, cfg, see)
        self.projector = NNCLRProjectionHead(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.predictor = NNCLRPredictionHead(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
        # The support set Q is this project's queue, not lightly's NNMemoryBankModule (lightly 1.6), which
        # (1) registers its bank and pointer with persistent=False, so they are not in the state_dict and a resume
        # restarts from a random bank; (2) never gathers across ranks (NNMemoryBankModule passes no
        # gather_distributed), so each rank would search its own support set, where the paper has one; (3) drops
        # the projections that do not fit before the end at wrap-around; (4) reads its pointer with int(), a host
        # sync per step. Equivalent otherwise: both start from random unit rows, and lightly's raw rows versus our
        # unit rows give the same cosine argmax and the same NT-Xent (which normalises).
        self.support = NegativeQueue(cfg.queue_size, cfg.proj_dim)

    def forward(self, views: Sequence[torch.Tensor]) -> StepOutput:
        """views: two (B, 3, H, W). embeddings: (2B, proj_dim) raw predictions of both views."""
        x1, x2 = views
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        nn, cos = nearest_neighbour(torch.cat([z1, z2]), self.support.keys)  # one lookup for both views
        nn1, nn2 = nn.chunk(2)
        t = self.cfg.temperature
        loss = nnclr_loss(nn1, nn2, p1, p2, t, gather=dist.gather_with_grad, rank=dist.rank())
        logs = {"nn_cosine": cos.mean()}  # how close the neighbours are (1: the support set holds the view itself)
        frac = self.see_fraction()
        if frac > 0:
            # SEE as SimCLR's synthetic anchors: the positive pairs are (neighbour, prediction of the other view),
            # so the anchors are the predictions (they carry the gradient), built from their detached neighbours
            pairs = ((nn1, p2), (nn2, p1))
            see_loss = sum(see_anchor_loss(nb, p, self.see.n, frac, t) for nb, p in pairs)
            loss = loss + self.see.weight * see_loss
            logs["see_loss"] = see_loss.detach()
        if self.training:
            # Algorithm 1: update_queue(Q, z1), the first view's projections, gathered from every rank (in rank
            # order) so that Q is the same everywhere (VISSL enqueues both views; lightly's example its second)
            self.support.enqueue(z1.detach())
        return StepOutput(loss, torch.cat([p1, p2], 0), logs)

    @property
    def loss_directions(self) -> int:
        return 1  # nnclr_loss averages its two directions (NT-Xent(nn1, p2) / 2 + NT-Xent(nn2, p1) / 2)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, proj_dim) projections: the space the support set holds and the nearest neighbours
        are searched in, which the predictions are trained to match (as BYOL's target projections for its
        predictions); the same dimension as the predictions SEC and vMF act on."""
        return self.projector(self.backbone(x))
