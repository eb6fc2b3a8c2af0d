"""Method registry: name -> class. Each method lives in its own file."""

from __future__ import annotations

from .base import Method, StepOutput, cosine_momentum
from .byol import BYOL
from .moco import MoCo
from .simclr import SimCLR

METHODS = {"simclr": SimCLR, "moco": MoCo, "byol": BYOL}


def build_method(method_cfg, backbone, feature_dim, see_cfg=None) -> Method:
    return METHODS[method_cfg.name](backbone, feature_dim, method_cfg, see_cfg)


__all__ = ["METHODS", "Method", "StepOutput", "build_method", "cosine_momentum"]
