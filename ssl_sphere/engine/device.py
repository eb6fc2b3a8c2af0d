"""The machine a run is on: its training device, seeding, precision and CPU model."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from omegaconf import DictConfig

from ..config import ConfigError


def cpu_name() -> str:
    """The CPU model (/proc/cpuinfo's "model name"; platform's name elsewhere): what records of
    timings and of float-exact results name their machine by."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown"


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


def bf16_enabled(cfg: DictConfig, device: torch.device) -> bool:
    return cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and device.type == "cuda")
