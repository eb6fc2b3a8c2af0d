"""What every dataset is: uint8 image tensors with labels, split into pretraining images, the kNN
bank and the test queries; plus the helpers that look at such tensors (channel statistics,
class-stratified subsets, the memory check before a decode)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Tuple

import torch

from ..core.errors import UserError

# Channel statistics used for normalisation (computed on each training split).
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

class DataError(UserError, RuntimeError):
    """Missing, empty or corrupt data; the message says where to put the files."""

@dataclass
class Split:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64; -1 for unlabelled

    def __len__(self) -> int:
        return self.images.shape[0]

@dataclass
class DataSplits:
    name: str
    train: Split  # pretraining images (may include unlabelled ones)
    bank: Split  # labelled train split: kNN bank / linear-probe training set
    test: Split  # labelled test split: kNN queries
    classes: List[str]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

def channel_stats(images: torch.Tensor, max_images: int = 10000) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean/std in [0, 1] units of (N, 3, H, W) uint8 images, from an evenly
    strided subset (folders are stored class by class, so a prefix would be biased)."""
    idx = torch.linspace(0, images.shape[0] - 1, min(max_images, images.shape[0])).long()
    x = images[idx].float().div_(255)
    return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).tolist())

def check_fits_in_ram(n: int, image_size: int, what: str, fraction: float = 0.8) -> None:
    """Refuse before allocating: n uint8 RGB images at image_size px must fit in ``fraction``
    of this machine's RAM (the decoded dataset is one tensor in memory)."""
    need = n * 3 * image_size**2
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > fraction * ram:
        raise DataError(
            f"{what}: {n} images at {image_size}px need {need / 2**30:.1f} GiB in memory, more than "
            f"{fraction:.0%} of this machine's {ram / 2**30:.0f} GiB; lower data.image_size"
        )


def stratified_subset(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a deterministic class-stratified subset of size min(n, N).

    labels: (N,). Classes are filled round-robin (in proportion while all have
    samples left), samples within a class in a random order fixed by ``seed``."""
    if n >= labels.numel():
        return torch.arange(labels.numel())
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(labels.numel(), generator=g)
    # round-robin over classes in random order: take from each class in turn
    order = torch.argsort(labels[perm], stable=True)
    ranked = perm[order]
    cls = labels[ranked]
    rank_in_class = torch.arange(len(cls)) - torch.searchsorted(cls, cls)
    pick = ranked[torch.argsort(rank_in_class, stable=True)[:n]]
    return pick.sort().values
