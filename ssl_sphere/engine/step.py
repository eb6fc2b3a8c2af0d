"""One optimisation step of the pretraining loop, with its data path."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig
from torch import nn

from ..augment.views import Augmenter
from ..core.schedules import cosine_schedule, lr_at
from ..data.loader import Prefetcher
from ..methods import Method
from .device import bf16_enabled
from .optim import clip_gradients, set_hyperparameters


def place_images(images: torch.Tensor, cfg: DictConfig, device: torch.device) -> tuple[torch.Tensor, bool]:
    """The uint8 train set copied to the device once when it fits there (data.on_device), else left
    where it is (host memory or the memory-mapped cache; batches are gathered from it one step
    ahead, loader.Prefetcher). Returns (images, on_device)."""
    on_device = cfg.data.on_device == "yes" or (
        cfg.data.on_device == "auto" and device.type == "cuda" and images.numel() < 4 * 2**30)
    if on_device:
        return images.to(device), True
    return images, False


class TrainStep:
    """One optimisation step of the pretraining loop and its data path (``batches``): lr schedule ->
    batch -> augmentation -> forward (method + SEC + vMF, bf16 autocast where enabled) ->
    non-finite flag -> backward -> optimiser -> method.after_step (EMA updates). train() and the
    step benchmark (benchmarks/bench.py) both run this object, data path included, so the
    benchmark times the loop's code.

    forward: the SSLModel or its DDP wrapper; images: from place_images. ``first_bad`` is
    a device scalar holding the first step with a non-finite loss (-1: none), updated
    without a host sync; the caller reads it when it logs."""

    def __init__(self, forward: nn.Module, method: Method, optimizer: torch.optim.Optimizer, aug: Augmenter,
                 images: torch.Tensor, on_device: bool, cfg: DictConfig, total: int, warmup: int,
                 device: torch.device, steps_per_epoch: int):
        self.forward, self.method, self.optimizer, self.aug = forward, method, optimizer, aug
        self.images, self.on_device, self.cfg = images, on_device, cfg
        self.total, self.warmup, self.device, self.steps_per_epoch = total, warmup, device, steps_per_epoch
        self.use_bf16 = bf16_enabled(cfg, device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def batches(self, order: Iterable[Tuple[int, torch.Tensor]]) -> Iterator[Tuple[int, torch.Tensor, Any]]:
        """The data path of the loop: (step, idx, x) for the (step, this rank's indices) of ``order``.
        With the dataset on the device, x is None and the step indexes it there; otherwise x is the
        (B, 3, H, W) uint8 batch, gathered one step ahead by a background thread into reused (pinned,
        on CUDA) buffers and copied to the device (data.loader.Prefetcher)."""
        if self.on_device:
            return ((s, i, None) for s, i in order)
        return Prefetcher(self.images, self.device, self.cfg.optim.batch_size)(order)

    def batch(self, idx_dev: torch.Tensor, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The (B, 3, H, W) uint8 batch on the training device: x as ``batches`` yields it, or (x None)
        indexed by idx_dev from the dataset on the device."""
        return self.images[idx_dev] if x is None else x

    def views(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The augmented views of the uint8 batch x, in the model's memory format."""
        views = self.aug.views(x)
        if self.cfg.model.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return views

    def __call__(self, step: int, idx: torch.Tensor, x: Optional[torch.Tensor] = None,
                 mark: Optional[Callable[[str], None]] = None):
        """idx: (B,) CPU indices of this rank's batch; x: its (B, 3, H, W) uint8 images on the training
        device as ``batches`` yields them (None: indexed here from the dataset on the device). mark(name),
        if given, is called after each phase (the benchmark's profiler). Returns (loss, method_loss,
        logs, the method's StepOutput, lr)."""
        cfg, device, optimizer = self.cfg, self.device, self.optimizer
        mark = mark or (lambda name: None)
        o = cfg.optim
        lr = lr_at(step, self.total, self.warmup, o.lr, o.min_lr_ratio)
        wd = o.weight_decay if o.get("weight_decay_end") is None else cosine_schedule(step / self.total,
                                                                                       o.weight_decay,
                                                                                       o.weight_decay_end)
        set_hyperparameters(optimizer, lr, o.lr, wd, momentum=o.momentum, betas=o.get("betas"))
        idx_dev = idx.to(device, non_blocking=True)  # one copy, used for the batch and by vMF
        x = self.batch(idx_dev, x)
        mark("batch_index")
        views = self.views(x)
        mark("augment")
        self.method.begin_step(step / self.steps_per_epoch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            loss, method_loss, logs, out = self.forward(views, step / self.total, idx_dev)
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)  # no sync
        mark("forward")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mark("backward")
        self.method.before_optimizer_step()
        if o.get("clip_grad"):
            clip_gradients(self.forward.parameters(), o.clip_grad)
        optimizer.step()
        mark("optimizer")
        self.method.after_step((step + 1) / self.total)
        mark("after_step")
        return loss, method_loss, logs, out, lr
