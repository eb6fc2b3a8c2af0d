"""What a run's checkpoint holds, how a run resumes from one, and the non-finite-loss stop that keeps
the last good checkpoint. When to save is the policy's (policy.py); the file format and the atomic
write are ssl_sphere.core.checkpoint's."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig

from ..config import ConfigError, to_container
from ..core import checkpoint, dist
from ..core.errors import UserError, first_line
from .device import seed_everything

FORMAT_VERSION = 2  # 2: samples_seen, global_batch, rng_per_rank


class NonFiniteLoss(UserError, RuntimeError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


class RunState:
    """A run's checkpoint: writes ``last.pt`` (and ``epoch_XXXX.pt``) into the run directory from
    rank 0 when the policy says so, restores a run from a checkpoint, and refuses to save a
    non-finite state.

    model, optimizer: what is trained; monitor: the kNN monitor (its start / best top-1 go into
    the checkpoint), or None when evaluation is off; global_batch: samples per step over all ranks.
    save() is collective under DDP (every rank calls it at the same step)."""

    def __init__(self, run_dir: str, cfg: DictConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 monitor, steps_per_epoch: int, global_batch: int, world: int, main: bool):
        self.run_dir, self.cfg, self.model, self.optimizer = run_dir, cfg, model, optimizer
        self.monitor, self.steps_per_epoch, self.global_batch = monitor, steps_per_epoch, global_batch
        self.world, self.main = world, main
        self.last_saved_step: Optional[int] = None
        self.last_good: Optional[str] = None  # the newest complete checkpoint of this run's state
        self.knn_step: Optional[int] = None  # the step of the last kNN evaluation in the restored checkpoint
        self.start_knn: Optional[float] = None  # carried from the checkpoint when the monitor is off
        # samples seen = samples_base + (step - step_base) * global_batch: exact across resumes on
        # other world sizes, where the step count restarts from the samples seen
        self.samples_base, self.step_base = 0, 0
        self.notice: Optional[str] = None  # what a resume on another world size did, for the log

    @property
    def last_path(self) -> str:
        return os.path.join(self.run_dir, "last.pt")

    def samples_seen(self, step: int) -> int:
        return self.samples_base + (step - self.step_base) * self.global_batch

    def restore(self, ckpt: Dict[str, Any], rank: int, source: Optional[str] = None) -> int:
        """Load a checkpoint's model, optimiser, monitor and RNG states; returns the step to
        continue at. Same world size and global batch: the exact continuation (every rank gets
        its own saved RNG state). Otherwise the step is recomputed from the samples seen, so the
        lr / momentum / SEC / SEE schedules (functions of step / total) continue where they were,
        and each rank gets a fresh RNG stream seeded from (seed, step, rank). source: the file
        ``ckpt`` came from (the last good checkpoint until this run saves its own)."""
        self.model.load_state_dict(ckpt["model"])
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ConfigError(f"the optimiser state in {source or 'the checkpoint'} does not fit this run's optimiser "
                              f"({first_line(exc)}): resume with the checkpoint's optim settings (optim.name, "
                              "optim.decay_norm_and_bias), or start a new run from its weights") from None
        step = int(ckpt["step"])
        saved_world = int(ckpt.get("world_size", 1))
        saved_cfg = ckpt["config"]
        saved_batch = int(ckpt.get("global_batch", saved_cfg["optim"]["batch_size"] * saved_world))
        samples = int(ckpt.get("samples_seen", step * saved_batch))
        self.start_knn = ckpt.get("start_knn_top1")
        if self.monitor is not None:
            self.monitor.start = self.start_knn
            if ckpt.get("best_knn_top1") is not None:
                self.monitor.best = ckpt["best_knn_top1"]
        rngs = ckpt.get("rng_per_rank") or ([ckpt["rng"]] if saved_world == 1 else None)
        if saved_world == self.world and saved_batch == self.global_batch and rngs and len(rngs) == self.world:
            checkpoint.set_rng_state(rngs[rank])  # exact continuation, every rank
            start = step
        else:
            start = samples // self.global_batch
            seed_everything(self.cfg.run.seed + 1000003 * start + rank)
            if saved_world != self.world or saved_batch != self.global_batch:
                self.notice = (f"checkpoint of {saved_world} process(es), global batch {saved_batch}, at step {step} "
                               f"({samples} samples seen) continues on {self.world} process(es), global batch "
                               f"{self.global_batch}, at step {start}: schedules continue by samples seen; the rest "
                               f"of the epoch is re-sliced into batches of the new size")
        self.samples_base, self.step_base = samples, start
        self.last_saved_step = start
        self.last_good = source
        self.knn_step = ckpt.get("knn_step", step)  # before this field: the epoch-end evaluation was made
        return start

    def payload(self, step: int, rngs: list) -> Dict[str, Any]:
        m = self.monitor
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step,
                "epoch": step / self.steps_per_epoch, "samples_seen": self.samples_seen(step),
                "global_batch": self.global_batch, "rng": rngs[0], "rng_per_rank": rngs,
                "config": to_container(self.cfg), "start_knn_top1": m.start if m is not None else self.start_knn,
                "best_knn_top1": m.best if m is not None and m.best > -1 else None,
                "knn_step": m.last.get("step") if m is not None else None,
                "world_size": self.world, "version": FORMAT_VERSION}

    def save(self, step: int, first_bad: torch.Tensor, periodic: bool = False) -> None:
        """last.pt (and epoch_XXXX.pt if ``periodic``) at ``step``: checks that no rank saw a
        non-finite loss (``first_bad``, see step.TrainStep), gathers every rank's RNG state, rank 0 writes."""
        self.check_finite(first_bad)
        rngs = dist.all_gather_object(checkpoint.rng_state())
        failed = None
        if self.main:
            try:
                payload = self.payload(step, rngs)
                checkpoint.save(self.last_path, payload)
                if periodic:
                    checkpoint.save(os.path.join(self.run_dir, f"epoch_{step // self.steps_per_epoch:04d}.pt"),
                                    payload)
            except checkpoint.CheckpointError as exc:
                failed = exc
            except Exception as exc:  # anything else: still one error every rank can unpickle and raise
                failed = checkpoint.CheckpointError(f"cannot write {self.last_path}: {type(exc).__name__}: "
                                                    f"{first_line(exc)}")
        # every rank waits here until rank 0's file is complete (a stop right after a save must
        # not end rank 0 mid-write), and every rank raises rank 0's write error, not only rank 0
        failed = dist.broadcast_object(failed)
        if failed is not None:
            raise failed
        self.last_saved_step = step
        self.last_good = self.last_path

    def check_finite(self, first_bad: torch.Tensor) -> None:
        """Raise NonFiniteLoss on every rank if any rank saw a non-finite loss (first_bad >= 0:
        the step of the first one). One host sync: call it at log intervals and before saving."""
        bad = int(dist.all_reduce_max(first_bad).item())
        if bad < 0:
            return
        where = (f"last good checkpoint: {self.last_good} (step {self.last_saved_step})"
                 if self.last_good is not None else "no checkpoint was written yet")
        raise NonFiniteLoss(f"non-finite loss at step {bad}; stopping. {where}. Lower --lr or sec.weight, or "
                            f"resume with --resume from the checkpoint.")
