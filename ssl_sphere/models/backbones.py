"""Backbones: torchvision ResNets (optionally with the small-image stem), timm Vision Transformers,
a tiny CPU convnet for smoke runs and tests, and the split BatchNorm of single-process MoCo."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


def tiny_convnet(width: int = 64) -> Tuple[nn.Module, int]:
    """4 conv-BN-ReLU blocks + global average pool: (B, 3, H, W) -> (B, 2*width).

    Hand-written because torchvision has no backbone small enough for a
    sub-3-minute CPU run; used by the default digits run and the tests."""

    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )

    net = nn.Sequential(
        block(3, width // 2, 1),
        block(width // 2, width, 2),
        block(width, width, 1),
        block(width, 2 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return net, 2 * width


#: --backbone name -> timm's model (patch 16 at 224 px; img_size and patch_size are set per run)
VITS = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}


def vit_spec(name: str, image_size: int, patch_size: int, pool: str = "cls", drop_path: float = 0.0,
             dynamic_img_size: bool = True) -> Tuple[str, Dict[str, Any]]:
    """(timm model name, kwargs) of a ViT backbone: ``timm.create_model(name, num_classes=0, **kwargs)``
    builds it (what export records, so the source library rebuilds the exported backbone).
    pool: 'cls' (the class token, as DINO / MoCo v3) | 'mean' (mean of the patch tokens, timm's
    'avg', with its norm after pooling); dynamic_img_size: positional embeddings interpolated
    (bicubic, timm) to any input size, e.g. an evaluation at another size than training."""
    kwargs = {"img_size": image_size, "patch_size": patch_size, "global_pool": {"cls": "token", "mean": "avg"}[pool],
              "drop_path_rate": drop_path, "dynamic_img_size": dynamic_img_size}
    return VITS[name], kwargs


def build_vit(name: str, **spec) -> Tuple[nn.Module, int]:
    """A timm Vision Transformer without classifier: (B, 3, H, W) -> (B, embed_dim). From timm, the
    zoo lightly and solo-learn build their ViTs from (torchvision's VisionTransformer has no drop
    path, no mean pooling, no positional-embedding interpolation at other input sizes)."""
    import timm

    timm_name, kwargs = vit_spec(name, **spec)
    net = timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
    return net, net.num_features


def build_backbone(name: str, small_images: bool = False, **vit) -> Tuple[nn.Module, int]:
    """Returns (module mapping (B, 3, H, W) -> (B, F), F).

    small_images: replace the ImageNet stem (7x7 stride-2 conv + max-pool) by a
    3x3 stride-1 conv and no pool, the standard CIFAR adaptation (SimCLR
    Appendix B.9). vit: image_size, patch_size, pool, drop_path, dynamic_img_size for the
    ViTs (vit_spec)."""
    if name == "tiny":
        return tiny_convnet()
    if name in VITS:
        return build_vit(name, **vit)
    try:
        net = torchvision.models.get_model(name, weights=None)
    except ValueError:
        raise ValueError(f"unknown backbone {name!r}; try tiny, resnet18, resnet34, resnet50, vit_small, ...") from None
    if not isinstance(net, torchvision.models.ResNet):
        raise ValueError(f"backbone {name!r} is not a ResNet; only ResNets, ViTs ({', '.join(VITS)}) and 'tiny' "
                         "are supported")
    if small_images:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that, in training mode, normalises ``num_splits`` groups of the batch with
    their own statistics, as ``num_splits`` GPUs would (the SplitBatchNorm of the MoCo authors'
    CIFAR-10 demo, which single-GPU MoCo needs: with the key batch shuffled, a key and its
    query then never share BN statistics, MoCo Sec. 3.3). Sample n is in group n mod
    num_splits; the running statistics are the mean over the groups; eval mode is plain BN.
    Same parameters and buffers as BatchNorm2d, so checkpoints move between the two; that is why
    this is not lightly.models.batchnorm.SplitBatchNorm, whose running buffers are C x num_splits
    (and which needs affine weights)."""

    def __init__(self, num_features: int, num_splits: int, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W), N divisible by num_splits."""
        if self.num_splits == 1:
            return super().forward(x)
        if not self.track_running_stats:
            return self._groups(x)
        if not self.training:
            return super().forward(x)  # eval: plain BN with the averaged running statistics
        n, c, h, w = x.shape
        s = self.num_splits
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        out = F.batch_norm(x.reshape(n // s, c * s, h, w), mean, var, *self._affine(s),
                           True, self.momentum if self.momentum is not None else 0.1, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(s, c).mean(0))
            self.running_var.copy_(var.view(s, c).mean(0))
            self.num_batches_tracked.add_(1)
        return out.reshape(n, c, h, w)

    def _groups(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group normalisation without running statistics (track_running_stats=False)."""
        n, c, h, w = x.shape
        s = self.num_splits
        return F.batch_norm(x.reshape(n // s, c * s, h, w), None, None, *self._affine(s), True, 0.0,
                            self.eps).reshape(n, c, h, w)

    def _affine(self, s: int):
        """(weight, bias) repeated for s groups laid side by side on the channel axis (None: affine=False)."""
        return tuple(p.repeat(s) if p is not None else None for p in (self.weight, self.bias))


def split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d of ``module`` (in place) by a SplitBatchNorm with the same
    parameters and buffers; returns the module."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = SplitBatchNorm(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                                 affine=child.affine, track_running_stats=child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            split_batchnorm(child, num_splits)
    return module


def backbone_of(model_cfg, image_size: int) -> Tuple[nn.Module, int]:
    """The backbone of a resolved config's model section at ``image_size``."""
    return build_backbone(model_cfg.backbone, bool(model_cfg.small_images), **vit_options(model_cfg, image_size))


def vit_options(model_cfg, image_size: int) -> Dict[str, Any]:
    """The ViT options of a model config section (empty for the other backbones)."""
    if model_cfg.backbone not in VITS:
        return {}
    return {"image_size": image_size, "patch_size": model_cfg.patch_size, "pool": model_cfg.pool,
            "drop_path": model_cfg.drop_path, "dynamic_img_size": model_cfg.dynamic_img_size}
