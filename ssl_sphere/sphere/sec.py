"""SEC, the spherical embedding constraint.

SEC (Zhang, Li, Zhang, "Deep Metric Learning with Spherical Embedding",
NeurIPS 2020, Sec. 3.2): for raw embeddings f_i, mu = mean_i ||f_i|| (no
gradient) and L_sec = mean_i (||f_i|| - mu)^2.  The gradient of a cosine w.r.t.
f is tangent to the sphere and scales as 1/||f||, so mixed norms give
unbalanced direction updates; SEC pulls all norms to a common value while its
own gradient is radial (it never changes a direction).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from ..core import dist


def sec_loss(z: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """L_sec = mean_i (||z_i|| - mu)^2.

    z: (B, D) raw embeddings; mu: () target norm (treated as a constant)."""
    return (z.float().norm(dim=1) - mu.detach()).pow(2).mean()


def sec_weight(weight: float, ramp: str, progress: float) -> float:
    """eta at ``progress`` in [0, 1]: linear ramp 0 -> eta (authors' SSL code) or constant."""
    return weight * min(max(progress, 0.0), 1.0) if ramp == "linear" else weight


def ema_update(mu_prev: torch.Tensor, batch_mean: torch.Tensor, rho: float) -> torch.Tensor:
    """mu_t = (1 - rho) mu_{t-1} + rho * batch mean (rho weights the CURRENT batch)."""
    return (1.0 - rho) * mu_prev + rho * batch_mean


class SEC(nn.Module):
    """Stateful SEC regulariser: holds the EMA mean norm as a (checkpointed) buffer.

    Under DDP mu is the mean norm over the global batch; only local embeddings
    carry gradient.  ``forward`` returns the weighted loss eta(progress) * L_sec.
    """

    def __init__(self, weight: float, ema: float = 1.0, ramp: str = "linear"):
        super().__init__()
        self.weight, self.rho, self.ramp = weight, ema, ramp
        self.register_buffer("mu", torch.zeros(()))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self, z: torch.Tensor, progress: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """z: (B, D) raw embeddings. Returns (eta * L_sec, logs)."""
        norms = z.detach().float().norm(dim=1)
        total = dist.all_reduce_sum(torch.stack([norms.sum(), norms.new_full((), float(norms.numel()))]))
        batch_mean = total[0] / total[1]
        if self.training:
            # first step: no history to average with, so mu starts at the batch mean
            prev = torch.where(self.initialised, self.mu, batch_mean)
            self.mu.copy_(ema_update(prev, batch_mean, self.rho))
            self.initialised.fill_(True)
        # batch variant, or an EMA that has not seen a training batch yet: the batch mean
        mu = torch.where(self.initialised, self.mu, batch_mean) if self.rho < 1.0 else batch_mean
        loss = sec_loss(z, mu)
        eta = sec_weight(self.weight, self.ramp, progress)
        return eta * loss, {"sec_loss": loss.detach(), "sec_mu": mu.detach(), "sec_weight": torch.tensor(eta)}
