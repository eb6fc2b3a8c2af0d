"""Backbones: torchvision ResNets (optionally with the small-image stem) and a
tiny CPU convnet for smoke runs and tests."""

from __future__ import annotations

from typing import Tuple

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


def build_backbone(name: str, small_images: bool) -> Tuple[nn.Module, int]:
    """Returns (module mapping (B, 3, H, W) -> (B, F), F).

    small_images: replace the ImageNet stem (7x7 stride-2 conv + max-pool) by a
    3x3 stride-1 conv and no pool, the standard CIFAR adaptation (SimCLR
    Appendix B.9)."""
    if name == "tiny":
        return tiny_convnet()
    try:
        net = torchvision.models.get_model(name, weights=None)
    except ValueError:
        raise ValueError(f"unknown backbone {name!r}; try tiny, resnet18, resnet34, resnet50, ...") from None
    if not isinstance(net, torchvision.models.ResNet):
        raise ValueError(f"backbone {name!r} is not a ResNet; only ResNets and 'tiny' are supported")
    if small_images:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim
