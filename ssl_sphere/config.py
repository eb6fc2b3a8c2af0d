"""Typed configuration: the schema (dataclass defaults), the one layering rule, and resolution.

The dataclass defaults are the embedded quick run (MoCo v2 on scikit-learn's
digits with a tiny convnet, a couple of minutes on a laptop CPU); the research
recipes for real datasets (ResNet-18, 200 epochs, batch 512, ...) are the YAML
files in configs/. The ``method`` section is the dataclass of the method named
``method.name``, which its own module defines and registers (ssl_sphere.methods):
this module names no method.

Precedence (lowest to highest): dataclass defaults < YAML file (--config) <
CLI flags < trailing ``key=value`` overrides: :func:`layered` gives the run's
*request*. ``None`` / ``"auto"`` values in it are derived by :func:`resolve`:
from the dataset and the method, and from the machine it is handed (number of
processes, CUDA). A resolved config keeps its request (``request``) and how each
derived value was obtained (``derived``), so a resume on another machine derives
those again instead of keeping the first machine's. Unknown keys, wrong types and
impossible values raise :class:`ConfigError` naming the key and, where there is
one, the valid choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .core import registry
from .core.errors import UserError

DATASET_CHOICES = ("digits", "cifar10", "cifar100", "stl10", "imagefolder")
BACKBONE_CHOICES = ("auto", "tiny", "resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2", "vit_tiny",
                    "vit_small", "vit_base")
VIT_CHOICES = ("vit_tiny", "vit_small", "vit_base")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
OPTIMIZER_CHOICES = ("sgd", "lars", "adamw")
RAMP_CHOICES = ("linear", "none")
PRECISION_CHOICES = ("auto", "fp32", "bf16")


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key and the fix."""


@dataclass
class DataConfig:
    """Where the images come from and how they are stored (docs/guide/data.md)."""

    dataset: str = "digits"  # digits (embedded, no download) | cifar10 | cifar100 | stl10 | imagefolder
    root: Optional[str] = None  # dataset directory (required for imagefolder: ROOT/train|test/<class>/*)
    download: bool = False  # torchvision datasets only; needs internet
    image_size: Optional[int] = None  # training side in px; None: the dataset's native size (digits: 32)
    train_limit: Optional[int] = None  # pretrain on a stratified subset of this many train images (quick studies)
    decode_workers: int = 0  # processes that decode image folders; 0 = all cores
    store_size: Optional[int] = None  # image folders: stored side (short side + centre crop); None: image_size
    eval_crop: float = 1.0  # eval view: centred square of this fraction of the stored side, resized to image_size
    cache: str = "auto"  # image folders: auto (decode once into cache_dir, then memory-map) | off | rebuild
    cache_dir: Optional[str] = None  # None: $SSL_SPHERE_CACHE or ~/.cache/ssl_sphere
    on_device: str = "auto"  # keep the uint8 dataset on the training device: auto (CUDA, < 4 GiB) | yes | no
    mean: Optional[List[float]] = None  # per-channel normalisation mean in [0, 1]; None: the training images'
    std: Optional[List[float]] = None  # per-channel normalisation std; None: the training images'


@dataclass
class AugConfig:
    """View augmentation (SimCLR Sec. 3 / Appendix A; BYOL Table 6), on the training device.

    Two-element lists are per view (view 1, view 2): BYOL's views are asymmetric.
    None means the method's default (derived and saved)."""

    crop_scale: List[float] = field(default_factory=lambda: [0.2, 1.0])  # random resized crop area (0.08 on ImageNet)
    crop_ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # random resized crop aspect ratio range
    hflip_p: Optional[float] = None  # horizontal flip probability; None: 0.5, 0 for digits (a mirrored 2 is no 2)
    jitter_p: float = 0.8  # probability of colour jitter (brightness, contrast, saturation, hue in random order)
    brightness: float = 0.4  # jitter strength: factor drawn from [1 - b, 1 + b]
    contrast: float = 0.4  # jitter strength: factor drawn from [1 - c, 1 + c]
    saturation: float = 0.4  # jitter strength: factor drawn from [1 - s, 1 + s]
    hue: float = 0.1  # jitter strength: hue shift drawn from [-h, h] turns
    hue_mode: str = "exact"  # exact: torchvision's HSV shift | yiq: faster linear approximation (opt-in)
    grayscale_p: float = 0.2  # probability of converting a view to grey
    blur_p: Optional[List[float]] = None  # Gaussian blur probability per view; None: the method's
    blur_sigma: List[float] = field(default_factory=lambda: [0.1, 2.0])  # blur sigma range (kernel ~10% of the side)
    solarize_p: Optional[List[float]] = None  # solarisation probability per view; None: the method's
    # multi-crop (SwAV Sec. 3.2, DINO): small local crops besides the two global views
    local_crops: int = 0  # local crops per image (DINO / SwAV: 6 or 8); 0: off
    local_size: Optional[int] = None  # local crop side; None: 96/224 of image_size (DINO), a multiple of a ViT's patch
    local_crop_scale: List[float] = field(default_factory=lambda: [0.05, 0.4])  # local crop area (DINO)
    local_blur_p: Optional[float] = None  # blur probability of a local crop; None: 0.5 (DINO), 0 at <= 64 px
    local_solarize_p: float = 0.0  # solarisation probability of a local crop (DINO)


@dataclass
class ModelConfig:
    """The backbone and its layers (docs/guide/methods.md)."""

    backbone: str = "auto"  # auto (digits: tiny, else resnet18) | tiny | resnet18 ... resnet101 | vit_tiny/small/base
    small_images: Optional[bool] = None  # ResNets: 3x3 stem, no max-pool; None: image_size <= 64
    patch_size: Optional[int] = None  # ViTs: patch side; None: 16 from 128 px up, else image_size / 8 (4 at 32 px)
    pool: str = "cls"  # ViTs: the feature is the class token (cls, as DINO / MoCo v3) or the mean patch token (mean)
    drop_path: float = 0.0  # ViTs: stochastic depth rate (DINO ViT-S: 0.1)
    dynamic_img_size: bool = True  # ViTs: positional embeddings interpolated to the input size (eval at other sizes)
    channels_last: bool = False  # channels_last memory format (faster convolutions on recent GPUs)
    sync_bn: bool = False  # under DDP: SyncBatchNorm (BN statistics over the global batch)
    # BN statistics per group of the (local) batch; None: the method's (MoCo in one process: 8, the
    # authors' CIFAR demo), else 1
    split_bn: Optional[int] = None
    compile: bool = False  # torch.compile the backbone


@dataclass
class SecConfig:
    """Spherical embedding constraint (Zhang et al., NeurIPS 2020) on the raw embeddings the method
    normalises (docs/guide/hypersphere.md)."""

    enabled: bool = False  # --sec
    weight: float = 0.1  # eta, relative to the per-direction mean method loss (docs/benchmarks/hypersphere.md)
    ema: float = 1.0  # rho: weight of the current batch in the mean norm; 1.0 = batch mean
    ramp: str = "linear"  # eta ramp over training: linear (authors' SSL code) | none


@dataclass
class SeeConfig:
    """Spherical embedding expansion (Le, Woo, PAKDD 2024), where the method defines it."""

    enabled: bool = False  # --see
    n: int = 8  # synthetic points per expanded sample (paper: 8)
    weight: float = 0.2  # lambda (paper: 0.2)
    fraction: float = 0.4  # share of most confident samples expanded, ramped 0 -> fraction (paper: 0.4)


@dataclass
class VmfConfig:
    """vMF mixture loss on pseudo-classes (Zhe, Chen, Yan); any method."""

    enabled: bool = False  # --vmf
    k: int = 100  # pseudo-classes (spherical k-means clusters)
    kappa: float = 10.0  # shared concentration
    weight: float = 0.5  # lambda of the auxiliary loss (not tuned; docs/benchmarks/hypersphere.md)
    refresh_epochs: int = 1  # re-estimate means and pseudo-labels every N epochs


@dataclass
class OptimConfig:
    """Optimiser and schedules: linear warm-up then cosine (schedules are functions of progress)."""

    # sgd | lars (large batches) | adamw (decoupled weight decay); None: adamw for ViTs (their papers' optimiser;
    # SGD at a ResNet's lr diverges a ViT), sgd otherwise
    optimizer: Optional[str] = None
    epochs: int = 15  # training length; sets the lr / momentum / SEC schedules
    max_steps: Optional[int] = None  # stop after this many optimiser steps (schedule unchanged)
    batch_size: int = 64  # per process
    lr: Optional[float] = None  # peak lr; None: base_lr x global batch / 128 (derived for each machine)
    # lr per 128 images of the global batch; None: the method's (SGD / LARS: 0.06, MoCo's demo, SimSiam 0.015;
    # AdamW: 7.5e-5, MoCo v3's ViT lr, DINO 2.5e-4)
    base_lr: Optional[float] = None
    momentum: float = 0.9  # SGD / LARS momentum
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas (torch's default)
    # on weights (norms and biases: see decay_norm_and_bias); the start of a wd schedule. None: 5e-4 under SGD /
    # LARS (MoCo's CIFAR demo, lightly's benchmark); under AdamW the method's (0.1, MoCo v3's ViT value; DINO 0.04)
    weight_decay: Optional[float] = None
    weight_decay_end: Optional[float] = None  # cosine from weight_decay to this over training (DINO); None: constant
    clip_grad: float = 0.0  # clip each parameter's gradient norm to this (DINO's clip_gradients); 0: off
    warmup_epochs: float = 1.0  # linear lr warm-up
    min_lr_ratio: float = 0.0  # cosine ends at lr * min_lr_ratio
    decay_norm_and_bias: bool = False  # weight decay on norm layers and biases too (the MoCo / lightly CIFAR code)
    lars_eta: float = 0.001  # LARS trust coefficient (You et al. 2017; lightly's LARS default)


@dataclass
class EvalConfig:
    """The live kNN monitor (docs/guide/evaluation.md)."""

    every_epochs: int = 1  # kNN monitor period; 0 disables it (the step-0 baseline too)
    knn_k: int = 200  # neighbours that vote
    knn_temperature: float = 0.1  # vote weight exp(cosine / T)
    # caps on the kNN bank (train split) and queries (test split), stratified subsets; None: 50000 / 10000
    # on CUDA, 5000 / 1000 on a CPU (a ResNet-18 evaluation there then takes about a minute, not a quarter hour)
    bank_size: Optional[int] = None
    test_size: Optional[int] = None  # see bank_size
    batch_size: int = 512  # feature extraction batch


@dataclass
class RunConfig:
    """The run: where it writes, how it resumes, seeds, device, logging, checkpoints."""

    output_dir: str = "runs"  # parent of run directories
    run_name: Optional[str] = None  # None: <dataset>_<method>[_sec]_s<seed>
    resume: Optional[str] = None  # checkpoint path or "auto"
    seed: int = 0  # seeds weights, data order and augmentation (per rank: seed + rank)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
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
    method: Any = None  # the dataclass of the registered method named method.name (see structured())
    sec: SecConfig = field(default_factory=SecConfig)
    see: SeeConfig = field(default_factory=SeeConfig)
    vmf: VmfConfig = field(default_factory=VmfConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # written by ssl_sphere, not settable: what the user asked (the layered config with null / auto
    # where a value is derived) and, per derived key, how its value was obtained (see resolve())
    request: Any = None
    derived: Any = None


SECTIONS = ("data", "aug", "model", "method", "sec", "see", "vmf", "optim", "eval", "run")
RECORDS = ("request", "derived")  # the parts of a config that ssl_sphere writes


@dataclass(frozen=True)
class Machine:
    """What the machine-dependent defaults depend on: the number of processes of the run and whether
    a CUDA GPU is available (the run's device then follows run.device: auto | cpu | cuda)."""

    world: int = 1
    cuda: bool = False

    @classmethod
    def here(cls) -> "Machine":
        """This process's machine: the process group's size (else torchrun's WORLD_SIZE, else 1) and
        whether torch sees a CUDA device."""
        import os

        import torch

        from .core import dist

        world = dist.world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        return cls(world=world, cuda=torch.cuda.is_available())


def _schema_node(path: str, method: Optional[str]):
    """The dataclass (or instance) behind a section path such as 'optim' or 'method', for messages."""
    if path == "method":
        try:
            return registry.method_class(method).Config if method else None
        except KeyError:
            return None
    node: Any = Config()
    for part in path.split(".") if path else []:
        node = getattr(node, part, None)
    return node


def _error_from_omegaconf(exc: OmegaConfBaseException, where: str, method: Optional[str] = None) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = getattr(exc, "msg", str(exc))
    if isinstance(exc, ConfigKeyError):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        if parent in RECORDS or key in RECORDS:
            return ConfigError(f"'{key}' ({where}) is written by ssl_sphere (the run's request and how its derived "
                               "values were obtained), not a setting; drop it")
        node = _schema_node(parent, method)
        valid = sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else []
        if not parent:
            valid = [v for v in valid if v not in RECORDS]
        prefix = f"{parent}." if parent else ""
        of = f" of method '{method}'" if parent == "method" and method else ""
        return ConfigError(f"unknown config key '{key}' ({where}); valid keys here{of}: "
                           + ", ".join(prefix + v for v in valid))
    if isinstance(exc, ValidationError):
        return ConfigError(f"bad value for config key '{key}' ({where}): {msg}")
    return ConfigError(f"config error at '{key}' ({where}): {msg}")


def _method_class(name: Any) -> type:
    try:
        return registry.method_class(name)
    except KeyError:
        names = registry.method_names()
        hint = ", ".join(names) if names else "none registered (import ssl_sphere.methods first)"
        raise ConfigError(f"invalid value {name!r} for 'method.name'; valid choices: {hint}") from None


def structured(method: Optional[str] = None) -> DictConfig:
    """The dataclass defaults as a type-checked config; the method section is the dataclass of the
    method registered as ``method`` (default: the registry's default method)."""
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    cfg.method = OmegaConf.structured(_method_class(method or registry.default_method()).Config)
    for key in RECORDS:  # free-form records, not schema: written by resolve()
        cfg[key] = {}
        OmegaConf.set_struct(cfg[key], False)
    cfg.request = None
    return cfg


def merge(cfg: DictConfig, other: Any, where: str) -> DictConfig:
    """Merge ``other`` (dict / DictConfig) into ``cfg`` with type checks."""
    try:
        return OmegaConf.merge(cfg, other)
    except OmegaConfBaseException as exc:
        raise _error_from_omegaconf(exc, where, cfg.method.name) from None


def load_yaml(path: str) -> DictConfig:
    """A recipe file. A run's own config.yaml is accepted too: its ``request`` is the recipe (so a run
    started from it derives its values for the machine it runs on)."""
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
    if isinstance(data.get("request"), DictConfig):
        data = data.request
        if isinstance(data.get("run"), DictConfig) and "resume" in data.run:
            data.run.resume = None  # a new run from that request, not a resume of that run
    return data


def _nest(flat: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """{'section.key': value} -> {'section': {'key': value}}."""
    out: Dict[str, Dict[str, Any]] = {}
    for key, value in flat.items():
        section, name = key.split(".")
        out.setdefault(section, {})[name] = value
    return out


def _method_name(layer: Any) -> Optional[str]:
    method = layer.get("method") if isinstance(layer, (dict, DictConfig)) else None
    return method.get("name") if isinstance(method, (dict, DictConfig)) else None


def layered(config_file: Optional[str] = None, values: Optional[Dict[str, Any]] = None,
            overrides: Sequence[str] = (), base: Any = None) -> DictConfig:
    """The one config-layering rule of every entry point (pretraining, the eval CLIs, the study):
    ``base`` (default: the dataclass defaults; a resume passes the checkpoint's request) < the YAML
    ``config_file`` < ``values`` ({'section.key': value}, e.g. from command-line flags) < ``overrides``
    ('section.key=value' strings, values parsed as YAML). Type-checked at every layer, the method
    section against the dataclass of the method the layers name. The result is the run's request:
    null / auto where a value is derived (see :func:`resolve`)."""
    layers = []
    if config_file:
        layers.append((load_yaml(config_file), f"config file {config_file}"))
    if values:
        layers.append((_nest(values), "command-line flags"))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"cannot read override '{item}': write it as section.key=value, e.g. method.temperature=0.2"
            )
        try:
            dotlist = OmegaConf.from_dotlist([item])
        except Exception as exc:
            raise ConfigError(f"cannot parse override '{item}': {exc}") from None
        layers.append((dotlist, f"override '{item}'"))
    for layer, where in layers:
        for key in RECORDS:
            if key in layer:
                raise ConfigError(f"'{key}' ({where}) is written by ssl_sphere (the run's request and how its "
                                  "derived values were obtained), not a setting; drop it")
    names = [n for n in [_method_name(base)] + [_method_name(layer) for layer, _ in layers] if n is not None]
    name = names[-1] if names else None
    cfg = structured(name)
    if base is not None:
        base = OmegaConf.to_container(base) if isinstance(base, DictConfig) else dict(base)
        base = {k: v for k, v in base.items() if k not in RECORDS}
        if _method_name(base) != cfg.method.name:  # another method: its section starts from its defaults
            base.pop("method", None)
        cfg = merge(cfg, base, "the saved request")
    for layer, where in layers:
        cfg = merge(cfg, layer, where)
    return cfg


def _check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"invalid value {value!r} for '{key}'; valid choices: {', '.join(choices)}")


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"invalid value for '{key}': {message}")


class Derivation:
    """Fills the keys of a config that the request leaves to ssl_sphere (null / auto) and records
    how each was obtained in ``cfg.derived`` ({'section.key': 'why'})."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def unset(self, key: str) -> bool:
        section, name = key.split(".")
        return self.cfg[section][name] in (None, "auto")

    def fill(self, key: str, value: Any, why: str) -> None:
        """Set ``key`` to ``value`` (with the reason) if the request leaves it unset."""
        if self.unset(key):
            section, name = key.split(".")
            self.cfg[section][name] = value
            self.cfg.derived[key] = why


def resolve(cfg: DictConfig, machine: Optional[Machine] = None) -> DictConfig:
    """Validate choices / ranges and fill every null / auto value: from the dataset and the method
    (machine-free), and from ``machine`` (default: this process's, Machine.here()): the learning rate
    by the global batch, the kNN monitor's caps by CUDA, the method's own machine-dependent choices.
    The first call keeps what was asked as ``cfg.request``; ``cfg.derived`` says how each filled value
    was obtained. Idempotent. A resume resolves the checkpoint's request again on its own machine."""
    machine = machine or Machine.here()
    c = cfg
    if c.request is None:
        c.request = {k: v for k, v in OmegaConf.to_container(c).items() if k not in RECORDS}
        OmegaConf.set_struct(c.request, False)
    d = Derivation(c)
    method_cls = _method_class(c.method.name)
    _check_choice("data.dataset", c.data.dataset, DATASET_CHOICES)
    _check_choice("model.backbone", c.model.backbone, BACKBONE_CHOICES)
    _check_choice("run.device", c.run.device, DEVICE_CHOICES)
    _check_choice("run.precision", c.run.precision, PRECISION_CHOICES)
    _check_choice("sec.ramp", c.sec.ramp, RAMP_CHOICES)
    # YAML reads yes / no / off as booleans, which reach these string fields as "True" / "False"
    c.data.on_device = {"True": "yes", "False": "no"}.get(c.data.on_device, c.data.on_device)
    c.data.cache = {"False": "off"}.get(c.data.cache, c.data.cache)
    _check_choice("data.on_device", c.data.on_device, ("auto", "yes", "no"))
    _check_choice("data.cache", c.data.cache, ("auto", "off", "rebuild"))

    # from the dataset
    d.fill("model.backbone", "tiny" if c.data.dataset == "digits" else "resnet18",
           f"data.dataset={c.data.dataset}: tiny convnet for digits, resnet18 otherwise")
    if c.data.dataset == "imagefolder":
        _check(c.data.root is not None, "data.root",
               "--dataset imagefolder needs --data-root DIR (DIR/train/<class>/*)")
    if d.unset("data.image_size"):
        if c.data.dataset == "imagefolder":
            from .data.listing import folder_image_size  # reads one image header

            d.fill("data.image_size", folder_image_size(c.data.root), "short side of the folder's first image")
        else:
            d.fill("data.image_size", 96 if c.data.dataset == "stl10" else 32, f"native size of {c.data.dataset}")
    d.fill("aug.hflip_p", 0.0 if c.data.dataset == "digits" else 0.5,
           "digits: a mirrored digit is another glyph, so no flips" if c.data.dataset == "digits"
           else "SimCLR augmentation: horizontal flip with p 0.5")
    small = c.data.image_size <= 64
    d.fill("model.small_images", small, f"data.image_size={c.data.image_size} {'<=' if small else '>'} 64")
    if c.model.backbone in VIT_CHOICES:
        # patch 16 at 224 px (the ViT paper); small images keep 8 x 8 patches as solo-learn's CIFAR ViTs (4 at 32 px)
        d.fill("model.patch_size", 16 if c.data.image_size >= 128 else max(1, c.data.image_size // 8),
               f"ViT at {c.data.image_size} px: " + ("patch 16" if c.data.image_size >= 128 else "8 x 8 patches"))
    if c.data.dataset == "imagefolder":
        d.fill("data.store_size", c.data.image_size, "data.image_size")
    if c.aug.local_crops:
        step = c.model.patch_size or 1
        d.fill("aug.local_size", max(step, round(c.data.image_size * 96 / 224 / step) * step),
               f"96/224 of {c.data.image_size} px (DINO's local crops)" + (f", a multiple of the patch {step}"
                                                                            if step > 1 else ""))
        small = c.data.image_size <= 64
        d.fill("aug.local_blur_p", 0.0 if small else 0.5,
               "no blur at <= 64 px (SimCLR Appendix B.9)" if small else "DINO's local crops: p 0.5")
    # from the method (cross-section defaults and its own checks)
    method_cls.configure(c, d)
    vit = c.model.backbone in VIT_CHOICES
    d.fill("optim.optimizer", "adamw" if vit else "sgd",
           f"{c.model.backbone} is a ViT: AdamW, as the ViT papers" if vit else "SGD for a convnet")
    _check_choice("optim.optimizer", c.optim.optimizer, OPTIMIZER_CHOICES)
    adamw = c.optim.optimizer == "adamw"
    d.fill("optim.weight_decay", method_cls.weight_decay_adamw if adamw else 5e-4,
           f"{c.method.name}'s decoupled weight decay under AdamW" if adamw else "SGD / LARS weight decay")
    d.fill("optim.base_lr", method_cls.base_lr_adamw if adamw else method_cls.base_lr,
           f"{c.method.name}'s lr per 128 images" + (" under AdamW" if adamw else ""))
    # from the machine
    on_gpu = c.run.device == "cuda" or (c.run.device == "auto" and machine.cuda)
    where = "on CUDA" if on_gpu else "on a CPU"
    d.fill("eval.bank_size", 50000 if on_gpu else 5000, f"kNN monitor cap {where}")
    d.fill("eval.test_size", 10000 if on_gpu else 1000, f"kNN monitor cap {where}")
    method_cls.derive(c, d, machine)
    d.fill("model.split_bn", 1, "plain BatchNorm")
    procs = f"{machine.world} process{'es' if machine.world > 1 else ''}"
    d.fill("optim.lr", c.optim.base_lr * c.optim.batch_size * machine.world / 128,
           f"linear scaling: base_lr {c.optim.base_lr} x global batch {c.optim.batch_size * machine.world} "
           f"({c.optim.batch_size} x {procs}) / 128")

    # ranges
    for key in ("blur_p", "solarize_p", "crop_scale", "crop_ratio", "blur_sigma"):
        _check(len(c.aug[key]) == 2, f"aug.{key}", f"needs 2 values, got {list(c.aug[key])}")
    for key in ("hflip_p", "jitter_p", "grayscale_p"):
        _check(0.0 <= c.aug[key] <= 1.0, f"aug.{key}", f"a probability in [0, 1], got {c.aug[key]}")
    for key in ("blur_p", "solarize_p"):
        _check(all(0.0 <= p <= 1.0 for p in c.aug[key]), f"aug.{key}", "probabilities in [0, 1]")
    _check(0 < c.aug.crop_scale[0] <= c.aug.crop_scale[1] <= 1.0, "aug.crop_scale", "need 0 < min <= max <= 1")
    _check(0 < c.aug.crop_ratio[0] <= c.aug.crop_ratio[1], "aug.crop_ratio", "need 0 < min <= max")
    _check(c.aug.local_crops >= 0, "aug.local_crops", "must be >= 0 (0 = no multi-crop)")
    if c.aug.local_crops:
        _check(len(c.aug.local_crop_scale) == 2 and 0 < c.aug.local_crop_scale[0] <= c.aug.local_crop_scale[1] <= 1,
               "aug.local_crop_scale", "need 0 < min <= max <= 1")
        _check(c.aug.local_size >= 4, "aug.local_size", "must be >= 4")
        for key in ("local_blur_p", "local_solarize_p"):
            _check(0.0 <= c.aug[key] <= 1.0, f"aug.{key}", "a probability in [0, 1]")
        _check(method_cls.multi_crop, "aug.local_crops", f"{c.method.name} takes two views; multi-crop is for "
               "the methods that take view groups (DINO, SwAV)")
    _check(0 <= c.aug.hue <= 0.5, "aug.hue", f"must be in [0, 0.5], got {c.aug.hue}")
    _check_choice("aug.hue_mode", c.aug.hue_mode, ("exact", "yiq"))
    for key in ("brightness", "contrast", "saturation"):
        _check(c.aug[key] >= 0, f"aug.{key}", "must be >= 0")
    _check(c.data.image_size >= 8, "data.image_size", "must be >= 8")
    _check_choice("model.pool", c.model.pool, ("cls", "mean"))
    _check(c.model.drop_path >= 0, "model.drop_path", "must be >= 0")
    if c.model.backbone in VIT_CHOICES:
        _check(c.model.patch_size >= 1 and c.data.image_size % c.model.patch_size == 0, "model.patch_size",
               f"{c.model.patch_size} does not tile data.image_size={c.data.image_size}; choose a divisor of it")
        if c.aug.local_crops:  # timm's patch embedding refuses inputs its patches do not tile ...
            _check(c.aug.local_size % c.model.patch_size == 0, "aug.local_size",
                   f"{c.aug.local_size} is not a multiple of model.patch_size={c.model.patch_size}; choose a "
                   "multiple of it (or leave it unset to derive one)")
            # ... and, without interpolated positional embeddings, any size but data.image_size
            _check(c.model.dynamic_img_size or c.aug.local_size == c.data.image_size, "model.dynamic_img_size",
                   f"must be true for ViT local crops of {c.aug.local_size} px (the positional embeddings are "
                   f"for {c.data.image_size} px); drop model.dynamic_img_size=false or aug.local_crops")
    else:
        _check(c.model.patch_size is None, "model.patch_size", f"only ViTs have patches, not {c.model.backbone}")
    _check(c.data.root is None or c.data.dataset != "digits", "data.root",
           "the digits dataset is embedded in scikit-learn and reads no files, so --data-root would be ignored; "
           "drop it, or choose the dataset it holds with --dataset")
    _check(c.data.decode_workers >= 0, "data.decode_workers", "must be >= 0 (0 = all cores)")
    _check(c.data.store_size is None or c.data.dataset == "imagefolder", "data.store_size",
           "only image folders are stored at a chosen size (the other datasets are arrays of their own size)")
    _check(c.data.store_size is None or c.data.store_size >= 8, "data.store_size", "must be >= 8")
    _check(0 < c.data.eval_crop <= 1, "data.eval_crop", f"a fraction in (0, 1], got {c.data.eval_crop}")
    _check(c.data.train_limit is None or c.data.train_limit >= 1, "data.train_limit", "must be >= 1")
    _check(c.optim.batch_size >= 2, "optim.batch_size", "must be >= 2 (contrastive losses need negatives)")
    _check(c.model.split_bn >= 1, "model.split_bn", "must be >= 1 (1: plain BatchNorm)")
    _check(not (c.model.sync_bn and c.model.split_bn > 1 and machine.world > 1), "model.split_bn",
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
    _check(len(c.optim.betas) == 2 and all(0 <= b < 1 for b in c.optim.betas), "optim.betas",
           f"two values in [0, 1), got {list(c.optim.betas)}")
    _check(c.optim.weight_decay_end is None or c.optim.weight_decay_end >= 0, "optim.weight_decay_end", "must be >= 0")
    _check(c.optim.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0 = off)")
    _check(0.0 < c.sec.ema <= 1.0, "sec.ema", f"rho must be in (0, 1] (1 = batch mean), got {c.sec.ema}")
    _check(c.sec.weight >= 0, "sec.weight", "must be >= 0")
    if c.see.enabled:
        _check(method_cls.see_unsupported is None, "see.enabled",
               f"SEE does not apply to {c.method.name}: {method_cls.see_unsupported}")
        _check(c.see.n >= 1, "see.n", "must be >= 1")
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


def request_of(cfg: DictConfig) -> Dict[str, Any]:
    """What was asked for ``cfg`` (its request; a config from before requests were kept: all of it)."""
    saved = cfg.get("request")
    if saved:
        return OmegaConf.to_container(saved)
    return {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in RECORDS}


def weight_keys(cfg: DictConfig) -> List[str]:
    """The config keys that shape a run's saved weights (and optimiser state): a resume may not
    change them. The method's own come from its class (``weight_keys``)."""
    common = ["method.name", "model.backbone", "model.small_images", "model.patch_size", "model.pool", "sec.enabled",
              "vmf.enabled", "vmf.k", "optim.decay_norm_and_bias"]  # the optimiser's parameter groups follow the last
    return common + [f"method.{k}" for k in _method_class(cfg.method.name).weight_keys]


def for_method(overrides: Sequence[str], method: str) -> List[str]:
    """'section.key=value' overrides of a sweep over methods, for one method: a ``method.KEY=...``
    applies only to a method whose section has KEY (MoCo's queue size is no key of SimCLR's, and
    would be refused as unknown there), every other override to all of them."""
    keys = {f.name for f in dataclasses.fields(_method_class(method).Config)}
    return [o for o in overrides if not o.startswith("method.") or o.split("=", 1)[0].split(".", 1)[1] in keys]


def to_container(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # plain dict: safe for torch.load(weights_only)


def from_container(data: Dict[str, Any], where: str = "checkpoint") -> DictConfig:
    """A saved (resolved) config back as a typed config. Configs saved before the method sections
    were per method (no ``request``) held every method's keys in one section: the keys that the
    saved method does not have are dropped."""
    data = dict(data)
    method = dict(data.get("method") or {})
    if "request" not in data and "name" in method:
        fields = {f.name for f in dataclasses.fields(_method_class(method["name"]).Config)}
        data["method"] = {k: v for k, v in method.items() if k in fields}
    return merge(structured(_method_name(data)), data, where)
