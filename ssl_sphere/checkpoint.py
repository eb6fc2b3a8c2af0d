"""Atomic checkpoints (temp file + rename) that load with ``weights_only=True``."""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Dict

import numpy as np
import torch


def rng_state() -> Dict[str, Any]:
    """All RNG states as weights_only-safe objects (tensors, lists, ints)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    s = state["numpy"]
    np.random.set_state((s[0], s[1].numpy().astype(np.uint32), int(s[2]), int(s[3]), float(s[4])))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str, payload: Dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a crash never leaves a torn file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load(path: str, map_location="cpu") -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"cannot read checkpoint {path} (corrupt or not an ssl_sphere checkpoint): {exc}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise RuntimeError(f"{path} is not an ssl_sphere checkpoint (no 'model'/'config' entries)")
    return ckpt
