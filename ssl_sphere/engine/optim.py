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
    code and lightly's CIFAR-10 benchmark do). Parameters that do not require grad (frozen or
    EMA targets) are left out. The parameters of the modules the method keeps at a fixed lr
    (``method.fixed_lr_modules()``, e.g. SimSiam's predictor) go into groups of their own, after
    those two, marked ``fixed_lr`` (set_lr keeps them at the peak lr)."""
    if ocfg.get("decay_norm_and_bias", False):
        decay, no_decay = list(model.parameters()), []
    else:
        decay, no_decay = get_weight_decay_parameters([model])
    method = getattr(model, "method", None)
    fixed = {id(p) for m in (method.fixed_lr_modules() if method is not None else []) for p in m.parameters()}
    groups, fixed_groups = [], []
    for params, wd in ((decay, ocfg.weight_decay), (no_decay, 0.0)):
        params = [p for p in params if p.requires_grad]
        groups.append({"params": [p for p in params if id(p) not in fixed], "weight_decay": wd})
        if any(id(p) in fixed for p in params):
            fixed_groups.append({"params": [p for p in params if id(p) in fixed], "weight_decay": wd, "fixed_lr": True})
    groups += fixed_groups
    if ocfg.optimizer == "lars":
        # LARS skips its trust ratio for groups with weight_decay 0 (norms, biases)
        return LARS(groups, lr=ocfg.lr, momentum=ocfg.momentum, trust_coefficient=ocfg.lars_eta)
    return torch.optim.SGD(groups, lr=ocfg.lr, momentum=ocfg.momentum)


def set_lr(optimizer: torch.optim.Optimizer, lr: float, peak: float) -> None:
    """The scheduled lr on every group, the peak lr on the groups marked fixed_lr."""
    for group in optimizer.param_groups:
        group["lr"] = peak if group.get("fixed_lr") else lr
