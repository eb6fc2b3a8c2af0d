"""Batched on-device view augmentation with per-sample random parameters.

Input: (B, 3, H, W) uint8 on the training device. Output: normalised float views.
The ops and their parameter ranges follow torchvision's transforms as used by
SimCLR (Chen et al. 2020, Appendix A) and BYOL (Grill et al. 2020, Table 6):

* random resized crop + horizontal flip: one batched affine ``grid_sample``
  (flip folded into the affine matrix), instead of a per-image crop/resize;
* colour jitter (p=0.8) with brightness/contrast/saturation as per-sample
  blends and hue as a per-sample rotation in YIQ space, applied in an
  independent random order per sample. DEVIATION: torchvision shifts hue in
  HSV; the YIQ rotation is the standard linear approximation (error bounded
  in tests/test_augment.py) and avoids the HSV round trip that makes stock
  Kornia's ColorJitter slow on CPU (DESIGN.md, "Performance principles");
* random grayscale (p=0.2), Gaussian blur via Kornia with per-sample sigma,
  solarisation (BYOL) and normalisation with the dataset statistics.

All randomness comes from the global torch RNG of the device, which the
checkpoint saves, so resumed runs draw the same parameters.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from torch import nn

# luma weights of torchvision's rgb_to_grayscale (ITU-R 601 with 0.2989 for red)
_LUMA = (0.2989, 0.587, 0.114)
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _uniform(shape, lo: float, hi: float, device) -> torch.Tensor:
    return torch.rand(shape, device=device) * (hi - lo) + lo


def sample_crops(b: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float], device,
                 tries: int = 10) -> torch.Tensor:
    """torchvision RandomResizedCrop.get_params, vectorised: up to ``tries`` draws per
    sample, first valid one kept, else the whole image clamped to the ratio range.

    Returns (B, 4) crops as (x0, y0, w, h) in pixels (continuous)."""
    area = height * width
    s = _uniform((b, tries), scale[0], scale[1], device) * area
    logr = _uniform((b, tries), math.log(ratio[0]), math.log(ratio[1]), device)
    r = torch.exp(logr)
    w, h = torch.sqrt(s * r), torch.sqrt(s / r)
    ok = (w <= width) & (h <= height)
    first = torch.argmax(ok.int(), dim=1, keepdim=True)  # index of the first valid try
    any_ok = ok.any(1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    # fallback (torchvision): whole image, aspect clamped to the ratio range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, width / ratio[0]
    elif in_ratio > ratio[1]:
        fw, fh = height * ratio[1], height
    else:
        fw, fh = width, height
    w = torch.where(any_ok, w, torch.full_like(w, fw))
    h = torch.where(any_ok, h, torch.full_like(h, fh))
    x0 = torch.rand(b, device=device) * (width - w)
    y0 = torch.rand(b, device=device) * (height - h)
    return torch.stack([x0, y0, w, h], 1)


def crop_resize_flip(x: torch.Tensor, crops: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """x: (B, C, H, W) float; crops: (B, 4) (x0, y0, w, h) px; flip: (B,) bool -> (B, C, size, size).
    One bilinear grid_sample for the whole batch (align_corners=False geometry). Crop and
    flip are axis-aligned, so the sampling grid is built by broadcasting a per-sample
    column of x and row of y (cheaper than F.affine_grid's batched matmul)."""
    b, _, height, width = x.shape
    x0, y0, w, h = crops.unbind(1)
    sign = 1.0 - 2.0 * flip.to(x.dtype)
    base = (2 * torch.arange(size, device=x.device, dtype=x.dtype) + 1) / size - 1  # output pixel centres
    gx = (w / width * sign).view(-1, 1) * base + ((2 * x0 + w) / width - 1).view(-1, 1)  # (B, S)
    gy = (h / height).view(-1, 1) * base + ((2 * y0 + h) / height - 1).view(-1, 1)  # (B, S)
    grid = torch.stack([gx.view(b, 1, size).expand(b, size, size), gy.view(b, size, 1).expand(b, size, size)], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    return _LUMA[0] * x[:, 0:1] + _LUMA[1] * x[:, 1:2] + _LUMA[2] * x[:, 2:3]


def hue_matrices(h: torch.Tensor) -> torch.Tensor:
    """(B,) hue shifts in turns ([-0.5, 0.5]) -> (B, 3, 3) RGB->RGB rotations about the grey axis in YIQ."""
    t = _RGB2YIQ.to(h.device, h.dtype)
    a = -2 * math.pi * h  # sign: positive h turns red towards yellow, as torchvision's HSV shift
    cos, sin = torch.cos(a), torch.sin(a)
    rot = torch.zeros(h.shape[0], 3, 3, device=h.device, dtype=h.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    return torch.linalg.inv(t) @ rot @ t


def adjust_hue(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x: (B, 3, H, W) in [0, 1]; h: (B,) shifts in turns."""
    return torch.einsum("bij,bjhw->bihw", hue_matrices(h), x).clamp_(0, 1)


def adjust_brightness(x, f):
    return (x * f.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(x, f):
    mean = grayscale(x).mean((1, 2, 3), keepdim=True)
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def adjust_saturation(x, f):
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * grayscale(x)).clamp_(0, 1)


def color_jitter(x: torch.Tensor, p: float, strengths: Sequence[float]) -> torch.Tensor:
    """torchvision ColorJitter(b, c, s, h) applied with probability p per sample, the
    four ops in a random order per sample, clamped after each op as torchvision does.

    Every op is a per-sample affine map of the RGB vector (brightness f*I, contrast
    f*I + (1-f)*grey mean, saturation f*I + (1-f)*1 luma^T, hue a YIQ rotation), so
    each of the 4 order slots is ONE batched 3x3 matrix product (baddbmm) + clamp;
    samples not jittered get identity parameters."""
    bri, con, sat, hue = strengths
    b, c, h, w = x.shape
    dev, dt = x.device, x.dtype
    on = torch.rand(b, device=dev) < p
    one = torch.ones(b, device=dev)
    fb = torch.where(on, _uniform(b, max(0.0, 1 - bri), 1 + bri, dev), one)
    fc = torch.where(on, _uniform(b, max(0.0, 1 - con), 1 + con, dev), one)
    fs = torch.where(on, _uniform(b, max(0.0, 1 - sat), 1 + sat, dev), one)
    fh = torch.where(on, _uniform(b, -hue, hue, dev), one * 0)
    order = torch.argsort(torch.rand(b, 4, device=dev), dim=1)  # per-sample permutation of the 4 ops
    luma = torch.tensor(_LUMA, device=dev, dtype=dt)
    eye = torch.eye(3, device=dev, dtype=dt).expand(b, 3, 3)
    mats = torch.stack([
        fb.view(-1, 1, 1) * eye,
        fc.view(-1, 1, 1) * eye,
        fs.view(-1, 1, 1) * eye + (1 - fs).view(-1, 1, 1) * luma.view(1, 1, 3),
        hue_matrices(fh),
    ], 1)  # (B, 4, 3, 3)
    y = x.reshape(b, 3, h * w)
    rows = torch.arange(b, device=dev)
    for slot in range(4):
        k = order[:, slot]
        grey_mean = y.mean(2) @ luma  # (B,) of the current image (contrast's blend target)
        off = torch.where(k == 1, (1 - fc) * grey_mean, torch.zeros_like(grey_mean))
        y = torch.baddbmm(off.view(-1, 1, 1).expand(b, 3, 1), mats[rows, k], y).clamp_(0, 1)
    return y.view(b, c, h, w)


def blur(x: torch.Tensor, p: float, sigma: Sequence[float]) -> torch.Tensor:
    """Gaussian blur with probability p, sigma ~ U(sigma) per sample; kernel ~10% of
    the image side, odd (SimCLR Appendix A)."""
    b, dev = x.shape[0], x.device
    k = max(3, int(0.1 * x.shape[-1]) // 2 * 2 + 1)
    s = _uniform(b, sigma[0], sigma[1], dev)
    y = gaussian_blur2d(x, (k, k), torch.stack([s, s], 1), border_type="reflect")
    on = (torch.rand(b, device=dev) < p).view(-1, 1, 1, 1)
    return torch.where(on, y, x)


def solarize(x: torch.Tensor, p: float, threshold: float = 0.5) -> torch.Tensor:
    on = (torch.rand(x.shape[0], device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(on & (x >= threshold), 1.0 - x, x)


class Augmenter(nn.Module):
    """Two-view training augmentation and the eval transform for one dataset.

    aug: the ``aug`` config section; mean/std: (3,) dataset statistics in [0, 1] units."""

    def __init__(self, aug, image_size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.aug, self.size = aug, image_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    @torch.no_grad()
    def view(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """x: (B, 3, H, W) uint8 -> (B, 3, size, size) normalised float view ``index`` (0 or 1)."""
        a = self.aug
        xf = x.float().div_(255)
        b, _, height, width = xf.shape
        crops = sample_crops(b, height, width, a.crop_scale, a.crop_ratio, x.device)
        flip = torch.rand(b, device=x.device) < a.hflip_p
        y = crop_resize_flip(xf, crops, flip, self.size).clamp_(0, 1)
        if a.jitter_p > 0:
            y = color_jitter(y, a.jitter_p, (a.brightness, a.contrast, a.saturation, a.hue))
        if a.grayscale_p > 0:
            on = (torch.rand(b, device=x.device) < a.grayscale_p).view(-1, 1, 1, 1)
            y = torch.where(on, grayscale(y).expand_as(y), y)
        if a.blur_p[index] > 0:
            y = blur(y, a.blur_p[index], a.blur_sigma)
        if a.solarize_p[index] > 0:
            y = solarize(y, a.solarize_p[index])
        return self.normalize(y)

    def views(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.view(x, 0), self.view(x, 1)

    @torch.no_grad()
    def eval_transform(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) uint8 -> normalised float, resized to ``size`` if needed; no augmentation."""
        y = x.float().div_(255)
        if y.shape[-1] != self.size or y.shape[-2] != self.size:
            y = F.interpolate(y, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self.normalize(y)
