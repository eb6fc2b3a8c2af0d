"""The training loop: the only place that knows DDP, AMP, logging and checkpoints."""

from __future__ import annotations

import math
import os
import random
import sys
from typing import Dict, Optional

import numpy as np
import torch
from lightly.models.utils import get_weight_decay_parameters
from lightly.utils.lars import LARS
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import checkpoint, dist
from .augment import Augmenter
from .backbones import build_backbone
from .config import ConfigError, to_container
from .data import DataSplits, epoch_batches, load_data, steps_per_epoch
from .evaluation import alignment_uniformity, extract_features, stratified_subset
from .methods import Method, build_method
from .monitor import KnnMonitor, RunLogger
from .sphere import SEC, VMF, norm_stats


class NonFiniteLoss(RuntimeError):
    pass


class Pretrainer(nn.Module):
    """A method plus the optional SEC and vMF regularisers: one module, one state_dict
    (weights, EMA copies, queue, SEC's running mean, vMF means/pseudo-labels together)."""

    def __init__(self, method: Method, sec: Optional[SEC], vmf: Optional[VMF] = None):
        super().__init__()
        self.method, self.sec, self.vmf = method, sec, vmf

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, progress: float, idx: Optional[torch.Tensor] = None):
        """x1, x2: (B, 3, H, W) views; idx: (B,) dataset indices (needed by vMF).
        Returns (total loss, method loss, logs of device scalars, raw embeddings)."""
        out = self.method(x1, x2)
        logs = dict(out.logs)
        logs.update(norm_stats(out.embeddings))
        total = out.loss
        if self.sec is not None:
            sec_term, sec_logs = self.sec(out.embeddings, progress)
            total = total + sec_term
            logs.update(sec_logs)
        if self.vmf is not None:
            vmf_term, vmf_logs = self.vmf(out.embeddings, idx)
            total = total + vmf_term
            logs.update(vmf_logs)
        return total, out.loss, logs, out.embeddings


def build_model(cfg: DictConfig, n_train: int = 0) -> Pretrainer:
    """n_train: training-set size (vMF keeps one pseudo-label per image)."""
    backbone, fdim = build_backbone(cfg.model.backbone, cfg.model.small_images)
    method = build_method(cfg.method, backbone, fdim, cfg.see)
    sec = SEC(cfg.sec.weight, cfg.sec.ema, cfg.sec.ramp) if cfg.sec.enabled else None
    vmf = None
    if cfg.vmf.enabled:
        if cfg.vmf.k > n_train:
            raise ConfigError(f"invalid value for 'vmf.k': {cfg.vmf.k} pseudo-classes but only {n_train} training images")
        vmf = VMF(cfg.vmf.k, cfg.method.proj_dim, n_train, cfg.vmf.kappa, cfg.vmf.weight)
    return Pretrainer(method, sec, vmf)


def build_model_on(cfg: DictConfig, n_train: int, device: torch.device, world: int = 1) -> Pretrainer:
    """build_model on ``device`` in the training memory format (SyncBatchNorm across ranks if asked)."""
    model = build_model(cfg, n_train).to(device)
    if world > 1 and cfg.model.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def sphere_pictures(logger: RunLogger, emb: torch.Tensor, step: int, two_views: bool) -> None:
    """Norm histogram of the raw embeddings of the last batch, and the alignment /
    uniformity of their normalised two views (Wang & Isola 2020)."""
    emb = emb.detach().float()
    logger.histogram("embeddings/norm", emb.norm(dim=1), step)
    if two_views:
        z1, z2 = emb.chunk(2)
        logger.log(step, alignment_uniformity(z1, z2), "sphere")


def projector_snapshot(logger: RunLogger, method: Method, splits: DataSplits, transform, device, step: int,
                       n: int = 300) -> None:
    """TensorBoard projector: backbone features of n stratified test images, labels, thumbnails."""
    idx = stratified_subset(splits.test.labels, n, seed=0)
    images = splits.test.images[idx]
    feats = extract_features(method, images, 256, device, transform)
    names = [splits.classes[int(y)] if y >= 0 else "?" for y in splits.test.labels[idx]]
    logger.projector(feats, names, images, step)


class EmbedView(nn.Module):
    """Presents a method's loss-space embedding (``embed``) as ``features`` for extract_features."""

    def __init__(self, method: Method):
        super().__init__()
        self.method = method

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.embed(x)


@torch.no_grad()
def refresh_vmf(model: Pretrainer, images: torch.Tensor, transform, cfg: DictConfig, device, seed: int) -> None:
    """vMF "global structure learning": embed the whole training set with the momentum
    (or eval-mode) encoder, eval transform only, sharded over ranks, then spherical
    k-means -> mean directions + pseudo-labels (identical on every rank: same inputs, same seed)."""
    r, w = dist.rank(), dist.world_size()
    emb = extract_features(EmbedView(model.method), images[r::w], cfg.eval.batch_size, device, transform)
    model.vmf.refresh(dist.gather_sharded(emb, images.shape[0]), seed)


def lr_at(step: int, total: int, warmup: int, lr: float, min_ratio: float = 0.0) -> float:
    """Linear warmup from lr/warmup to lr over ``warmup`` steps, then half-cosine to lr*min_ratio."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def build_optimizer(model: nn.Module, ocfg) -> torch.optim.Optimizer:
    """Weight decay on weights only: norm layers and biases are excluded (lightly's split)."""
    decay, no_decay = get_weight_decay_parameters([model])
    groups = [
        {"params": [p for p in decay if p.requires_grad], "weight_decay": ocfg.weight_decay},
        {"params": [p for p in no_decay if p.requires_grad], "weight_decay": 0.0},
    ]
    if ocfg.optimizer == "lars":
        # LARS skips its trust ratio for groups with weight_decay 0 (norms, biases)
        return LARS(groups, lr=ocfg.lr, momentum=ocfg.momentum, trust_coefficient=ocfg.lars_eta)
    return torch.optim.SGD(groups, lr=ocfg.lr, momentum=ocfg.momentum)


def bf16_enabled(cfg: DictConfig, device: torch.device) -> bool:
    return cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and device.type == "cuda")


def place_images(images: torch.Tensor, cfg: DictConfig, device: torch.device) -> tuple[torch.Tensor, bool]:
    """The uint8 train set on the device when it fits (data.on_device), else in (pinned) host memory.
    Returns (images, on_device)."""
    on_device = cfg.data.on_device == "yes" or (
        cfg.data.on_device == "auto" and device.type == "cuda" and images.numel() < 4 * 2**30)
    if on_device:
        return images.to(device), True
    return (images.pin_memory() if device.type == "cuda" else images), False


class TrainStep:
    """One optimisation step of the pretraining loop: lr schedule -> batch indexing ->
    augmentation -> forward (method + SEC + vMF, bf16 autocast where enabled) ->
    non-finite flag -> backward -> optimiser -> method.after_step. train() and
    ``ssl_sphere.bench step`` both run this object, so the benchmark times the loop's code.

    forward: the Pretrainer or its DDP wrapper; images: from place_images. ``first_bad`` is
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

    def __call__(self, step: int, idx: torch.Tensor, mark=None):
        """idx: (B,) CPU indices of this rank's batch. mark(name), if given, is called after each
        phase (the benchmark's profiler). Returns (loss, method_loss, logs, embeddings, lr)."""
        cfg, device, optimizer = self.cfg, self.device, self.optimizer
        mark = mark or (lambda name: None)
        lr = lr_at(step, self.total, self.warmup, cfg.optim.lr, cfg.optim.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        idx_dev = idx.to(device, non_blocking=True)  # one copy, used for the batch and by vMF
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


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def seed_everything(seed: int) -> None:
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


def train(cfg: DictConfig, splits: Optional[DataSplits] = None) -> Dict[str, float]:
    """Pretrain as configured (cfg already resolved). Returns a summary dict.
    splits: already loaded data for cfg.data (studies reuse one decode across runs)."""
    device = resolve_device(cfg.run.device)
    dist.setup(device.type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world = dist.rank(), dist.world_size()
    main = rank == 0

    run_dir, resume_path = dist.broadcast_object(choose_run_dir(cfg) if main else None)
    cfg.run.run_name = os.path.basename(run_dir)
    cfg.run.output_dir = os.path.dirname(run_dir)
    ckpt = checkpoint.load(resume_path) if resume_path else None

    seed_everything(cfg.run.seed + rank)
    splits = splits if splits is not None else load_data(cfg.data)
    n = len(splits.train)
    spe = steps_per_epoch(n, cfg.optim.batch_size, world)
    total = cfg.optim.epochs * spe
    stop = min(total, cfg.optim.max_steps or total)
    warmup = int(round(cfg.optim.warmup_epochs * spe))

    aug = Augmenter(cfg.aug, cfg.data.image_size, splits.mean, splits.std).to(device)
    model = build_model_on(cfg, n, device, world)
    optimizer = build_optimizer(model, cfg.optim)

    start_step, start_knn = 0, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step, start_knn = int(ckpt["step"]), ckpt.get("start_knn_top1")
    method = model.method
    if cfg.model.compile:
        method.backbone.compile()
    ddp = model
    if world > 1:
        # DDP broadcasts rank 0's parameters and buffers (weights, EMA copies, queue) at
        # construction, so every rank starts identical despite per-rank seeds.
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    images, on_device = place_images(splits.train.images, cfg, device)
    run_step = TrainStep(ddp, method, optimizer, aug, images, on_device, cfg, total, warmup, device)

    os.makedirs(run_dir, exist_ok=True)
    if main:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(cfg))
    logger = RunLogger(run_dir, active=main, purge_step=start_step if ckpt is not None else None)
    monitor = KnnMonitor(splits, aug.eval_transform, cfg.eval, device, cfg.run.seed) if cfg.eval.every_epochs else None
    if ckpt is not None:
        if world == 1 and ckpt.get("world_size", 1) == 1:
            checkpoint.set_rng_state(ckpt["rng"])  # exact continuation
        else:
            # the checkpoint holds rank 0's RNG only: give each rank a fresh stream for this step
            seed_everything(cfg.run.seed + 1000003 * start_step + rank)
        if monitor is not None and ckpt.get("best_knn_top1") is not None:
            monitor.best = ckpt["best_knn_top1"]

    use_bf16 = run_step.use_bf16
    say = print if main else (lambda *a, **k: None)
    say(f"[ssl_sphere] run dir {run_dir} | {cfg.method.name}{' +SEC' if cfg.sec.enabled else ''} | "
        f"{splits.name}: {n} train / {len(splits.test)} test images | {cfg.model.backbone} | device {device}"
        f"{' bf16' if use_bf16 else ''} | {spe} steps/epoch, {total} total" + (f", stopping at {stop}" if stop < total else "")
        + (f" | resumed at step {start_step}" if ckpt is not None else ""))

    state = {"last_saved_step": start_step if ckpt is not None else None, "knn": {}}

    def payload(step: int) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "epoch": step / spe, "rng": checkpoint.rng_state(), "config": to_container(cfg),
                "start_knn_top1": start_knn, "best_knn_top1": monitor.best if monitor and monitor.best > -1 else None,
                "world_size": world, "version": 1}

    def save(step: int, periodic: bool = False) -> None:
        if main:
            checkpoint.save(os.path.join(run_dir, "last.pt"), payload(step))
            if periodic:
                checkpoint.save(os.path.join(run_dir, f"epoch_{step // spe:04d}.pt"), payload(step))
        state["last_saved_step"] = step

    def evaluate(step: int) -> None:
        nonlocal start_knn
        if monitor is None:
            return
        res = monitor(method)
        if start_knn is None:
            start_knn = res["knn_top1"]
        logger.log(step, res, "eval", epoch=step / spe)
        state["knn"] = dict(res, step=step)
        say(f"[ssl_sphere] step {step} (epoch {step / spe:.2f}): kNN top-1 {res['knn_top1']:.2f}% "
            f"top-5 {res['knn_top5']:.2f}% ({res['knn_seconds']:.1f}s)")

    if start_step == 0 and monitor is not None:
        evaluate(0)  # random-init baseline

    bar = None
    if main and cfg.run.progress:
        from tqdm import tqdm
        bar = tqdm(total=stop, initial=start_step, desc="pretrain", dynamic_ncols=True, file=sys.stdout)

    def check_finite() -> None:
        bad = int(dist.all_reduce_max(run_step.first_bad).item())  # every rank stops together
        if bad >= 0:
            where = (f"last good checkpoint: {os.path.join(run_dir, 'last.pt')} (step {state['last_saved_step']})"
                     if state["last_saved_step"] is not None else "no checkpoint was written yet")
            raise NonFiniteLoss(
                f"non-finite loss at step {bad}; stopping. {where}. Lower --lr or sec.weight, or resume with "
                f"--resume from the checkpoint."
            )

    step = start_step
    model.train()
    try:
        while step < stop:
            epoch, pos = divmod(step, spe)
            if model.vmf is not None and (not bool(model.vmf.initialised) or (pos == 0 and epoch % cfg.vmf.refresh_epochs == 0)):
                refresh_vmf(model, splits.train.images, aug.eval_transform, cfg, device, seed=cfg.run.seed + epoch)
            logs, emb = {}, None
            for idx in epoch_batches(n, cfg.optim.batch_size, cfg.run.seed, epoch, pos, rank, world):
                loss, method_loss, logs, emb, lr = run_step(step, idx)
                step += 1
                if step % cfg.run.log_every == 0 or step == stop:
                    check_finite()
                    vals = logger.log(step, {"loss": loss.detach(), "method_loss": method_loss.detach(), "lr": lr, **logs},
                                      "train", epoch=step / spe)
                    if bar is not None:
                        post = {"loss": f"{vals['loss']:.3f}", "lr": f"{lr:.3g}",
                                "norm": f"{vals['norm_mean']:.2f}±{vals['norm_std']:.2f}"}
                        if "sec_loss" in vals:
                            post["sec"] = f"{vals['sec_loss']:.3g}"
                        bar.set_postfix(post, refresh=False)
                if bar is not None:
                    bar.update(1)
                if step >= stop:
                    break
            epoch_done = step % spe == 0
            check_finite()
            if epoch_done:
                done_epochs = step // spe
                if emb is not None:
                    sphere_pictures(logger, emb, step, two_views=cfg.method.name != "moco" or cfg.method.symmetric)
                if monitor is not None and done_epochs % cfg.eval.every_epochs == 0:
                    evaluate(step)
                every = cfg.run.ckpt_every_epochs
                save(step, periodic=bool(every) and done_epochs % every == 0)
        check_finite()
        if monitor is not None and state["knn"].get("step") != step:
            evaluate(step)
        if state["last_saved_step"] != step:
            save(step)
        if main and monitor is not None:
            projector_snapshot(logger, method, splits, aug.eval_transform, device, step)
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    dist.barrier()
    summary = {"step": step, "run_dir": run_dir}
    if state["knn"]:
        summary.update(knn_top1=state["knn"]["knn_top1"], knn_top5=state["knn"]["knn_top5"], start_knn_top1=start_knn)
        say(f"[ssl_sphere] kNN top-1: {start_knn:.2f}% at start -> {state['knn']['knn_top1']:.2f}% at step {step}")
    say(f"[ssl_sphere] checkpoint: {os.path.join(run_dir, 'last.pt')}")
    return summary
