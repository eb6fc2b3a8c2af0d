"""Typed configuration: every default lives here, with the one layering rule and the validation.

The dataclass defaults are the embedded quick run (MoCo v2 on scikit-learn's
digits with a tiny convnet, a few minutes on a laptop CPU); the research
recipes for real datasets (ResNet-18, 200 epochs, batch 512, ...) are the YAML
files in configs/.

Precedence (lowest to highest): dataclass defaults < YAML file (--config) <
CLI flags < trailing ``key=value`` overrides.  ``None`` / ``"auto"`` values are
filled by :func:`resolve` from the dataset and method (e.g. the temperature of
the chosen method), so the ``config.yaml`` saved with every run holds only
concrete values.  Unknown keys, wrong types and impossible values raise
:class:`ConfigError` naming the key and, where there is one, the valid choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .errors import UserError

METHOD_CHOICES = ("simclr", "moco", "byol")
DATASET_CHOICES = ("digits", "cifar10", "cifar100", "stl10", "imagefolder")
BACKBONE_CHOICES = ("auto", "tiny", "resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
OPTIMIZER_CHOICES = ("sgd", "lars")
RAMP_CHOICES = ("linear", "none")
PRECISION_CHOICES = ("auto", "fp32", "bf16")


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key and the fix."""


@dataclass
class DataConfig:
    dataset: str = "digits"
    root: Optional[str] = None  # dataset directory (required for imagefolder)
    download: bool = False  # torchvision datasets only; needs internet
    image_size: Optional[int] = None  # None: the dataset's native size (digits: 32)
    train_limit: Optional[int] = None  # pretrain on a stratified subset of this many train images (quick studies)
    decode_workers: int = 0  # processes that decode image folders; 0 = all cores
    store_size: Optional[int] = None  # image folders: stored side (short side + centre crop); None: image_size
    eval_crop: float = 1.0  # eval view: centred square of this fraction of the stored side, resized to image_size
    cache: str = "auto"  # image folders: auto (decode once into cache_dir, then memory-map) | off | rebuild
    cache_dir: Optional[str] = None  # None: $SSL_SPHERE_CACHE or ~/.cache/ssl_sphere
    on_device: str = "auto"  # keep the uint8 dataset on the training device: auto|yes|no
    mean: Optional[List[float]] = None  # normalisation statistics; None: dataset's
    std: Optional[List[float]] = None


@dataclass
class AugConfig:
    """View augmentation (SimCLR Sec. 3 / Appendix A; BYOL Table 6).

    Two-element lists are per view (view 1, view 2): BYOL's views are asymmetric.
    None means the method's default (resolved and saved)."""

    crop_scale: List[float] = field(default_factory=lambda: [0.2, 1.0])  # 0.08 on ImageNet
    crop_ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    hue_mode: str = "exact"  # exact: torchvision's HSV shift | yiq: faster linear approximation (opt-in)
    grayscale_p: float = 0.2
    blur_p: Optional[List[float]] = None  # simclr/moco: 0 (small images) or 0.5; byol: [1.0, 0.1]
    blur_sigma: List[float] = field(default_factory=lambda: [0.1, 2.0])
    solarize_p: Optional[List[float]] = None  # simclr/moco: [0, 0]; byol: [0.0, 0.2]


@dataclass
class ModelConfig:
    backbone: str = "auto"  # auto: tiny for digits, resnet18 otherwise
    small_images: Optional[bool] = None  # 3x3 stem, no max-pool; None: image_size <= 64
    channels_last: bool = False
    sync_bn: bool = False  # under DDP: SyncBatchNorm (BN statistics over the global batch)
    # BN statistics per group of the (local) batch; None: 8 for MoCo in one process (the authors' CIFAR
    # demo: with the key batch shuffled, a key never shares BN statistics with its query), else 1
    split_bn: Optional[int] = None
    compile: bool = False


@dataclass
class MethodConfig:
    name: str = "moco"
    temperature: Optional[float] = None  # simclr 0.5, moco 0.1 (CIFAR, symmetric) / 0.2
    proj_hidden_dim: Optional[int] = None  # simclr/moco 2048, byol 4096
    proj_dim: Optional[int] = None  # simclr/moco 128, byol 256
    pred_hidden_dim: int = 4096  # byol predictor
    momentum: float = 0.99  # EMA start value; cosine schedule to momentum_final
    momentum_final: float = 1.0
    queue_size: int = 1024  # moco negatives (CIFAR recipes: 4096; keep it well below 2 x dataset size)
    symmetric: bool = True  # moco symmetric loss
    shuffle_bn: bool = True  # moco: shuffle the key batch (across ranks under DDP)


@dataclass
class SecConfig:
    """Spherical embedding constraint (Zhang et al., NeurIPS 2020)."""

    enabled: bool = False
    weight: float = 0.1  # eta, relative to the per-direction mean method loss; README "SEC weight"
    ema: float = 1.0  # rho: weight of the current batch in the mean norm; 1.0 = batch mean
    ramp: str = "linear"  # eta ramp over training: linear (authors' SSL code) | none


@dataclass
class SeeConfig:
    """Spherical embedding expansion (Le, Woo, PAKDD 2024); MoCo and SimCLR only."""

    enabled: bool = False
    n: int = 8  # synthetic points per expanded sample (paper: 8)
    weight: float = 0.2  # lambda (paper: 0.2)
    fraction: float = 0.4  # share of most confident samples expanded, ramped 0 -> fraction (paper: 0.4)


@dataclass
class VmfConfig:
    """vMF mixture loss on pseudo-classes (Zhe, Chen, Yan); any method."""

    enabled: bool = False
    k: int = 100  # pseudo-classes (spherical k-means clusters)
    kappa: float = 10.0  # shared concentration
    weight: float = 0.5  # lambda of the auxiliary loss (not tuned; see README study)
    refresh_epochs: int = 1  # re-estimate means and pseudo-labels every N epochs


@dataclass
class OptimConfig:
    optimizer: str = "sgd"
    epochs: int = 15
    max_steps: Optional[int] = None  # stop after this many optimiser steps (schedule unchanged)
    batch_size: int = 64
    lr: Optional[float] = None  # None: base_lr * batch_size / 128
    base_lr: float = 0.06
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0  # cosine ends at lr * min_lr_ratio
    decay_norm_and_bias: bool = False  # weight decay on norm layers and biases too (the MoCo / lightly CIFAR code)
    lars_eta: float = 0.001  # LARS trust coefficient (You et al. 2017; lightly's LARS default)


@dataclass
class EvalConfig:
    every_epochs: int = 1  # kNN monitor period; 0 disables it (the step-0 baseline too)
    knn_k: int = 200
    knn_temperature: float = 0.1
    # caps on the kNN bank (train split) and queries (test split), stratified subsets; None: 50000 / 10000
    # on CUDA, 5000 / 1000 on a CPU (a ResNet-18 evaluation there then takes about a minute, not a quarter hour)
    bank_size: Optional[int] = None
    test_size: Optional[int] = None
    batch_size: int = 512


@dataclass
class RunConfig:
    output_dir: str = "runs"
    run_name: Optional[str] = None  # None: <dataset>_<method>[_sec]_s<seed>
    resume: Optional[str] = None  # checkpoint path or "auto"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    log_every: int = 10  # steps between progress/TensorBoard updates (and NaN checks)
    ckpt_every_epochs: int = 0  # keep epoch_XXXX.pt every N epochs (last.pt: every epoch end and below)
    ckpt_every_steps: int = 0  # also write last.pt every N steps mid-epoch (0: off)
    ckpt_every_minutes: float = 30.0  # also write last.pt when this long has passed since the last save (0: off)
    overwrite_newer: bool = False  # allow resuming in place from a checkpoint older than the run's last.pt
    progress: bool = True  # tqdm progress bar


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    sec: SecConfig = field(default_factory=SecConfig)
    see: SeeConfig = field(default_factory=SeeConfig)
    vmf: VmfConfig = field(default_factory=VmfConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# Method defaults (DESIGN.md "Method interface"): the CIFAR recipes of the papers.
_METHOD_DEFAULTS: Dict[str, Dict[str, Any]] = {
    # SimCLR (Chen et al. 2020, Appendix B.9 CIFAR): T=0.5, 2048-128 head
    "simclr": dict(temperature=0.5, proj_hidden_dim=2048, proj_dim=128),
    # MoCo v2 CIFAR (moco colab demo: symmetric loss, T=0.1)
    "moco": dict(temperature=0.1, proj_hidden_dim=2048, proj_dim=128),
    # BYOL (Grill et al. 2020, Sec. 3.3): 4096-256 projector and predictor
    "byol": dict(temperature=None, proj_hidden_dim=4096, proj_dim=256),
}


def _error_from_omegaconf(exc: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = getattr(exc, "msg", str(exc))
    if isinstance(exc, ConfigKeyError):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = Config()
        for part in parent.split(".") if parent else []:
            node = getattr(node, part, None)
        valid = sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else []
        prefix = f"{parent}." if parent else ""
        return ConfigError(
            f"unknown config key '{key}' ({where}); valid keys here: "
            + ", ".join(prefix + v for v in valid)
        )
    if isinstance(exc, ValidationError):
        return ConfigError(f"bad value for config key '{key}' ({where}): {msg}")
    return ConfigError(f"config error at '{key}' ({where}): {msg}")


def structured() -> DictConfig:
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    return cfg


def merge(cfg: DictConfig, other: Any, where: str) -> DictConfig:
    """Merge ``other`` (dict / DictConfig) into ``cfg`` with type checks."""
    try:
        return OmegaConf.merge(cfg, other)
    except OmegaConfBaseException as exc:
        raise _error_from_omegaconf(exc, where) from None


def load_yaml(path: str) -> DictConfig:
    try:
        data = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except Exception as exc:  # yaml syntax errors
        raise ConfigError(f"cannot parse config file {path}: {exc}") from None
    if data is None:
        data = OmegaConf.create({})
    if not isinstance(data, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of sections (data:, method:, ...)")
    return data


def _nest(flat: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """{'section.key': value} -> {'section': {'key': value}}."""
    out: Dict[str, Dict[str, Any]] = {}
    for key, value in flat.items():
        section, name = key.split(".")
        out.setdefault(section, {})[name] = value
    return out


def layered(config_file: Optional[str] = None, values: Optional[Dict[str, Any]] = None,
            overrides: Sequence[str] = (), base: Optional[DictConfig] = None) -> DictConfig:
    """The one config-layering rule of every entry point (pretraining, the eval CLIs, the study):
    ``base`` (default: the dataclass defaults) < the YAML ``config_file`` < ``values`` ({'section.key':
    value}, e.g. from command-line flags) < ``overrides`` ('section.key=value' strings, values parsed
    as YAML). Type-checked at every layer; not yet resolved (see :func:`resolve`)."""
    cfg = base if base is not None else structured()
    if config_file:
        cfg = merge(cfg, load_yaml(config_file), f"config file {config_file}")
    if values:
        cfg = merge(cfg, _nest(values), "command-line flags")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"cannot read override '{item}': write it as section.key=value, e.g. method.temperature=0.2"
            )
        try:
            dotlist = OmegaConf.from_dotlist([item])
        except Exception as exc:
            raise ConfigError(f"cannot parse override '{item}': {exc}") from None
        cfg = merge(cfg, dotlist, f"override '{item}'")
    return cfg


def world_size_from_env() -> int:
    """Number of processes of this run: the initialised process group's, else torchrun's
    WORLD_SIZE (1 without torchrun)."""
    import os

    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"invalid value {value!r} for '{key}'; valid choices: {', '.join(choices)}")


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"invalid value for '{key}': {message}")


def resolve(cfg: DictConfig) -> DictConfig:
    """Validate choices/ranges and fill every ``None``/``auto`` default."""
    c = cfg
    _check_choice("data.dataset", c.data.dataset, DATASET_CHOICES)
    _check_choice("method.name", c.method.name, METHOD_CHOICES)
    _check_choice("model.backbone", c.model.backbone, BACKBONE_CHOICES)
    _check_choice("run.device", c.run.device, DEVICE_CHOICES)
    _check_choice("run.precision", c.run.precision, PRECISION_CHOICES)
    _check_choice("optim.optimizer", c.optim.optimizer, OPTIMIZER_CHOICES)
    _check_choice("sec.ramp", c.sec.ramp, RAMP_CHOICES)
    # YAML reads yes / no / off as booleans, which reach these string fields as "True" / "False"
    c.data.on_device = {"True": "yes", "False": "no"}.get(c.data.on_device, c.data.on_device)
    c.data.cache = {"False": "off"}.get(c.data.cache, c.data.cache)
    _check_choice("data.on_device", c.data.on_device, ("auto", "yes", "no"))
    _check_choice("data.cache", c.data.cache, ("auto", "off", "rebuild"))

    name = c.method.name
    for k, v in _METHOD_DEFAULTS[name].items():
        if c.method[k] is None:
            c.method[k] = v
    if c.model.backbone == "auto":
        c.model.backbone = "tiny" if c.data.dataset == "digits" else "resnet18"
    if c.data.dataset == "imagefolder":
        _check(c.data.root is not None, "data.root",
               "--dataset imagefolder needs --data-root DIR (DIR/train/<class>/*)")
    if c.data.image_size is None:
        if c.data.dataset == "imagefolder":
            from .data import folder_image_size  # reads one image header

            c.data.image_size = folder_image_size(c.data.root)
        else:
            c.data.image_size = 96 if c.data.dataset == "stl10" else 32
    if c.model.small_images is None:
        c.model.small_images = c.data.image_size <= 64
    small = c.data.image_size <= 64
    if c.aug.blur_p is None:
        # SimCLR drops blur on CIFAR (Appendix B.9); BYOL keeps its asymmetric pair (Table 6).
        c.aug.blur_p = [1.0, 0.1] if name == "byol" else ([0.0, 0.0] if small else [0.5, 0.5])
    if c.aug.solarize_p is None:
        c.aug.solarize_p = [0.0, 0.2] if name == "byol" else [0.0, 0.0]
    world = world_size_from_env()
    on_gpu = c.run.device == "cuda" or (c.run.device == "auto" and _cuda_available())
    if c.eval.bank_size is None:
        c.eval.bank_size = 50000 if on_gpu else 5000
    if c.eval.test_size is None:
        c.eval.test_size = 10000 if on_gpu else 1000
    if c.model.split_bn is None:
        c.model.split_bn = 8 if name == "moco" and world == 1 and not c.model.sync_bn else 1
    if c.optim.lr is None:
        # linear scaling on the GLOBAL batch (batch_size is per process)
        c.optim.lr = c.optim.base_lr * c.optim.batch_size * world / 128

    # ranges
    for key in ("blur_p", "solarize_p", "crop_scale", "crop_ratio", "blur_sigma"):
        _check(len(c.aug[key]) == 2, f"aug.{key}", f"needs 2 values, got {list(c.aug[key])}")
    for key in ("hflip_p", "jitter_p", "grayscale_p"):
        _check(0.0 <= c.aug[key] <= 1.0, f"aug.{key}", f"a probability in [0, 1], got {c.aug[key]}")
    for key in ("blur_p", "solarize_p"):
        _check(all(0.0 <= p <= 1.0 for p in c.aug[key]), f"aug.{key}", "probabilities in [0, 1]")
    _check(0 < c.aug.crop_scale[0] <= c.aug.crop_scale[1] <= 1.0, "aug.crop_scale", "need 0 < min <= max <= 1")
    _check(0 < c.aug.crop_ratio[0] <= c.aug.crop_ratio[1], "aug.crop_ratio", "need 0 < min <= max")
    _check(0 <= c.aug.hue <= 0.5, "aug.hue", f"must be in [0, 0.5], got {c.aug.hue}")
    _check_choice("aug.hue_mode", c.aug.hue_mode, ("exact", "yiq"))
    for key in ("brightness", "contrast", "saturation"):
        _check(c.aug[key] >= 0, f"aug.{key}", "must be >= 0")
    _check(c.data.image_size >= 8, "data.image_size", "must be >= 8")
    _check(c.data.root is None or c.data.dataset != "digits", "data.root",
           "the digits dataset is embedded in scikit-learn and reads no files, so --data-root would be ignored; "
           "drop it, or choose the dataset it holds with --dataset")
    _check(c.data.decode_workers >= 0, "data.decode_workers", "must be >= 0 (0 = all cores)")
    _check(c.data.store_size is None or c.data.dataset == "imagefolder", "data.store_size",
           "only image folders are stored at a chosen size (the other datasets are arrays of their own size)")
    if c.data.dataset == "imagefolder" and c.data.store_size is None:
        c.data.store_size = c.data.image_size
    _check(c.data.store_size is None or c.data.store_size >= 8, "data.store_size", "must be >= 8")
    _check(0 < c.data.eval_crop <= 1, "data.eval_crop", f"a fraction in (0, 1], got {c.data.eval_crop}")
    _check(c.data.train_limit is None or c.data.train_limit >= 1, "data.train_limit", "must be >= 1")
    _check(c.optim.batch_size >= 2, "optim.batch_size", "must be >= 2 (contrastive losses need negatives)")
    _check(c.model.split_bn >= 1, "model.split_bn", "must be >= 1 (1: plain BatchNorm)")
    _check(not (c.model.sync_bn and c.model.split_bn > 1 and world > 1), "model.split_bn",
           "split BN (per-group statistics) and model.sync_bn (global statistics) exclude each other; set "
           "model.split_bn=1 to synchronise BN")
    _check(c.optim.batch_size % c.model.split_bn == 0, "model.split_bn",
           f"the batch of {c.optim.batch_size} does not split into {c.model.split_bn} equal BN groups; choose a "
           f"batch divisible by it or another model.split_bn (1 turns it off)")
    _check(c.optim.epochs >= 1, "optim.epochs", "must be >= 1")
    _check(c.optim.max_steps is None or c.optim.max_steps >= 1, "optim.max_steps", "must be >= 1")
    _check(c.optim.lr > 0, "optim.lr", "must be > 0")
    _check(c.optim.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    _check(c.optim.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {c.optim.weight_decay}")
    _check(0 <= c.optim.momentum < 1, "optim.momentum", f"SGD momentum must be in [0, 1), got {c.optim.momentum}")
    _check(0 <= c.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(c.optim.lars_eta > 0, "optim.lars_eta", "must be > 0")
    _check(c.method.temperature is None or c.method.temperature > 0, "method.temperature", "must be > 0")
    _check(0.0 <= c.method.momentum <= c.method.momentum_final <= 1.0, "method.momentum",
           "need 0 <= momentum <= momentum_final <= 1")
    if name == "moco":
        per_step = c.optim.batch_size * world * (2 if c.method.symmetric else 1)
        _check(c.method.queue_size >= per_step, "method.queue_size",
               f"must hold at least the keys of one step ({per_step} = batch x views x {world} processes); "
               "raise it or lower the batch")
    _check(0.0 < c.sec.ema <= 1.0, "sec.ema", f"rho must be in (0, 1] (1 = batch mean), got {c.sec.ema}")
    _check(c.sec.weight >= 0, "sec.weight", "must be >= 0")
    if c.see.enabled:
        _check(name != "byol", "see.enabled",
               "SEE has no role in BYOL: its synthetic points serve as extra negatives (MoCo) or as anchors of "
               "an InfoNCE over the batch (SimCLR), and BYOL has neither negatives nor proxies; use --method "
               "moco or simclr")
        _check(c.see.n >= 1, "see.n", "must be >= 1")
        _check(c.method.proj_dim >= c.see.n + 2, "see.n",
               f"n={c.see.n} synthetic points need method.proj_dim >= n + 2 = {c.see.n + 2} (got {c.method.proj_dim})")
        _check(0.0 <= c.see.fraction <= 1.0, "see.fraction", "must be in [0, 1]")
        _check(c.see.weight >= 0, "see.weight", "must be >= 0")
    _check(c.vmf.k >= 2, "vmf.k", "needs at least 2 pseudo-classes")
    _check(c.vmf.kappa > 0, "vmf.kappa", "must be > 0")
    _check(c.vmf.refresh_epochs >= 1, "vmf.refresh_epochs", "must be >= 1")
    _check(c.eval.every_epochs >= 0, "eval.every_epochs", "must be >= 0")
    _check(c.eval.knn_k >= 1, "eval.knn_k", "must be >= 1")
    _check(c.eval.knn_temperature > 0, "eval.knn_temperature", "must be > 0")
    for key in ("bank_size", "test_size", "batch_size"):
        _check(c.eval[key] >= 1, f"eval.{key}", f"must be >= 1, got {c.eval[key]}")
    _check(c.run.log_every >= 1, "run.log_every", "must be >= 1")
    for key in ("ckpt_every_epochs", "ckpt_every_steps", "ckpt_every_minutes"):
        _check(c.run[key] >= 0, f"run.{key}", "must be >= 0 (0 = off)")
    return cfg


def to_container(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # plain dict: safe for torch.load(weights_only)


def from_container(data: Dict[str, Any], where: str = "checkpoint") -> DictConfig:
    return merge(structured(), data, where)
