"""Optimiser, parameter groups, and the schedules (lr, EMA momentum) as pure functions of progress."""

from __future__ import annotations

import math

import torch
from lightly.models.utils import get_weight_decay_parameters
from lightly.utils.lars import LARS
from torch import nn


def lr_at(step: int, total: int, warmup: int, lr: float, min_ratio: float = 0.0) -> float:
    """Linear warmup from lr/warmup to lr over ``warmup`` steps, then half-cosine to lr*min_ratio."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def cosine_momentum(progress: float, base: float, final: float) -> float:
    """EMA momentum from ``base`` to ``final`` along a half cosine of training
    progress in [0, 1] (BYOL, Grill et al. 2020, Sec. 3.2: tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2)."""
    p = min(max(progress, 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * p) + 1) / 2


def build_optimizer(model: nn.Module, ocfg) -> torch.optim.Optimizer:
    """SGD or LARS over two parameter groups: weight decay on weights only; norm layers and
    biases are excluded (lightly's ``get_weight_decay_parameters`` split), unless
    optim.decay_norm_and_bias puts every parameter under weight decay (as the MoCo authors'
    code and lightly's CIFAR-10 benchmark do)."""
    if ocfg.get("decay_norm_and_bias", False):
        decay, no_decay = list(model.parameters()), []
    else:
        decay, no_decay = get_weight_decay_parameters([model])
    groups = [
        {"params": [p for p in decay if p.requires_grad], "weight_decay": ocfg.weight_decay},
        {"params": [p for p in no_decay if p.requires_grad], "weight_decay": 0.0},
    ]
    if ocfg.optimizer == "lars":
        # LARS skips its trust ratio for groups with weight_decay 0 (norms, biases)
        return LARS(groups, lr=ocfg.lr, momentum=ocfg.momentum, trust_coefficient=ocfg.lars_eta)
    return torch.optim.SGD(groups, lr=ocfg.lr, momentum=ocfg.momentum)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
