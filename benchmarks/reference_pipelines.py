"""The reference pipelines the benchmarks compare ssl_sphere with: stock Kornia augmentation and
lightly's per-sample transforms + heads + losses in a DataLoader (as in lightly's examples)."""

from __future__ import annotations

import copy

import torch
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


def lightly_view_transform(method: str, a, size: int, mean, std):
    """lightly's per-sample two-view transform for ``method`` with the parameters of our aug config."""
    from lightly.transforms import BYOLTransform, MoCoV2Transform, SimCLRTransform
    from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform

    common = dict(input_size=size, cj_prob=a.jitter_p, cj_strength=1.0, cj_bright=a.brightness,
                  cj_contrast=a.contrast, cj_sat=a.saturation, cj_hue=a.hue, min_scale=a.crop_scale[0],
                  random_gray_scale=a.grayscale_p, sigmas=tuple(a.blur_sigma), hf_prob=a.hflip_p,
                  normalize={"mean": list(mean), "std": list(std)})
    if method == "byol":
        return BYOLTransform(
            view_1_transform=BYOLView1Transform(gaussian_blur=a.blur_p[0], solarization_prob=a.solarize_p[0], **common),
            view_2_transform=BYOLView2Transform(gaussian_blur=a.blur_p[1], solarization_prob=a.solarize_p[1], **common))
    cls = MoCoV2Transform if method == "moco" else SimCLRTransform
    return cls(gaussian_blur=a.blur_p[0], **common)



class LightlyStep:
    """lightly's reference pipeline: per-sample transforms in DataLoader workers, lightly heads,
    losses and update_momentum (as in lightly's examples), same backbone and optimiser settings."""

    def __init__(self, cfg, images: torch.Tensor, mean, std, device: torch.device, n_batches: int, workers: int):
        from lightly.loss import NegativeCosineSimilarity, NTXentLoss
        from lightly.models.modules.heads import (
            BYOLPredictionHead,
            BYOLProjectionHead,
            MoCoProjectionHead,
            SimCLRProjectionHead,
        )
        from lightly.models.utils import deactivate_requires_grad, update_momentum
        from lightly.utils.scheduler import cosine_schedule

        m = cfg.method
        self.name, self.device = m.name, device
        self.update_momentum, self.cosine_schedule = update_momentum, cosine_schedule
        backbone, fdim = backbone_of(cfg.model, cfg.data.image_size)
        if m.name == "simclr":
            self.online = nn.Sequential(backbone, SimCLRProjectionHead(fdim, m.proj_hidden_dim, m.proj_dim))
            self.criterion = NTXentLoss(temperature=m.temperature)
            self.target = self.predictor = None
        elif m.name == "moco":
            self.online = nn.Sequential(backbone, MoCoProjectionHead(fdim, m.proj_hidden_dim, m.proj_dim))
            self.criterion = NTXentLoss(temperature=m.temperature, memory_bank_size=(m.queue_size, m.proj_dim))
            self.predictor = None
        else:
            self.online = nn.Sequential(backbone, BYOLProjectionHead(fdim, m.proj_hidden_dim, m.proj_dim))
            self.predictor = BYOLPredictionHead(m.proj_dim, m.pred_hidden_dim, m.proj_dim).to(device)
            self.criterion = NegativeCosineSimilarity()
        self.online = self.online.to(device)
        if m.name != "simclr":
            self.target = copy.deepcopy(self.online)
            deactivate_requires_grad(self.target)
        params = list(self.online.parameters()) + (list(self.predictor.parameters()) if self.predictor else [])
        self.optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                         weight_decay=cfg.optim.weight_decay)
        self.m0, self.m1 = m.get("momentum"), m.get("momentum_final")  # momentum methods only
        self.symmetric = m.get("symmetric", True)
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
            (x0, x1), _ = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            (x0, x1), _ = next(self.it)
        x0, x1 = x0.to(self.device, non_blocking=True), x1.to(self.device, non_blocking=True)
        if self.name == "simclr":
            loss = self.criterion(self.online(x0), self.online(x1))
        elif self.name == "moco":
            q0 = self.online(x0)
            with torch.no_grad():
                k1 = self.target(x1)
            if self.symmetric:
                q1 = self.online(x1)
                with torch.no_grad():
                    k0 = self.target(x0)
                loss = self.criterion(q0, k1) + self.criterion(q1, k0)
            else:
                loss = self.criterion(q0, k1)
        else:
            p0, p1 = self.predictor(self.online(x0)), self.predictor(self.online(x1))
            with torch.no_grad():
                z0, z1 = self.target(x0), self.target(x1)
            loss = 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
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
