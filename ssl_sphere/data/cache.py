"""The decoded-image cache of image folders: decoded once per machine into fixed-size uint8
arrays on disk with a manifest, then memory-mapped by every run, rank and eval CLI.

Layout of one cache entry, ``<cache_dir>/<folder name>-<hash of its path>-s<store size>/``:

* ``train.u8``, ``test.u8``: raw (N, 3, S, S) uint8 arrays (numpy memmaps; S = store size),
* ``train_labels.npy``, ``test_labels.npy``: (N,) int64,
* ``manifest.json``: format version, folder, store size and resize policy, class names,
  per-split image count, a digest of the file list, channel statistics of the training
  images, and the build time; ``files.json``: every source file with its size and mtime (a
  changed folder is detected from the digest, and the file list says what changed).

Built into ``<entry>.tmp-<host>-<pid>`` and renamed when complete, under an exclusive ``flock`` on
``<entry>.lock``: one process of a node builds, the others wait and then map the result; a
build that dies leaves only a temp directory that no run trusts (removed by the next build on
that host once its process is gone; a cache_dir shared between hosts keeps other hosts' temps).
Memory maps are read-only views of the files (numpy memmap), so the pages live once in the
OS page cache however many processes read them, and a dataset larger than RAM streams from
disk. Hand-written because neither torchvision nor lightly has a decoded-image cache.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from ..core.errors import UserError
from .decode import decode_files, decode_map
from .listing import Listing
from .splits import channel_stats

FORMAT_VERSION = 1
RESIZE_POLICY = "short side to S (PIL bilinear), centre crop S x S, 16-bit grey scaled to 8 bit"


class CacheError(UserError, RuntimeError):
    """A cache that cannot be used as it is; the message names the file and the fix."""


def default_cache_dir() -> str:
    """$SSL_SPHERE_CACHE, else $XDG_CACHE_HOME/ssl_sphere, else ~/.cache/ssl_sphere."""
    if os.environ.get("SSL_SPHERE_CACHE"):
        return os.environ["SSL_SPHERE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ssl_sphere")


def entry_dir(root: str, store_size: int, cache_dir: str) -> str:
    path = os.path.abspath(root)
    digest = hashlib.sha1(path.encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"{Path(path).name or 'folder'}-{digest}-s{store_size}")


def why_stale(manifest: Dict, listing: Listing, store_size: int, entry: str) -> Optional[str]:
    """None if the manifest describes this folder listing at this store size, else the reason
    (from the entry's files.json, the full file list, read only when the digests differ)."""
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"cache format {manifest.get('format_version')} is not the current {FORMAT_VERSION}"
    if manifest.get("store_size") != store_size or manifest.get("resize_policy") != RESIZE_POLICY:
        return "the stored size or resize policy changed"
    if manifest.get("classes") != listing.classes:
        return "the class folders changed"
    if manifest.get("listing_digest") == listing.digest():
        return None
    try:
        with open(os.path.join(entry, "files.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return "the folder changed"
    reasons = []
    for split, now in listing.signature().items():
        before = {f[0]: (f[1], f[2]) for f in saved.get(split, [])}
        current = {f[0]: (f[1], f[2]) for f in now}
        added = len(current.keys() - before.keys())
        removed = len(before.keys() - current.keys())
        modified = sum(before[k] != current[k] for k in current.keys() & before.keys())
        for n, what in ((added, "added"), (removed, "removed"), (modified, "modified (size or time)")):
            if n:
                reasons.append(f"{n} {split} file(s) {what}")
    return "; ".join(reasons) or "the folder changed (labels or order)"


def _nbytes(n: int, store_size: int) -> int:
    """Bytes of one split's (n, 3, S, S) uint8 array."""
    return n * 3 * store_size * store_size


def _decode_into(args) -> int:
    """Worker: decode files into rows [start, start + n) of the (N, 3, S, S) memmap at ``path``."""

    path, n_total, start, paths, size = args
    out = np.memmap(path, dtype=np.uint8, mode="r+", shape=(n_total, 3, size, size))
    out[start:start + len(paths)] = decode_files(paths, size).transpose(0, 3, 1, 2)
    out.flush()
    del out
    return len(paths)


def _build(root: str, listing: Listing, store_size: int, final: str, workers: int, progress: bool,
           token: Optional[str] = None) -> None:
    """Decode every image into ``<final>.tmp-<host>-<pid>`` in parallel (each worker writes its chunk
    straight into the memmap: peak memory is one chunk per worker), then rename it to ``final``."""
    from tqdm import tqdm


    tmp = f"{final}.tmp-{_host()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    workers = workers or os.cpu_count() or 1
    total = listing.count()
    bar = tqdm(total=total, desc=f"decoding {root} into the cache", unit="img", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    try:
        for split, files in listing.paths.items():
            n = len(files)
            path = os.path.join(tmp, f"{split}.u8")
            with open(path, "wb") as f:
                f.truncate(_nbytes(n, store_size))
            chunk = max(1, min(512, n // (4 * workers) + 1))
            jobs = [(path, n, i, [os.path.join(root, f) for f in files[i:i + chunk]], store_size)
                    for i in range(0, n, chunk)]
            died = CacheError(f"a decode worker died while building the image cache of {root} (killed, often out "
                              "of memory); set data.decode_workers to fewer processes, e.g. 1, and start again (no "
                              "cache entry was written)")
            for done in decode_map(_decode_into, workers, died, jobs):
                bar.update(done)
            np.save(os.path.join(tmp, f"{split}_labels.npy"), listing.labels[split])
        train = _map(os.path.join(tmp, "train.u8"), listing.count("train"), store_size)
        mean, std = channel_stats(train)
        manifest = {"format_version": FORMAT_VERSION, "root": os.path.abspath(root), "store_size": store_size,
                    "resize_policy": RESIZE_POLICY, "classes": listing.classes,
                    "counts": {s: listing.count(s) for s in listing.paths}, "mean": list(mean), "std": list(std),
                    "listing_digest": listing.digest(), "created": time.time(), "build_token": token}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        with open(os.path.join(tmp, "files.json"), "w") as f:  # every source file with its size and mtime
            json.dump(listing.signature(), f)
        for name in os.listdir(tmp):  # data on disk before the rename makes the entry visible
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        if os.path.exists(final):  # the stale entry this build replaces (we hold the lock)
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            # another host sharing cache_dir (where flock does not reach) renamed its build there
            # first: keep that complete entry, drop ours
            if _read_manifest(final) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()


def _host() -> str:
    """This machine's name as it may appear in a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_dead_builds(entry: str) -> int:
    """Delete ``<entry>.tmp-<this host>-<pid>`` directories whose process is gone (builds that died);
    temps of other hosts sharing the cache_dir and of live processes stay. Returns how many."""
    n = 0
    # <entry>.tmp-<pid>: the name before 2026-11-27 (no host), swept the same way
    for prefix in (f"{Path(entry).name}.tmp-{_host()}-", f"{Path(entry).name}.tmp-"):
        for stale in Path(entry).parent.glob(glob.escape(prefix) + "*"):
            pid = stale.name[len(prefix):]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
                n += 1
    return n


def _map(path: str, n: int, size: int) -> torch.Tensor:
    """The (n, 3, size, size) uint8 file at ``path`` as a read-only memory-mapped tensor."""
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, 3, size, size))
    with warnings.catch_warnings():  # the mapping is read-only by design; nothing writes into it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(mm)


def _open(entry: str, manifest: Dict, store_size: int):
    """The entry's (images, labels) per split, after checking every file is complete."""
    out = {}
    for split, n in manifest["counts"].items():
        path = os.path.join(entry, f"{split}.u8")
        want = _nbytes(n, store_size)
        have = os.path.getsize(path) if os.path.exists(path) else -1
        if have != want:
            raise CacheError(f"cache file {path} is {'missing' if have < 0 else f'{have} bytes, expected {want}'} "
                             "(truncated or damaged); rebuild it with data.cache=rebuild")
        try:
            labels = torch.from_numpy(np.load(os.path.join(entry, f"{split}_labels.npy")))
        except (OSError, ValueError) as exc:
            raise CacheError(f"cache file {os.path.join(entry, f'{split}_labels.npy')} is unreadable ({exc}); "
                             "rebuild it with data.cache=rebuild") from None
        if labels.shape != (n,):
            raise CacheError(f"cache labels of {split} in {entry} do not match its manifest; rebuild it with "
                             "data.cache=rebuild")
        out[split] = (_map(path, n, store_size), labels)
    return out


def _read_manifest(entry: str) -> Optional[Dict]:
    path = os.path.join(entry, "manifest.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CacheError(f"cache manifest {path} is unreadable ({exc}); rebuild it with data.cache=rebuild") from None


def _check_space(cache_dir: str, listing: Listing, store_size: int) -> None:
    need = _nbytes(listing.count(), store_size)
    free = shutil.disk_usage(cache_dir).free
    if need * 1.05 + 2**20 > free:
        raise CacheError(f"the decoded-image cache needs {need / 2**30:.2f} GiB in {cache_dir} but only "
                         f"{free / 2**30:.2f} GiB are free; set data.cache_dir to a disk with room "
                         "(or data.cache=off to decode into memory)")


def open_cached(root: str, listing: Listing, store_size: int, cache_dir: str, mode: str = "auto",
                workers: int = 0, rebuild_token: Optional[str] = None, progress: bool = True, say=print):
    """Memory-mapped splits of an image folder, building or rebuilding its cache entry when needed.

    listing: the folder as it is now (list_folder). Returns (classes, {split: (images (N, 3, S, S)
    uint8 memmap tensor, labels (N,))}, mean, std).
    mode: 'auto' (build if missing or stale) or 'rebuild' (rebuild unless the entry was built with
    ``rebuild_token``, a string shared by the processes of one run, so the run rebuilds it once per
    cache_dir however many ranks and nodes it has; None: rebuild now)."""
    os.makedirs(cache_dir, exist_ok=True)
    entry = entry_dir(root, store_size, cache_dir)
    with open(entry + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per machine; the others wait here
        try:
            remove_dead_builds(entry)  # builds that died: never trusted
            manifest = _read_manifest(entry)
            reason = None
            if manifest is None:
                reason = "no cache yet" if not os.path.exists(entry) else "the cache has no manifest"
            elif mode == "rebuild" and (rebuild_token is None or manifest.get("build_token") != rebuild_token):
                reason = "data.cache=rebuild"
            else:
                reason = why_stale(manifest, listing, store_size, entry)
            if reason is not None:
                _check_space(cache_dir, listing, store_size)
                # whichever process builds says so (under torchrun it need not be rank 0)
                print(f"[ssl_sphere] building the image cache {entry} ({reason})", flush=True)
                t0 = time.time()
                _build(root, listing, store_size, entry, workers, progress, rebuild_token)
                with open(entry + ".builds.log", "a") as log:  # who built this entry, when and why
                    log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {os.uname().nodename} pid {os.getpid()}: "
                              f"{listing.count()} images in {time.time() - t0:.1f}s "
                              f"({reason})\n")
                manifest = _read_manifest(entry)
            arrays = _open(entry, manifest, store_size)
            say(f"[ssl_sphere] image cache {entry} (memory-mapped; data.cache_dir={cache_dir})")
        finally:
            # explicit: decode workers forked during the build share this open file, and closing it
            # here would not release the lock while one of them still lived
            fcntl.flock(lock, fcntl.LOCK_UN)
    return manifest["classes"], arrays, tuple(manifest["mean"]), tuple(manifest["std"])
