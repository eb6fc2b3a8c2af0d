"""What a run saves and when, how it resumes from that, and the non-finite-loss stop that keeps
the last good checkpoint (the file format and the atomic write are checkpoint.py's)."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig

from . import checkpoint, dist
from .config import to_container
from .run import seed_everything

FORMAT_VERSION = 1


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


class Checkpointer:
    """Saves ``last.pt`` (and ``epoch_XXXX.pt`` every run.ckpt_every_epochs epochs) into the run
    directory from rank 0, restores a run from one, and refuses to save a non-finite state.

    model, optimizer: what is trained; monitor: the kNN monitor (its start / best top-1 go into
    the checkpoint), or None when evaluation is off."""

    def __init__(self, run_dir: str, cfg: DictConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 monitor, steps_per_epoch: int, world: int, main: bool):
        self.run_dir, self.cfg, self.model, self.optimizer = run_dir, cfg, model, optimizer
        self.monitor, self.steps_per_epoch, self.world, self.main = monitor, steps_per_epoch, world, main
        self.last_saved_step: Optional[int] = None
        self.start_knn: Optional[float] = None  # carried from the checkpoint when the monitor is off

    @property
    def last_path(self) -> str:
        return os.path.join(self.run_dir, "last.pt")

    def restore(self, ckpt: Dict[str, Any], rank: int) -> int:
        """Load a checkpoint's model, optimiser, monitor and RNG states; returns its step."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        step = int(ckpt["step"])
        self.start_knn = ckpt.get("start_knn_top1")
        if self.monitor is not None:
            self.monitor.start = self.start_knn
            if ckpt.get("best_knn_top1") is not None:
                self.monitor.best = ckpt["best_knn_top1"]
        if self.world == 1 and ckpt.get("world_size", 1) == 1:
            checkpoint.set_rng_state(ckpt["rng"])  # exact continuation
        else:
            # the checkpoint holds rank 0's RNG only: give each rank a fresh stream for this step
            seed_everything(self.cfg.run.seed + 1000003 * step + rank)
        self.last_saved_step = step
        return step

    def payload(self, step: int) -> Dict[str, Any]:
        m = self.monitor
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step,
                "epoch": step / self.steps_per_epoch, "rng": checkpoint.rng_state(),
                "config": to_container(self.cfg), "start_knn_top1": m.start if m is not None else self.start_knn,
                "best_knn_top1": m.best if m is not None and m.best > -1 else None,
                "world_size": self.world, "version": FORMAT_VERSION}

    def save(self, step: int, periodic: bool = False) -> None:
        """last.pt (and epoch_XXXX.pt if ``periodic``) at ``step``, written by rank 0."""
        if self.main:
            payload = self.payload(step)
            checkpoint.save(self.last_path, payload)
            if periodic:
                checkpoint.save(os.path.join(self.run_dir, f"epoch_{step // self.steps_per_epoch:04d}.pt"), payload)
        self.last_saved_step = step

    def check_finite(self, first_bad: torch.Tensor) -> None:
        """Raise NonFiniteLoss on every rank if any rank saw a non-finite loss (first_bad >= 0:
        the step of the first one). One host sync: call it at log intervals and before saving."""
        bad = int(dist.all_reduce_max(first_bad).item())
        if bad < 0:
            return
        where = (f"last good checkpoint: {self.last_path} (step {self.last_saved_step})"
                 if self.last_saved_step is not None else "no checkpoint was written yet")
        raise NonFiniteLoss(f"non-finite loss at step {bad}; stopping. {where}. Lower --lr or sec.weight, or "
                            f"resume with --resume from the checkpoint.")
