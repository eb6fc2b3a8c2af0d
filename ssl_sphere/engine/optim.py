"""The optimiser and its parameter groups; the lr schedule itself is ssl_sphere.core.schedules.lr_at."""

from __future__ import annotations

import torch
from lightly.models.utils import get_weight_decay_parameters
from lightly.utils.lars import LARS
from torch import nn


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
