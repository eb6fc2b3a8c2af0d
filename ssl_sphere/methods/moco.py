"""MoCo v2 (Chen, Fan, Girshick, He 2020): EMA key encoder, MLP head, negatives queue; SEC on the
query projector outputs; SEE as synthetic negatives around the keys.

Symmetric loss as in the MoCo CIFAR-10 demo of the authors (moco colab
notebook): loss = L(q1, k2) + L(q2, k1), a SUM as there (so lr 0.06 x B/128
matches its recipe), and both key sets are enqueued.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from lightly.models.modules.heads import MoCoProjectionHead
from lightly.models.utils import batch_shuffle, batch_unshuffle
from torch import nn

from ..core import dist
from .base import EMAPair, MomentumMethod, StepOutput, check, register
from .losses import info_nce, see_negatives_loss
from .queue import NegativeQueue


@dataclass
class MoCoConfig:
    """MoCo v2 (Chen et al. 2020) with the CIFAR-10 demo's symmetric loss."""

    name: str = "moco"  # --method moco (the default method)
    temperature: float = 0.1  # [demo] CIFAR-10 demo, symmetric loss (0.2 in the ImageNet recipe [v2])
    proj_hidden_dim: int = 2048  # [v2] MLP head 2048-128
    proj_dim: int = 128  # [v2]
    momentum: float = 0.99  # [demo] key encoder EMA start; cosine to momentum_final
    momentum_final: float = 1.0  # [ours] BYOL's cosine schedule to 1 (the demo keeps 0.99)
    queue_size: int = 1024  # [ours] digits default; CIFAR recipes: 4096 [demo]; keep it well below 2 x dataset size
    symmetric: bool = True  # [demo] L(q1, k2) + L(q2, k1)
    shuffle_bn: bool = True  # [v2] shuffle the key batch (across ranks under DDP, in BN groups in one process)


@register(default=True)
class MoCo(MomentumMethod):
    Config = MoCoConfig
    weight_keys = ("proj_hidden_dim", "proj_dim", "queue_size")
    sec_target = "the query projector outputs (both views with the symmetric loss)"
    see_unsupported = None

    @classmethod
    def derive(cls, cfg, d, machine) -> None:
        # split BN (the authors' CIFAR demo: 8 groups of 64 images of a 512 batch, keys shuffled, so a
        # key never shares BN statistics with its query in one process; under DDP the shuffle crosses
        # ranks instead). As many groups as keep >= 64 images each, at most 8: groups of 8 images (a
        # batch of 64 in 8) estimate BN statistics too noisily to learn from (docs/benchmarks/default-run.md)
        if machine.world == 1 and not cfg.model.sync_bn:
            batch = cfg.optim.batch_size
            groups = max(g for g in range(1, 9) if batch % g == 0 and (g == 1 or batch // g >= 64))
            if groups > 1:
                d.fill("model.split_bn", groups, f"MoCo in one process: split BN in {groups} groups of "
                       f"{batch // groups} images (the authors' CIFAR demo: 8 of 64)")
        per_step = cfg.optim.batch_size * machine.world * (2 if cfg.method.symmetric else 1)
        check(cfg.method.queue_size >= per_step, "method.queue_size",
              f"must hold at least the keys of one step ({per_step} = batch x views x {machine.world} processes); "
              "raise it or lower the batch")

    def __init__(self, backbone, feature_dim, cfg, see=None):
        super().__init__(backbone, feature_dim, cfg, see)
        projector = MoCoProjectionHead(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.encoder = EMAPair(nn.Sequential(backbone, projector))
        self.queue = NegativeQueue(cfg.queue_size, cfg.proj_dim)
        # BN groups of the backbone (split BN), read from its layers: the shuffle pays off only with them
        self.split_bn = max((getattr(m, "num_splits", 1) for m in backbone.modules()), default=1)

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        """Shuffle-BN (MoCo Sec. 3.3): the key batch is shuffled before the key encoder, so a key
        is normalised with other samples' BN statistics than its query: across ranks under DDP,
        within the batch in one process, where split BN (model.split_bn) makes the groups."""
        world = dist.world_size()
        shuffle = self.cfg.shuffle_bn and (world > 1 or self.split_bn > 1)
        if shuffle:
            x, idx = batch_shuffle(x, distributed=world > 1)
        k = self.encoder.target(x)
        return batch_unshuffle(k, idx, distributed=world > 1) if shuffle else k

    def forward(self, views: Sequence[torch.Tensor]) -> StepOutput:
        """views: two (B, 3, H, W). embeddings: (2B or B, proj_dim) raw query projections."""
        x1, x2 = views
        t = self.cfg.temperature
        negatives = self.queue.negatives()
        q1 = self.encoder.online(x1)
        k2 = self._keys(x2)
        if self.cfg.symmetric:
            q2 = self.encoder.online(x2)
            k1 = self._keys(x1)
            loss = info_nce(q1, k2, negatives, t) + info_nce(q2, k1, negatives, t)
            queries, keys = torch.cat([q1, q2]), torch.cat([k1, k2])
            pairs = [(q1, k2), (q2, k1)]
        else:
            loss = info_nce(q1, k2, negatives, t)
            queries, keys = q1, k2
            pairs = [(q1, k2)]
        logs = {}
        frac = self.see_fraction()
        if frac > 0:
            see_loss = sum(see_negatives_loss(q, k, negatives, self.see.n, frac, t) for q, k in pairs)
            loss = loss + self.see.weight * see_loss
            logs["see_loss"] = see_loss.detach()
        if self.training:
            self.queue.enqueue(keys)
        return StepOutput(loss, queries, logs, views=len(pairs))

    @property
    def loss_directions(self) -> int:
        return 2 if self.cfg.symmetric else 1
