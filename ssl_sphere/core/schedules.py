"""Schedules as pure functions of training progress (no state: a resumed run recomputes them)."""

from __future__ import annotations

import math


def lr_at(step: int, total: int, warmup: int, lr: float, min_ratio: float = 0.0) -> float:
    """Linear warmup from lr/warmup to lr over ``warmup`` steps, then half-cosine to lr*min_ratio."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def cosine_schedule(progress: float, base: float, final: float) -> float:
    """From ``base`` to ``final`` along a half cosine of training progress in [0, 1]: the EMA
    momentum (BYOL, Grill et al. 2020, Sec. 3.2: tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2)
    and the weight decay of the ViT recipes (DINO's cosine_scheduler from weight_decay to
    weight_decay_end)."""
    p = min(max(progress, 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * p) + 1) / 2
