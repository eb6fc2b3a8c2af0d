"""The augmentation ops: batched, on the device, with per-sample random parameters.

Input: (B, 3, H, W) uint8 on the training device. Output: normalised float views.
The ops and their parameter ranges follow torchvision's transforms as used by
SimCLR (Chen et al. 2020, Appendix A) and BYOL (Grill et al. 2020, Table 6):

* random resized crop + horizontal flip: torchvision's crop distribution (integer
  sizes and corners, central fallback), then one batched ``grid_sample`` (flip folded
  into the sampling grid) instead of a per-image crop/resize;
* colour jitter (p=0.8) in an independent random order per sample: brightness,
  contrast and saturation as per-sample affine maps (one 3x3 map per order slot),
  hue as torchvision's exact HSV shift (``hue_shift``); ``aug.hue_mode=yiq`` swaps
  in a YIQ rotation that joins the affine maps (faster, opt-in; a linear
  approximation that misses the drawn hue by up to ~1.45x per pixel);
* random grayscale (p=0.2), Gaussian blur (kornia's kernel, per-sample sigma, as
  two batched matmuls), solarisation (BYOL) and normalisation with the dataset
  statistics; grayscale and normalisation are one fused 3x3 map at the end.

All views of a step are drawn as one batch (``Augmenter.views`` in views.py), so each
op is one kernel launch per step. Performance notes sit next to each trick (the
rules: docs/design/index.md, "Performance"); tests/test_augment.py checks every fused
piece against the op-by-op reference in torchvision's order.

All randomness comes from the global torch RNG of the device, which the
checkpoint saves, so resumed runs draw the same parameters.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from kornia.filters import get_gaussian_kernel1d

# luma weights of torchvision's rgb_to_grayscale (ITU-R 601 with 0.2989 for red)
_LUMA = (0.2989, 0.587, 0.114)
_RGB2YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


class _Colour(NamedTuple):
    luma: torch.Tensor  # (3,)
    rgb2yiq: torch.Tensor  # (3, 3)
    yiq2rgb: torch.Tensor  # (3, 3)


@functools.lru_cache(maxsize=None)
def _colour(device: torch.device, dtype: torch.dtype) -> _Colour:
    """The colour constants on ``device``, built once per (device, dtype) and never written to.
    Cached because torch.tensor(..., device="cuda") is a blocking host->device copy and
    torch.linalg.inv on CUDA checks its result on the host: per step, either would stall
    the CPU behind the GPU queue."""
    t = torch.tensor(_RGB2YIQ, dtype=torch.float64)
    return _Colour(torch.tensor(_LUMA, dtype=dtype, device=device), t.to(device, dtype),
                   torch.linalg.inv(t).to(device, dtype))


def _uniform(shape, lo: float, hi: float, device) -> torch.Tensor:
    return torch.rand(shape, device=device) * (hi - lo) + lo


def sample_crops(b: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float], device,
                 tries: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params with the same distribution, vectorised over the
    batch: up to ``tries`` draws per sample of target area ~ U(scale) x H x W and log aspect ratio
    ~ U(log ratio), rounded to integer w = round(sqrt(area r)), h = round(sqrt(area / r)); the
    first draw with 0 < w <= W and 0 < h <= H is kept and placed at an integer corner drawn
    uniformly from [0, W - w] x [0, H - h]. With no valid draw: the central crop of the whole
    image clamped to the ratio range, as torchvision. (A continuous corner in [0, W - w] would
    put the border columns inside the crop less often than torchvision does.)

    Returns (B, 4) crops as (x0, y0, w, h), integer pixel values in a float tensor."""
    area = height * width
    s = _uniform((b, tries), scale[0], scale[1], device) * area
    r = torch.exp(_uniform((b, tries), math.log(ratio[0]), math.log(ratio[1]), device))
    w, h = torch.round(torch.sqrt(s * r)), torch.round(torch.sqrt(s / r))  # round half to even, as Python's round
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(ok.int(), dim=1, keepdim=True)  # index of the first valid try
    any_ok = ok.any(1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    # integer corner uniform over [0, W - w] (torch.randint(0, W - w + 1) in torchvision)
    x0 = torch.floor(torch.rand(b, device=device) * (width - w + 1)).clamp_max_(width - w)
    y0 = torch.floor(torch.rand(b, device=device) * (height - h + 1)).clamp_max_(height - h)
    # fallback (torchvision): central crop, whole image clamped to the ratio range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    # the fallback from Python scalars (full_like): no host -> device copy in the step
    columns = [(x0, (width - fw) // 2), (y0, (height - fh) // 2), (w, fw), (h, fh)]
    return torch.stack([torch.where(any_ok, c, torch.full_like(c, float(f))) for c, f in columns], 1)


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
    c = _colour(h.device, h.dtype)
    a = -2 * math.pi * h  # sign: positive h turns red towards yellow, as torchvision's HSV shift
    cos, sin = torch.cos(a), torch.sin(a)
    rot = torch.zeros(h.shape[0], 3, 3, device=h.device, dtype=h.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    return c.yiq2rgb @ rot @ c.rgb2yiq


def adjust_hue_yiq(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x: (B, 3, H, W) in [0, 1]; h: (B,) shifts in turns. The YIQ rotation (aug.hue_mode=yiq):
    a linear approximation of torchvision's HSV shift (see color_jitter_)."""
    return torch.einsum("bij,bjhw->bihw", hue_matrices(h), x).clamp_(0, 1)


# HSV -> RGB channel offsets n of f(n) = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6
_HSV_N = (5.0, 3.0, 1.0)


@functools.lru_cache(maxsize=None)
def _hsv_offsets(device: torch.device, dtype: torch.dtype, dims: int) -> torch.Tensor:
    """_HSV_N as a (1, 3, 1...) tensor on ``device``, built once (a fresh torch.tensor on CUDA is
    a blocking host -> device copy)."""
    return torch.tensor(_HSV_N, device=device, dtype=dtype).view(1, 3, *[1] * (dims - 2))


def hue_shift(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Exact HSV hue shift, batched: x (N, 3, L) or (N, 3, H, W) in [0, 1], h (N,) in turns.
    Each pixel's hue moves by exactly h (mod 1) while its saturation and value stay, as
    torchvision's adjust_hue (RGB -> HSV, shift, HSV -> RGB; equal to it up to float rounding).

    Written out instead of kornia.enhance.adjust_hue, which matches torchvision as closely but
    measured ~15x slower on a CPU: the round trip collapses to max / min / chroma, one hue
    angle and the closed-form HSV -> RGB (V - C clamp(min(k, 4 - k), 0, 1) per channel)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)  # chroma V * S
    safe = torch.where(c > 0, c, torch.ones_like(c))
    # hue in sixths of a turn from the channel holding the max (torchvision's order: r, then g, then b)
    hr = ((g - b) / safe) % 6
    hg = (b - r) / safe + 2
    hb = (r - g) / safe + 4
    six = torch.where(v == r, hr, torch.where(v == g, hg, hb))
    six = (six + 6 * h.view(-1, *[1] * (x.dim() - 1))) % 6
    k = (_hsv_offsets(x.device, x.dtype, x.dim()) + six) % 6
    return v - c * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _rows_(y: torch.Tensor, rows: torch.Tensor, fn) -> None:
    """y[rows] = fn(y[rows], row indices) in place for a (B,) bool mask ``rows``. On a CPU the
    selected rows are gathered (the count costs nothing there); on CUDA fn runs on every row
    and torch.where keeps the selected ones, so the step never waits for the host."""
    if y.is_cuda:
        y.copy_(torch.where(rows.view(-1, *[1] * (y.dim() - 1)), fn(y, slice(None)), y))
        return
    idx = rows.nonzero().squeeze(1)
    if idx.numel():
        y[idx] = fn(y[idx], idx)


def color_jitter_(x: torch.Tensor, p: float, strengths: Sequence[float],
                  scratch: Optional[torch.Tensor] = None, hue_mode: str = "exact") -> torch.Tensor:
    """x: (B, 3, H, W) in [0, 1], jittered IN PLACE and returned; scratch: optional
    contiguous workspace with x's number of elements (allocated if None).

    torchvision ColorJitter(b, c, s, h) applied with probability p per sample, the
    four ops in a random order per sample, clamped after each op as torchvision does.

    Brightness (f*I), contrast (f*I + (1-f)*grey mean) and saturation (f*I + (1-f)*1 luma^T)
    are per-sample affine maps of the RGB vector, so each of the 4 order slots is ONE
    batched 3x3 matrix product (baddbmm) + clamp; samples not jittered get identity
    parameters. Hue (hue_mode 'exact', the default) is torchvision's HSV shift, applied in
    its slot to the samples whose drawn order puts it there (hue_shift). hue_mode 'yiq':
    a rotation about the grey axis in YIQ space instead, which joins the affine maps
    (faster; DEVIATION from torchvision: per pixel it shifts the hue by 0.7-1.45x the
    drawn amount and changes HSV saturation; opt-in, docs/guide/augmentation.md)."""
    bri, con, sat, hue = strengths
    b, c, h, w = x.shape
    if not x.is_contiguous() or (scratch is not None and (scratch.numel() != x.numel() or scratch.dtype != x.dtype
                                                          or not scratch.is_contiguous())):
        raise ValueError("color_jitter_ works in place on a contiguous x; scratch must be a contiguous tensor with "
                         "x's dtype and number of elements")
    dev, dt = x.device, x.dtype
    on = torch.rand(b, device=dev) < p
    one = torch.ones(b, device=dev)
    fb = torch.where(on, _uniform(b, max(0.0, 1 - bri), 1 + bri, dev), one)
    fc = torch.where(on, _uniform(b, max(0.0, 1 - con), 1 + con, dev), one)
    fs = torch.where(on, _uniform(b, max(0.0, 1 - sat), 1 + sat, dev), one)
    fh = torch.where(on, _uniform(b, -hue, hue, dev), one * 0)
    order = torch.argsort(torch.rand(b, 4, device=dev), dim=1)  # per-sample permutation of the 4 ops
    luma = _colour(dev, dt).luma
    eye = torch.eye(3, device=dev, dtype=dt).expand(b, 3, 3)
    exact = hue_mode == "exact"
    mats = torch.stack([
        fb.view(-1, 1, 1) * eye,
        fc.view(-1, 1, 1) * eye,
        fs.view(-1, 1, 1) * eye + (1 - fs).view(-1, 1, 1) * luma.view(1, 1, 3),
        eye if exact else hue_matrices(fh),  # exact: the hue slot's linear map is the identity
    ], 1)  # (B, 4, 3, 3)
    slots = mats.gather(1, order.view(b, 4, 1, 1).expand(b, 4, 3, 3))  # (B, 4, 3, 3) in drawn order
    con_off = torch.where(order == 1, (1 - fc).view(-1, 1), torch.zeros_like(fc).view(-1, 1))  # (B, 4)
    # the 4 slots ping-pong between x and one scratch buffer and end in x: on CPU every
    # fresh multi-MB tensor costs page faults (glibc hands large blocks back to the OS),
    # which measured more than the arithmetic itself
    buf = [x.view(b, 3, h * w), (torch.empty_like(x) if scratch is None else scratch).view(b, 3, h * w)]
    for slot in range(4):
        src, dst = buf[slot % 2], buf[1 - slot % 2]
        # contrast blends towards the grey mean of the CURRENT image, so it is read per slot
        off = con_off[:, slot] * (src.mean(2) @ luma)  # (B,)
        torch.baddbmm(off.view(-1, 1, 1).expand(b, 3, 1), slots[:, slot], src, out=dst).clamp_(0, 1)
        if exact:
            _rows_(dst, (order[:, slot] == 3) & (fh != 0), lambda y, i: hue_shift(y, fh[i]))
    return x


def blur_matrices(sigma: torch.Tensor, size: int, k: int) -> torch.Tensor:
    """sigma: (B,) -> (B, size, size) matrices M with (M @ v) = v convolved with the
    normalised k-tap Gaussian of kornia's get_gaussian_kernel1d, reflect border ("dcb|abcd|cba",
    torch/kornia's "reflect"), i.e. row i of M holds the taps at the reflected positions."""
    b, r = sigma.shape[0], k // 2
    if r > size - 1:
        raise ValueError(f"blur kernel {k} needs an image side of at least {r + 1}, got {size}")
    w = get_gaussian_kernel1d(k, sigma.view(-1, 1))  # (B, k)
    pos = (torch.arange(size, device=sigma.device).view(-1, 1) + torch.arange(k, device=sigma.device) - r).abs()
    pos = torch.where(pos > size - 1, 2 * (size - 1) - pos, pos)  # (size, k) reflected source columns
    m = torch.zeros(b, size, size, device=sigma.device, dtype=sigma.dtype)
    return m.scatter_add_(2, pos.expand(b, size, k), w.view(b, 1, k).expand(b, size, k))


def blur_kernel_size(side: int) -> int:
    """The odd Gaussian kernel side, about 10% of the image side (SimCLR Appendix A), at least 3."""
    return max(3, int(0.1 * side) // 2 * 2 + 1)


def blur(x: torch.Tensor, p, sigma: Sequence[float]) -> torch.Tensor:
    """x: (B, C, H, W). Gaussian blur with probability p (float or (B,) per sample),
    sigma ~ U(sigma) per sample; kernel ~10% of the image side, odd (SimCLR Appendix A),
    reflect border; equals kornia's gaussian_blur2d(x, (k, k), (sigma, sigma), "reflect").

    Written as two batched matmuls with per-sample (side x side) blur matrices (identity
    for samples not blurred) instead of kornia's grouped convolution: with a different
    kernel per sample, kornia's conv has B*C groups of tiny work that oneDNN runs slowly on
    a CPU; the dense matmuls do ~S/k times the arithmetic, are still faster there
    (docs/benchmarks/performance.md has the numbers), and need no separate torch.where pass for the
    samples left sharp."""
    b, c, h, w = x.shape
    dev, dt = x.device, x.dtype
    k = blur_kernel_size(w)
    s = _uniform(b, sigma[0], sigma[1], dev).to(dt)
    on = (torch.rand(b, device=dev) < p).view(-1, 1, 1)

    def mats(size):
        return torch.where(on, blur_matrices(s, size, k), torch.eye(size, device=dev, dtype=dt))

    mw = mats(w)
    mh = mw if h == w else mats(h)
    rows = torch.bmm(x.reshape(b, c * h, w), mw.transpose(1, 2)).view(b, c, h, w)  # along W
    return torch.matmul(mh.unsqueeze(1), rows)  # along H


def solarize(x: torch.Tensor, p, threshold: float = 0.5) -> torch.Tensor:
    """x: (B, ...) in [0, 1]; p: float or (B,) per-sample probability. torchvision's solarize
    (pixels >= threshold inverted)."""
    on = (torch.rand(x.shape[0], device=x.device) < p).view(-1, *[1] * (x.dim() - 1))
    return torch.where(on & (x >= threshold), 1.0 - x, x)


def _check_uint8(x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise TypeError(f"Augmenter expects (B, 3, H, W) uint8 images in [0, 255], got {tuple(x.shape)} {x.dtype}; "
                        "convert with (x * 255).round().to(torch.uint8) or keep the dataset in uint8")


@torch.no_grad()
def eval_transform(x: torch.Tensor, size: int, mean, std, crop: float = 1.0) -> torch.Tensor:
    """The evaluation input: x (B, 3, H, W) uint8 -> (B, 3, size, size) float, no augmentation.

    A centred square of side ``crop`` x min(H, W) (the whole image when it is square and crop
    is 1), resized (bilinear, antialiased) to ``size`` only if it is not that size already,
    then normalised per channel. With images stored at 256 and size 224, crop 0.875 is the
    usual resize-256 / centre-crop-224 protocol. mean, std: (3,) sequences or tensors
    broadcastable to (1, 3, 1, 1), in [0, 1] units."""
    _check_uint8(x)
    h, w = x.shape[-2:]
    if crop < 1 or h != w:
        side = max(1, round(crop * min(h, w)))
        top, left = (h - side) // 2, (w - side) // 2
        x = x[..., top:top + side, left:left + side]
    y = x.float().div_(255)
    if y.shape[-1] != size or y.shape[-2] != size:
        y = F.interpolate(y, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.as_tensor(mean, dtype=y.dtype, device=y.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=y.dtype, device=y.device).view(1, 3, 1, 1)
    return (y - mean) / std
