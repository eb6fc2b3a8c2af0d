"""ssl_sphere: self-supervised contrastive pretraining on the hypersphere (SEC / SEE / vMF on every method).

Library entry points: ``load_pretrained`` (a checkpoint's backbone and its input normalisation),
``build_config`` (command-line style arguments -> resolved config), ``train`` (a resolved config -> a
run), ``build_model`` (the model of a resolved config). They are imported on first use, so
``import ssl_sphere`` (and every CLI's ``--help``) stays light. The package, by layer (imports run
downward only; tests/test_contract.py checks it): cli > engine > models > methods > evaluation > sphere >
config > augment, data > core."""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {"Pretrained": "models.pretrained", "load_pretrained": "models.pretrained", "build_config": "cli.pretrain",
         "train": "engine.train", "build_model": "models.ssl_model"}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ssl_sphere' has no attribute {name!r}")
