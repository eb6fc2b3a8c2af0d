"""The interface every method implements; the training loop knows only this."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict

import torch
from lightly.models.utils import deactivate_requires_grad, update_momentum
from torch import nn

from ..optim import cosine_momentum


@dataclass
class StepOutput:
    """loss: () the method's own loss; embeddings: (N, D) the RAW outputs its loss
    normalises (SEC and norm statistics act on these); logs: detached scalars."""

    loss: torch.Tensor
    embeddings: torch.Tensor
    logs: Dict[str, torch.Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """backbone: (B, 3, H, W) -> (B, F). Subclasses define forward(x1, x2) -> StepOutput."""

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg, see=None):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.cfg = cfg  # the method section of the config (read-only)
        self.see = see if see is not None and see.enabled else None  # SEE section, if on
        # training progress in [0, 1] as of the last after_step: drives SEE's ramp (checkpointed).
        # _progress mirrors it on the host so reading it costs no device sync per step; None
        # means "read the buffer once" (fresh module, or a state_dict just loaded into it)
        self.register_buffer("progress", torch.zeros(()))
        self._progress = None

    @property
    def loss_directions(self) -> int:
        """How many directions the method's loss SUMS (MoCo symmetric, BYOL: 2; SimCLR, whose
        NT-Xent averages over both views, and asymmetric MoCo: 1). SEC's weight is defined
        against the per-direction mean of the loss, so it is scaled by this (model.SSLModel)."""
        return 1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) normalised images -> (B, F) backbone features for evaluation."""
        return self.backbone(x)

    def after_step(self, progress: float) -> None:
        """Called after each optimiser step with training progress in [0, 1]."""
        self.set_progress(progress)

    def set_progress(self, progress: float) -> None:
        self.progress.fill_(progress)
        self._progress = float(progress)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._progress = None  # the loaded buffer is the truth now

    def progress_value(self) -> float:
        if self._progress is None:
            self._progress = float(self.progress)  # one sync, then the host mirror
        return self._progress

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> (B, D) embeddings in the loss space from the momentum
        encoder where there is one (vMF's global structure estimation)."""
        raise NotImplementedError

    def see_fraction(self) -> float:
        """Share of samples SEE expands now: ramps 0 -> see.fraction over training."""
        return self.see.fraction * self.progress_value() if self.see is not None else 0.0

    def momentum_at(self, progress: float) -> float:
        return cosine_momentum(progress, self.cfg.momentum, self.cfg.momentum_final)


class EMAPair(nn.Module):
    """An online module and its frozen EMA copy (MoCo key encoder, BYOL target);
    the copy's parameters are buffers of the optimiser's world: no gradients."""

    def __init__(self, online: nn.Module):
        super().__init__()
        self.online = online
        self.target = copy.deepcopy(online)
        deactivate_requires_grad(self.target)

    @torch.no_grad()
    def update(self, m: float) -> None:
        update_momentum(self.online, self.target, m)
