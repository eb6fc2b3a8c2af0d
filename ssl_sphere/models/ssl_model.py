"""Model composition: a method plus its regularisers (SEC, vMF) as one module, built from a
resolved config, and rebuilt from a checkpoint."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import torch
from omegaconf import DictConfig
from torch import nn

from ..config import ConfigError, from_container
from ..core import dist
from ..core.errors import first_line
from ..evaluation.features import extract_features
from ..methods import Method, build_method
from ..sphere.sec import SEC
from ..sphere.stats import norm_stats
from ..sphere.vmf import VMF
from .backbones import backbone_of, split_batchnorm


class SSLModel(nn.Module):
    """A method plus the optional SEC and vMF regularisers: one module, one state_dict
    (weights, EMA copies, queue, SEC's running mean, vMF means/pseudo-labels together).
    Its forward is the whole pretraining objective of one step."""

    def __init__(self, method: Method, sec: Optional[SEC], vmf: Optional[VMF] = None):
        super().__init__()
        self.method, self.sec, self.vmf = method, sec, vmf

    def forward(self, views: Sequence[torch.Tensor], progress: float, idx: Optional[torch.Tensor] = None):
        """views: the (B, 3, H, W) augmented views; idx: (B,) dataset indices (needed by vMF).
        Returns (total loss, method loss, logs of device scalars, the method's StepOutput)."""
        out = self.method(views)
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
        return total, out.loss, logs, out


def build_model(cfg: DictConfig, n_train: int = 0, device: Union[str, torch.device, None] = None,
                world: int = 1) -> SSLModel:
    """The model of a resolved config. n_train: training-set size (vMF keeps one pseudo-label
    per image). With ``device``: moved there, SyncBatchNorm across ``world`` > 1 ranks if
    model.sync_bn, and in channels_last memory format if model.channels_last."""
    backbone, fdim = backbone_of(cfg.model, cfg.data.image_size)
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
        detail = first_line(exc).replace(f"Error(s) in loading state_dict for {SSLModel.__name__}:", "").strip()
        raise ConfigError(f"the weights in {path} do not fit the model built from its saved config "
                          f"(method '{trained.method.name}', backbone '{trained.model.backbone}'): "
                          f"{detail or 'state_dict mismatch'}") from None
    return model


__all__: Sequence[str] = ("SSLModel", "build_model", "EmbedView", "refresh_vmf", "model_from_checkpoint")
