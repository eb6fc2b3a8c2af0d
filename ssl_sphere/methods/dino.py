"""DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021): a student
(backbone + DINO head) trained to predict, with a cross-entropy over K prototypes, the centred and sharpened
output of its EMA teacher on another view; SEC on the student's raw bottleneck outputs; SEE as synthetic
points around the prototypes.

The step follows the authors' code (facebookresearch/dino, main_dino.py): the views of one resolution go
through the backbone as one batch (its MultiCropWrapper), the teacher sees the first ``N_GLOBAL`` (global)
views, the loss is the mean over every (teacher view t, student view s != t) pair of the cross-entropy
averaged over the batch (Sec. 3.1, Eq. 3), then the centre is updated with the batch mean of the teacher
outputs over all ranks (Eq. 4). More views (multi-crop) only lengthen the list of views.

Why not lightly's DINOLoss (lightly 1.6): its einsum runs in bf16 under autocast (the project computes
logits and cross-entropies in float32, ssl_sphere.core.numerics), it updates the centre on every call,
evaluation forwards included, and it does not return the teacher distribution that ``code_entropy`` needs
(a second softmax over (V*B, K) otherwise). The pure functions below are tested against it
(tests/test_method_dino.py). lightly's DINOProjectionHead is used as it is: its MLP, initialisation,
weight-normalised ``last_layer``, ``norm_last_layer`` and ``cancel_last_layer_gradients``; its forward is
not called, because it hides the bottleneck that SEC acts on: ``head.layers`` gives the raw bottleneck and
``prototype_logits`` the head's last two steps (L2 normalisation, prototypes), equal to its forward.

SEE (Le, Woo, PAKDD 2024) in DINO. SEE expands a confident sample into synthetic embeddings on the ring of
its cosine to its class proxy and adds them, as further samples of that class, to the proxy loss; being
built from detached embeddings they train the proxies only. DINO's prototypes (the weight-normalised last
layer) are such proxies and the teacher's assignment is the class: for every pair (teacher view t,
student view s != t), the student's unit bottleneck of view s (detached) is expanded around the
prototype the teacher of view t gives the highest probability, for the share of samples closest to
their prototype, and the synthetic points enter DINO's own cross-entropy with that sample's teacher
distribution as target. Their gradient reaches the prototypes only (weight_v, and weight_g where
norm_last_layer is off); frozen with the last layer in the first epochs like the rest of it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import DINOProjectionHead
from torch import nn

from ..config import VIT_CHOICES
from ..core import dist
from ..core.numerics import float32
from ..sphere.stats import code_entropy
from .base import EMAPair, MomentumMethod, StepOutput, asymmetric_views, check, encode_views, register
from .losses import see_prototype_points

N_GLOBAL = 2  # [paper] the two global views the teacher sees (main_dino.py: teacher(images[:2]))


@dataclass
class DINOConfig:
    """DINO (Caron et al. 2021): DINO head on student and EMA teacher, centring and sharpening of the
    teacher, cross-entropy between views. [paper]: the paper (Sec. 3.1 / 3.2) and its code (main_dino.py)."""

    name: str = "dino"  # --method dino
    proj_hidden_dim: int = 2048  # [paper] DINOHead: 3-layer MLP, hidden 2048
    proj_dim: int = 256  # [paper] bottleneck_dim 256: the raw embeddings SEC / vMF act on
    out_dim: int = 4096  # [solo] prototypes K of its CIFAR recipe; [paper] --out_dim 65536 on ImageNet
    # BN in the head's MLP; None: for convnets, not for ViTs ([paper] Sec. 3.1: with ViTs "we do not use any BN
    # also in the projection heads", main_dino.py --use_bn_in_head; lightly's CIFAR-10 ResNet head has BN)
    batch_norm: Optional[bool] = None
    norm_last_layer: bool = True  # [paper] --norm_last_layer true: prototype gains weight_g fixed at 1
    freeze_last_layer: int = 1  # [paper] --freeze_last_layer 1: epochs in which the prototypes get no update
    student_temp: float = 0.1  # [paper] Sec. 3.2: tau_s 0.1
    teacher_temp: float = 0.07  # [paper] Sec. 3.2: tau_t after its warm-up (0.07)
    warmup_teacher_temp: float = 0.04  # [paper] Sec. 3.2: tau_t at epoch 0 (0.04) ...
    warmup_teacher_temp_epochs: int = 30  # [paper] ... linear to teacher_temp over the first 30 epochs
    center_momentum: float = 0.9  # [paper] m of Eq. 4 (main_dino.py DINOLoss center_momentum 0.9)
    momentum: float = 0.996  # [paper] Sec. 3.1: teacher EMA lambda from 0.996 ...
    momentum_final: float = 1.0  # [paper] ... to 1 along a cosine


# ----------------------------------------------------------------------------- pure functions
def teacher_temperature(epoch: float, start: float, end: float, warmup_epochs: int) -> float:
    """tau_t in epoch ``epoch`` (a float, step / steps per epoch): main_dino.py's schedule, i.e.
    np.linspace(start, end, warmup_epochs) indexed by the whole epoch, then ``end``. A run shorter than
    the warm-up ends inside it (the authors' code refuses such a run)."""
    e = int(epoch)
    if e >= warmup_epochs:
        return end
    return start + (end - start) * e / max(warmup_epochs - 1, 1)


@float32
def prototype_logits(z: torch.Tensor, weight_v: torch.Tensor, weight_g: torch.Tensor) -> torch.Tensor:
    """The DINO head after its MLP: L2 normalisation, then the weight-normalised prototype layer.

    z: (N, D) raw bottleneck outputs; weight_v: (K, D), weight_g: (K, 1) the prototypes as
    nn.utils.weight_norm keeps them (W = g v / ||v||) -> (N, K) float32 logits (cosines times g)."""
    return F.normalize(z.float(), dim=-1) @ (weight_g.float() * F.normalize(weight_v.float(), dim=1)).T


@float32
def teacher_distribution(logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """Centring and sharpening (Sec. 3.1): softmax((g_t(x) - c) / tau_t), rows (..., K).

    logits: (..., K) teacher prototype logits; center: (1, K)."""
    return F.softmax((logits.float() - center) / temperature, dim=-1)


def _pairs(t: int, s: int) -> List[Tuple[int, int]]:
    """The (teacher view, student view) pairs of the loss: every pair of different views (Eq. 3)."""
    return [(i, j) for i in range(t) for j in range(s) if i != j]


def _cross_entropy(p: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """-sum_k p log q, mean over the rows. p, logp: (N, K)."""
    return -(p * logp).sum(-1).mean()


@float32
def dino_loss(teacher_probs: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """DINO's multi-view cross-entropy (Eq. 3; main_dino.py DINOLoss.forward): the mean over the pairs
    (t, s != t) of H(P_t, P_s), each a mean over the batch.

    teacher_probs: (T, B, K) centred, sharpened teacher distributions of the T global views;
    student_logits: (S, B, K) prototype logits of all S views, the T global ones first, in the same order."""
    logp = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    p = teacher_probs.float().detach()
    terms = [_cross_entropy(p[i], logp[j]) for i, j in _pairs(p.shape[0], logp.shape[0])]
    return torch.stack(terms).mean()


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """Eq. 4: c <- m c + (1 - m) mean of the teacher logits over the global batch: summed and counted
    over every rank (one all-reduce, main_dino.py update_center), so 2 ranks of B give the centre of one
    process with 2B. center: (1, K); teacher_logits: (N, K) this rank's, all its global views."""
    t = teacher_logits.float()
    stats = dist.all_reduce_sum(torch.cat([t.sum(0), t.new_full((1,), float(t.shape[0]))]))
    return center * momentum + (stats[:-1] / stats[-1]) * (1.0 - momentum)


@float32
def dino_see_loss(z: torch.Tensor, teacher_probs: torch.Tensor, weight_v: torch.Tensor,
                       weight_g: torch.Tensor, n: int, fraction: float, student_temp: float) -> torch.Tensor:
    """SEE around the prototypes (module docstring): for every pair (t, s != t), the ``fraction`` of the
    samples whose unit student bottleneck of view s is closest to its teacher prototype (argmax of view
    t's distribution) is expanded into n synthetic points around that prototype; their cross-entropy
    against the sample's teacher distribution, mean over points and pairs, trains the prototypes only.

    z: (S, B, D) raw student bottlenecks; teacher_probs: (T, B, K); weight_v, weight_g: the prototypes."""
    protos = F.normalize((weight_g * weight_v).detach().float(), dim=1)  # (K, D) prototype directions
    terms = []
    for i, j in _pairs(teacher_probs.shape[0], z.shape[0]):
        with torch.no_grad():
            synth, chosen = see_prototype_points(z[j], protos[teacher_probs[i].argmax(1)], n, fraction)
            target = teacher_probs[i][chosen].float().repeat_interleave(n, 0)
        logp = F.log_softmax(prototype_logits(synth, weight_v, weight_g) / student_temp, dim=-1)
        terms.append(_cross_entropy(target, logp))
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------- the method
@register
class DINO(MomentumMethod):
    Config = DINOConfig
    weight_keys = ("proj_hidden_dim", "proj_dim", "out_dim", "batch_norm", "norm_last_layer")
    sec_target = ("the student's raw bottleneck outputs of every view (before the L2 normalisation that precedes "
                  "the prototypes)")
    see_unsupported = None
    multi_crop = True  # local crops after the two global views: student only, every pair in the loss (Eq. 3)
    base_lr_adamw = 2.5e-4  # [paper] Sec. 4.2 / main_dino.py: lr = 0.0005 x B / 256 under AdamW
    weight_decay_adamw = 0.04  # [paper] Sec. 4.2 / main_dino.py: 0.04 (cosine to 0.4 in the recipes)

    @classmethod
    def configure(cls, cfg, d) -> None:
        # the authors' DataAugmentationDINO is BYOL's on the two global views (blur 1.0 / 0.1, solarisation
        # 0 / 0.2); no blur at <= 64 px, as lightly's CIFAR-10 DINO benchmark (gaussian_blur=(0, 0, 0))
        asymmetric_views(cfg, d, "DINO (DataAugmentationDINO)")
        super().configure(cfg, d)
        vit = cfg.model.backbone in VIT_CHOICES
        d.fill("method.batch_norm", not vit, "DINO Sec. 3.1: " + ("no BN in the head of a ViT (a BN-free system)"
                                                                 if vit else "BN in the head of a convnet"))
        m = cfg.method
        check(m.student_temp > 0, "method.student_temp", "must be > 0")
        check(m.teacher_temp > 0, "method.teacher_temp", "must be > 0")
        check(m.warmup_teacher_temp > 0, "method.warmup_teacher_temp", "must be > 0")
        check(m.warmup_teacher_temp_epochs >= 0, "method.warmup_teacher_temp_epochs", "must be >= 0")
        check(m.freeze_last_layer >= 0, "method.freeze_last_layer", "must be >= 0 (epochs; 0: never frozen)")
        check(0.0 <= m.center_momentum <= 1.0, "method.center_momentum", "must be in [0, 1]")
        check(m.out_dim >= 2, "method.out_dim", "needs at least 2 prototypes")

    def __init__(self, backbone, feature_dim, cfg, see=None):
        super().__init__(backbone, feature_dim, cfg, see)
        with warnings.catch_warnings():  # lightly 1.6 builds last_layer with the deprecated nn.utils.weight_norm:
            warnings.filterwarnings("ignore", "`torch.nn.utils.weight_norm` is deprecated", FutureWarning)  # not ours
            head = DINOProjectionHead(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.out_dim,
                                      batch_norm=cfg.batch_norm, freeze_last_layer=cfg.freeze_last_layer,
                                      norm_last_layer=cfg.norm_last_layer)
        # nn.utils.weight_norm keeps its last computed weight as a non-leaf attribute, which copy.deepcopy
        # refuses (pytorch#103001); it is recomputed from weight_g / weight_v on every call of the layer
        # (this method never calls it: prototype_logits reads weight_g / weight_v), so a detached copy is the same
        head.last_layer.weight = head.last_layer.weight.detach()
        self.encoder = EMAPair(nn.Sequential(backbone, head))  # online: the student; target: the teacher
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))  # Eq. 4 (checkpointed)

    @property
    def loss_directions(self) -> int:
        return 1  # dino_loss averages over its view pairs

    # ------------------------------------------------------------------ forward pieces
    @staticmethod
    def _bottleneck(net: nn.Sequential, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """(V*B, D) raw bottleneck outputs of ``net`` = (backbone, DINO head) for the views, view blocks
        stacked: one backbone batch per run of views of one resolution, then the head's MLP on all of them
        (the authors' MultiCropWrapper: the global views share the backbone's BN statistics)."""
        return net[1].layers(encode_views(net[0], views))

    @staticmethod
    def _logits(net: nn.Sequential, z: torch.Tensor) -> torch.Tensor:
        last = net[1].last_layer
        return prototype_logits(z, last.weight_v, last.weight_g)

    def forward(self, views: Sequence[torch.Tensor]) -> StepOutput:
        """views: S >= 2 (B, 3, H, W) views, the N_GLOBAL global views first. embeddings: (S*B, proj_dim)
        raw student bottlenecks."""
        student, teacher, c = self.encoder.online, self.encoder.target, self.cfg
        s, b = len(views), views[0].shape[0]
        z = self._bottleneck(student, views)
        student_logits = self._logits(student, z).unflatten(0, (s, b))
        with torch.no_grad():
            global_views = views[:N_GLOBAL]
            teacher_logits = self._logits(teacher, self._bottleneck(teacher, global_views))  # (T*B, K)
            temp = teacher_temperature(self.epoch, c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs)
            probs = teacher_distribution(teacher_logits, self.center, temp).unflatten(0, (len(global_views), b))
        loss = dino_loss(probs, student_logits, c.student_temp)
        logs = {"code_entropy": code_entropy(probs.flatten(0, 1)), "teacher_temp": torch.tensor(temp)}
        frac = self.see_fraction()
        if frac > 0:
            last = student[1].last_layer
            see_loss = dino_see_loss(z.unflatten(0, (s, b)), probs, last.weight_v, last.weight_g, self.see.n,
                                          frac, c.student_temp)
            loss = loss + self.see.weight * see_loss
            logs["see_loss"] = see_loss.detach()
        if self.training:  # after the loss, as the authors' code: this step's targets used the old centre
            self.center.copy_(update_center(self.center, teacher_logits, c.center_momentum))
        return StepOutput(loss, z, logs, views=s)

    def before_optimizer_step(self) -> None:
        # [paper] --freeze_last_layer: no update of the prototypes while epoch < freeze_last_layer (lightly's
        # cancel_last_layer_gradients sets their .grad to None, so the optimiser skips them, decay included)
        self.encoder.online[1].cancel_last_layer_gradients(self.epoch)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, proj_dim) the teacher's raw bottleneck outputs (vMF)."""
        return self._bottleneck(self.encoder.target, [x])
