"""The optimiser, its parameter groups and the per-step hyper-parameters (lr, weight decay) and
gradient clipping; the schedules themselves are ssl_sphere.core.schedules."""

from __future__ import annotations

from typing import Optional, Sequence, Set

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
    those two, marked ``fixed_lr`` (set_hyperparameters keeps them at the peak lr). A ViT's positional
    embedding and tokens are not decayed either."""
    if ocfg.get("decay_norm_and_bias", False):
        decay, no_decay = list(model.parameters()), []
    else:
        decay, no_decay = get_weight_decay_parameters([model])
        tokens = token_parameters(model)  # a ViT's positional embedding and class token: no decay either (DINO)
        decay, no_decay = [p for p in decay if id(p) not in tokens], no_decay + [p for p in decay if id(p) in tokens]
    method = getattr(model, "method", None)
    fixed = {id(p) for m in (method.fixed_lr_modules() if method is not None else []) for p in m.parameters()}
    groups, fixed_groups = [], []
    for params, wd, decayed in ((decay, ocfg.weight_decay, True), (no_decay, 0.0, False)):
        params = [p for p in params if p.requires_grad]
        groups.append({"params": [p for p in params if id(p) not in fixed], "weight_decay": wd, "decay": decayed})
        if any(id(p) in fixed for p in params):
            fixed_groups.append({"params": [p for p in params if id(p) in fixed], "weight_decay": wd,
                                 "decay": decayed, "fixed_lr": True})
    groups += fixed_groups
    if ocfg.optimizer == "lars":
        # LARS skips its trust ratio for groups with weight_decay 0 (norms, biases)
        return LARS(groups, lr=ocfg.lr, momentum=ocfg.momentum, trust_coefficient=ocfg.lars_eta)
    if ocfg.optimizer == "adamw":
        # decoupled weight decay (Loshchilov & Hutter 2019), the optimiser of the ViT recipes (DINO, MoCo v3)
        return torch.optim.AdamW(groups, lr=ocfg.lr, betas=tuple(ocfg.betas))
    return torch.optim.SGD(groups, lr=ocfg.lr, momentum=ocfg.momentum)


def token_parameters(model: nn.Module) -> Set[int]:
    """ids of the parameters that a submodule lists in ``no_weight_decay()`` (timm's ViTs: pos_embed,
    cls_token, ...): embeddings, not weights, kept out of weight decay."""
    out: Set[int] = set()
    for prefix, module in model.named_modules():
        names = module.no_weight_decay() if callable(getattr(module, "no_weight_decay", None)) else ()
        params = dict(module.named_parameters())
        out |= {id(params[n]) for n in names if n in params}
    return out


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, peak: float, weight_decay: float,
                        momentum: Optional[float] = None, betas: Optional[Sequence[float]] = None) -> None:
    """Every step, from the config: the scheduled lr on every group (the peak lr on the groups marked
    fixed_lr), the (scheduled or constant) weight decay on the groups marked ``decay`` at build, and
    SGD / LARS's momentum or AdamW's betas. Written each step, not only at build, because a resume
    loads the optimiser's groups with the values they were saved with: a changed optim.weight_decay
    or optim.momentum must act on the resumed run too, and a weight-decay schedule that passes 0
    must not lose which groups it decays."""
    for group in optimizer.param_groups:
        group["lr"] = peak if group.get("fixed_lr") else lr
        # checkpoints from before the mark: the decayed groups are those with weight decay
        if group.get("decay", group["weight_decay"] > 0):
            group["weight_decay"] = weight_decay
        if momentum is not None and "momentum" in group:
            group["momentum"] = momentum
        if betas is not None and "betas" in group:
            group["betas"] = tuple(betas)


@torch.no_grad()
def clip_gradients(parameters, max_norm: float) -> None:
    """Scale each parameter's gradient down to a norm of at most max_norm (DINO's utils.clip_gradients:
    per parameter, not the global norm of torch.nn.utils.clip_grad_norm_), in foreach kernels."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    scale = torch._foreach_add(norms, 1e-6)
    torch._foreach_reciprocal_(scale)
    torch._foreach_mul_(scale, max_norm)
    torch._foreach_clamp_max_(scale, 1.0)
    torch._foreach_mul_(grads, scale)
