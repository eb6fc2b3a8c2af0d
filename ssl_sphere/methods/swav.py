"""SwAV (Caron et al., NeurIPS 2020): online codes by Sinkhorn-Knopp over unit prototypes, swapped
prediction of one view's code from the other view's prototype scores; the optional queue of past
projections for small batches. SEC on both views' projector outputs (before the L2 normalisation
that precedes the prototypes); SEE as synthetic points around each sample's assigned prototype,
which train the prototypes (its proxies).

Follows the authors' code (facebookresearch/swav, main_swav.py) where lightly differs:
* prototypes: a bias-free linear layer whose weight rows are L2-normalised before every forward
  (here: at construction and after every optimiser step, the same weights at every forward), not
  lightly's SwaVPrototypes: its nn.Linear has a bias (the scores are then no cosines) and it
  freezes by a step count passed to its forward (here: epochs, in before_optimizer_step);
* the loss: codes and swapped prediction written here, in float32 with autocast off, not lightly's
  SwaVLoss: that computes in the autocast dtype (exp(score / 0.05) of bf16 scores), all-reduces
  through torch.distributed itself (here: core.dist) and does not return the codes, which
  code_entropy and SEE need; tests/test_method_swav.py checks the two equal;
* both views go through the backbone as one batch (BN statistics over both), as the authors'
  forward does for crops of one resolution (lightly's benchmark runs one forward per view);
* multi-crop (Sec. 3.2) as the authors': the two global views are encoded as one batch, each group
  of local crops as another; codes only for the global views (crops_for_assign 0 1), predictions
  for every view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import SwaVProjectionHead
from torch import nn

from ..core import dist
from ..core.numerics import float32
from ..sphere.stats import code_entropy
from .base import Method, StepOutput, check, encode_views, register
from .losses import identity, see_prototype_points
from .queue import NegativeQueue

Reduce = Callable[[torch.Tensor], torch.Tensor]
VIEWS = 2  # the global views, whose codes are computed (crops_for_assign 0 1), one queue each


@dataclass
class SwAVConfig:
    """SwAV (Caron et al. 2020) with the authors' ImageNet defaults (main_swav.py)."""

    name: str = "swav"  # --method swav
    temperature: float = 0.1  # [paper] Sec. 3.1 Eq. 2 tau (main_swav.py 0.1); [solo] [lightly] too
    proj_hidden_dim: int = 2048  # [paper] hidden_mlp 2048 (projector 2048-2048-128); [solo] CIFAR; lightly's CIFAR: 512
    proj_dim: int = 128  # [paper] feat_dim 128; [solo] [lightly]
    n_prototypes: int = 3000  # [paper] nmb_prototypes 3000; [solo] CIFAR 3000; lightly's CIFAR benchmark: 512
    sinkhorn_iterations: int = 3  # [paper] Sec. 3.1 "3 iterations"; [lightly] [solo]
    epsilon: float = 0.05  # [paper] Sec. 3.1 Eq. 3 entropy weight (main_swav.py 0.05); [lightly] [solo]
    # [paper] queue_length 0: no queue; for small batches (Sec. 3.1 "Working with small batches") the authors'
    # batch-256 scripts keep 3840 projections ([solo] CIFAR: 3840)
    queue_size: int = 0
    queue_start_epoch: float = 15.0  # [paper] epoch_queue_starts 15 (queue filled from then, used once full)
    # [paper] freeze_prototypes_niters 313 at batch 4096 (5005 at batch 256): one ImageNet epoch; in epochs here
    # (prototype gradients dropped while step / steps_per_epoch < this), as [solo] freeze_prototypes_epochs 1
    freeze_prototypes_epochs: float = 1.0


# ----------------------------------------------------------------------------- pure functions
@torch.no_grad()
def sinkhorn(scores: torch.Tensor, iterations: int = 3, epsilon: float = 0.05,
             all_reduce: Reduce = identity) -> torch.Tensor:
    """Codes by Sinkhorn-Knopp (SwAV Sec. 3.1, Eq. 3; distributed_sinkhorn of main_swav.py).

    scores: (N, K) cosines of this rank's N samples to the K prototypes; all_reduce: sums a tensor
    over ranks (identity in one process), so the N of every rank are one assignment problem.
    Returns (N, K) float32 codes: each sample's row sums to 1, each prototype's column to about
    N_total / K (equipartition; exact in the limit of iterations). The reference's extra scalings
    (rows by 1 / K, columns by 1 / B, the final x B) are uniform factors that the next
    normalisation cancels: dropped, so no rank needs the global sample count (lightly drops 1 / K
    too). Plain exp(s / epsilon) as the reference: |s| <= 1 keeps it finite in float32 for
    epsilon >= 0.02."""
    q = torch.exp(scores.float() / epsilon).T  # (K, N)
    q = q / all_reduce(q.sum())
    for _ in range(iterations):
        q = q / all_reduce(q.sum(dim=1, keepdim=True))  # each prototype: total mass 1 over all ranks
        q = q / q.sum(dim=0, keepdim=True)  # each sample: mass 1
    return q.T


@float32
def swav_loss(z: torch.Tensor, prototypes: torch.Tensor, views: int, temperature: float = 0.1,
              iterations: int = 3, epsilon: float = 0.05, queue: Optional[torch.Tensor] = None,
              all_reduce: Reduce = identity, assign: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Swapped prediction (SwAV Eq. 1-2; main_swav.py), the MEAN over the views whose codes are
    predicted and, for each, over the other views.

    z: (V*B, D) raw projector outputs, view blocks stacked (normalised here); prototypes: (K, D)
    weight (unit rows); assign: the first ``assign`` views get codes (default all V; multi-crop: the 2
    global views, crops_for_assign, and every other view predicts them); queue: (assign, Q, D) unit
    projections of past batches, one queue per assigned view, used only to compute that view's codes
    (Sec. 3.1, "Working with small batches"); all_reduce: as in sinkhorn. Returns (loss, codes) with
    codes (assign*B, K), detached."""
    assign = views if assign is None else assign
    b = z.shape[0] // views
    w = prototypes.float()
    scores = (F.normalize(z.float(), dim=1) @ w.T).view(views, b, -1)  # (V, B, K)
    with torch.no_grad():
        codes = []
        for i in range(assign):
            s = scores[i].detach()
            if queue is not None:
                s = torch.cat([s, queue[i].float() @ w.T])
            codes.append(sinkhorn(s, iterations, epsilon, all_reduce)[:b])
    logp = F.log_softmax(scores / temperature, dim=2)
    loss = z.new_zeros((), dtype=torch.float32)
    for i in range(assign):
        cross = sum(-(codes[i] * logp[v]).sum(1).mean() for v in range(views) if v != i)
        loss = loss + cross / (views - 1)
    return loss / assign, torch.cat(codes)


@float32
def swav_see_loss(z: torch.Tensor, prototypes: torch.Tensor, assigned: torch.Tensor, n: int, fraction: float,
                       temperature: float) -> torch.Tensor:
    """SEE with the prototypes as proxies: around each confident sample's assigned prototype, n
    synthetic unit points with the sample's cosine to it (see_expand); detached, they are
    classified over all prototypes at ``temperature`` with their anchor as the class, which
    trains the prototypes only (as SEE trains the proxies of a proxy loss).

    z: (B, D) raw projections (detached here); prototypes: (K, D) unit rows; assigned: (B,) index
    of each sample's prototype; fraction: share of the B samples expanded (most confident)."""
    with torch.no_grad():
        synth, chosen = see_prototype_points(z, prototypes.detach().float()[assigned], n, fraction)
        target = assigned[chosen].repeat_interleave(n)
    return F.cross_entropy(synth @ prototypes.float().T / temperature, target)


# ----------------------------------------------------------------------------- the method
@register
class SwAV(Method):
    Config = SwAVConfig
    weight_keys = ("proj_hidden_dim", "proj_dim", "n_prototypes", "queue_size")
    sec_target = "the projector outputs of both views, before the L2 normalisation that precedes the prototypes"
    see_unsupported = None
    multi_crop = True  # local crops after the two global views: predictions only (crops_for_assign 0 1)

    @classmethod
    def configure(cls, cfg, d) -> None:
        super().configure(cfg, d)
        m = cfg.method
        check(m.n_prototypes >= 2, "method.n_prototypes", "needs at least 2 prototypes")
        check(m.sinkhorn_iterations >= 1, "method.sinkhorn_iterations", "must be >= 1")
        check(m.epsilon >= 0.02, "method.epsilon", "must be >= 0.02: below, the sum of exp(score / epsilon) over a "
              "batch can overflow float32 (SwAV uses 0.05)")
        check(m.queue_size >= 0, "method.queue_size", "must be >= 0 (0: no queue)")
        check(m.queue_start_epoch >= 0, "method.queue_start_epoch", "must be >= 0")
        check(m.freeze_prototypes_epochs >= 0, "method.freeze_prototypes_epochs", "must be >= 0")

    @classmethod
    def derive(cls, cfg, d, machine) -> None:
        per_step = cfg.optim.batch_size * machine.world
        check(cfg.method.queue_size == 0 or cfg.method.queue_size >= per_step, "method.queue_size",
              f"must hold at least the projections of one step ({per_step} = batch x {machine.world} processes), "
              "or be 0 (no queue); raise it or lower the batch")

    def __init__(self, backbone, feature_dim, cfg, see=None):
        super().__init__(backbone, feature_dim, cfg, see)
        self.projector = SwaVProjectionHead(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.prototypes = nn.Linear(cfg.proj_dim, cfg.n_prototypes, bias=False)  # the reference's, bias-free
        self.normalize_prototypes()
        # the queue of the reference, global here: every rank holds the gathered projections of all ranks
        # (NegativeQueue), and rank r uses rows r::world when computing codes, so the ranks together use
        # each row once, as the reference's per-rank queues of queue_length / world rows; it keeps its size
        # when a checkpoint moves to another number of processes. Ring buffer instead of the reference's
        # shift: the same rows once full, in another order, which the codes do not depend on.
        self.queue = nn.ModuleList([NegativeQueue(cfg.queue_size, cfg.proj_dim) for _ in range(VIEWS)]) \
            if cfg.queue_size > 0 else None
        # rows written since the queue started (saturates at queue_size): the reference uses the queue only
        # once full (its last row non-zero); _filled mirrors it on the host (None: read the buffer once)
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self._filled: Optional[int] = None

    # ------------------------------------------------------------------ prototypes
    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Unit prototype rows: the reference normalises them before every forward; here at construction
        and after every optimiser step (after_step), so every forward sees unit rows as there."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def before_optimizer_step(self) -> None:
        """Prototypes frozen for the first freeze_prototypes_epochs epochs: the reference drops their
        gradients while iteration < freeze_prototypes_niters, i.e. niters = epochs x steps per epoch
        (no momentum or weight-decay update either: the optimiser skips a parameter without grad)."""
        if self.epoch < self.cfg.freeze_prototypes_epochs:
            self.prototypes.weight.grad = None

    def after_step(self, progress: float) -> None:
        super().after_step(progress)
        self.normalize_prototypes()

    # ------------------------------------------------------------------ queue
    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._filled = None  # the loaded buffer is the truth now

    def _queue_on(self) -> bool:
        return self.queue is not None and self.epoch >= self.cfg.queue_start_epoch

    def _queue_full(self) -> bool:
        if self._filled is None:
            self._filled = int(self.queue_filled)  # one sync, then the host mirror
        return self._filled >= self.cfg.queue_size

    def queue_share(self) -> Optional[torch.Tensor]:
        """(V, Q_r, D) this rank's share of the queue (rows rank::world) once the queue is on and full,
        else None."""
        if not (self._queue_on() and self._queue_full()):
            return None
        r, w = dist.rank(), dist.world_size()
        return torch.stack([q.keys[r::w] for q in self.queue])

    @torch.no_grad()
    def _enqueue(self, z: torch.Tensor) -> None:
        """z: (V*B, D) raw projections of this rank; each view's block goes into its queue (gathered
        over ranks, normalised by NegativeQueue)."""
        for q, block in zip(self.queue, z.detach().chunk(VIEWS)):
            q.enqueue(block)
        self._queue_full()  # the mirror is current
        self._filled = min(self.cfg.queue_size, self._filled + z.shape[0] // VIEWS * dist.world_size())
        self.queue_filled.fill_(self._filled)

    # ------------------------------------------------------------------ the step
    def swapped_prediction(self, z: torch.Tensor, views: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """z: (V*B, D) raw projections of this rank -> (loss, (2B, K) codes of the global views), with the
        queue where it is on and full and Sinkhorn's sums over all ranks."""
        c = self.cfg
        return swav_loss(z, self.prototypes.weight, views, c.temperature, c.sinkhorn_iterations, c.epsilon,
                         self.queue_share(), dist.all_reduce_sum, assign=VIEWS)

    def forward(self, views: Sequence[torch.Tensor]) -> StepOutput:
        """views: the two global (B, 3, H, W) views, then any local crops (multi-crop, Sec. 3.2): views of
        one resolution through the backbone as one batch, as the reference. embeddings: (V*B, proj_dim)
        raw projector outputs."""
        z = self.projector(encode_views(self.backbone, views))
        loss, codes = self.swapped_prediction(z, len(views))
        # the collapse monitor's code entropy from the prototype predictions: Sinkhorn's codes are
        # equipartitioned by construction and would hide a collapse
        with torch.no_grad():
            scores = F.normalize(z.detach().float(), dim=1) @ self.prototypes.weight.detach().float().T
            logs = {"code_entropy": code_entropy(F.softmax(scores / self.cfg.temperature, dim=1))}
        frac = self.see_fraction()
        if frac > 0:
            see_loss = sum(self._see_terms(z, codes, frac))
            loss = loss + self.see.weight * see_loss
            logs["see_loss"] = see_loss.detach()
        if self.training and self._queue_on():
            self._enqueue(z[: codes.shape[0]])  # the global views' projections
        return StepOutput(loss, z, logs, views=len(views))

    def _see_terms(self, z: torch.Tensor, codes: torch.Tensor, frac: float) -> List[torch.Tensor]:
        """SEE around the prototype each view is asked to predict (the argmax of the other view's
        code), summed over the two directions as MoCo's and SimCLR's SEE terms."""
        zs, assigned = z[: codes.shape[0]].chunk(VIEWS), [c.argmax(1) for c in codes.chunk(VIEWS)]
        w, n, t = self.prototypes.weight, self.see.n, self.cfg.temperature
        return [swav_see_loss(zs[v], w, assigned[i], n, frac, t)
                for i in range(VIEWS) for v in range(VIEWS) if v != i]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))
