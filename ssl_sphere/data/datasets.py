"""The datasets: digits (embedded), CIFAR-10/100 and STL-10 (torchvision formats) and image folders,
each as uint8 tensors (splits.py) — in memory, or memory-mapped from the decoded-image cache
(cache.py) — with no per-image Python work and no CPU augmentation in training."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .decode import decode_images
from .listing import list_image_folder
from .splits import STATS, DataError, DataSplits, Split, channel_stats, check_fits_in_ram, stratified_subset


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
        from .cache import default_cache_dir, open_cached  # only image folders need the cache module

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


