"""MoCo v2 (Chen, Fan, Girshick, He 2020): EMA key encoder, MLP head, negatives queue.

Symmetric loss as in the MoCo CIFAR-10 demo of the authors (moco colab
notebook): loss = L(q1, k2) + L(q2, k1), a SUM as there (so lr 0.06 x B/128
matches its recipe), and both key sets are enqueued.
"""

from __future__ import annotations

import torch
from lightly.models.modules.heads import MoCoProjectionHead
from lightly.models.utils import batch_shuffle, batch_unshuffle
from torch import nn

from .. import dist
from ..losses import info_nce
from ..queue import NegativeQueue
from .base import EMAPair, Method, StepOutput


class MoCo(Method):
    def __init__(self, backbone, feature_dim, cfg):
        super().__init__(backbone, feature_dim, cfg)
        projector = MoCoProjectionHead(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.encoder = EMAPair(nn.Sequential(backbone, projector))
        self.queue = NegativeQueue(cfg.queue_size, cfg.proj_dim)

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        # Shuffle-BN (MoCo Sec. 3.3) only matters across ranks: in one process BN
        # sees the whole batch either way, so the shuffle is skipped there.
        shuffle = self.cfg.shuffle_bn and dist.world_size() > 1
        if shuffle:
            x, idx = batch_shuffle(x, distributed=True)
        k = self.encoder.target(x)
        return batch_unshuffle(k, idx, distributed=True) if shuffle else k

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> StepOutput:
        """x1, x2: (B, 3, H, W). embeddings: (2B or B, proj_dim) raw query projections."""
        t = self.cfg.temperature
        negatives = self.queue.negatives()
        q1 = self.encoder.online(x1)
        k2 = self._keys(x2)
        if self.cfg.symmetric:
            q2 = self.encoder.online(x2)
            k1 = self._keys(x1)
            loss = info_nce(q1, k2, negatives, t) + info_nce(q2, k1, negatives, t)
            queries, keys = torch.cat([q1, q2]), torch.cat([k1, k2])
        else:
            loss = info_nce(q1, k2, negatives, t)
            queries, keys = q1, k2
        if self.training:
            self.queue.enqueue(keys)
        return StepOutput(loss, queries)

    def after_step(self, progress: float) -> None:
        self.encoder.update(self.momentum_at(progress))
