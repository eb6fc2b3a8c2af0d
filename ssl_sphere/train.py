"""The training loop, the only module that knows DDP, AMP, logging and checkpoints: one
optimisation step (``TrainStep``) and ``train()``, a sequence of named phases."""

from __future__ import annotations

import errno
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import checkpoint, dist
from .augment import Augmenter
from .checkpointer import Checkpointer, NonFiniteLoss
from .config import ConfigError
from .data import DataSplits, load_data, step_batches, steps_per_epoch
from .errors import UserError, first_line
from .evaluation import alignment_uniformity, extract_features, stratified_subset
from .loader import Prefetcher
from .methods import Method
from .model import SSLModel, build_model, refresh_vmf
from .monitor import KnnMonitor, RunLogger
from .optim import build_optimizer, lr_at, set_lr
from .run import claim_run_dir, resolve_device, seed_everything
from .signals import StopRequested, StopSignals

__all__ = ["Plan", "TrainStep", "train", "bf16_enabled", "place_images", "NonFiniteLoss", "StopRequested",
           "build_model"]


# ----------------------------------------------------------------------------- the step
def bf16_enabled(cfg: DictConfig, device: torch.device) -> bool:
    return cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and device.type == "cuda")


def place_images(images: torch.Tensor, cfg: DictConfig, device: torch.device) -> tuple[torch.Tensor, bool]:
    """The uint8 train set copied to the device once when it fits there (data.on_device), else left
    where it is (host memory or the memory-mapped cache; batches are gathered from it one step
    ahead, loader.Prefetcher). Returns (images, on_device)."""
    on_device = cfg.data.on_device == "yes" or (
        cfg.data.on_device == "auto" and device.type == "cuda" and images.numel() < 4 * 2**30)
    if on_device:
        return images.to(device), True
    return images, False


class TrainStep:
    """One optimisation step of the pretraining loop: lr schedule -> batch indexing ->
    augmentation -> forward (method + SEC + vMF, bf16 autocast where enabled) ->
    non-finite flag -> backward -> optimiser -> method.after_step. train() and the step
    benchmark (benchmarks/bench.py) both run this object, so the benchmark times the loop's code.

    forward: the SSLModel or its DDP wrapper; images: from place_images. ``first_bad`` is
    a device scalar holding the first step with a non-finite loss (-1: none), updated
    without a host sync; the caller reads it when it logs."""

    def __init__(self, forward: nn.Module, method: Method, optimizer: torch.optim.Optimizer, aug: Augmenter,
                 images: torch.Tensor, on_device: bool, cfg: DictConfig, total: int, warmup: int,
                 device: torch.device):
        self.forward, self.method, self.optimizer, self.aug = forward, method, optimizer, aug
        self.images, self.on_device, self.cfg = images, on_device, cfg
        self.total, self.warmup, self.device = total, warmup, device
        self.use_bf16 = bf16_enabled(cfg, device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def batch(self, idx: torch.Tensor, idx_dev: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 images of this batch on the training device."""
        if self.on_device or self.device.type != "cuda":
            return self.images[idx_dev]
        # Off-device on CUDA: indexing even a pinned tensor returns pageable memory, and a copy
        # from pageable memory blocks the host. Gather into a pinned block instead; the caching
        # host allocator hands that block out again only after this copy has completed.
        buf = torch.empty((idx.numel(), *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=True)
        torch.index_select(self.images, 0, idx, out=buf)
        return buf.to(self.device, non_blocking=True)

    def views(self, x: torch.Tensor):
        """The two augmented views of the uint8 batch x, in the model's memory format."""
        v1, v2 = self.aug.views(x)
        if self.cfg.model.channels_last:
            v1, v2 = v1.contiguous(memory_format=torch.channels_last), v2.contiguous(memory_format=torch.channels_last)
        return v1, v2

    def __call__(self, step: int, idx: torch.Tensor, mark: Optional[Callable[[str], None]] = None,
                 x: Optional[torch.Tensor] = None):
        """idx: (B,) CPU indices of this rank's batch; x: its (B, 3, H, W) uint8 images on the device
        when already gathered (loader.Prefetcher), else gathered here. mark(name), if given, is called
        after each phase (the benchmark's profiler). Returns (loss, method_loss, logs, embeddings, lr)."""
        cfg, device, optimizer = self.cfg, self.device, self.optimizer
        mark = mark or (lambda name: None)
        lr = lr_at(step, self.total, self.warmup, cfg.optim.lr, cfg.optim.min_lr_ratio)
        set_lr(optimizer, lr)
        idx_dev = idx.to(device, non_blocking=True)  # one copy, used for the batch and by vMF
        if x is None:
            x = self.batch(idx, idx_dev)
        mark("batch_index")
        v1, v2 = self.views(x)
        mark("augment")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            loss, method_loss, logs, emb = self.forward(v1, v2, step / self.total, idx_dev)
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)  # no sync
        mark("forward")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mark("backward")
        optimizer.step()
        mark("optimizer")
        self.method.after_step((step + 1) / self.total)
        mark("after_step")
        return loss, method_loss, logs, emb, lr


# ----------------------------------------------------------------------------- the run
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
    def of(cls, cfg: DictConfig, n_train: int, world: int) -> "Plan":
        per_epoch = steps_per_epoch(n_train, cfg.optim.batch_size, world)
        total = cfg.optim.epochs * per_epoch
        return cls(per_epoch, total, min(total, cfg.optim.max_steps or total),
                   int(round(cfg.optim.warmup_epochs * per_epoch)), cfg.optim.batch_size * world)


@dataclass
class Run:
    """What the phases of one training run share."""

    cfg: DictConfig
    run_dir: str
    device: torch.device
    main: bool
    plan: Plan
    splits: DataSplits
    aug: Augmenter
    model: SSLModel
    step_fn: TrainStep
    logger: RunLogger
    monitor: Optional[KnnMonitor]
    checkpointer: Checkpointer
    signals: StopSignals
    control_group: object = None  # gloo group for the per-step stop / save decision under DDP
    bar: object = None  # tqdm progress bar on rank 0 (run.progress)

    def say(self, message: str) -> None:
        if self.main:
            print(message)


def setup_process(cfg: DictConfig) -> tuple[torch.device, int, int]:
    """The training device and, under torchrun, the process group: (device, rank, world)."""
    device = resolve_device(cfg.run.device)
    dist.setup(device.type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, dist.rank(), dist.world_size()


def _lock_run_dir(run_dir: str):
    """An exclusive lock on ``run_dir/.lock``, held (the returned open file) for the whole run, so a
    second run resuming the same directory (a requeued job while the first still runs, two
    ``--resume auto`` of one name) is refused instead of interleaving its saves. A POSIX record
    lock (lockf), not flock: it belongs to this process only, so the decode workers it forks do
    not hold it after a kill. None where the file system has no locks: the run goes on unguarded."""
    import fcntl

    f = open(os.path.join(run_dir, ".lock"), "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        f.close()
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            raise ConfigError(f"another run is writing into {run_dir} (it holds {run_dir}/.lock); wait for it to "
                              "stop, or start this one elsewhere with --run-name NEW") from None
        return None
    return f


def open_run_dir(cfg: DictConfig) -> tuple[str, Optional[str], Optional[dict], object]:
    """Rank 0 claims the run directory (and finds the checkpoint to resume) for every rank,
    before anything else happens, locks it for the run, and clears the temp files a killed save
    left there; the config records where the run lives. Returns (run_dir, path of the checkpoint
    to resume or None, that checkpoint, the lock to close when the run ends (rank 0; None elsewhere))."""
    claim, lock, error = None, None, None
    if dist.is_main():
        try:
            run_dir, path = claim_run_dir(cfg)
            lock = _lock_run_dir(run_dir)  # before the cleanup: a live run's temp file is not stale
            checkpoint.remove_stale_temp_files(run_dir)
            claim = (run_dir, path)
        except Exception as exc:
            if lock is not None:
                lock.close()
            error = exc
            # every rank raises it, not only rank 0: as a one-argument error that surely pickles
            claim = exc if isinstance(exc, UserError) else ConfigError(f"{type(exc).__name__}: {first_line(exc)}")
    claim = dist.broadcast_object(claim)
    if error is not None:
        raise error
    if isinstance(claim, Exception):
        raise claim
    run_dir, resume_path = claim
    cfg.run.run_name = os.path.basename(run_dir)
    cfg.run.output_dir = os.path.dirname(run_dir)
    try:
        ckpt = checkpoint.load(resume_path) if resume_path else None
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return run_dir, resume_path, ckpt, lock


def record_normalisation(cfg: DictConfig, splits: DataSplits) -> None:
    """Resolve data.mean / data.std to the statistics the run normalises with, so config.yaml and
    every checkpoint say what a user of the pretrained network must feed it."""
    cfg.data.mean, cfg.data.std = [float(v) for v in splits.mean], [float(v) for v in splits.std]


def open_logs(cfg: DictConfig, run_dir: str, main: bool, purge_step: Optional[int]) -> RunLogger:
    """The run directory with its config.yaml (rank 0), TensorBoard events and metrics.jsonl."""
    os.makedirs(run_dir, exist_ok=True)
    if main:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(cfg))
    return RunLogger(run_dir, active=main, purge_step=purge_step)


def announce(run: Run, start: int, resumed: bool) -> None:
    cfg, plan, splits = run.cfg, run.plan, run.splits
    if run.checkpointer.notice:
        run.say(f"[ssl_sphere] {run.checkpointer.notice}")
    run.say(f"[ssl_sphere] run dir {run.run_dir} | {cfg.method.name}{' +SEC' if cfg.sec.enabled else ''} | "
            f"{splits.name}: {len(splits.train)} train / {len(splits.test)} test images | {cfg.model.backbone} | "
            f"device {run.device}{' bf16' if run.step_fn.use_bf16 else ''} | {plan.steps_per_epoch} steps/epoch, "
            f"{plan.total} total" + (f", stopping at {plan.stop}" if plan.stop < plan.total else "")
            + (f" | resumed at step {start}" if resumed else ""))


def evaluate(run: Run, step: int) -> None:
    """kNN monitor -> TensorBoard, metrics.jsonl and one console line."""
    res = run.monitor(run.model.method, step)
    run.logger.log(step, res, "eval", epoch=step / run.plan.steps_per_epoch)
    run.say(f"[ssl_sphere] step {step} (epoch {step / run.plan.steps_per_epoch:.2f}): kNN top-1 "
            f"{res['knn_top1']:.2f}% top-5 {res['knn_top5']:.2f}% ({res['knn_seconds']:.1f}s)")


def knn_missing(run: Run, start: int, ckpt: Optional[dict]) -> bool:
    """Whether the kNN evaluation due at ``start`` has not been made: a fresh run's baseline, or
    the epoch-end evaluation that a stop signal skipped (see end_of_epoch) before a resume."""
    if ckpt is None:
        return start == 0
    epoch, pos = divmod(start, run.plan.steps_per_epoch)
    due = start == 0 or (pos == 0 and epoch % run.cfg.eval.every_epochs == 0)
    return due and run.checkpointer.knn_step != start and start < run.plan.stop


def log_step(run: Run, step: int, loss, method_loss, logs: Dict[str, torch.Tensor], lr: float) -> None:
    """Scalars of step ``step`` to TensorBoard / metrics.jsonl and the progress bar (one host sync)."""
    vals = run.logger.log(step, {"loss": loss.detach(), "method_loss": method_loss.detach(), "lr": lr, **logs},
                          "train", epoch=step / run.plan.steps_per_epoch)
    if run.bar is not None:
        post = {"loss": f"{vals['loss']:.3f}", "lr": f"{lr:.3g}",
                "norm": f"{vals['norm_mean']:.2f}±{vals['norm_std']:.2f}"}
        if "sec_loss" in vals:
            post["sec"] = f"{vals['sec_loss']:.3g}"
        run.bar.set_postfix(post, refresh=False)


def log_sphere_stats(logger: RunLogger, emb: torch.Tensor, step: int, two_views: bool) -> None:
    """Norm histogram of the raw embeddings of the last batch, and the alignment /
    uniformity of their normalised two views (Wang & Isola 2020)."""
    emb = emb.detach().float()
    logger.histogram("embeddings/norm", emb.norm(dim=1), step)
    if two_views:
        z1, z2 = emb.chunk(2)
        logger.log(step, alignment_uniformity(z1, z2), "sphere")


def end_of_epoch(run: Run, step: int, emb: torch.Tensor, stopping: bool = False) -> None:
    """Embedding statistics, the kNN monitor when due, and last.pt (+ epoch_XXXX.pt when due).
    stopping: a stop signal came in; save at once (a scheduler's grace period is short) and
    leave out the kNN evaluation."""
    cfg = run.cfg
    epoch = step // run.plan.steps_per_epoch
    run.checkpointer.check_finite(run.step_fn.first_bad)
    log_sphere_stats(run.logger, emb, step, two_views=cfg.method.name != "moco" or cfg.method.symmetric)
    if run.monitor is not None and epoch % cfg.eval.every_epochs == 0 and not stopping:
        evaluate(run, step)
    every = cfg.run.ckpt_every_epochs
    run.checkpointer.save(step, run.step_fn.first_bad, periodic=bool(every) and epoch % every == 0)


def poll(run: Run) -> tuple[int, bool]:
    """(signal number or 0, time-based save due): what every rank must agree on at a step
    boundary. One all-reduce of two integers on a CPU group under DDP; no sync otherwise."""
    local = [run.signals.received or 0, int(run.checkpointer.time_due())]
    if run.control_group is None:
        return local[0], bool(local[1])
    signum, due = dist.all_reduce_max_cpu(local, run.control_group)
    return signum, bool(due)


def projector_snapshot(run: Run, step: int, n: int = 300) -> None:
    """TensorBoard projector: backbone features of n stratified test images, labels, thumbnails."""
    test = run.splits.test
    idx = stratified_subset(test.labels, n, seed=0)
    images = test.images[idx]
    feats = extract_features(run.model.method, images, 256, run.device, run.aug.eval_transform)
    names = [run.splits.classes[int(y)] if y >= 0 else "?" for y in test.labels[idx]]
    run.logger.projector(feats, names, images, step)


def loop(run: Run, start: int) -> int:
    """Optimisation steps start..plan.stop-1 (vMF refresh, step, log, end of epoch); returns the last step."""
    cfg, plan, model, step_fn = run.cfg, run.plan, run.model, run.step_fn
    step = start
    batches = step_batches(len(run.splits.train), cfg.optim.batch_size, cfg.run.seed, start, plan.stop,
                           dist.rank(), dist.world_size())
    if step_fn.on_device:
        batches = ((s, i, None) for s, i in batches)  # gathered on the device inside the step
    else:
        batches = Prefetcher(step_fn.images, run.device, cfg.optim.batch_size)(batches)
    for step_i, idx, x in batches:
        epoch, pos = divmod(step_i, plan.steps_per_epoch)
        if model.vmf is not None and ((step_i == start and not bool(model.vmf.initialised))
                                      or (pos == 0 and epoch % cfg.vmf.refresh_epochs == 0)):
            refresh_vmf(model, run.splits.train.images, run.aug.eval_transform, cfg, run.device,
                        seed=cfg.run.seed + epoch)
        loss, method_loss, logs, emb, lr = step_fn(step_i, idx, x=x)
        step = step_i + 1
        if step % cfg.run.log_every == 0 or step == plan.stop:
            run.checkpointer.check_finite(step_fn.first_bad)  # every rank stops together
            log_step(run, step, loss, method_loss, logs, lr)
        if run.bar is not None:
            run.bar.update(1)
        signum, time_due = poll(run)
        if step % plan.steps_per_epoch == 0:
            end_of_epoch(run, step, emb, stopping=bool(signum) and step < plan.stop)
        elif time_due or run.checkpointer.due(step):
            run.checkpointer.save(step, step_fn.first_bad)
        if signum and step < plan.stop:
            if run.checkpointer.last_saved_step != step:
                run.checkpointer.save(step, step_fn.first_bad)
            raise StopRequested(signum, step, run.checkpointer.last_path)
    return step


def finish(run: Run, start: int, step: int) -> Dict[str, object]:
    """The final kNN evaluation and checkpoint where the last epoch end did not already make
    them, the projector snapshot, and the run's summary. A resume that had nothing left to do
    (start == step) writes nothing."""
    ran = step > start
    run.checkpointer.check_finite(run.step_fn.first_bad)
    if ran and run.monitor is not None and run.monitor.last.get("step") != step:
        evaluate(run, step)
    if ran and run.checkpointer.last_saved_step != step:
        run.checkpointer.save(step, run.step_fn.first_bad)
    if ran and run.main and run.monitor is not None:
        projector_snapshot(run, step)
    if not ran:
        run.say(f"[ssl_sphere] nothing to do: the run is at step {step} already (optim.max_steps / optim.epochs)")
    summary: Dict[str, object] = {"step": step, "run_dir": run.run_dir}
    if run.monitor is not None and run.monitor.last:
        last = run.monitor.last
        summary.update(knn_top1=last["knn_top1"], knn_top5=last["knn_top5"], start_knn_top1=run.monitor.start)
    return summary


def close_quietly(run: Run) -> None:
    for closer in (getattr(run.bar, "close", None), run.logger.close):
        try:
            if closer is not None:
                closer()
        except Exception:
            pass


def train(cfg: DictConfig, splits: Optional[DataSplits] = None) -> Dict[str, object]:
    """Pretrain as configured (cfg already resolved). Returns a summary dict.
    splits: already loaded data for cfg.data (studies reuse one decode across runs).
    SIGTERM / SIGUSR1 / Ctrl-C from the start on: save at the next step boundary and stop."""
    device, rank, world = setup_process(cfg)
    run_dir, resume_path, ckpt, lock = open_run_dir(cfg)
    try:
        return _train(cfg, splits, device, rank, world, run_dir, resume_path, ckpt)
    finally:
        if lock is not None:
            lock.close()


def _train(cfg: DictConfig, splits: Optional[DataSplits], device: torch.device, rank: int, world: int,
           run_dir: str, resume_path: Optional[str], ckpt: Optional[dict]) -> Dict[str, object]:
    main = rank == 0
    seed_everything(cfg.run.seed + rank)
    if splits is None:
        started = time.time()
        token = dist.broadcast_object(uuid.uuid4().hex)  # data.cache=rebuild: one rebuild per run, not per rank
        splits = load_data(cfg.data, rebuild_token=token, progress=main and cfg.run.progress,
                           say=print if main else (lambda *a: None))
        if main:
            print(f"[ssl_sphere] data ready in {time.time() - started:.2f}s")
    record_normalisation(cfg, splits)
    plan = Plan.of(cfg, len(splits.train), world)
    # from here on (after the decode, whose worker processes keep the default handlers), SIGTERM /
    # SIGUSR1 / Ctrl-C are recorded and stop the run at the next step boundary, after a save
    with StopSignals() as signals:
        return _build_and_run(cfg, splits, plan, device, rank, world, run_dir, resume_path, ckpt, signals)


def _build_and_run(cfg: DictConfig, splits: DataSplits, plan: Plan, device: torch.device, rank: int, world: int,
                   run_dir: str, resume_path: Optional[str], ckpt: Optional[dict],
                   signals: StopSignals) -> Dict[str, object]:
    main = rank == 0

    # build
    aug = Augmenter(cfg.aug, cfg.data.image_size, splits.mean, splits.std, cfg.data.eval_crop).to(device)
    model = build_model(cfg, len(splits.train), device, world)
    optimizer = build_optimizer(model, cfg.optim)
    monitor = (KnnMonitor(splits, aug.eval_transform, cfg.eval, device, cfg.run.seed, main and cfg.run.progress)
               if cfg.eval.every_epochs else None)
    checkpointer = Checkpointer(run_dir, cfg, model, optimizer, monitor, plan.steps_per_epoch, plan.global_batch,
                                world, main)

    # resume (weights before compile and the DDP wrapper; DDP then broadcasts rank 0's state)
    start = checkpointer.restore(ckpt, rank, source=resume_path) if ckpt is not None else 0
    if cfg.model.compile:
        model.method.backbone.compile()
    wrapped = model
    if world > 1:
        # DDP broadcasts rank 0's parameters and buffers (weights, EMA copies, queue) at
        # construction, so every rank starts identical despite per-rank seeds.
        device_ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    images, on_device = place_images(splits.train.images, cfg, device)
    step_fn = TrainStep(wrapped, model.method, optimizer, aug, images, on_device, cfg, plan.total, plan.warmup, device)
    logger = open_logs(cfg, run_dir, main, purge_step=start if ckpt is not None else None)
    run = Run(cfg, run_dir, device, main, plan, splits, aug, model, step_fn, logger, monitor, checkpointer,
              signals, dist.cpu_group())
    announce(run, start, resumed=ckpt is not None)

    # loop over steps, finish
    try:
        if monitor is not None and not signals.received and knn_missing(run, start, ckpt):
            evaluate(run, start)  # the random-init baseline, or an epoch-end evaluation a stop skipped
        if main and cfg.run.progress:
            from tqdm import tqdm

            run.bar = tqdm(total=plan.stop, initial=start, desc="pretrain", dynamic_ncols=True, file=sys.stdout)
        model.train()
        step = loop(run, start)
        summary = finish(run, start, step)
    except BaseException:
        close_quietly(run)  # the error in flight is the one to report, not a failing flush after it
        raise
    if run.bar is not None:
        run.bar.close()
    logger.close()
    dist.barrier()
    if "knn_top1" in summary:
        run.say(f"[ssl_sphere] kNN top-1: {summary['start_knn_top1']:.2f}% at start -> "
                f"{summary['knn_top1']:.2f}% at step {step}")
    run.say(f"[ssl_sphere] checkpoint: {checkpointer.last_path}")
    return summary
