"""Run bookkeeping: the training device, seeding, and the run directory a run writes into."""

from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig

from .config import ConfigError


def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' -> a torch.device; under torchrun, cuda means cuda:LOCAL_RANK."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available on this machine; "
                          "use --device cpu or --device auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_run_name(cfg: DictConfig) -> str:
    return f"{cfg.data.dataset}_{cfg.method.name}{'_sec' if cfg.sec.enabled else ''}_s{cfg.run.seed}"


def choose_run_dir(cfg: DictConfig) -> tuple[str, Optional[str]]:
    """(run_dir, checkpoint to resume or None).

    A fresh run takes the first of <name>, <name>-2, <name>-3, ... that does not
    exist, so work already saved is never overwritten; ``resume: auto`` picks the
    newest of those that holds a last.pt (or starts fresh if none does)."""
    r = cfg.run
    if r.resume not in (None, "auto"):
        return os.path.dirname(os.path.abspath(r.resume)), r.resume
    name = r.run_name or default_run_name(cfg)
    i, latest = 1, None
    while True:
        d = os.path.join(r.output_dir, name if i == 1 else f"{name}-{i}")
        if not os.path.isdir(d):
            break
        if os.path.isfile(os.path.join(d, "last.pt")):
            latest = d
        i += 1
    if r.resume == "auto" and latest is not None:
        return latest, os.path.join(latest, "last.pt")
    return d, None
