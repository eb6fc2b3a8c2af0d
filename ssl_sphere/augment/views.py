"""The Augmenter: the training views of a uint8 batch and the evaluation transform of one dataset,
built from the ops in ops.py. The views come in groups of one size (the two global views; the small
local crops of multi-crop), each group drawn in one batched pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch import nn

from .ops import _check_uint8, _colour, blur, color_jitter_, crop_resize_flip, eval_transform, sample_crops, solarize


@dataclass(frozen=True)
class ViewGroup:
    """Views of one size, drawn in one batched pass: ``len(blur_p)`` views of every image at ``size``
    px, random resized crops of area ``crop_scale``, per-view blur / solarisation probabilities."""

    size: int
    crop_scale: Tuple[float, float]
    blur_p: Tuple[float, ...]
    solarize_p: Tuple[float, ...]

    @property
    def count(self) -> int:
        return len(self.blur_p)


def view_groups(aug, image_size: int) -> List[ViewGroup]:
    """The view groups of an ``aug`` config section: the two global views at image_size with their
    per-view blur / solarisation, then aug.local_crops small crops at aug.local_size (multi-crop,
    Caron et al. 2020 Sec. 3.2) with their own crop scale, blur and solarisation."""
    groups = [ViewGroup(image_size, tuple(aug.crop_scale), tuple(aug.blur_p), tuple(aug.solarize_p))]
    n = aug.get("local_crops", 0)
    if n:
        groups.append(ViewGroup(aug.local_size, tuple(aug.local_crop_scale), (aug.local_blur_p,) * n,
                                (aug.local_solarize_p,) * n))
    return groups


class Augmenter(nn.Module):
    """Training views (two global views, plus local crops with multi-crop) and the eval transform
    for one dataset.

    aug: the ``aug`` config section; mean/std: (3,) dataset statistics in [0, 1] units."""

    def __init__(self, aug, image_size: int, mean: Sequence[float], std: Sequence[float], eval_crop: float = 1.0):
        super().__init__()
        self.aug, self.size, self.eval_crop = aug, image_size, eval_crop
        self.groups = view_groups(aug, image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def draw(self, x: torch.Tensor, group: ViewGroup) -> torch.Tensor:
        """x: (B, 3, H, W) uint8 -> (group.count * B, 3, S, S) normalised float, S = group.size: view
        v of every image in rows [v * B, (v + 1) * B).

        All views of the group go through each op as ONE batch (2B rows for a view pair), so every op
        is one kernel launch per group and step instead of one per view; the views differ only in
        their per-view blur/solarise probabilities, which become per-row probabilities."""
        _check_uint8(x)
        a = self.aug
        b, _, height, width = x.shape
        n, size = group.count, group.size
        dev = x.device
        xf = (x.repeat(n, 1, 1, 1) if n > 1 else x).float().div_(255)  # (N, 3, H, W), N = n * B
        rows = xf.shape[0]
        crops = sample_crops(rows, height, width, group.crop_scale, a.crop_ratio, dev)
        flip = torch.rand(rows, device=dev) < a.hflip_p
        y = crop_resize_flip(xf, crops, flip, size).contiguous().clamp_(0, 1)  # channels_last input
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
        blur_p = group.blur_p
        if max(blur_p) > 0:
            y = self._per_view(y, b, blur_p, lambda t, p: blur(t, p, a.blur_sigma))
        grey = torch.rand(rows, device=dev) < a.grayscale_p
        luma = _colour(dev, y.dtype).luma
        eye = torch.eye(3, device=dev, dtype=y.dtype)
        mix = torch.where(grey.view(-1, 1, 1), luma.expand(3, 3), eye)  # (N, 3, 3): rows of luma or identity
        inv_std = 1 / self.std.view(1, 3, 1)
        shift = (-self.mean / self.std).view(1, 3, 1).expand(rows, 3, 1)
        solar_p = group.solarize_p
        flat, out = y.reshape(rows, 3, -1), spare.view(rows, 3, -1)
        if max(solar_p) > 0:
            torch.bmm(mix, flat, out=out)
            out = self._per_view(out, b, solar_p, solarize).mul_(inv_std).add_(shift)
        else:
            torch.baddbmm(shift, inv_std * mix, flat, out=out)
        return out.view(rows, 3, size, size)

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
        """The training views of x (B, 3, H, W) uint8, one batched pass per view group: a list of
        (B, 3, S, S) tensors (views of one buffer per group, no copy), the global views first."""
        return [v for g in self.groups for v in self.draw(x, g).split(x.shape[0])]

    def eval_transform(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) uint8 -> normalised float, resized to ``size`` if needed; no augmentation."""
        return eval_transform(x, self.size, self.mean, self.std, self.eval_crop)


