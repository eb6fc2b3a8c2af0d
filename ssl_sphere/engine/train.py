"""The training run: ``train(cfg)`` sets up one ``Run`` (the setup object: process group, run
directory, data, model, optimiser, step, logs, monitor, checkpoint state, policy) and runs its loop.
The engine is the only layer that knows DDP, AMP, logging and checkpoints; what happens at each
step boundary is the policy's (policy.py)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..augment.views import Augmenter
from ..core import dist
from ..data.batches import step_batches, steps_per_epoch
from ..data.datasets import load_data
from ..data.splits import DataSplits, stratified_subset
from ..evaluation.features import extract_features
from ..evaluation.monitor import CollapseMonitor, KnnMonitor
from ..evaluation.protocols import alignment_uniformity
from ..models.ssl_model import SSLModel, build_model, refresh_vmf
from .device import resolve_device, seed_everything
from .logs import RunLogger
from .optim import build_optimizer
from .policy import Decision, Plan, Policy
from .rundir import open_run_dir
from .signals import StopRequested, StopSignals
from .state import NonFiniteLoss, RunState
from .step import TrainStep, place_images

__all__ = ["Run", "train", "NonFiniteLoss", "StopRequested"]


@dataclass
class Run:
    """Everything one training run holds, built by :meth:`open`; :meth:`loop` runs it."""

    cfg: DictConfig
    run_dir: str
    device: torch.device
    rank: int
    world: int
    plan: Plan
    splits: DataSplits
    aug: Augmenter
    model: SSLModel
    step_fn: TrainStep
    logger: RunLogger
    monitor: Optional[KnnMonitor]
    state: RunState
    policy: Policy
    signals: StopSignals
    start: int  # the step this run continues from (0 for a fresh run)
    resumed: bool
    collapse: CollapseMonitor = field(default_factory=CollapseMonitor)
    control_group: Any = None  # gloo group for the per-step stop / save decision under DDP
    bar: Any = None  # tqdm progress bar on rank 0 (run.progress)
    knn_step: Optional[int] = field(default=None)  # the step of the checkpoint's last kNN evaluation

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, message: str) -> None:
        if self.main:
            print(message)

    # ------------------------------------------------------------------ setup
    @classmethod
    @contextlib.contextmanager
    def open(cls, cfg: DictConfig, splits: Optional[DataSplits] = None) -> Iterator["Run"]:
        """Set a run up (cfg resolved; splits: data already loaded for cfg.data, as studies reuse one
        decode) and tear it down afterwards: process group, run directory and its lock, data, stop
        signals, model (restored on resume), logs. SIGTERM / SIGUSR1 / Ctrl-C from the end of the
        data load on: save at the next step boundary and stop."""
        with contextlib.ExitStack() as stack:
            device = resolve_device(cfg.run.device)
            if dist.setup(device.type):
                stack.callback(dist.teardown)
            if device.type == "cuda":
                torch.cuda.set_device(device)
            rank, world = dist.rank(), dist.world_size()
            run_dir, resume_path, ckpt, lock = open_run_dir(cfg)
            if lock is not None:
                stack.callback(lock.close)
            seed_everything(cfg.run.seed + rank)
            if splits is None:
                splits = _load_data(cfg, main=rank == 0)
            # the statistics the run normalises with: config.yaml and every checkpoint say what a user
            # of the pretrained network must feed it
            cfg.data.mean, cfg.data.std = [float(v) for v in splits.mean], [float(v) for v in splits.std]
            plan = Plan.of(cfg, steps_per_epoch(len(splits.train), cfg.optim.batch_size, world), world)
            # after the decode, whose worker processes keep the default handlers
            signals = stack.enter_context(StopSignals())
            run = cls._build(cfg, run_dir, device, rank, world, plan, splits, signals, ckpt, resume_path)
            stack.callback(run.close)
            yield run

    @classmethod
    def _build(cls, cfg, run_dir, device, rank, world, plan, splits, signals, ckpt, resume_path) -> "Run":
        aug = Augmenter(cfg.aug, cfg.data.image_size, splits.mean, splits.std, cfg.data.eval_crop).to(device)
        model = build_model(cfg, len(splits.train), device, world)
        optimizer = build_optimizer(model, cfg.optim)
        show = rank == 0 and cfg.run.progress
        monitor = KnnMonitor(splits, aug.eval_transform, cfg.eval, device, cfg.run.seed, show) \
            if cfg.eval.every_epochs else None
        state = RunState(run_dir, cfg, model, optimizer, monitor, plan.steps_per_epoch, plan.global_batch, world,
                         rank == 0)
        # weights before compile and the DDP wrapper; DDP then broadcasts rank 0's parameters and buffers
        # (weights, EMA copies, queue), so every rank starts identical despite per-rank seeds
        start = state.restore(ckpt, rank, source=resume_path) if ckpt is not None else 0
        if cfg.model.compile:
            model.method.backbone.compile()
        forward = model
        if world > 1:
            forward = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        images, on_device = place_images(splits.train.images, cfg, device)
        step_fn = TrainStep(forward, model.method, optimizer, aug, images, on_device, cfg, plan.total, plan.warmup,
                            device, plan.steps_per_epoch)
        logger = _open_logs(cfg, run_dir, rank == 0, purge_step=start if ckpt is not None else None)
        return cls(cfg, run_dir, device, rank, world, plan, splits, aug, model, step_fn, logger, monitor, state,
                   Policy(cfg, plan, monitor is not None), signals, start, ckpt is not None,
                   control_group=dist.cpu_group(), knn_step=state.knn_step)

    def close(self) -> None:
        """Close the progress bar and the logs; an error while closing never hides the one in flight."""
        for closer in (getattr(self.bar, "close", None), self.logger.close):
            with contextlib.suppress(Exception):
                if closer is not None:
                    closer()

    # ------------------------------------------------------------------ the loop
    def loop(self) -> Dict[str, object]:
        """Optimisation steps start .. plan.stop - 1, each followed by what the policy decides;
        returns the run's summary."""
        cfg, plan, policy, step_fn = self.cfg, self.plan, self.policy, self.step_fn
        self.announce()
        if not self.signals.received and policy.evaluate_at_start(self.start, self.resumed, self.knn_step):
            self.evaluate(self.start)  # the random-init baseline, or an epoch-end evaluation a stop skipped
        if self.main and cfg.run.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=plan.stop, initial=self.start, desc="pretrain", dynamic_ncols=True, file=sys.stdout)
        self.model.train()
        step = self.start
        order = step_batches(len(self.splits.train), cfg.optim.batch_size, cfg.run.seed, self.start, plan.stop,
                             self.rank, self.world)
        for step_i, idx, x in step_fn.batches(order):
            vmf = self.model.vmf
            if vmf is not None and policy.refresh_vmf(step_i, self.start, bool(vmf.initialised)):
                refresh_vmf(self.model, self.splits.train.images, self.aug.eval_transform, cfg, self.device,
                            seed=cfg.run.seed + policy.epoch(step_i))
            loss, method_loss, logs, out, lr = step_fn(step_i, idx, x)
            step = step_i + 1
            self.act(step, policy.after(step, *self.poll()), loss, method_loss, logs, out, lr)
        if step == self.start:
            self.say(f"[ssl_sphere] nothing to do: the run is at step {step} already (optim.max_steps / optim.epochs)")
        return self.summary(step)

    def act(self, step: int, d: Decision, loss, method_loss, logs, out, lr: float) -> None:
        """Do what the policy decided after ``step``, in its order."""
        if d.check_finite:
            self.state.check_finite(self.step_fn.first_bad)  # every rank stops together
        if d.log:
            self.log_step(step, loss, method_loss, logs, lr)
        if self.bar is not None:
            self.bar.update(1)
        if d.epoch_end:
            self.log_sphere_stats(step, out)
        if d.evaluate:
            self.evaluate(step, out)
        if d.save:
            self.state.save(step, self.step_fn.first_bad, periodic=d.keep_epoch)
            self.policy.saved()
        if d.last and self.main and self.monitor is not None:
            self.projector_snapshot(step)
        if d.stop:
            raise StopRequested(d.stop, step, self.state.last_path)  # the signal every rank agreed on

    def poll(self) -> tuple[int, bool]:
        """(signal number or 0, time-based save due): what every rank must agree on at a step
        boundary. One all-reduce of two integers on a CPU group under DDP; no sync otherwise."""
        local = [self.signals.received or 0, int(self.policy.time_due())]
        if self.control_group is None:
            return local[0], bool(local[1])
        signum, due = dist.all_reduce_max_cpu(local, self.control_group)
        return signum, bool(due)

    # ------------------------------------------------------------------ what the decisions do
    def announce(self) -> None:
        cfg, plan, splits = self.cfg, self.plan, self.splits
        if self.state.notice:
            self.say(f"[ssl_sphere] {self.state.notice}")
        self.say(f"[ssl_sphere] run dir {self.run_dir} | {cfg.method.name}{' +SEC' if cfg.sec.enabled else ''} | "
                 f"{splits.name}: {len(splits.train)} train / {len(splits.test)} test images | {cfg.model.backbone} | "
                 f"device {self.device}{' bf16' if self.step_fn.use_bf16 else ''} | {plan.steps_per_epoch} "
                 f"steps/epoch, {plan.total} total" + (f", stopping at {plan.stop}" if plan.stop < plan.total else "")
                 + (f" | resumed at step {self.start}" if self.resumed else ""))

    def evaluate(self, step: int, out=None) -> None:
        """kNN monitor and collapse statistics (out: the last step's StepOutput) -> TensorBoard,
        metrics.jsonl, one console line, and a warning the first time a collapse statistic is low."""
        res = self.monitor(self.model.method, step)
        epoch = step / self.plan.steps_per_epoch
        self.logger.log(step, res, "eval", epoch=epoch)
        stats, warnings = self.collapse(out, self.monitor.feature_stats)
        self.logger.log(step, stats, "collapse", epoch=epoch)
        self.say(f"[ssl_sphere] step {step} (epoch {epoch:.2f}): kNN top-1 "
                 f"{res['knn_top1']:.2f}% top-5 {res['knn_top5']:.2f}% ({res['knn_seconds']:.1f}s)")
        for w in warnings:
            self.say(f"[ssl_sphere] warning at step {step}: {w}")

    def log_step(self, step: int, loss, method_loss, logs: Dict[str, torch.Tensor], lr: float) -> None:
        """Scalars of step ``step`` to TensorBoard / metrics.jsonl and the progress bar (one host sync)."""
        vals = self.logger.log(step, {"loss": loss.detach(), "method_loss": method_loss.detach(), "lr": lr, **logs},
                               "train", epoch=step / self.plan.steps_per_epoch)
        if self.bar is not None:
            post = {"loss": f"{vals['loss']:.3f}", "lr": f"{lr:.3g}",
                    "norm": f"{vals['norm_mean']:.2f}±{vals['norm_std']:.2f}"}
            if "sec_loss" in vals:
                post["sec"] = f"{vals['sec_loss']:.3g}"
            self.bar.set_postfix(post, refresh=False)

    def log_sphere_stats(self, step: int, out) -> None:
        """Norm histogram of the raw embeddings of the last batch, and the alignment / uniformity of
        their first two normalised views (Wang & Isola 2020)."""
        emb = out.embeddings.detach().float()
        self.logger.histogram("embeddings/norm", emb.norm(dim=1), step)
        if out.views >= 2:
            z1, z2 = emb.chunk(out.views)[:2]
            self.logger.log(step, alignment_uniformity(z1, z2), "sphere")

    def projector_snapshot(self, step: int, n: int = 300) -> None:
        """TensorBoard projector: backbone features of n stratified test images, labels, thumbnails."""
        test = self.splits.test
        idx = stratified_subset(test.labels, n, seed=0)
        images = test.images[idx]
        feats = extract_features(self.model.method, images, 256, self.device, self.aug.eval_transform)
        names = [self.splits.classes[int(y)] if y >= 0 else "?" for y in test.labels[idx]]
        self.logger.projector(feats, names, images, step)

    def summary(self, step: int) -> Dict[str, object]:
        out: Dict[str, object] = {"step": step, "run_dir": self.run_dir}
        if self.monitor is not None and self.monitor.last:
            last = self.monitor.last
            out.update(knn_top1=last["knn_top1"], knn_top5=last["knn_top5"], start_knn_top1=self.monitor.start)
        return out


def _load_data(cfg: DictConfig, main: bool) -> DataSplits:
    started = time.time()
    token = dist.broadcast_object(uuid.uuid4().hex)  # data.cache=rebuild: one rebuild per run, not per rank
    splits = load_data(cfg.data, rebuild_token=token, progress=main and cfg.run.progress,
                       say=print if main else (lambda *a: None))
    if main:
        print(f"[ssl_sphere] data ready in {time.time() - started:.2f}s")
    return splits


def _open_logs(cfg: DictConfig, run_dir: str, main: bool, purge_step: Optional[int]) -> RunLogger:
    """The run directory's config.yaml (rank 0), TensorBoard events and metrics.jsonl."""
    os.makedirs(run_dir, exist_ok=True)
    if main:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(CONFIG_HEADER + OmegaConf.to_yaml(cfg))
    return RunLogger(run_dir, active=main, purge_step=purge_step)


CONFIG_HEADER = """\
# The configuration of this run. The sections data ... run are what the run used. `request` is what
# was asked (dataclass defaults < --config YAML < flags < key=value), with null / auto where ssl_sphere
# derives the value; `derived` says how each derived value was obtained. A resume derives those again
# for the machine it runs on; `--config <this file>` starts a new run from the request.
"""


def train(cfg: DictConfig, splits: Optional[DataSplits] = None) -> Dict[str, object]:
    """Pretrain as configured (cfg resolved, e.g. by ssl_sphere.cli.pretrain.build_config). Returns a
    summary dict (step, run_dir and, with the monitor on, the start / final kNN top-1).
    splits: already loaded data for cfg.data (studies reuse one decode across runs)."""
    with Run.open(cfg, splits) as run:
        summary = run.loop()
        if run.bar is not None:
            run.bar.close()
        run.logger.close()  # a failing flush here is the run's error (on the way out, close() stays quiet)
        dist.barrier()
        if "knn_top1" in summary:
            run.say(f"[ssl_sphere] kNN top-1: {summary['start_knn_top1']:.2f}% at start -> "
                    f"{summary['knn_top1']:.2f}% at step {summary['step']}")
        run.say(f"[ssl_sphere] checkpoint: {run.state.last_path}")
        return summary
