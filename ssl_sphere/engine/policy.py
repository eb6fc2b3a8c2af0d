"""When a run logs, evaluates, saves and stops: the whole story of a step boundary in one place.

The loop asks the policy once before the first step (``evaluate_at_start``), before each step
(``refresh_vmf``) and after each step (``after``); it does what the answer says, in this order:
non-finite check and scalars, epoch statistics, kNN evaluation, checkpoint, stop.

* scalars every run.log_every steps and at the last step (after a non-finite check: every rank
  stops together on a NaN, before anything is saved);
* at every epoch end: the embedding statistics (norm histogram, alignment / uniformity);
* the kNN monitor every eval.every_epochs epochs, at the last step, and before the first step of a
  fresh run (the random-init baseline) or of a resume whose epoch-end evaluation a stop skipped;
  never while stopping on a signal (a scheduler's grace period is short);
* last.pt at every epoch end (plus epoch_XXXX.pt every run.ckpt_every_epochs), every
  run.ckpt_every_steps steps, when run.ckpt_every_minutes have passed since the last save, at the
  last step, and when a stop signal came in;
* a stop signal (agreed by all ranks, see Run.poll) stops the run after that save.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

from omegaconf import DictConfig


@dataclass(frozen=True)
class Plan:
    """The run's length in optimiser steps. total: the schedules' length (epochs x steps per
    epoch); stop: where this run stops (optim.max_steps, schedules unchanged)."""

    steps_per_epoch: int
    total: int
    stop: int
    warmup: int
    global_batch: int

    @classmethod
    def of(cls, cfg: DictConfig, steps_per_epoch: int, world: int) -> "Plan":
        total = cfg.optim.epochs * steps_per_epoch
        return cls(steps_per_epoch, total, min(total, cfg.optim.max_steps or total),
                   int(round(cfg.optim.warmup_epochs * steps_per_epoch)), cfg.optim.batch_size * world)


@dataclass(frozen=True)
class Decision:
    """What to do at one step boundary (see the module docstring for the rules)."""

    log: bool  # scalars to TensorBoard / metrics.jsonl and the progress bar
    epoch_end: bool  # embedding statistics of the epoch's last batch
    evaluate: bool  # the kNN monitor
    save: bool  # last.pt
    keep_epoch: bool  # also epoch_XXXX.pt
    stop: int  # the signal to stop on, after the save (0: none)
    last: bool  # the run's last step

    @property
    def check_finite(self) -> bool:
        """Whether every rank checks for a non-finite loss here (one host sync)."""
        return self.log or self.epoch_end or self.save


class Policy:
    """monitor: whether the kNN monitor is on (eval.every_epochs > 0). The clock of time-based
    saves starts now and restarts at every save (``saved``)."""

    def __init__(self, cfg: DictConfig, plan: Plan, monitor: bool, clock: Callable[[], float] = time.monotonic):
        self.r, self.e, self.plan, self.monitor, self.clock = cfg.run, cfg.eval, plan, monitor, clock
        self.vmf_every = cfg.vmf.refresh_epochs if cfg.vmf.enabled else 0
        self.last_save = clock()

    def epoch(self, step: int) -> int:
        return step // self.plan.steps_per_epoch

    def _eval_epoch(self, step: int) -> bool:
        """``step`` is an epoch end at which the kNN monitor is due (step 0 included)."""
        return step % self.plan.steps_per_epoch == 0 and self.epoch(step) % self.e.every_epochs == 0

    def evaluate_at_start(self, start: int, resumed: bool, knn_step: Optional[int]) -> bool:
        """Before the first step: the random-init baseline of a fresh run, or the evaluation due at
        ``start`` that a stop signal skipped before the checkpoint of a resume was written."""
        if not self.monitor:
            return False
        if not resumed:
            return start == 0
        return self._eval_epoch(start) and knn_step != start and start < self.plan.stop

    def refresh_vmf(self, step: int, start: int, initialised: bool) -> bool:
        """Before step ``step``: vMF's means and pseudo-labels are re-estimated at the start of every
        vmf.refresh_epochs-th epoch, and at the first step of a run that has none yet."""
        if not self.vmf_every:
            return False
        epoch, pos = divmod(step, self.plan.steps_per_epoch)
        return (step == start and not initialised) or (pos == 0 and epoch % self.vmf_every == 0)

    def time_due(self) -> bool:
        minutes = self.r.ckpt_every_minutes
        return bool(minutes) and self.clock() - self.last_save >= 60 * minutes

    def saved(self) -> None:
        self.last_save = self.clock()

    def after(self, step: int, signum: int = 0, time_due: bool = False) -> Decision:
        """After ``step`` optimiser steps. signum: the stop signal every rank agreed on (0: none);
        time_due: the time-based save every rank agreed on."""
        last = step >= self.plan.stop
        epoch_end = step % self.plan.steps_per_epoch == 0
        stop = signum if signum and not last else 0
        every_steps = self.r.ckpt_every_steps
        keep = self.r.ckpt_every_epochs
        return Decision(
            log=step % self.r.log_every == 0 or last,
            epoch_end=epoch_end,
            evaluate=self.monitor and not stop and (last or self._eval_epoch(step)),
            save=epoch_end or last or bool(stop) or time_due or (bool(every_steps) and step % every_steps == 0),
            keep_epoch=epoch_end and bool(keep) and self.epoch(step) % keep == 0,
            stop=stop,
            last=last,
        )
