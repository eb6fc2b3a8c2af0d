"""Model composition: a method plus its regularisers (SEC, vMF) as one module, built from a
config; and the user-facing way back from a checkpoint to a pretrained backbone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from omegaconf import DictConfig
from torch import nn

from . import checkpoint, dist
from .augment import eval_transform
from .backbones import SplitBatchNorm, build_backbone, split_batchnorm
from .config import ConfigError, from_container
from .evaluation import extract_features
from .methods import Method, build_method
from .sphere import SEC, VMF, norm_stats

PARTS = ("backbone", "momentum_backbone", "model")


class SSLModel(nn.Module):
    """A method plus the optional SEC and vMF regularisers: one module, one state_dict
    (weights, EMA copies, queue, SEC's running mean, vMF means/pseudo-labels together).
    Its forward is the whole pretraining objective of one step."""

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
            # eta is relative to the per-direction mean of the method's loss: MoCo (symmetric) and
            # BYOL SUM two directions, so their SEC term is doubled and one eta is one strength
            sec_term, sec_logs = self.sec(out.embeddings, progress)
            total = total + self.method.loss_directions * sec_term
            logs.update(sec_logs)
        if self.vmf is not None:
            vmf_term, vmf_logs = self.vmf(out.embeddings, idx)
            total = total + vmf_term
            logs.update(vmf_logs)
        return total, out.loss, logs, out.embeddings


def build_model(cfg: DictConfig, n_train: int = 0, device: Union[str, torch.device, None] = None,
                world: int = 1) -> SSLModel:
    """The model of a resolved config. n_train: training-set size (vMF keeps one pseudo-label
    per image). With ``device``: moved there, SyncBatchNorm across ``world`` > 1 ranks if
    model.sync_bn, and in channels_last memory format if model.channels_last."""
    backbone, fdim = build_backbone(cfg.model.backbone, cfg.model.small_images)
    if (cfg.model.get("split_bn") or 1) > 1:  # None in checkpoints from before split BN
        split_batchnorm(backbone, cfg.model.split_bn)  # before the method copies it into its EMA encoder
    method = build_method(cfg.method, backbone, fdim, cfg.see)
    sec = SEC(cfg.sec.weight, cfg.sec.ema, cfg.sec.ramp) if cfg.sec.enabled else None
    vmf = None
    if cfg.vmf.enabled:
        if cfg.vmf.k > n_train:
            raise ConfigError(f"invalid value for 'vmf.k': {cfg.vmf.k} pseudo-classes but only {n_train} "
                              "training images")
        vmf = VMF(cfg.vmf.k, cfg.method.proj_dim, n_train, cfg.vmf.kappa, cfg.vmf.weight)
    model = SSLModel(method, sec, vmf)
    if device is None:
        return model
    model = model.to(device)
    if world > 1 and cfg.model.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class EmbedView(nn.Module):
    """Presents a method's loss-space embedding (``embed``) as ``features`` for extract_features."""

    def __init__(self, method: Method):
        super().__init__()
        self.method = method

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.embed(x)


@torch.no_grad()
def refresh_vmf(model: SSLModel, images: torch.Tensor, transform, cfg: DictConfig, device, seed: int) -> None:
    """vMF "global structure learning": embed the whole training set with the momentum
    (or eval-mode) encoder, eval transform only, sharded over ranks, then spherical
    k-means -> mean directions + pseudo-labels (identical on every rank: same inputs, same seed)."""
    r, w = dist.rank(), dist.world_size()
    emb = extract_features(EmbedView(model.method), images[r::w], cfg.eval.batch_size, device, transform)
    model.vmf.refresh(dist.gather_sharded(emb, images.shape[0]), seed)


# ----------------------------------------------------------------------------- from a checkpoint
def vmf_train_size(state: Dict[str, Any]) -> int:
    """The training-set size build_model needs for a state_dict: the length of its vMF label
    buffer (0 without vMF)."""
    labels = state.get("vmf.labels")
    return int(labels.shape[0]) if torch.is_tensor(labels) else 0


def model_from_checkpoint(ckpt: Dict[str, Any], path: str, cfg: Optional[DictConfig] = None) -> SSLModel:
    """The SSLModel of a loaded checkpoint with its weights (strict). cfg: the resolved config to
    build it from (default: the one saved in the checkpoint). Raises ConfigError with the fix
    when the weights do not fit."""
    trained = from_container(ckpt["config"], f"checkpoint {path}")
    cfg = cfg if cfg is not None else trained
    try:
        model = build_model(cfg, vmf_train_size(ckpt["model"]))
        model.load_state_dict(ckpt["model"], strict=True)
    except (RuntimeError, ValueError) as exc:
        if cfg.model.backbone != trained.model.backbone:
            raise ConfigError(f"the weights in {path} do not fit backbone '{cfg.model.backbone}': the checkpoint "
                              f"was trained with backbone '{trained.model.backbone}'") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        detail = first.replace(f"Error(s) in loading state_dict for {SSLModel.__name__}:", "").strip()
        raise ConfigError(f"the weights in {path} do not fit the model built from its saved config "
                          f"(method '{trained.method.name}', backbone '{trained.model.backbone}'): "
                          f"{detail or 'state_dict mismatch'}") from None
    return model


def normalisation(cfg: DictConfig) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) the run normalised its images with: saved in the config by every run since
    they were resolved at start-up; older checkpoints fall back to the dataset's known values."""
    if cfg.data.mean is not None and cfg.data.std is not None:
        return tuple(cfg.data.mean), tuple(cfg.data.std)
    from .data import STATS, load_digits

    if cfg.data.dataset in STATS:
        return STATS[cfg.data.dataset]
    if cfg.data.dataset == "digits":
        d = load_digits(cfg.data.image_size)
        return d.mean, d.std
    raise ConfigError(f"this checkpoint does not record its normalisation statistics ({cfg.data.dataset} "
                      "images); recompute them from the training images (ssl_sphere.data.channel_stats) and "
                      "normalise with those")


@dataclass
class Pretrained:
    """A pretrained network and what it expects as input.

    module: in eval mode, on the requested device; ``part`` 'backbone' / 'momentum_backbone'
    map (B, 3, S, S) normalised images to (B, feature_dim) features, 'model' is the whole
    SSLModel. image_size: S, the side the network was trained at; mean / std: the per-channel
    normalisation in [0, 1] units. ``preprocess`` turns (B, 3, H, W) uint8 images into that input."""

    module: nn.Module
    part: str
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    feature_dim: int
    arch: str
    small_images: bool
    config: Dict[str, Any]
    step: Optional[int]  # the training step the checkpoint was written at
    eval_crop: float = 1.0  # the centred fraction of an image the evaluation view keeps (data.eval_crop)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, 3, S, S) float normalised: the centred square (eval_crop of the
        short side), resized (bilinear, antialiased) to S if needed; as the run's evaluation saw its images."""
        return eval_transform(images, self.image_size, self.mean, self.std, self.eval_crop)


def load_pretrained(path: str, part: str = "backbone", device: Union[str, torch.device] = "cpu") -> Pretrained:
    """Load an ssl_sphere checkpoint (``last.pt``, ``epoch_XXXX.pt``) for use.

        p = ssl_sphere.load_pretrained("runs/cifar10_moco_sec_s0/last.pt")
        features = p.module(p.preprocess(images_uint8))       # (B, p.feature_dim)

    part: 'backbone' (the encoder that kNN / linear probes evaluate), 'momentum_backbone'
    (MoCo's key encoder / BYOL's target; an EMA of the backbone) or 'model' (everything)."""
    if part not in PARTS:
        raise ConfigError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")
    ckpt = checkpoint.load(path)
    model = model_from_checkpoint(ckpt, path)
    cfg = from_container(ckpt["config"], f"checkpoint {path}")
    method = model.method
    if part == "backbone":
        module = method.backbone
    elif part == "momentum_backbone":
        if not hasattr(method, "encoder"):
            raise ConfigError(f"{path} was trained with {cfg.method.name}, which has no momentum encoder; "
                              "use part='backbone'")
        module = method.encoder.target[0]
    else:
        module = model
    for m in module.modules():  # a user's batch need not split into the training run's BN groups
        if isinstance(m, SplitBatchNorm):
            m.num_splits = 1
    mean, std = normalisation(cfg)
    return Pretrained(module.to(device).eval(), part, int(cfg.data.image_size), mean, std, method.feature_dim,
                      cfg.model.backbone, bool(cfg.model.small_images), ckpt["config"], ckpt.get("step"),
                      float(cfg.data.eval_crop))


def backbone_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """A plain state_dict (contiguous CPU tensors, no training memory format) of a backbone."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


__all__: Sequence[str] = ("SSLModel", "build_model", "EmbedView", "refresh_vmf", "model_from_checkpoint",
                          "Pretrained", "load_pretrained", "backbone_state_dict")
