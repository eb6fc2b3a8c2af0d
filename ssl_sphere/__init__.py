"""ssl_sphere: self-supervised contrastive pretraining on the hypersphere (SimCLR, MoCo v2, BYOL + SEC/SEE/vMF).

Library entry points: ``load_pretrained`` (a checkpoint's backbone and its input normalisation),
``train`` (a resolved config -> a run), ``build_config`` (command-line style arguments -> config).
They are imported on first use, so ``import ssl_sphere`` (and every CLI's ``--help``) stays light."""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {"Pretrained": "model", "load_pretrained": "model", "build_config": "pretrain", "train": "train"}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ssl_sphere' has no attribute {name!r}")
