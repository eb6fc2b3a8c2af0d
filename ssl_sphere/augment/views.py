"""The Augmenter: the training views of a uint8 batch and the evaluation transform of one dataset,
built from the ops in ops.py."""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from .ops import _check_uint8, _colour, blur, color_jitter_, crop_resize_flip, eval_transform, sample_crops, solarize


class Augmenter(nn.Module):
    """Two-view training augmentation and the eval transform for one dataset.

    aug: the ``aug`` config section; mean/std: (3,) dataset statistics in [0, 1] units."""

    def __init__(self, aug, image_size: int, mean: Sequence[float], std: Sequence[float], eval_crop: float = 1.0):
        super().__init__()
        self.aug, self.size, self.eval_crop = aug, image_size, eval_crop
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def augment(self, x: torch.Tensor, indices: Sequence[int] = (0, 1)) -> torch.Tensor:
        """x: (B, 3, H, W) uint8 -> (len(indices) * B, 3, size, size) normalised float: view
        ``indices[i]`` of every image in rows [i * B, (i + 1) * B).

        All views go through each op as ONE batch (2B rows for a view pair), so every op
        is one kernel launch per step instead of one per view; the views differ only in
        their per-view blur/solarise probabilities, which become per-row probabilities."""
        _check_uint8(x)
        a = self.aug
        b, _, height, width = x.shape
        n = len(indices)
        dev = x.device
        xf = (x.repeat(n, 1, 1, 1) if n > 1 else x).float().div_(255)  # (N, 3, H, W), N = n * B
        rows = xf.shape[0]
        crops = sample_crops(rows, height, width, a.crop_scale, a.crop_ratio, dev)
        flip = torch.rand(rows, device=dev) < a.hflip_p
        y = crop_resize_flip(xf, crops, flip, self.size).contiguous().clamp_(0, 1)  # channels_last input
        # xf is dead from here on: reuse it as the workspace when it has the view's size
        # (two multi-MB allocations per call instead of seven; see color_jitter_)
        spare = xf if xf.numel() == y.numel() and xf.is_contiguous() else torch.empty_like(y)
        if a.jitter_p > 0:
            color_jitter_(y, a.jitter_p, (a.brightness, a.contrast, a.saturation, a.hue), scratch=spare,
                          hue_mode=a.hue_mode)
        # torchvision's order is grayscale -> blur -> solarise -> normalise. Grayscale is a
        # per-pixel channel mix and the blur filters every channel with the same kernel, so
        # the two commute exactly: blur first, then grayscale and normalisation fold into
        # ONE per-sample 3x3 map + offset (one pass instead of three) unless solarisation,
        # which is not linear, has to sit between them.
        blur_p = [a.blur_p[i] for i in indices]
        if max(blur_p) > 0:
            y = self._per_view(y, b, blur_p, lambda t, p: blur(t, p, a.blur_sigma))
        grey = torch.rand(rows, device=dev) < a.grayscale_p
        luma = _colour(dev, y.dtype).luma
        eye = torch.eye(3, device=dev, dtype=y.dtype)
        mix = torch.where(grey.view(-1, 1, 1), luma.expand(3, 3), eye)  # (N, 3, 3): rows of luma or identity
        inv_std = 1 / self.std.view(1, 3, 1)
        shift = (-self.mean / self.std).view(1, 3, 1).expand(rows, 3, 1)
        solar_p = [a.solarize_p[i] for i in indices]
        flat, out = y.reshape(rows, 3, -1), spare.view(rows, 3, -1)
        if max(solar_p) > 0:
            torch.bmm(mix, flat, out=out)
            out = self._per_view(out, b, solar_p, solarize).mul_(inv_std).add_(shift)
        else:
            torch.baddbmm(shift, inv_std * mix, flat, out=out)
        return out.view(rows, 3, self.size, self.size)

    @staticmethod
    def _per_view(y: torch.Tensor, b: int, probs: Sequence[float], op) -> torch.Tensor:
        """Apply ``op(rows, p)`` with per-row probability ``p`` (one value per view block of
        ``b`` rows) to the smallest contiguous range of view blocks with p > 0 (static
        slicing: no host sync)."""
        on = [i for i, p in enumerate(probs) if p > 0]
        lo, hi = on[0] * b, (on[-1] + 1) * b
        p = torch.cat([torch.full((b,), float(q), device=y.device, dtype=y.dtype) for q in probs[on[0]:on[-1] + 1]])
        if hi - lo == y.shape[0]:
            return op(y, p)
        y[lo:hi] = op(y[lo:hi], p)
        return y

    def views(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The training views of x (B, 3, H, W) uint8, drawn in one batched pass: a list of
        (B, 3, size, size) tensors (views of one buffer, no copy), view 0 first."""
        return list(self.augment(x, (0, 1)).split(x.shape[0]))

    def eval_transform(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) uint8 -> normalised float, resized to ``size`` if needed; no augmentation."""
        return eval_transform(x, self.size, self.mean, self.std, self.eval_crop)


