"""Pretraining methods, one module each, found by name through the registry. Importing this package
registers the built-in methods; a method of your own registers itself the same way
(``@ssl_sphere.methods.register`` on a ``Method`` subclass with a ``Config`` dataclass)."""

from __future__ import annotations

# importing a method module registers it, in this order (the order --help and messages list them in)
from . import simclr  # noqa: F401

# isort: split
from . import moco  # noqa: F401

# isort: split
from . import byol  # noqa: F401

# isort: split
from . import simsiam  # noqa: F401

# isort: split
from . import mocov3  # noqa: F401

# isort: split
from . import nnclr  # noqa: F401

# isort: split
from . import dino  # noqa: F401

# isort: split
from . import swav  # noqa: F401

# isort: split
from .base import EMAPair, Method, MomentumMethod, StepOutput, get, names, register, update_momentum

__all__ = ["EMAPair", "Method", "MomentumMethod", "StepOutput", "build_method", "get", "names", "register",
           "update_momentum"]


def build_method(method_cfg, backbone, feature_dim, see_cfg=None) -> Method:
    """The registered method named ``method_cfg.name`` around ``backbone`` ((B, 3, H, W) -> (B, feature_dim))."""
    return get(method_cfg.name)(backbone, feature_dim, method_cfg, see_cfg)
