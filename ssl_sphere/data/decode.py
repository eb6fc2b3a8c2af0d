"""Decoding image files into uint8 arrays: 8-bit RGB, short side resized, centre crop; in parallel
processes for a whole folder (decode_map serves the in-memory decode and the cache build)."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..core.errors import UserError
from .splits import DataError


# ----------------------------------------------------------------------------- image folders
def to_rgb8(im):
    """A PIL image as 8-bit RGB. Pillow's convert("RGB") clips 16-bit grey ("I;16*", and "I" from
    16-bit PNGs) at 255, which turns almost every pixel white: scale those to 8 bit instead
    (x / 257 maps 0..65535 onto 0..255; an "I" image whose values all fit 8 bits is kept as is).
    Float images ("F") have no defined range and are refused."""
    from PIL import Image

    if im.mode == "F":
        raise ValueError("32-bit float images have no defined intensity range; convert them to 8 or 16 bit")
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    return im.convert("RGB")

def decode_files(paths: Sequence[str], size: int) -> np.ndarray:
    """Decode image files to (n, size, size, 3) uint8: 8-bit RGB (to_rgb8), short side resized to
    ``size`` (PIL bilinear), centre crop."""
    from PIL import Image

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = to_rgb8(im)
                if im.size != (size, size):
                    w, h = im.size
                    s = size / min(w, h)
                    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
                    w, h = im.size
                    left, top = (w - size) // 2, (h - size) // 2
                    im = im.crop((left, top, left + size, top + size))
                out[i] = np.asarray(im)
        except Exception as exc:
            raise DataError(f"cannot decode image '{p}': {exc}. Remove or replace the file.") from None
    return out

def decode_map(fn: Callable, workers: int, died: UserError, *jobs: Sequence) -> Iterator:
    """``map(fn, *jobs)`` in order, in ``workers`` processes when there is more than one job (else in
    this one); a worker that dies (killed, often out of memory) raises ``died``. One pool logic for
    the in-memory decode (decode_images) and the cache build (cache._build)."""
    if workers <= 1 or len(jobs[0]) <= 1:
        yield from map(fn, *jobs)
        return
    try:
        with ProcessPoolExecutor(workers) as ex:
            yield from ex.map(fn, *jobs)
    except BrokenProcessPool:
        raise died from None

def decode_images(paths: Sequence[str], size: int, workers: int = 0) -> torch.Tensor:
    """Decode image files in parallel processes -> (N, 3, size, size) uint8 in memory. Each
    decoded chunk is written into the one preallocated result (no concatenation copy)."""
    workers = workers or os.cpu_count() or 1
    chunk = max(1, min(2048, len(paths) // (4 * workers) + 1))
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    died = DataError("a decode worker process died (killed, often out of memory); set data.decode_workers "
                     "to fewer processes, e.g. 1, and start again")
    for k, part in enumerate(decode_map(decode_files, workers, died, chunks, [size] * len(chunks))):
        out[k * chunk:k * chunk + len(part)] = torch.from_numpy(part).permute(0, 3, 1, 2)
    return out
