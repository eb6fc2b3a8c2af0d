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


def _candidates(output_dir: str, name: str):
    """<output_dir>/<name>, <name>-2, <name>-3, ..."""
    i = 1
    while True:
        yield os.path.join(output_dir, name if i == 1 else f"{name}-{i}")
        i += 1


def find_resume(cfg: DictConfig) -> Optional[str]:
    """The checkpoint this config continues: run.resume when it is a path; with ``auto`` the
    last.pt of the newest of <name>, <name>-2, ... that has one (None: a fresh run)."""
    r = cfg.run
    if r.resume is None:
        return None
    if r.resume != "auto":
        return r.resume
    latest = None
    for d in _candidates(r.output_dir, r.run_name or default_run_name(cfg)):
        if not os.path.isdir(d):
            break
        if os.path.isfile(os.path.join(d, "last.pt")):
            latest = os.path.join(d, "last.pt")
    return latest


def _claim_new(output_dir: str, name: str) -> str:
    """Create and return the first of <name>, <name>-2, ... that does not exist. os.mkdir (no
    exist_ok) is atomic: of two runs that start together with the same name, one gets <name>
    and the other moves on, so two runs never share a directory or overwrite saved work."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output directory {output_dir}: {exc.strerror}; "
                          "choose another --output-dir") from None
    for d in _candidates(output_dir, name):
        try:
            os.mkdir(d)
            return d
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot create the run directory {d}: {exc.strerror}; "
                              "choose a writable --output-dir") from None


def claim_run_dir(cfg: DictConfig) -> tuple[str, Optional[str]]:
    """(run_dir, checkpoint to resume or None), claimed before anything else happens.

    * fresh run: a new directory <output_dir>/<name>[-N] (see _claim_new);
    * ``--resume auto``: the newest run of that name with a last.pt, in place (else fresh);
    * ``--resume PATH`` into PATH's own directory (run.output_dir / run.run_name name it): in place,
      refused when PATH is older than that run's last.pt (it would discard saved steps) unless
      run.overwrite_newer; into any other directory: a fork, claimed like a fresh run."""
    r = cfg.run
    path = find_resume(cfg)
    if path is None:
        return _claim_new(r.output_dir, r.run_name or default_run_name(cfg)), None
    from .checkpoint import peek_step

    ckpt_dir = os.path.dirname(os.path.abspath(path))
    target = os.path.abspath(os.path.join(r.output_dir, r.run_name)) if r.run_name else ckpt_dir
    if r.resume == "auto" or os.path.realpath(target) == os.path.realpath(ckpt_dir):
        last = os.path.join(ckpt_dir, "last.pt")
        if os.path.basename(path) != "last.pt" and os.path.isfile(last) and not r.overwrite_newer:
            newer, older = peek_step(last), peek_step(path)
            if newer is not None and older is not None and newer > older:
                raise ConfigError(
                    f"{path} is at step {older} but {last} is at step {newer}: resuming in place would replace "
                    f"{newer - older} saved steps. Fork into a new run with --resume {path} --run-name NEW, or "
                    "replace them on purpose with run.overwrite_newer=true")
        return ckpt_dir, path
    return _claim_new(os.path.dirname(target), os.path.basename(target)), path
