"""The way back from a checkpoint to a pretrained network: ``load_pretrained`` (the module and what it
expects as input) and ``export`` (a plain state_dict that the source library's model loads)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch
from omegaconf import DictConfig
from torch import nn

from ..augment.ops import eval_transform
from ..config import ConfigError, from_container
from ..core import checkpoint
from .backbones import VITS, vit_options, vit_spec
from .ssl_model import model_from_checkpoint

PARTS = ("backbone", "momentum_backbone", "model")


def normalisation(cfg: DictConfig) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) the run normalised its images with: saved in the config by every run since
    they were resolved at start-up; older checkpoints fall back to the dataset's known values."""
    if cfg.data.mean is not None and cfg.data.std is not None:
        return tuple(cfg.data.mean), tuple(cfg.data.std)
    from ..data.datasets import load_digits
    from ..data.splits import STATS

    if cfg.data.dataset in STATS:
        return STATS[cfg.data.dataset]
    if cfg.data.dataset == "digits":
        d = load_digits(cfg.data.image_size)
        return d.mean, d.std
    raise ConfigError(f"this checkpoint does not record its normalisation statistics ({cfg.data.dataset} "
                      "images); recompute them from the training images (ssl_sphere.data.channel_stats) and "
                      "normalise with those")


@dataclass
class Pretrained:
    """A pretrained network and what it expects as input.

    module: in eval mode, on the requested device; ``part`` 'backbone' / 'momentum_backbone'
    map (B, 3, S, S) normalised images to (B, feature_dim) features, 'model' is the whole
    SSLModel. image_size: S, the side the network was trained at; mean / std: the per-channel
    normalisation in [0, 1] units. ``preprocess`` turns (B, 3, H, W) uint8 images into that input."""

    module: nn.Module
    part: str
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    feature_dim: int
    arch: str
    small_images: bool
    config: Dict[str, Any]
    step: Optional[int]  # the training step the checkpoint was written at
    eval_crop: float = 1.0  # the centred fraction of an image the evaluation view keeps (data.eval_crop)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, 3, S, S) float normalised: the centred square (eval_crop of the
        short side), resized (bilinear, antialiased) to S if needed; as the run's evaluation saw its images."""
        return eval_transform(images, self.image_size, self.mean, self.std, self.eval_crop)


def load_pretrained(path: str, part: str = "backbone", device: Union[str, torch.device] = "cpu") -> Pretrained:
    """Load an ssl_sphere checkpoint (``last.pt``, ``epoch_XXXX.pt``) for use.

        p = ssl_sphere.load_pretrained("runs/cifar10_moco_sec_s0/last.pt")
        features = p.module(p.preprocess(images_uint8))       # (B, p.feature_dim)

    part: 'backbone' (the encoder that kNN / linear probes evaluate), 'momentum_backbone'
    (MoCo's key encoder / BYOL's target; an EMA of the backbone) or 'model' (everything)."""
    if part not in PARTS:
        raise ConfigError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")
    ckpt = checkpoint.load(path)
    model = model_from_checkpoint(ckpt, path)
    cfg = from_container(ckpt["config"], f"checkpoint {path}")
    method = model.method
    if part == "backbone":
        module = method.backbone
    elif part == "momentum_backbone":
        module = method.momentum_backbone()
        if module is None:
            raise ConfigError(f"{path} was trained with {cfg.method.name}, which has no momentum encoder; "
                              "use part='backbone'")
    else:
        module = model
    for m in module.modules():  # a user's batch need not split into the training run's BN groups (split BN)
        if hasattr(m, "num_splits"):
            m.num_splits = 1
    mean, std = normalisation(cfg)
    return Pretrained(module.to(device).eval(), part, int(cfg.data.image_size), mean, std, method.feature_dim,
                      cfg.model.backbone, bool(cfg.model.small_images), ckpt["config"], ckpt.get("step"),
                      float(cfg.data.eval_crop))


def backbone_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """A plain state_dict (contiguous CPU tensors, no training memory format) of a backbone."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def source_model(cfg) -> Dict[str, Any]:
    """How the source library rebuilds a run's backbone, for the export's JSON: ``library`` (timm |
    torchvision | ssl_sphere), ``name`` and ``kwargs``: ``timm.create_model(name, num_classes=0, **kwargs)``
    for a ViT; ``torchvision.models.get_model(name, **kwargs)`` for a ResNet, then ``fc`` replaced by
    ``nn.Identity()`` and, with ``small_images``, the 3x3 stride-1 stem without max-pool."""
    name = cfg.model.backbone
    if name in VITS:
        timm_name, kwargs = vit_spec(name, **vit_options(cfg.model, int(cfg.data.image_size)))
        return {"library": "timm", "name": timm_name, "kwargs": kwargs}
    if name == "tiny":
        return {"library": "ssl_sphere", "name": "tiny", "kwargs": {}}
    return {"library": "torchvision", "name": name, "kwargs": {"weights": None}}


def export(checkpoint_path: str, out: str, part: str = "backbone") -> dict:
    """Write the backbone of ``checkpoint_path`` to ``out`` (+ its .json); returns the metadata."""
    p = load_pretrained(checkpoint_path, part=part)
    state = backbone_state_dict(p.module)
    meta = {**source_model(from_container(p.config)), "arch": p.arch, "small_images": p.small_images,
            "image_size": p.image_size, "mean": list(p.mean),
            "std": list(p.std), "feature_dim": p.feature_dim, "part": part, "method": p.config["method"]["name"],
            "checkpoint": os.path.abspath(checkpoint_path), "step": p.step,
            "values": sum(t.numel() for t in state.values())}
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ConfigError(f"output directory {parent} does not exist; create it or choose another --out")
    checkpoint.save(out, state)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    return meta
