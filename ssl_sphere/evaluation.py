"""Evaluation protocols (DESIGN.md, "Evaluation protocols"): feature extraction
and the weighted kNN classifier of Wu et al. 2018 (k=200, T=0.1)."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(model_or_backbone: nn.Module, images: torch.Tensor, batch_size: int,
                     device: torch.device, transform: Optional[Callable] = None) -> torch.Tensor:
    """images: (N, 3, H, W) uint8 (or already-transformed float) -> (N, F) float32 on ``device``.

    Eval mode (restored afterwards), no augmentation (``transform`` only converts
    and normalises), no grad, bf16 autocast on CUDA. Uses ``.features`` when the
    module has it (a method), else calls the module (a backbone)."""
    fn = getattr(model_or_backbone, "features", model_or_backbone)
    was_training = model_or_backbone.training
    model_or_backbone.eval()
    device = torch.device(device)
    out = []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(device, non_blocking=True)
            if transform is not None:
                x = transform(x)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out.append(fn(x).float())
    finally:
        model_or_backbone.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
               k: int = 200, temperature: float = 0.1, num_classes: Optional[int] = None,
               chunk_size: int = 1024) -> torch.Tensor:
    """Weighted-vote class scores: (N_test, C).

    train_features: (N, F), train_labels: (N,), test_features: (M, F); features
    are L2-normalised here; each query's k most cosine-similar bank entries vote
    with weight exp(sim / T). Chunked over queries: memory is chunk_size x N."""
    bank = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(bank.device).long()
    c = int(num_classes if num_classes is not None else labels.max().item() + 1)
    k = min(k, bank.shape[0])
    scores = []
    for i in range(0, test_features.shape[0], chunk_size):
        q = F.normalize(test_features[i:i + chunk_size].float().to(bank.device), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        w = (sim / temperature).exp()
        s = torch.zeros(q.shape[0], c, device=bank.device)
        scores.append(s.scatter_add_(1, labels[idx], w))
    return torch.cat(scores)


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 k: int = 200, temperature: float = 0.1, num_classes: Optional[int] = None,
                 topk: int = 1) -> torch.Tensor:
    """Predicted labels: (N_test,) for topk=1, else (N_test, topk) best first."""
    s = knn_scores(train_features, train_labels, test_features, k, temperature, num_classes)
    pred = s.topk(min(topk, s.shape[1]), dim=1).indices
    return pred[:, 0] if topk == 1 else pred


def knn_accuracy(train_features, train_labels, test_features, test_labels, k: int = 200,
                 temperature: float = 0.1, num_classes: Optional[int] = None) -> Dict[str, float]:
    """{'knn_top1', 'knn_top5'} in percent."""
    pred = knn_classify(train_features, train_labels, test_features, k, temperature, num_classes, topk=5)
    y = test_labels.to(pred.device).view(-1, 1)
    hit = pred == y
    return {"knn_top1": 100.0 * hit[:, 0].float().mean().item(), "knn_top5": 100.0 * hit.any(1).float().mean().item()}


def stratified_subset(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a deterministic class-stratified subset of size <= n."""
    if n >= labels.numel():
        return torch.arange(labels.numel())
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(labels.numel(), generator=g)
    # round-robin over classes in random order: take from each class in turn
    order = torch.argsort(labels[perm], stable=True)
    ranked = perm[order]
    cls = labels[ranked]
    rank_in_class = torch.arange(len(cls)) - torch.searchsorted(cls, cls)
    pick = ranked[torch.argsort(rank_in_class, stable=True)[:n]]
    return pick.sort().values
