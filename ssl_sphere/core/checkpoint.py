"""The checkpoint file: atomic write (temp file + rename + directory fsync), safe load
(``weights_only=True``), RNG states as weights_only-safe objects."""

from __future__ import annotations

import errno
import os
import pickle
import random
import tempfile
import zipfile
from typing import Any, Dict, Optional

import numpy as np
import torch

from .errors import UserError

TEMP_PREFIX = ".tmp-"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or written; the message names the file and what to do."""


def rng_state() -> Dict[str, Any]:
    """This process's RNG states (Python, NumPy, torch CPU and CUDA) as weights_only-safe objects."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's device only (one per rank): every device's state would initialise a
        # context on each GPU and could not be restored on a machine with fewer GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    s = state["numpy"]
    np.random.set_state((s[0], s[1].numpy().astype(np.uint32), int(s[2]), int(s[3]), float(s[4])))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # checkpoints before 2026-11-27: every device's state
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(d: str) -> None:
    """Make a rename in ``d`` durable (POSIX: the directory entry lives in the directory)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename itself is still atomic
    finally:
        os.close(fd)


def save(path: str, payload: Dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a crash or a full disk never leaves a torn
    file, and the file that was at ``path`` stays intact until the new one is complete.
    The file gets the permissions of any other file the process creates (0666 & ~umask)."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".pt", dir=d)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(d)
    except (OSError, RuntimeError) as exc:
        full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc) or \
            "unexpected pos" in str(exc)  # torch's zip writer reports a short write this way
        kept = f"; the previous {os.path.basename(path)} is intact" if os.path.exists(path) else ""
        if full:
            raise CheckpointError(f"no space left on the device while writing {path}: free space in {d} "
                                  f"or choose another --output-dir{kept}") from None
        if isinstance(exc, PermissionError):
            raise CheckpointError(f"cannot write {path}: permission denied; choose a writable --output-dir{kept}") \
                from None
        raise CheckpointError(f"cannot write {path}: {exc}{kept}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temp_files(d: str) -> int:
    """Delete the ``.tmp-*`` files a killed save (or metrics.jsonl rewrite) left in run directory
    ``d``; returns how many. Only the process that holds the run directory's lock calls this,
    before it saves anything."""
    n = 0
    if os.path.isdir(d):
        for name in os.listdir(d):
            if name.startswith(TEMP_PREFIX) and os.path.isfile(os.path.join(d, name)):
                try:
                    os.remove(os.path.join(d, name))
                    n += 1
                except OSError:
                    pass
    return n


def load(path: str, map_location="cpu", mmap: bool = False) -> Dict[str, Any]:
    """A checkpoint written by :func:`save` (``weights_only=True``: no code runs on load).
    Raises FileNotFoundError, or CheckpointError naming the file and what is wrong with it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not ours
        raise CheckpointError(f"cannot read checkpoint {path}: not a torch checkpoint file (corrupt, truncated, "
                              "or another format)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        # torch's message suggests weights_only=False, which would run the file's code: never repeat it
        raise CheckpointError(f"refused to load {path}: it holds objects that no ssl_sphere checkpoint "
                              "contains (it may not be a checkpoint, or not a safe file)") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        kind = "truncated or corrupt" if "zip" in str(exc).lower() or isinstance(exc, EOFError) else "unreadable"
        raise CheckpointError(f"cannot read checkpoint {path}: the file is {kind} "
                              "(not a complete torch file)") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not an ssl_sphere checkpoint (no 'model'/'config' entries; a plain "
                              "state_dict cannot be resumed: start a new run)")
    return ckpt


def peek_step(path: str) -> Optional[int]:
    """The training step a checkpoint was written at, read without loading its tensors
    (memory-mapped); None if the file cannot be read."""
    try:
        return int(load(path, mmap=True)["step"])
    except (FileNotFoundError, CheckpointError, KeyError, TypeError, ValueError):
        return None
