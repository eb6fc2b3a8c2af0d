"""Numerical precision rules shared by the losses and regularisers."""

from __future__ import annotations

import functools

import torch


def float32(fn):
    """Decorator: run a function of tensors with autocast off on the device of its first argument,
    so its similarities and logits are float32 even inside a bf16 autocast region (bf16 keeps ~3
    significant digits: too few for logits scaled by 1 / temperature)."""

    @functools.wraps(fn)
    def wrapped(x: torch.Tensor, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return wrapped
