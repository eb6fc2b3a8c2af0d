"""Benchmark harness: augmentation throughput and training-step throughput.

    python benchmarks/bench.py augment [--device cpu|cuda|auto] [--sizes 32,96,224] [--batch 256] [--repeats N] [--json]
    python benchmarks/bench.py step --method METHOD [--config RECIPE.yaml] [--backbone resnet18]
        [--batch 128] [--image-size 32] [--sec] [--device ...] [--steps 5] [--warmup 1] [--profile]
        [--compare-lightly] [--threads N] [--json] [--out FILE.json] [section.key=value ...]
    python benchmarks/bench.py multicrop [--device ...] [--sizes 32,224] [--local-crops 6] [--batch 256]
        [--repeats N] [--json] [--out FILE.json]

METHOD: any registered method (ssl_sphere.methods.names(): simclr, moco, byol, simsiam, mocov3, nnclr,
dino, swav); ``--compare-lightly`` works for each (reference_pipelines.LIGHTLY_METHODS).

``augment`` times two SimCLR views of one uint8 batch per image size for
  * ``ssl_sphere``: :class:`ssl_sphere.augment.views.Augmenter` (simclr config; blur p 0.5 above 64 px),
  * ``kornia_stock``: an equivalent stock ``kornia.augmentation.AugmentationSequential`` on the same device,
  * ``torchvision_cpu``: lightly's ``SimCLRTransform`` applied per PIL image on the CPU in ONE process with one
    torch thread -- what one DataLoader worker does (n workers give at most n times this).
Input images are uint8 (B, 3, S, S) and the output views are S x S (crop scale 0.2-1). The uint8 -> float
conversion is inside the timed region for the two batched pipelines; PIL images are built beforehand (no
JPEG decoding is timed for anyone).

``step`` times the full ssl_sphere training step -- uint8 batch indexing -> Augmenter.views -> SSLModel
forward (method + SEC) -> backward -> optimiser step -> after_step, i.e. ``train.TrainStep``, the object the
training loop calls -- against a backbone-only step (same backbone architecture, forward/backward of the same two
view batches with ``sum`` of the features as the loss, same optimiser type and parameter groups). The methods
with an EMA copy of the backbone (MoCo, BYOL, MoCo v3, DINO) also run its forward on both views; that floor
is reported as ``backbone_plus_ema_fwd``. ``--compare-lightly`` adds lightly's reference pipeline
(per-sample transforms in a DataLoader with one worker per core, lightly heads / losses / update_momentum)
on the same backbone and data.

``multicrop`` times DINO's multi-crop views (2 global views at S px + ``--local-crops`` local crops at 96/224
of S, DINO's parameters: the resolved ``--method dino`` aug config with aug.local_crops=N) of one uint8 batch:
  * ``ssl_sphere``: :class:`ssl_sphere.augment.views.Augmenter` (one batched pass per view group),
  * ``lightly_dino_cpu``: lightly's ``DINOTransform`` with the same parameters per PIL image, in ONE process
    with one torch thread (one DataLoader worker, as ``torchvision_cpu`` above).
views/s counts every view (global and local): (2 + N) x batch per call.

Timing: warm-up iterations, then timed repeats (torch.cuda.synchronize on CUDA); the median is reported.
Pipelines of one measurement run round-robin (one repeat each in turn), so a change in machine load hits
them alike. With ``--json`` the last stdout line is one JSON object (``augment`` and ``multicrop``: one
line per size, the requested order); ``--out FILE`` also writes a record with the command, machine,
versions and load averages.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from reference_pipelines import LightlyStep, kornia_stock, lightly_view_transform, to_pil

from ssl_sphere.augment.ops import blur_kernel_size
from ssl_sphere.augment.views import Augmenter
from ssl_sphere.cli.pretrain import build_config
from ssl_sphere.data.batches import step_batches, steps_per_epoch
from ssl_sphere.data.datasets import load_imagefolder
from ssl_sphere.data.decode import decode_images
from ssl_sphere.data.listing import IMAGE_EXTENSIONS
from ssl_sphere.engine.device import bf16_enabled, cpu_name, resolve_device
from ssl_sphere.engine.optim import build_optimizer
from ssl_sphere.engine.step import TrainStep, place_images
from ssl_sphere.methods import names as method_names
from ssl_sphere.models.backbones import backbone_of
from ssl_sphere.models.ssl_model import build_model, refresh_vmf

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
# the CIFAR-10 image folder beside the checkout (../shared/data/cifar10), or $SSL_SPHERE_CIFAR10
DEFAULT_DATA = Path(os.environ.get("SSL_SPHERE_CIFAR10",
                                   Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"))
AUG_PIPELINES = ("ssl_sphere", "ssl_sphere_yiq", "kornia_stock", "torchvision_cpu")
MULTICROP_PIPELINES = ("ssl_sphere", "lightly_dino_cpu")


# ----------------------------------------------------------------------------- helpers
def versions() -> Dict[str, str]:
    import kornia
    import lightly
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "kornia": kornia.__version__,
            "lightly": lightly.__version__, "python": platform.python_version()}


def machine() -> Dict[str, object]:
    info: Dict[str, object] = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def load_avg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def say(*args) -> None:
    print(*args, flush=True)


def run_round_robin(fns: Dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int,
                    budget_s: float, min_repeats: int = 3) -> Dict[str, List[float]]:
    """Warm every pipeline up, then time them in turn, one call each per round.

    A pipeline gets ``warmup`` untimed calls (fewer once its warm-up has used a quarter of
    ``budget_s``) and up to ``repeats`` timed calls; it stops early once its timed calls add
    up to ``budget_s`` and it has ``min(min_repeats, repeats)`` of them. Returns seconds per call."""
    for fn in fns.values():
        spent = 0.0
        for _ in range(warmup):
            t = time.perf_counter()
            fn()
            sync(device)
            spent += time.perf_counter() - t
            if spent > budget_s / 4:
                break
    times: Dict[str, List[float]] = {k: [] for k in fns}
    need = min(min_repeats, repeats)
    for _ in range(repeats):
        active = [k for k in fns if len(times[k]) < need or sum(times[k]) < budget_s]
        if not active:
            break
        for k in active:
            t = time.perf_counter()
            fns[k]()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return times


# ----------------------------------------------------------------------------- data
def folder_paths(root: Path, n: int) -> List[str]:
    """``n`` image paths of ROOT/train/<class>/*, strided evenly over the (class-sorted) listing."""
    paths = []
    for d in sorted(p for p in (root / "train").iterdir() if p.is_dir()):
        paths += [str(d / f) for f in sorted(os.listdir(d)) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not paths:
        raise FileNotFoundError(f"no images under {root}/train/<class>/")
    idx = np.linspace(0, len(paths) - 1, min(n, len(paths))).round().astype(int)
    return [paths[i] for i in idx]


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def sample_images(n: int, size: int, data: str, root: Path) -> Tuple[torch.Tensor, str]:
    """(n, 3, size, size) uint8 images: decoded from the CIFAR-10 folder (resize short side + centre crop,
    as ssl_sphere.data.datasets does; CIFAR's 32 px images are upsampled for larger sizes), or random pixels."""
    if data == "auto" and (root / "train").is_dir():
        paths = folder_paths(root, n)
        imgs = decode_images(paths, size, workers=min(2, os.cpu_count() or 1))
        if imgs.shape[0] < n:  # tiny folder: repeat
            imgs = imgs.repeat((n + imgs.shape[0] - 1) // imgs.shape[0], 1, 1, 1)[:n]
        return imgs, f"cifar10 folder {root} ({len(paths)} images)"
    why = "--data random" if data == "random" else f"{root}/train not found"
    return random_images(n, size), f"random uint8 images ({why})"


def train_images(size: int, data: str, root: Path, need: int) -> Tuple[torch.Tensor, Tuple, Tuple, str]:
    """Training images for the step benchmark: the whole CIFAR-10 folder through
    ssl_sphere.data.load_imagefolder when it fits in 2 GiB at ``size``, otherwise an evenly
    strided subset of ``max(need, 10000)`` images, or random images. Returns (images, mean, std, source)."""
    if data == "auto" and (root / "train").is_dir():
        n_files = sum(len(os.listdir(d)) for d in (root / "train").iterdir() if d.is_dir())
        if n_files * 3 * size * size <= 2 * 2**30:
            t = time.perf_counter()
            ds = load_imagefolder(str(root), size)
            src = (f"cifar10 folder {root} via load_imagefolder ({len(ds.train)} train images, "
                   f"{time.perf_counter() - t:.0f}s to decode)")
            return ds.train.images, ds.mean, ds.std, src
        imgs, src = sample_images(max(need, 10000), size, data, root)
        return imgs, CIFAR_MEAN, CIFAR_STD, src + " (subset: the whole folder would not fit 2 GiB at this size)"
    imgs, src = sample_images(max(need, 1024), size, data, root)
    return imgs, CIFAR_MEAN, CIFAR_STD, src


# ----------------------------------------------------------------------------- augment
def simclr_aug_cfg(size: int):
    """The resolved ``aug`` section of the simclr config at ``size`` (blur p 0 at <= 64 px, else 0.5)."""
    return build_config(["--method", "simclr", f"data.image_size={size}", "eval.every_epochs=0"]).aug


class _Threads:
    """Temporarily run torch with ``n`` intra-op threads (a DataLoader worker uses 1)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def per_image(transform, images: torch.Tensor) -> Callable[[], List[torch.Tensor]]:
    """A call of lightly's per-sample ``transform`` on every image (as PIL images, built here, untimed) in
    this process with one torch thread, i.e. what one DataLoader worker does; the views are stacked per
    view, as the DataLoader's collate does."""
    pil = to_pil(images)

    def run() -> List[torch.Tensor]:
        with _Threads(1):
            views = [transform(im) for im in pil]
            return [torch.stack(v) for v in zip(*views)]

    return run


def bench_augment_size(size: int, batch: int, device: torch.device, data: str, root: Path, warmup: int,
                       repeats: int, budget_s: float, pipelines: Sequence[str]) -> Tuple[Dict, Dict]:
    a = simclr_aug_cfg(size)
    images, src = sample_images(batch, size, data, root)
    x = images.to(device)
    mean, std = CIFAR_MEAN, CIFAR_STD

    fns: Dict[str, Callable[[], None]] = {}
    if "ssl_sphere" in pipelines:  # the default: torchvision's exact HSV hue shift
        ours = Augmenter(a, size, mean, std).to(device)
        fns["ssl_sphere"] = lambda: ours.views(x)
    if "ssl_sphere_yiq" in pipelines:  # the opt-in linear hue approximation (aug.hue_mode=yiq)
        yiq_cfg = a.copy()
        yiq_cfg.hue_mode = "yiq"
        ours_yiq = Augmenter(yiq_cfg, size, mean, std).to(device)
        fns["ssl_sphere_yiq"] = lambda: ours_yiq.views(x)
    if "kornia_stock" in pipelines:
        ks = kornia_stock(a, size, mean, std, device)

        def kornia_views():
            with torch.no_grad():
                xf = x.float().div_(255)
                return ks(xf), ks(xf)

        fns["kornia_stock"] = kornia_views
    if "torchvision_cpu" in pipelines:
        fns["torchvision_cpu"] = per_image(lightly_view_transform("simclr", a, size, mean, std), images)

    times = run_round_robin(fns, device, warmup, repeats, budget_s)
    vps = {k: round(2 * batch / statistics.median(t), 1) for k, t in times.items()}
    result = {"device": device.type, "image_size": size, "batch": batch, "views_per_s": vps}
    extra = {"data": src, "repeats": {k: len(t) for k, t in times.items()},
             "median_s": {k: statistics.median(t) for k, t in times.items()},
             "blur_p": a.blur_p[0], "blur_kernel": blur_kernel_size(size) if a.blur_p[0] > 0 else None}
    return result, extra


def views_setup(args, allowed: Sequence[str], title: str,
                per_image_note: str) -> Tuple[torch.device, Path, List[int], List[str]]:
    """The device, data root, sizes and pipelines of an ``augment`` / ``multicrop`` command (threads set),
    after printing its header: ``title`` and what its per-PIL-image pipeline is."""
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    pipelines = [p for p in args.pipelines.split(",") if p]
    bad = sorted(set(pipelines) - set(allowed))
    if bad:
        raise SystemExit(f"unknown pipelines {bad}; choose from {', '.join(allowed)}")
    say(f"# {title} | device {device} | torch threads {torch.get_num_threads()} | batch {args.batch} | "
        f"warmup {args.warmup}, repeats <= {args.repeats} (stop after {args.max_seconds:.0f}s per pipeline, min 3) | "
        f"load avg {load_avg()}")
    say(f"# {per_image_note} per PIL image, one process, one torch thread (one DataLoader worker; n workers give at "
        "most n x)")
    return device, Path(args.data_root), sizes, pipelines


def views_rows(res: Dict, extra: Dict, width: int, per_call: str) -> None:
    """Print one size's pipelines: views/s, ms per call, repeats, ssl_sphere's speed-up over each."""
    v = res["views_per_s"]
    say(f"{'pipeline':<{width}} {'views/s':>10} {per_call:>18} {'repeats':>8} {'ssl_sphere speed-up':>20}")
    for k in v:
        up = v.get("ssl_sphere", float("nan")) / v[k]
        say(f"{k:<{width}} {v[k]:>10.1f} {1000 * extra['median_s'][k]:>18.1f} {extra['repeats'][k]:>8d} {up:>19.1f}x")


def views_output(args, kind: str, results: List[Dict], extras: List[Dict]) -> List[Dict]:
    """--json: one line per size; --out: the record."""
    if args.json:
        for res in results:
            print(json.dumps(res), flush=True)
    if args.out:
        write_record(args.out, kind, results, extras)
    return results


def augment_main(args) -> List[Dict]:
    device, root, sizes, pipelines = views_setup(args, AUG_PIPELINES, "augment benchmark",
                                                 "torchvision_cpu = lightly SimCLRTransform")
    results, extras = [], []
    for size in sizes:
        res, extra = bench_augment_size(size, args.batch, device, args.data, root, args.warmup, args.repeats,
                                        args.max_seconds, pipelines)
        results.append(res)
        extras.append(extra)
        say(f"\nimage size {size} px | data: {extra['data']} | blur "
            + (f"p {extra['blur_p']} k {extra['blur_kernel']}" if extra["blur_kernel"] else "off")
            + f" | load avg {load_avg()}")
        views_rows(res, extra, 16, "ms/batch(2 views)")
    return views_output(args, "augment", results, extras)


# ----------------------------------------------------------------------------- multi-crop augment
def dino_aug_cfg(size: int, local_crops: int):
    """The resolved ``aug`` section of the dino config at ``size`` with ``local_crops`` local crops
    (local side 96/224 of size; blur 1.0 / 0.1 / 0.5 above 64 px, none at <= 64 px; solarisation 0 / 0.2 / 0)."""
    return build_config(["--method", "dino", f"data.image_size={size}", f"aug.local_crops={local_crops}",
                         "eval.every_epochs=0"]).aug


def bench_multicrop_size(size: int, local_crops: int, batch: int, device: torch.device, data: str, root: Path,
                         warmup: int, repeats: int, budget_s: float, pipelines: Sequence[str]) -> Tuple[Dict, Dict]:
    a = dino_aug_cfg(size, local_crops)
    images, src = sample_images(batch, size, data, root)
    x = images.to(device)
    mean, std = CIFAR_MEAN, CIFAR_STD
    fns: Dict[str, Callable[[], None]] = {}
    if "ssl_sphere" in pipelines:
        ours = Augmenter(a, size, mean, std).to(device)
        fns["ssl_sphere"] = lambda: ours.views(x)
    if "lightly_dino_cpu" in pipelines:
        fns["lightly_dino_cpu"] = per_image(lightly_view_transform("dino", a, size, mean, std), images)
    times = run_round_robin(fns, device, warmup, repeats, budget_s)
    n_views = (2 + local_crops) * batch
    vps = {k: round(n_views / statistics.median(t), 1) for k, t in times.items()}
    result = {"device": device.type, "image_size": size, "local_size": a.local_size if local_crops else None,
              "local_crops": local_crops, "batch": batch, "views_per_s": vps}
    extra = {"data": src, "repeats": {k: len(t) for k, t in times.items()},
             "median_s": {k: statistics.median(t) for k, t in times.items()},
             "blur_p": list(a.blur_p) + ([a.local_blur_p] if local_crops else []),
             "solarize_p": list(a.solarize_p) + ([a.local_solarize_p] if local_crops else []),
             "crop_scale": list(a.crop_scale), "local_crop_scale": list(a.local_crop_scale) if local_crops else None}
    return result, extra


def multicrop_main(args) -> List[Dict]:
    if args.local_crops < 0:
        raise SystemExit("--local-crops must be >= 0")
    device, root, sizes, pipelines = views_setup(
        args, MULTICROP_PIPELINES, f"multi-crop benchmark | 2 global + {args.local_crops} local crops (DINO)",
        "lightly_dino_cpu = lightly DINOTransform")
    results, extras = [], []
    for size in sizes:
        res, extra = bench_multicrop_size(size, args.local_crops, args.batch, device, args.data, root, args.warmup,
                                          args.repeats, args.max_seconds, pipelines)
        results.append(res)
        extras.append(extra)
        say(f"\nglobal {size} px, local {res['local_size']} px | data: {extra['data']} | blur p {extra['blur_p']} | "
            f"solarize p {extra['solarize_p']} | load avg {load_avg()}")
        views_rows(res, extra, 18, "ms/batch")
    return views_output(args, "multicrop", results, extras)


# ----------------------------------------------------------------------------- step
def step_config(args):
    # a recipe (--config) supplies its own backbone / batch; explicit flags still win
    recipe = ["--config", args.config] if args.config else []
    backbone = args.backbone or (None if args.config else "resnet18")
    batch = args.batch or (None if args.config else 128)
    argv = recipe + ["--method", args.method, "--device", args.device, f"data.image_size={args.image_size}",
                     "eval.every_epochs=0", "run.progress=false"]
    argv += (["--backbone", backbone] if backbone else []) + (["--batch-size", str(batch)] if batch else [])
    return build_config(argv + (["--sec"] if args.sec else []) + list(args.overrides))


class PipelineStep:
    """The training loop's own step (``engine.step.TrainStep``) on the loop's objects (build_model,
    build_optimizer, place_images, Augmenter), fed by the loop's data path (``TrainStep.batches``: the
    dataset on the device, or batches prefetched one step ahead) in the loop's batch order."""

    def __init__(self, cfg, images: torch.Tensor, mean, std, device: torch.device, total: int):
        self.cfg, self.device = cfg, device
        self.n = images.shape[0]
        placed, on_device = place_images(images, cfg, device)
        self.aug = Augmenter(cfg.aug, cfg.data.image_size, mean, std).to(device)
        self.model = build_model(cfg, self.n, device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        if cfg.model.compile:
            self.model.method.backbone.compile()
        self.spe = steps_per_epoch(self.n, cfg.optim.batch_size, 1)
        warmup = int(round(cfg.optim.warmup_epochs * self.spe))
        self.step = TrainStep(self.model, self.model.method, self.optimizer, self.aug, placed, on_device, cfg,
                              total, warmup, device, self.spe)
        self.stream = self.step.batches(step_batches(self.n, cfg.optim.batch_size, cfg.run.seed, 0, 10**9))
        self.phases: Optional[Dict[str, List[float]]] = None
        if getattr(self.model, "vmf", None) is not None:  # per-epoch refresh, outside the timed steps as in train.py
            refresh_vmf(self.model, images, self.aug.eval_transform, cfg, device, seed=cfg.run.seed)
        self.model.train()

    def _mark(self, name: str) -> None:
        """--profile: wall time of each phase of the step (device synchronised)."""
        sync(self.device)
        now = time.perf_counter()
        self.phases.setdefault(name, []).append(now - self._t)
        self._t = now

    def __call__(self) -> None:
        if self.phases is not None:
            sync(self.device)
            self._t = time.perf_counter()
        step, idx, x = next(self.stream)
        self.last_loss = self.step(step, idx, x, self._mark if self.phases is not None else None)[0]

    def views(self) -> List[torch.Tensor]:
        """The views of the next batch, as the step makes them."""
        step, idx, x = next(self.stream)
        return self.step.views(self.step.batch(idx.to(self.device), x))


class BackboneStep:
    """Backbone-only step on fixed views: forward of each view, loss = sum of the features,
    backward, optimiser step (same builder as training: same type and parameter groups).
    ``ema_forward``: also a no-grad forward of an EMA copy on the two global views (the floor of
    the methods with an EMA backbone: MoCo, BYOL, MoCo v3, DINO)."""

    def __init__(self, cfg, views: Sequence[torch.Tensor], device: torch.device, ema_forward: bool):
        backbone, _ = backbone_of(cfg.model, cfg.data.image_size)
        self.backbone = backbone.to(device)
        if cfg.model.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.target = copy.deepcopy(self.backbone).requires_grad_(False) if ema_forward else None
        if cfg.model.compile:  # compiled like the ssl_sphere step, so the ratio compares like with like
            self.backbone.compile()
            if self.target is not None:
                self.target.compile()
        self.optimizer = build_optimizer(self.backbone, cfg.optim)
        self.views, self.device = views, device
        self.use_bf16 = bf16_enabled(cfg, device)
        self.backbone.train()
        if self.target is not None:
            self.target.train()

    def __call__(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            loss = sum(self.backbone(v).float().sum() for v in self.views)
            if self.target is not None:
                with torch.no_grad():
                    for v in self.views[:2]:
                        self.target(v)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def step_main(args) -> Dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = step_config(args)
    device = resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    b = cfg.optim.batch_size
    n_calls = args.warmup + args.steps
    images, mean, std, src = train_images(cfg.data.image_size, args.data, Path(args.data_root), b * (n_calls + 1))
    say(f"# step benchmark | {cfg.method.name}{' +SEC' if cfg.sec.enabled else ''} | {cfg.model.backbone} "
        f"(small-image stem: {cfg.model.small_images}) | batch {b} | {cfg.data.image_size} px | device {device} | "
        f"torch threads {torch.get_num_threads()} | warmup {args.warmup}, {args.steps} timed steps (median) | "
        f"load avg {load_avg()}")
    say(f"# data: {src}")
    total = max(n_calls, cfg.optim.epochs * max(1, images.shape[0] // b))
    pipe = PipelineStep(cfg, images, mean, std, device, total)
    use_bf16 = pipe.step.use_bf16
    if args.profile:
        pipe.phases = {}
    views = pipe.views()
    fns = {"ssl_sphere": pipe, "backbone_only": BackboneStep(cfg, views, device, ema_forward=False)}
    if pipe.model.method.momentum_backbone() is not None:  # an EMA backbone: MoCo, BYOL, MoCo v3, DINO
        fns["backbone_plus_ema_fwd"] = BackboneStep(cfg, views, device, ema_forward=True)
    times = run_round_robin(fns, device, args.warmup, args.steps, budget_s=float("inf"))
    phases = {k: round(statistics.median(v[args.warmup:] or v), 4) for k, v in (pipe.phases or {}).items()}
    if not torch.isfinite(pipe.last_loss).item():
        raise RuntimeError("the ssl_sphere step produced a non-finite loss")
    load_mid = load_avg()
    if args.compare_lightly:
        workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
        transform = lightly_view_transform(cfg.method.name, cfg.aug, cfg.data.image_size, mean, std)
        say(f"# lightly reference: {type(transform).__name__} "
            f"per sample in a DataLoader with {workers} workers, lightly heads + loss + update_momentum")
        del fns, pipe  # free memory before the next model
        lstep = LightlyStep(cfg, images, mean, std, device, n_calls, workers)
        times.update(run_round_robin({"lightly": lstep}, device, args.warmup, args.steps, budget_s=float("inf")))
        if not torch.isfinite(lstep.last_loss).item():
            raise RuntimeError("lightly's reference step produced a non-finite loss")
        del lstep
    vps = {k: round(2 * b / statistics.median(t), 2) for k, t in times.items()}
    ratio = vps["ssl_sphere"] / vps["backbone_only"]
    res = {"device": device.type, "method": cfg.method.name, "backbone": cfg.model.backbone, "batch": b,
           "image_size": cfg.data.image_size, "sec": bool(cfg.sec.enabled), "steps": args.steps,
           "warmup": args.warmup, "torch_threads": torch.get_num_threads(),
           "data": "cifar10" if src.startswith("cifar10") else "random", "views_per_s": vps,
           "ratio": round(ratio, 3), "precision": "bf16" if use_bf16 else "fp32",
           "channels_last": bool(cfg.model.channels_last), "compile": bool(cfg.model.compile)}
    if args.config:
        res["config"] = args.config
    if args.overrides:
        res["overrides"] = list(args.overrides)
    if "backbone_plus_ema_fwd" in vps:
        res["ratio_vs_ema_floor"] = round(vps["ssl_sphere"] / vps["backbone_plus_ema_fwd"], 3)
    if "lightly" in vps:
        res["speedup_vs_lightly"] = round(vps["ssl_sphere"] / vps["lightly"], 3)
    if phases:
        res["phases_s"] = phases
    res["versions"] = {k: v for k, v in versions().items() if k in ("torch", "kornia", "lightly", "torchvision")}
    say(f"\n{'pipeline':<22} {'views/s':>10} {'s/step':>8} {'steps':>6}")
    for k in vps:
        say(f"{k:<22} {vps[k]:>10.2f} {statistics.median(times[k]):>8.3f} {len(times[k]):>6d}")
    say(f"ratio ssl_sphere / backbone_only = {res['ratio']:.3f}"
        + (f" | vs backbone + EMA forward = {res['ratio_vs_ema_floor']:.3f}" if "ratio_vs_ema_floor" in res else "")
        + (f" | ssl_sphere / lightly = {res['speedup_vs_lightly']:.2f}x" if "speedup_vs_lightly" in res else "")
        + f" | load avg {load_avg()}")
    if phases:
        say("ssl_sphere step phases (median s, synchronised): "
            + ", ".join(f"{k} {v:.4f} ({100 * v / sum(phases.values()):.1f}%)" for k, v in phases.items()))
    if args.json:
        print(json.dumps(res), flush=True)
    if args.out:
        write_record(args.out, "step", [res], [{"data": src, "load_avg_after_ssl_sphere": load_mid}])
    return res


# ----------------------------------------------------------------------------- records and CLI
_LOAD_AT_START: Optional[List[float]] = None
_COMMAND: List[str] = []


# process-level settings that change CPU timings (allocator, threads): recorded when set
_TUNING_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def tuning_env() -> Dict[str, str]:
    return {k: os.environ[k] for k in _TUNING_ENV if k in os.environ}


def write_record(path: str, kind: str, results: List[Dict], extras: List[Dict]) -> None:
    """A JSON record: command line, machine, versions, load averages, and the results (the --json lines)."""
    rec = {"kind": kind, "command": "python benchmarks/bench.py " + " ".join(_COMMAND),
           "machine": machine(), "versions": versions(), "env": tuning_env(), "load_avg_start": _LOAD_AT_START,
           "load_avg_end": load_avg(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "results": results, "details": extras}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    print(f"# wrote {path}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="default auto: cuda if available")
        q.add_argument("--json", action="store_true", help="print the result as JSON on the last stdout line(s)")
        q.add_argument("--out", metavar="FILE.json",
                       help="also write a record (command, machine, versions, load, results)")
        q.add_argument("--data", default="auto", choices=("auto", "random"),
                       help="auto: the CIFAR-10 image folder if present, else random uint8 images")
        q.add_argument("--data-root", default=str(DEFAULT_DATA), metavar="DIR",
                       help="CIFAR-10 image folder (default ../shared/data/cifar10 or $SSL_SPHERE_CIFAR10)")
        q.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's default)")
        q.add_argument("--warmup", type=int, default=2,
                       help="untimed warm-up calls per pipeline (default: augment / multicrop 2, step 1)")

    a = sub.add_parser("augment",
                       help="views/s of two SimCLR views: ssl_sphere vs stock Kornia vs torchvision (lightly)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(a)
    a.add_argument("--sizes", default="32", help="comma-separated image sizes (default 32; e.g. 32,96,224)")
    a.add_argument("--batch", type=int, default=256, help="images per batch (default 256)")
    a.add_argument("--repeats", type=int, default=10, help="timed repeats per pipeline (default 10)")
    a.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop timing a pipeline once its repeats add up to this (min 3 repeats; default 60)")
    a.add_argument("--pipelines", default=",".join(AUG_PIPELINES), help="subset to run (default: all four)")

    s = sub.add_parser("step", help="training-step views/s: ssl_sphere pipeline vs backbone-only (vs lightly)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(s)
    s.add_argument("--method", required=True, choices=method_names(), help="a registered method")
    s.add_argument("--config", metavar="FILE.yaml", help="a recipe (e.g. configs/cifar10/moco.yaml) as the base "
                   "config: its backbone, batch, queue, heads, optimiser; the flags below override it")
    s.add_argument("--backbone", default=None, help="default resnet18, or the recipe's (tiny, resnet34, resnet50, ...)")
    s.add_argument("--batch", type=int, default=None, help="batch size (default 128, or the recipe's)")
    s.add_argument("--image-size", type=int, default=32, help="image side in px (default 32)")
    s.add_argument("--sec", action="store_true", help="with the spherical embedding constraint")
    s.add_argument("--steps", type=int, default=5, help="timed steps per pipeline (default 5)")
    s.set_defaults(warmup=1)
    s.add_argument("--profile", action="store_true",
                   help="also time the phases of the ssl_sphere step (index, augment, forward, backward, optimizer, "
                        "after_step); adds a device sync per phase")
    s.add_argument("--compare-lightly", action="store_true", help="also time lightly's reference pipeline")
    s.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers for --compare-lightly (default: cpu count)")
    s.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides (after the options), e.g. model.channels_last=true method.queue_size=4096")

    m = sub.add_parser("multicrop", help="views/s of DINO's multi-crop views: ssl_sphere vs lightly DINOTransform",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(m)
    m.add_argument("--sizes", default="32,224", help="comma-separated global crop sizes (default 32,224)")
    m.add_argument("--local-crops", type=int, default=6, help="local crops per image (default 6, DINO's)")
    m.add_argument("--batch", type=int, default=256, help="images per batch (default 256)")
    m.add_argument("--repeats", type=int, default=10, help="timed repeats per pipeline (default 10)")
    m.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop timing a pipeline once its repeats add up to this (min 3 repeats; default 60)")
    m.add_argument("--pipelines", default=",".join(MULTICROP_PIPELINES), help="subset to run (default: both)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    global _LOAD_AT_START, _COMMAND
    _LOAD_AT_START = load_avg()
    _COMMAND = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.warmup < 0 or getattr(args, "repeats", 1) < 1 or getattr(args, "steps", 1) < 1:
        raise SystemExit("--warmup must be >= 0 and --repeats / --steps >= 1")
    if args.cmd == "augment":
        augment_main(args)
    elif args.cmd == "multicrop":
        multicrop_main(args)
    else:
        step_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
