"""Datasets as uint8 tensors (in memory, or memory-mapped from the image cache) + the
index-permutation batch iterator.

Every dataset is ``images: (N, 3, H, W) uint8`` and ``labels: (N,) int64``: digits and the
torchvision formats in memory, image folders memory-mapped from the decoded-image cache
(cache.py); an epoch is a permutation of indices, and batches are gathered by indexing (no
per-image Python work, no CPU augmentation).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")

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


# ----------------------------------------------------------------------------- digits
def load_digits(image_size: int = 32) -> DataSplits:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), upsampled
    bilinearly to ``image_size`` and replicated to RGB; stratified 80/20 split
    with a fixed seed."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    check_fits_in_ram(len(d.images) * 3, image_size, "digits")  # the float upsampling needs ~4x the uint8 result
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target).long()
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=d.target)
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    train = Split(x[tr], y[tr])
    mean, std = channel_stats(train.images)
    return DataSplits("digits", train, train, Split(x[te], y[te]), [str(i) for i in range(10)], mean, std)


# ----------------------------------------------------------------------------- torchvision formats
def _missing(name: str, root: str, files: str) -> DataError:
    return DataError(
        f"{name} not found under '{root}'. Pass --download to fetch it (needs internet), or put "
        f"{files} into that directory (--data-root DIR)."
    )


def load_cifar(name: str, root: str, download: bool) -> DataSplits:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = "cifar-10-batches-py/" if name == "cifar10" else "cifar-100-python/"
    try:
        tr = cls(root, train=True, download=download)
        te = cls(root, train=False, download=download)
    except RuntimeError as exc:
        if not download:
            raise _missing(name, root, folder) from None
        raise DataError(f"could not download {name} to '{root}': {exc}") from None
    except OSError as exc:
        raise DataError(f"could not download {name} to '{root}' (no internet?): {exc}") from None

    def split(ds) -> Split:
        return Split(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets).long())

    train = split(tr)
    mean, std = STATS[name]
    return DataSplits(name, train, train, split(te), list(tr.classes), mean, std)


def load_stl10(root: str, download: bool) -> DataSplits:
    """STL-10: pretrain on train+unlabeled (105k), kNN bank = train (5k), queries = test (8k)."""
    import torchvision

    def get(split: str):
        try:
            return torchvision.datasets.STL10(root, split=split, download=download)
        except RuntimeError:
            if not download:
                raise _missing("stl10", root, "stl10_binary/") from None
            raise

    un, tr, te = get("unlabeled"), get("train"), get("test")
    to = lambda ds: Split(torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64)))  # noqa: E731
    bank, test, unl = to(tr), to(te), to(un)
    train = Split(torch.cat([bank.images, unl.images]), torch.cat([bank.labels, unl.labels]))
    mean, std = STATS["stl10"]
    return DataSplits("stl10", train, bank, test, list(tr.classes), mean, std)


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


def folder_splits(root: str) -> Dict[str, Path]:
    """{'train': ROOT/train, 'test': ROOT/test or ROOT/val}, or a DataError saying what is missing."""
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"data root '{root}' does not exist; pass --data-root DIR with DIR/train/<class>/*.jpg")
    train_dir = r / "train"
    test_dir = next((r / s for s in ("test", "val") if (r / s).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"'{root}' needs train/ and test/ (or val/) subfolders, each holding <class>/ folders "
                        "of images")
    return {"train": train_dir, "test": test_dir}


def list_image_folder(root: str):
    """The folder's files per split (cache.Listing: relative paths, labels, sizes, mtimes), checked:
    every split has images, and the test split has no class the train split lacks."""
    from .cache import list_folder

    splits = folder_splits(root)
    listing = list_folder(root, splits, IMAGE_EXTENSIONS)
    unknown = sorted({e.name for e in os.scandir(splits["test"]) if e.is_dir()} - set(listing.classes))
    if unknown:
        raise DataError(f"'{splits['test']}' has classes not in the train split: {unknown[:5]}")
    for split, files in listing.paths.items():
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in '{splits[split]}/<class>/'; "
                            "expected ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg")
    return listing


def folder_image_size(root: str) -> int:
    """Short side of the first training image of an image folder (the default image size)."""
    from PIL import Image

    train = folder_splits(root)["train"]
    for d in sorted(train.iterdir()):
        if d.is_dir():
            for f in sorted(os.listdir(d)):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    try:
                        with Image.open(d / f) as im:
                            return min(im.size)
                    except Exception as exc:
                        raise DataError(f"cannot read image '{d / f}' ({type(exc).__name__}: "
                                        f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}); remove or "
                                        "replace the file, or set data.image_size") from None
    raise DataError(f"no images found in '{train}/<class>/'")


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


def load_imagefolder(root: str, image_size: int, workers: int = 0, store_size: Optional[int] = None,
                     cache: str = "off", cache_dir: Optional[str] = None, rebuild_token: Optional[str] = None,
                     progress: bool = True, say=print) -> DataSplits:
    """ROOT/train/<class>/* (pretraining + kNN bank) and ROOT/test|val/<class>/* (queries).

    Images are stored at ``store_size`` (default ``image_size``): short side resized, centre
    crop. cache 'auto' / 'rebuild': memory-mapped from the decoded-image cache in ``cache_dir``
    (ssl_sphere.cache; built on first use); 'off': decoded into memory by this process."""
    store = store_size or image_size
    listing = list_image_folder(root)
    name = Path(root).name or "imagefolder"
    if cache == "off":
        paths = {s: [os.path.join(root, f) for f in files] for s, files in listing.paths.items()}
        check_fits_in_ram(listing.count(), store, f"image folder {root}")
        arrays = {s: (decode_images(p, store, workers), torch.from_numpy(listing.labels[s]))
                  for s, p in paths.items()}
        mean, std = channel_stats(arrays["train"][0])
        classes = listing.classes
    else:
        from .cache import default_cache_dir, open_cached

        cache_dir = cache_dir or default_cache_dir()
        classes, arrays, mean, std = open_cached(root, listing, store, cache_dir, cache, workers, rebuild_token,
                                                 progress, say)
    train = Split(*arrays["train"])
    return DataSplits(name, train, train, Split(*arrays["test"]), classes, mean, std)


def load_data(dcfg, rebuild_token: Optional[str] = None, progress: bool = True, say=print) -> DataSplits:
    """Build the splits for a data config section (see config.DataConfig). Image folders come from
    the decoded-image cache (data.cache); rebuild_token: see cache.open_cached; progress / say: the
    decode progress bar and messages (rank 0 only under DDP)."""
    name = dcfg.dataset
    if name == "digits":
        ds = load_digits(dcfg.image_size)
    elif name == "imagefolder":
        ds = load_imagefolder(dcfg.root, dcfg.image_size, dcfg.decode_workers, dcfg.store_size, dcfg.cache,
                              dcfg.cache_dir, rebuild_token, progress, say)
    else:
        root = dcfg.root or os.path.join("data", name)
        ds = load_cifar(name, root, dcfg.download) if name.startswith("cifar") else load_stl10(root, dcfg.download)
        if dcfg.image_size != ds.train.images.shape[-1]:
            raise DataError(
                f"data.image_size={dcfg.image_size} but {name} images are {ds.train.images.shape[-1]}px; "
                "leave data.image_size unset for torchvision datasets"
            )
    if dcfg.train_limit is not None and dcfg.train_limit < len(ds.train):
        from .evaluation import stratified_subset

        keep = stratified_subset(ds.train.labels, dcfg.train_limit, seed=0)
        same = ds.bank is ds.train
        ds.train = Split(ds.train.images[keep], ds.train.labels[keep])
        if same:  # the kNN bank stays the pretraining images
            ds.bank = ds.train
    if dcfg.mean is not None:
        ds.mean = tuple(dcfg.mean)
    if dcfg.std is not None:
        ds.std = tuple(dcfg.std)
    return ds


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Optimiser steps per epoch (drop_last over the global batch)."""
    global_batch = batch_size * world
    if global_batch > n:
        raise DataError(
            f"global batch {global_batch} (batch {batch_size} x {world} ranks) is larger than the "
            f"{n} training images; lower --batch-size"
        )
    return n // global_batch


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's index order: a pure function of (seed, epoch), so resuming
    mid-epoch replays exactly the remaining batches."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0,
                  world: int = 1) -> Iterator[torch.Tensor]:
    """Yield this rank's (batch_size,) index tensors of ``epoch`` from batch ``start`` on.
    Each rank takes a disjoint slice of every global batch."""
    perm = epoch_permutation(n, seed, epoch)
    global_batch = batch_size * world
    for i in range(start, steps_per_epoch(n, batch_size, world)):
        yield perm[i * global_batch + rank * batch_size: i * global_batch + (rank + 1) * batch_size]


def step_batches(n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0,
                 world: int = 1) -> Iterator[Tuple[int, torch.Tensor]]:
    """(step, this rank's (batch_size,) indices) for the global steps start <= step < stop,
    across epoch boundaries: step s is batch s % steps_per_epoch of epoch s // steps_per_epoch,
    so a run resumed at any step sees exactly the batches it would have seen."""
    per_epoch = steps_per_epoch(n, batch_size, world)
    step = start
    while step < stop:
        for idx in epoch_batches(n, batch_size, seed, step // per_epoch, step % per_epoch, rank, world):
            yield step, idx
            step += 1
            if step >= stop:
                return
