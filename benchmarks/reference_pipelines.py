"""The reference pipelines the benchmarks compare ssl_sphere with: stock Kornia augmentation and
lightly's per-sample transforms + heads + losses in a DataLoader (as in lightly's examples and its
CIFAR-10 benchmark), for every ssl_sphere method: simclr, moco, byol, simsiam, mocov3 (composed from
lightly's parts: lightly has no MoCo v3), nnclr, dino, swav."""

from __future__ import annotations

import copy
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ssl_sphere.augment.ops import blur_kernel_size
from ssl_sphere.models.backbones import backbone_of


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    arr = images.permute(0, 2, 3, 1).contiguous().numpy()
    return [Image.fromarray(a) for a in arr]


def kornia_stock(a, size: int, mean, std, device) -> nn.Module:
    """Stock Kornia SimCLR views with default options. ColorJitter (not ColorJiggle) is kornia 0.9's
    class with torchvision's formulas (hue: HSV shift)."""
    import kornia.augmentation as K

    ops = [
        K.RandomResizedCrop((size, size), scale=tuple(a.crop_scale), ratio=tuple(a.crop_ratio)),
        K.RandomHorizontalFlip(p=a.hflip_p),
        K.ColorJitter(a.brightness, a.contrast, a.saturation, a.hue, p=a.jitter_p),
        K.RandomGrayscale(p=a.grayscale_p),
    ]
    if a.blur_p[0] > 0:
        k = blur_kernel_size(size)
        ops.append(K.RandomGaussianBlur((k, k), tuple(a.blur_sigma), p=a.blur_p[0]))
    ops.append(K.Normalize(torch.tensor(mean), torch.tensor(std)))
    return K.AugmentationSequential(*ops).to(device)


def _jitter(a, strength: float = 1.0) -> dict:
    """lightly's colour-jitter arguments for our strengths: lightly multiplies each by cj_strength."""
    return dict(cj_prob=a.jitter_p, cj_strength=strength, cj_bright=a.brightness / strength,
                cj_contrast=a.contrast / strength, cj_sat=a.saturation / strength, cj_hue=a.hue / strength)


def _same(what: str, ours, lightly_value) -> None:
    """Refuse a config that lightly's transform cannot express (rather than compare different views)."""
    if ours != lightly_value:
        raise ValueError(f"lightly's transform cannot express {what}={ours} (it has {lightly_value})")


def lightly_view_transform(method: str, a, size: int, mean, std):
    """lightly's per-sample view transform for ``method`` with the parameters of our aug config ``a``:
    a list of views per PIL image, the two global views first (then ``a.local_crops`` local crops
    for DINO).

    * simclr / moco / simsiam: SimCLRTransform / MoCoV2Transform / SimSiamTransform (one blur
      probability, no solarisation: our views of these methods are symmetric);
    * byol, mocov3, nnclr (BYOL's asymmetric views, BYOL Table 6): BYOLTransform with a
      BYOLView1Transform / BYOLView2Transform per view, each with its own blur and solarisation;
    * dino: DINOTransform (global views at ``size``, local crops at ``a.local_size``);
    * swav: SwaVTransform (the two views as its high-resolution crops).
    """
    from lightly.transforms import (
        BYOLTransform,
        DINOTransform,
        MoCoV2Transform,
        SimCLRTransform,
        SimSiamTransform,
        SwaVTransform,
    )
    from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform

    norm = {"mean": list(mean), "std": list(std)}
    common = dict(hf_prob=a.hflip_p, random_gray_scale=a.grayscale_p, sigmas=tuple(a.blur_sigma), normalize=norm)
    n_local = a.get("local_crops", 0) or 0
    if method == "dino":
        # DINOTransform gives cj_strength to its first global view and its local views but not to its second
        # global view, which keeps DINOViewTransform's default 0.5: strength 0.5 with our strengths doubled
        # gives every view our jitter. Its first global view and its local crops are never solarised.
        _same("aug.solarize_p[0]", a.solarize_p[0], 0.0)
        _same("aug.local_solarize_p", a.get("local_solarize_p", 0.0), 0.0)
        return DINOTransform(global_crop_size=size, global_crop_scale=tuple(a.crop_scale),
                             local_crop_size=a.get("local_size") or size,
                             local_crop_scale=tuple(a.local_crop_scale), n_local_views=n_local,
                             gaussian_blur=(a.blur_p[0], a.blur_p[1], a.local_blur_p),
                             solarization_prob=a.solarize_p[1], **_jitter(a, 0.5), **common)
    if n_local:
        raise ValueError(f"{method}: lightly's reference pipeline here takes two views (aug.local_crops=0)")
    if method == "swav":
        _same("aug.blur_p[1]", a.blur_p[1], a.blur_p[0])
        _same("aug.solarize_p", list(a.solarize_p), [0.0, 0.0])
        return SwaVTransform(crop_sizes=(size,), crop_counts=(2,), crop_min_scales=(a.crop_scale[0],),
                             crop_max_scales=(a.crop_scale[1],), gaussian_blur=a.blur_p[0], **_jitter(a),
                             **common)
    common.update(input_size=size, min_scale=a.crop_scale[0], **_jitter(a))
    if method in ("byol", "mocov3", "nnclr"):
        return BYOLTransform(
            view_1_transform=BYOLView1Transform(gaussian_blur=a.blur_p[0], solarization_prob=a.solarize_p[0], **common),
            view_2_transform=BYOLView2Transform(gaussian_blur=a.blur_p[1], solarization_prob=a.solarize_p[1], **common))
    _same("aug.blur_p[1]", a.blur_p[1], a.blur_p[0])
    _same("aug.solarize_p", list(a.solarize_p), [0.0, 0.0])
    cls = {"moco": MoCoV2Transform, "simsiam": SimSiamTransform}.get(method, SimCLRTransform)
    return cls(gaussian_blur=a.blur_p[0], **common)


# ----------------------------------------------------------------------------- lightly's methods
def _mocov3_ctr(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's ctr(q, k) (Algorithm 1), which lightly has no loss for: cross-entropy of the cosine
    logits q k^T / tau against the diagonal, times 2 tau (the reference code's scaling)."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    labels = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(q @ k.T / temperature, labels) * (2 * temperature)


class _Lightly(nn.Module):
    """One method as lightly's examples / CIFAR-10 benchmark write it. ``online``: nn.Sequential(backbone,
    projector / head), the trained encoder (its [0] is the backbone the quality benchmark scores);
    ``extra``: further trained modules (predictor, prototypes); ``target``: an EMA copy of ``online`` or
    None; ``loss(views, step, epoch)`` the method's loss of one batch of views;
    ``after_backward(epoch)`` what runs between backward and the optimiser step."""

    def __init__(self, online: nn.Module, extra: Optional[nn.Module] = None, ema: bool = False):
        super().__init__()
        self.online, self.extra = online, extra
        self.target = None
        if ema:
            from lightly.models.utils import deactivate_requires_grad

            self.target = copy.deepcopy(online)
            deactivate_requires_grad(self.target)

    def loss(self, views: List[torch.Tensor], step: int, epoch: int) -> torch.Tensor:
        raise NotImplementedError

    def after_backward(self, epoch: int) -> None:
        pass


class _SimCLR(_Lightly):
    def __init__(self, backbone, fdim, m):
        from lightly.loss import NTXentLoss
        from lightly.models.modules.heads import SimCLRProjectionHead

        super().__init__(nn.Sequential(backbone, SimCLRProjectionHead(fdim, m.proj_hidden_dim, m.proj_dim)))
        self.criterion = NTXentLoss(temperature=m.temperature)

    def loss(self, views, step, epoch):
        x0, x1 = views
        return self.criterion(self.online(x0), self.online(x1))


class _MoCo(_Lightly):
    def __init__(self, backbone, fdim, m):
        from lightly.loss import NTXentLoss
        from lightly.models.modules.heads import MoCoProjectionHead

        super().__init__(nn.Sequential(backbone, MoCoProjectionHead(fdim, m.proj_hidden_dim, m.proj_dim)), ema=True)
        self.criterion = NTXentLoss(temperature=m.temperature, memory_bank_size=(m.queue_size, m.proj_dim))
        self.symmetric = m.get("symmetric", True)

    def loss(self, views, step, epoch):
        x0, x1 = views
        q0 = self.online(x0)
        with torch.no_grad():
            k1 = self.target(x1)
        if not self.symmetric:
            return self.criterion(q0, k1)
        q1 = self.online(x1)
        with torch.no_grad():
            k0 = self.target(x0)
        return self.criterion(q0, k1) + self.criterion(q1, k0)


class _BYOL(_Lightly):
    def __init__(self, backbone, fdim, m):
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead

        super().__init__(nn.Sequential(backbone, BYOLProjectionHead(fdim, m.proj_hidden_dim, m.proj_dim)),
                         BYOLPredictionHead(m.proj_dim, m.pred_hidden_dim, m.proj_dim), ema=True)
        self.criterion = NegativeCosineSimilarity()

    def loss(self, views, step, epoch):
        x0, x1 = views
        p0, p1 = self.extra(self.online(x0)), self.extra(self.online(x1))
        with torch.no_grad():
            z0, z1 = self.target(x0), self.target(x1)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))


class _SimSiam(_Lightly):
    """lightly's CIFAR-10 benchmark SimSiamModel: a 2-layer projector (its last BN affine) on small images,
    SimSiamProjectionHead (3 layers) otherwise, SimSiamPredictionHead, NegativeCosineSimilarity against
    the detached projections; one SGD lr for everything (the predictor's lr decays with the rest)."""

    def __init__(self, backbone, fdim, m):
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules.heads import ProjectionHead, SimSiamPredictionHead, SimSiamProjectionHead

        if m.proj_layers == 3:
            projector = SimSiamProjectionHead(fdim, m.proj_hidden_dim, m.proj_dim)
        else:  # the benchmark's CIFAR head, generalised to proj_layers
            dims = [fdim] + [m.proj_hidden_dim] * (m.proj_layers - 1)
            blocks = [(d, m.proj_hidden_dim, nn.BatchNorm1d(m.proj_hidden_dim), nn.ReLU()) for d in dims[:-1]]
            projector = ProjectionHead(blocks + [(dims[-1], m.proj_dim, nn.BatchNorm1d(m.proj_dim), None)])
        super().__init__(nn.Sequential(backbone, projector),
                         SimSiamPredictionHead(m.proj_dim, m.pred_hidden_dim, m.proj_dim))
        self.criterion = NegativeCosineSimilarity()

    def loss(self, views, step, epoch):
        x0, x1 = views
        z0, z1 = self.online(x0), self.online(x1)
        p0, p1 = self.extra(z0), self.extra(z1)
        return 0.5 * (self.criterion(z0.detach(), p1) + self.criterion(z1.detach(), p0))


class _MoCoV3(_Lightly):
    """MoCo v3 (ResNet setting) from lightly's parts, lightly having no MoCo v3 model or loss: the
    projector and predictor as lightly ProjectionHead blocks (Linear without bias + BN + ReLU; projector
    ending in a BN without affine parameters, predictor in a plain Linear), EMA key encoder = copy of
    backbone + projector updated by lightly's update_momentum, loss ctr(q1, k2) + ctr(q2, k1)."""

    def __init__(self, backbone, fdim, m):
        from lightly.models.modules.heads import ProjectionHead

        h, d = m.proj_hidden_dim, m.proj_dim
        dims = [fdim] + [h] * (m.proj_layers - 1)
        proj = [(a, h, nn.BatchNorm1d(h), nn.ReLU()) for a in dims[:-1]]
        proj.append((dims[-1], d, nn.BatchNorm1d(d, affine=False), None, False))
        pred = [(d, m.pred_hidden_dim, nn.BatchNorm1d(m.pred_hidden_dim), nn.ReLU()),
                (m.pred_hidden_dim, d, None, None, False)]
        super().__init__(nn.Sequential(backbone, ProjectionHead(proj)), ProjectionHead(pred), ema=True)
        self.temperature = m.temperature

    def loss(self, views, step, epoch):
        x0, x1 = views
        q0, q1 = self.extra(self.online(x0)), self.extra(self.online(x1))
        with torch.no_grad():
            k0, k1 = self.target(x0), self.target(x1)
        return _mocov3_ctr(q0, k1, self.temperature) + _mocov3_ctr(q1, k0, self.temperature)


class _NNCLR(_Lightly):
    """lightly's NNCLR example: NNCLRProjectionHead, NNCLRPredictionHead, NNMemoryBankModule (the support
    set; updated with the second view's projections) and NTXentLoss, 0.5 * (NT-Xent(nn0, p1) + NT-Xent(nn1, p0))."""

    def __init__(self, backbone, fdim, m):
        from lightly.loss import NTXentLoss
        from lightly.models.modules import NNMemoryBankModule
        from lightly.models.modules.heads import NNCLRPredictionHead, NNCLRProjectionHead

        super().__init__(nn.Sequential(backbone, NNCLRProjectionHead(fdim, m.proj_hidden_dim, m.proj_dim)),
                         NNCLRPredictionHead(m.proj_dim, m.pred_hidden_dim, m.proj_dim))
        self.bank = NNMemoryBankModule(size=(m.queue_size, m.proj_dim))
        self.criterion = NTXentLoss(temperature=m.temperature)

    def loss(self, views, step, epoch):
        x0, x1 = views
        z0, z1 = self.online(x0), self.online(x1)
        p0, p1 = self.extra(z0), self.extra(z1)
        nn0 = self.bank(z0.detach(), update=False)
        nn1 = self.bank(z1.detach(), update=True)
        return 0.5 * (self.criterion(nn0, p1) + self.criterion(nn1, p0))


class _DINO(_Lightly):
    """lightly's DINO (its ImageNet ResNet-50 benchmark's step): DINOProjectionHead on student and teacher
    (the teacher a copy of the student), the global views through each network as one batch and the local
    crops as another, DINOLoss with its epoch-indexed teacher temperature, cancel_last_layer_gradients
    before the optimiser step, update_momentum of the teacher."""

    def __init__(self, backbone, fdim, m):
        import warnings

        from lightly.loss import DINOLoss
        from lightly.models.modules.heads import DINOProjectionHead

        with warnings.catch_warnings():  # lightly builds last_layer with the deprecated nn.utils.weight_norm
            warnings.filterwarnings("ignore", "`torch.nn.utils.weight_norm` is deprecated", FutureWarning)
            head = DINOProjectionHead(fdim, m.proj_hidden_dim, m.proj_dim, m.out_dim, batch_norm=m.batch_norm,
                                      freeze_last_layer=m.freeze_last_layer, norm_last_layer=m.norm_last_layer)
        # weight_norm's computed weight is a non-leaf tensor, which copy.deepcopy refuses (pytorch#103001);
        # it is recomputed from weight_g / weight_v before every forward, so a detached copy changes nothing
        head.last_layer.weight = head.last_layer.weight.detach()
        super().__init__(nn.Sequential(backbone, head), ema=True)
        self.criterion = DINOLoss(output_dim=m.out_dim, warmup_teacher_temp=m.warmup_teacher_temp,
                                  teacher_temp=m.teacher_temp, warmup_teacher_temp_epochs=m.warmup_teacher_temp_epochs,
                                  student_temp=m.student_temp, center_momentum=m.center_momentum)

    def loss(self, views, step, epoch):
        n = len(views)
        global_views = torch.cat(views[:2])
        with torch.no_grad():
            teacher = self.target(global_views).chunk(2)
        student = [self.online(global_views)] + ([self.online(torch.cat(views[2:]))] if n > 2 else [])
        return self.criterion(list(teacher), list(torch.cat(student).chunk(n)), epoch=epoch)

    def after_backward(self, epoch):
        self.online[1].cancel_last_layer_gradients(epoch)


class _SwAV(_Lightly):
    """lightly's SwaV example / CIFAR-10 benchmark: SwaVProjectionHead, SwaVPrototypes (normalised at the
    start of every step; frozen for the first freeze_prototypes_epochs epochs through its
    n_steps_frozen_prototypes), one backbone forward per view, SwaVLoss over the two high-resolution views."""

    def __init__(self, backbone, fdim, m, steps_per_epoch: int):
        from lightly.loss import SwaVLoss
        from lightly.models.modules.heads import SwaVProjectionHead, SwaVPrototypes

        frozen = int(round(m.freeze_prototypes_epochs * steps_per_epoch))
        super().__init__(nn.Sequential(backbone, SwaVProjectionHead(fdim, m.proj_hidden_dim, m.proj_dim)),
                         SwaVPrototypes(m.proj_dim, m.n_prototypes, n_steps_frozen_prototypes=frozen))
        self.criterion = SwaVLoss(temperature=m.temperature, sinkhorn_iterations=m.sinkhorn_iterations,
                                  sinkhorn_epsilon=m.epsilon)

    def loss(self, views, step, epoch):
        self.extra.normalize()
        out = [self.extra(F.normalize(self.online(x), dim=1), step) for x in views]
        return self.criterion(out[:2], out[2:])


LIGHTLY_METHODS = {"simclr": _SimCLR, "moco": _MoCo, "byol": _BYOL, "simsiam": _SimSiam, "mocov3": _MoCoV3,
                   "nnclr": _NNCLR, "dino": _DINO, "swav": _SwAV}


class LightlyStep:
    """lightly's reference pipeline: per-sample transforms in DataLoader workers, lightly heads,
    losses and update_momentum (as in lightly's examples), same backbone and optimiser settings.

    ``online[0]`` is the backbone; ``total`` the number of steps the EMA momentum's cosine runs over;
    ``steps_per_epoch`` (default: the loader's length) turns steps into the epochs of DINO's teacher
    temperature, DINO's last-layer freeze and SwAV's prototype freeze."""

    def __init__(self, cfg, images: torch.Tensor, mean, std, device: torch.device, n_batches: int, workers: int,
                 steps_per_epoch: Optional[int] = None):
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        m = cfg.method
        if m.name not in LIGHTLY_METHODS:
            raise ValueError(f"no lightly reference pipeline for {m.name!r}; have {', '.join(LIGHTLY_METHODS)}")
        self.name, self.device = m.name, device
        self.update_momentum, self.cosine_schedule = update_momentum, cosine_schedule
        self.steps_per_epoch = steps_per_epoch or n_batches
        backbone, fdim = backbone_of(cfg.model, cfg.data.image_size)
        args = (self.steps_per_epoch,) if m.name == "swav" else ()
        self.model = LIGHTLY_METHODS[m.name](backbone, fdim, m, *args).to(device)
        self.online, self.target = self.model.online, self.model.target
        params = list(self.online.parameters()) + (list(self.model.extra.parameters()) if self.model.extra else [])
        self.optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                         weight_decay=cfg.optim.weight_decay)
        self.m0, self.m1 = m.get("momentum"), m.get("momentum_final")  # momentum methods only
        self.total = 1000
        self.step_i = 0

        transform = lightly_view_transform(m.name, cfg.aug, cfg.data.image_size, mean, std)
        pil = to_pil(images[: n_batches * cfg.optim.batch_size])
        self.loader = torch.utils.data.DataLoader(
            _PILDataset(pil, transform), batch_size=cfg.optim.batch_size, shuffle=True, drop_last=True,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")
        self.it = iter(self.loader)

    def __call__(self) -> None:
        try:
            views, _ = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            views, _ = next(self.it)
        views = [v.to(self.device, non_blocking=True) for v in views]
        epoch = self.step_i // self.steps_per_epoch
        self.last_loss = loss = self.model.loss(views, self.step_i, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.model.after_backward(epoch)
        self.optimizer.step()
        if self.target is not None:
            momentum = self.cosine_schedule(self.step_i, self.total, self.m0, self.m1)
            self.update_momentum(self.online, self.target, momentum)
        self.step_i += 1


class _PILDataset(torch.utils.data.Dataset):
    def __init__(self, images: list, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), 0
