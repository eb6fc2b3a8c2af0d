"""Frozen features of uint8 images: eval mode, the evaluation transform only, no grad, batch by batch."""

from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
from torch import nn


@torch.no_grad()
def extract_features(model_or_backbone: nn.Module, images, batch_size: int,
                     device: torch.device, transform: Optional[Callable] = None,
                     index: Optional[torch.Tensor] = None, progress: bool = False,
                     desc: str = "features") -> torch.Tensor:
    """Frozen features of a set of images.

    images: (N, 3, H, W) uint8 tensor (or already-transformed float; in memory or
    memory-mapped), or a data ``Split`` (anything with an ``.images`` attribute holding such a
    tensor). index: (M,) rows to embed (default all), gathered one batch at a time, so a
    memory-mapped dataset is never copied whole. Returns (M, F) float32 on ``device``;
    progress: a progress bar on stderr.

    Eval mode (the module's mode is restored afterwards), no augmentation
    (``transform`` only converts, resizes and normalises, e.g.
    ``Augmenter.eval_transform``), no grad, bf16 autocast on CUDA. Uses
    ``.features`` when the module has it (a method), else calls the module (a
    backbone). Batches are moved to ``device`` one at a time, so the images may
    stay on the CPU."""
    from tqdm import tqdm

    images = getattr(images, "images", images)
    fn = getattr(model_or_backbone, "features", model_or_backbone)
    was_training = model_or_backbone.training
    model_or_backbone.eval()
    device = torch.device(device)
    n = images.shape[0] if index is None else index.shape[0]
    out = []
    try:
        for i in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress, leave=False,
                      file=sys.stderr, dynamic_ncols=True):
            rows = images[i:i + batch_size] if index is None else images[index[i:i + batch_size]]
            x = rows.to(device, non_blocking=True)
            if transform is not None:
                x = transform(x)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out.append(fn(x).float())
    finally:
        model_or_backbone.train(was_training)
    if not out:
        raise ValueError("extract_features got no images")
    return torch.cat(out)


