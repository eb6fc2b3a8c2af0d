"""Image folders: ROOT/train|test|val/<class>/* listed with their sizes and mtimes (what the
decoded-image cache checks for changes) and their default image size."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.errors import first_line
from .splits import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass
class Listing:
    """An image folder's files per split: relative paths, and as int64 arrays their sizes,
    mtimes (ns) and labels. Arrays, not per-file Python objects: the listing of a
    million-image folder then costs tens of MB, not hundreds, in every process that reads it."""

    classes: List[str]
    paths: Dict[str, List[str]]
    sizes: Dict[str, np.ndarray]
    mtimes: Dict[str, np.ndarray]
    labels: Dict[str, np.ndarray]

    def count(self, split: Optional[str] = None) -> int:
        return len(self.paths[split]) if split else sum(len(p) for p in self.paths.values())

    def signature(self) -> Dict[str, List[List]]:
        """{split: [[path, size, mtime_ns], ...]} (files.json of a cache entry)."""
        return {s: [[p, int(z), int(m)] for p, z, m in zip(self.paths[s], self.sizes[s], self.mtimes[s])]
                for s in self.paths}

    def digest(self) -> str:
        """One hash of every split's paths, sizes, mtimes and labels, and the class names:
        equal digests, unchanged folder."""
        h = hashlib.sha1("\n".join(self.classes).encode())
        for s in self.paths:
            h.update(s.encode())
            h.update("\n".join(self.paths[s]).encode())
            for a in (self.sizes[s], self.mtimes[s], self.labels[s]):
                h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        return h.hexdigest()

def _scan_class(cdir: str, ext: Tuple[str, ...]):
    """(names, sizes, mtimes) of the images in one class folder, sorted by name. The hot loop of a
    warm start (one stat per file), kept to the bare minimum of Python work."""
    if not os.path.isdir(cdir):
        return [], [], []
    found = []
    for e in os.scandir(cdir):
        name = e.name
        if name.lower().endswith(ext):
            st = e.stat()
            found.append((name, st.st_size, st.st_mtime_ns))
    found.sort()
    return [f[0] for f in found], [f[1] for f in found], [f[2] for f in found]

def list_folder(root: str, splits: Dict[str, Path], image_ext: Sequence[str]) -> Listing:
    """Files of ROOT/<split>/<class>/* with their sizes and mtimes (one stat per file; threads
    measured slower here, the loop is bound by the interpreter, not by the syscalls)."""
    ext = tuple(image_ext)
    classes = sorted(e.name for e in os.scandir(splits["train"]) if e.is_dir())
    paths: Dict[str, List[str]] = {}
    arrays: Dict[str, Dict[str, np.ndarray]] = {"sizes": {}, "mtimes": {}, "labels": {}}
    for split, d in splits.items():
        rel = os.path.relpath(d, root)
        paths[split], sizes, mtimes, labels = [], [], [], []
        for ci, c in enumerate(classes):
            names, z, m = _scan_class(os.path.join(d, c), ext)
            prefix = f"{rel}/{c}/"
            paths[split] += [prefix + n for n in names]
            sizes += z
            mtimes += m
            labels += [ci] * len(names)
        for key, vals in (("sizes", sizes), ("mtimes", mtimes), ("labels", labels)):
            arrays[key][split] = np.asarray(vals, dtype=np.int64)
    return Listing(classes, paths, arrays["sizes"], arrays["mtimes"], arrays["labels"])


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
                                        f"{first_line(str(exc))}); remove or "
                                        "replace the file, or set data.image_size") from None
    raise DataError(f"no images found in '{train}/<class>/'")
