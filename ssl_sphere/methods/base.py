"""The method contract: what a method module defines, how it registers itself, and the momentum
(EMA) update that every method with a target network shares.

A method is one module holding everything unique to it:

* ``Config``: its config section, a dataclass whose ``name`` default is the name it registers
  under; each default says the source it comes from;
* ``configure(cfg, d)`` / ``derive(cfg, d, machine)``: the defaults it sets in other sections (e.g.
  its augmentation) and its own checks, machine-free and machine-dependent (classmethods, called by
  ``ssl_sphere.config.resolve``);
* ``weight_keys``: the keys of its section that shape its weights (a resume may not change them);
* its heads, its loss call (``forward(views) -> StepOutput``), its momentum pairs (``momentum_pairs``),
  and the step hooks it needs (``begin_step(epoch)``, ``before_optimizer_step()``, ``after_step(progress)``);
* what the hypersphere regularisers act on: ``StepOutput.embeddings`` are the RAW embeddings its loss
  L2-normalises (SEC and vMF act on these; ``sec_target`` says which they are), and
  ``see_unsupported`` is None where it implements SEE, else the reason SEE does not apply.

``@register`` adds the class to the registry (ssl_sphere.core.registry), which the config schema,
the model builder and the CLI read: none of them names a method.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
from lightly.models.utils import deactivate_requires_grad
from lightly.models.utils import update_momentum as lightly_update_momentum
from torch import nn

from ..core import registry
from ..core.schedules import cosine_schedule
from ..sphere.see import check_see_dim


def register(cls=None, *, default: bool = False):
    """Class decorator: register a Method subclass under ``cls.Config.name``. ``default=True``: the
    method of a config that names none."""

    def add(c):
        return registry.register_method(c, default=default)

    return add(cls) if cls is not None else add


def get(name: str) -> type:
    """The method class registered as ``name`` (KeyError if none)."""
    return registry.method_class(name)


def names() -> List[str]:
    return registry.method_names()


def check(cond: bool, key: str, message: str) -> None:
    """A method's own config check: raises ConfigError naming the key."""
    from ..config import ConfigError

    if not cond:
        raise ConfigError(f"invalid value for '{key}': {message}")


def asymmetric_views(cfg, d, who: str, blur_small: bool = False) -> None:
    """Fill BYOL's asymmetric views (BYOL Table 6: blur 1.0 / 0.1, solarisation 0 / 0.2), the views of
    the methods that adopted them (MoCo v3, NNCLR). blur_small: blur images of 64 px or less too (BYOL's
    own default); else the base's rule leaves them without blur (SimCLR Appendix B.9, as solo-learn's
    CIFAR recipes)."""
    if blur_small or cfg.data.image_size > 64:
        d.fill("aug.blur_p", [1.0, 0.1], f"{who}: BYOL's asymmetric views (BYOL Table 6)")
    d.fill("aug.solarize_p", [0.0, 0.2], f"{who}: BYOL's asymmetric views (BYOL Table 6)")


def encode_views(backbone: nn.Module, views: Sequence[torch.Tensor]) -> torch.Tensor:
    """(V*B, F) backbone features of the views, view blocks stacked in order: one backbone batch per
    run of consecutive views of one resolution (multi-crop: the global views together, then the local
    crops), as the authors' MultiCropWrapper of SwAV and DINO, so views of one size share BN statistics."""
    runs = [torch.cat(list(group)) for _, group in itertools.groupby(views, key=lambda v: v.shape[-2:])]
    return torch.cat([backbone(x) for x in runs])


@dataclass
class StepOutput:
    """loss: () the method's own loss; embeddings: (V*B, D) the RAW outputs its loss normalises,
    V view blocks of the batch stacked (SEC, vMF and the norm statistics act on these); views: V;
    logs: detached scalars."""

    loss: torch.Tensor
    embeddings: torch.Tensor
    logs: Dict[str, torch.Tensor] = field(default_factory=dict)
    views: int = 2


class Method(nn.Module):
    """backbone: (B, 3, H, W) -> (B, F). Subclasses define ``Config`` and ``forward(views)``.

    cfg: the method's config section (read-only); see: the ``see`` section when SEE is on."""

    Config: ClassVar[type]
    weight_keys: ClassVar[Tuple[str, ...]] = ()
    sec_target: ClassVar[str] = ""
    see_unsupported: ClassVar[Optional[str]] = "this method does not implement it"
    embedding_dim_key: ClassVar[str] = "proj_dim"  # the key of its section giving the embeddings' dimension
    multi_crop: ClassVar[bool] = False  # whether forward takes local crops after the two global views
    base_lr: ClassVar[float] = 0.06  # its default optim.base_lr (lr per 128 images): MoCo's CIFAR demo, 0.06 x B / 128
    # its default optim.base_lr under AdamW (ViTs), where SGD's lrs diverge: MoCo v3's ViT lr, 1.5e-4 x B / 256
    base_lr_adamw: ClassVar[float] = 7.5e-5
    weight_decay_adamw: ClassVar[float] = 0.1  # its default weight decay under AdamW: MoCo v3's ViT value

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg, see=None):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.cfg = cfg
        self.see = see if see is not None and see.enabled else None
        # training progress in [0, 1] as of the last after_step: drives SEE's ramp (checkpointed).
        # _progress mirrors it on the host so reading it costs no device sync per step; None
        # means "read the buffer once" (fresh module, or a state_dict just loaded into it)
        self.register_buffer("progress", torch.zeros(()))
        self._progress = None
        self.epoch = 0.0  # position in training in epochs (step / steps per epoch), set by begin_step

    # ------------------------------------------------------------------ config hooks
    @classmethod
    def configure(cls, cfg, d) -> None:
        """Fill the defaults this method sets outside its section (``d.fill(key, value, why)``) and
        check its section. Default: SimCLR's augmentation (Appendix A): no blur on images of 64 px
        or less (Appendix B.9, CIFAR), p 0.5 otherwise; no solarisation. Checks a temperature (if
        the section has one) and, with SEE on, the embedding dimension SEE needs."""
        small = cfg.data.image_size <= 64
        d.fill("aug.blur_p", [0.0, 0.0] if small else [0.5, 0.5],
               "SimCLR augmentation: no blur at <= 64 px (Appendix B.9), p 0.5 above")
        d.fill("aug.solarize_p", [0.0, 0.0], "SimCLR augmentation: no solarisation")
        if "temperature" in cfg.method:
            check(cfg.method.temperature > 0, "method.temperature", "must be > 0")
        if cfg.see.enabled and cls.see_unsupported is None:
            check_see_dim(cfg.see.n, cfg.method[cls.embedding_dim_key])

    @classmethod
    def derive(cls, cfg, d, machine) -> None:
        """Fill this method's machine-dependent defaults and checks (machine: config.Machine)."""

    # ------------------------------------------------------------------ the step
    @property
    def loss_directions(self) -> int:
        """How many directions the method's loss SUMS (MoCo symmetric, BYOL: 2; SimCLR, whose
        NT-Xent averages over both views, and asymmetric MoCo: 1). SEC's weight is defined
        against the per-direction mean of the loss, so it is scaled by this (SSLModel)."""
        return 1

    def begin_step(self, epoch: float) -> None:
        """Called before each step's forward with the position in training in epochs (step / steps
        per epoch, a float): what epoch-based schedules of a method read (self.epoch)."""
        self.epoch = epoch

    def forward(self, views: Sequence[torch.Tensor]) -> StepOutput:
        """views: the augmented views of the batch, each (B, 3, H, W)."""
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        """Called after the backward pass, before the optimiser step: e.g. drop the gradients of a
        layer kept frozen for the first epochs (set them to None: the optimiser then skips it)."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) normalised images -> (B, F) backbone features for evaluation."""
        return self.backbone(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> (B, D) embeddings in the loss space, from the momentum encoder where
        there is one (vMF's global structure estimation)."""
        raise NotImplementedError

    def momentum_pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        """(online, target) modules whose target is an EMA of the online one (none by default)."""
        return []

    def fixed_lr_modules(self) -> List[nn.Module]:
        """Modules whose parameters keep the peak lr instead of the schedule (e.g. SimSiam's
        predictor, Sec. 4.2); none by default."""
        return []

    def momentum_backbone(self) -> Optional[nn.Module]:
        """The EMA copy of the backbone (MoCo's key encoder, BYOL's target), or None."""
        return None

    def momentum_at(self, progress: float) -> float:
        return cosine_schedule(progress, self.cfg.momentum, self.cfg.momentum_final)

    def after_step(self, progress: float) -> None:
        """Called after each optimiser step with training progress in [0, 1]: records it and
        updates every momentum pair (the one place EMA targets are updated)."""
        self.set_progress(progress)
        pairs = self.momentum_pairs()
        if pairs:
            update_momentum(pairs, self.momentum_at(progress))

    # ------------------------------------------------------------------ progress (SEE's ramp)
    def set_progress(self, progress: float) -> None:
        self.progress.fill_(progress)
        self._progress = float(progress)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._progress = None  # the loaded buffer is the truth now

    def progress_value(self) -> float:
        if self._progress is None:
            self._progress = float(self.progress)  # one sync, then the host mirror
        return self._progress

    def see_fraction(self) -> float:
        """Share of samples SEE expands now: ramps 0 -> see.fraction over training."""
        return self.see.fraction * self.progress_value() if self.see is not None else 0.0


@torch.no_grad()
def update_momentum(pairs: Sequence[Tuple[nn.Module, nn.Module]], m: float) -> None:
    """target = m * target + (1 - m) * online for the parameters of every (online, target) pair:
    lightly's update_momentum, two fused foreach kernels per pair (BN buffers of a target follow
    its own forward)."""
    for online, target in pairs:
        lightly_update_momentum(online, target, m)


class EMAPair(nn.Module):
    """An online module and its frozen EMA copy (MoCo key encoder, BYOL target);
    the copy's parameters are buffers of the optimiser's world: no gradients."""

    def __init__(self, online: nn.Module):
        super().__init__()
        self.online = online
        self.target = copy.deepcopy(online)
        deactivate_requires_grad(self.target)


class MomentumMethod(Method):
    """A method whose ``encoder`` is an EMAPair of nn.Sequential(backbone, projector): the pair
    is its momentum pair and the target's output is its loss-space embedding. Its config section
    has ``momentum`` (start) and ``momentum_final``, on BYOL's cosine schedule."""

    encoder: EMAPair

    @classmethod
    def configure(cls, cfg, d) -> None:
        super().configure(cfg, d)
        m = cfg.method
        check(0.0 <= m.momentum <= m.momentum_final <= 1.0, "method.momentum",
              "need 0 <= momentum <= momentum_final <= 1")

    def momentum_pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        return [(self.encoder.online, self.encoder.target)]

    def momentum_backbone(self) -> nn.Module:
        return self.encoder.target[0]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.target(x)
