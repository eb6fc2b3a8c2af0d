"""Evaluation protocols (DESIGN.md, "Evaluation protocols").

Everything here works on tensors; the offline CLIs in ``eval/`` and the live
kNN monitor (``monitor.py``) are thin layers over these functions.

* :func:`extract_features` -- frozen backbone features of uint8 images (eval mode,
  no augmentation, no grad, bf16 autocast on CUDA).
* :func:`knn_classify` / :func:`knn_accuracy` -- the weighted kNN classifier of
  Wu et al. 2018 (InstDisc) as used by MoCo / SimCLR / lightly: cosine similarity,
  the k = 200 nearest bank entries vote with weight exp(sim / T), T = 0.1.
* :func:`linear_probe` -- a linear classifier trained on cached, standardised features.
* :func:`recall_at_k` -- leave-one-out retrieval Recall@K (the metric of the SEC paper).
* :func:`alignment_uniformity` -- Wang & Isola (2020) statistics of normalised embeddings.
* :func:`stratified_subset` -- deterministic class-stratified subsets (capped banks, --limit-*).

All similarity computations are chunked over queries so that the largest
temporary is about :data:`CHUNK_ELEMENTS` floats (64 MiB) whatever the sizes:
a 50k-bank x 10k-query kNN needs the normalised bank copy (N x D floats) plus
that block.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

#: elements of the (queries x bank) similarity block computed at once (64 MiB of float32)
CHUNK_ELEMENTS = 1 << 24


def _auto_chunk(n_bank: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, min(4096, CHUNK_ELEMENTS // max(1, n_bank)))


# ----------------------------------------------------------------------------- features
@torch.no_grad()
def extract_features(model_or_backbone: nn.Module, images, batch_size: int,
                     device: torch.device, transform: Optional[Callable] = None) -> torch.Tensor:
    """Frozen features of a set of images.

    images: (N, 3, H, W) uint8 tensor (or already-transformed float), or a data
    ``Split`` (anything with an ``.images`` attribute holding such a tensor).
    Returns (N, F) float32 on ``device``.

    Eval mode (the module's mode is restored afterwards), no augmentation
    (``transform`` only converts, resizes and normalises, e.g.
    ``Augmenter.eval_transform``), no grad, bf16 autocast on CUDA. Uses
    ``.features`` when the module has it (a method), else calls the module (a
    backbone). Batches are moved to ``device`` one at a time, so the images may
    stay on the CPU."""
    images = getattr(images, "images", images)
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
    if not out:
        raise ValueError("extract_features got no images")
    return torch.cat(out)


# ----------------------------------------------------------------------------- kNN
@torch.no_grad()
def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
               k: int = 200, temperature: float = 0.1, num_classes: Optional[int] = None,
               chunk_size: Optional[int] = None) -> torch.Tensor:
    """Weighted-vote class scores of the kNN classifier: (M, C) float32.

    train_features: (N, D) bank, train_labels: (N,) int in [0, C), test_features:
    (M, D) queries (any device; computed on the bank's device). Features are
    L2-normalised here; each query's k most cosine-similar bank entries vote for
    their label with weight exp(sim / T) (Wu et al. 2018; lightly's
    ``knn_predict``). C = ``num_classes`` or max(train_labels) + 1.

    Chunked over queries: the largest temporary is chunk_size x N floats
    (default: chunk_size = CHUNK_ELEMENTS // N, i.e. 64 MiB) plus the
    normalised bank copy (N x D)."""
    if train_features.shape[0] == 0:
        raise ValueError("kNN bank is empty")
    bank = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(bank.device).long()
    c = int(num_classes if num_classes is not None else labels.max().item() + 1)
    k = min(int(k), bank.shape[0])
    step = _auto_chunk(bank.shape[0], chunk_size)
    scores = torch.empty(test_features.shape[0], c, device=bank.device)
    for i in range(0, test_features.shape[0], step):
        q = F.normalize(test_features[i:i + step].float().to(bank.device), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        w = sim.div_(temperature).exp_()
        s = scores[i:i + step].zero_()
        s.scatter_add_(1, labels[idx], w)
    return scores


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 k: int = 200, temperature: float = 0.1, num_classes: Optional[int] = None,
                 topk: int = 1, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Predicted labels of the weighted kNN classifier (see :func:`knn_scores`).

    Returns (M,) for topk=1, else (M, min(topk, C)) best first."""
    s = knn_scores(train_features, train_labels, test_features, k, temperature, num_classes, chunk_size)
    pred = s.topk(min(topk, s.shape[1]), dim=1).indices
    return pred[:, 0] if topk == 1 else pred


def knn_accuracy(train_features, train_labels, test_features, test_labels, k: int = 200,
                 temperature: float = 0.1, num_classes: Optional[int] = None,
                 chunk_size: Optional[int] = None) -> Dict[str, float]:
    """{'knn_top1', 'knn_top5'} in percent; shapes as in :func:`knn_scores`, test_labels (M,).
    With fewer than 5 classes top-5 counts all classes (100%)."""
    pred = knn_classify(train_features, train_labels, test_features, k, temperature, num_classes, topk=5,
                        chunk_size=chunk_size)
    y = test_labels.to(pred.device).view(-1, 1)
    hit = pred == y
    return {"knn_top1": 100.0 * hit[:, 0].float().mean().item(), "knn_top5": 100.0 * hit.any(1).float().mean().item()}


# ----------------------------------------------------------------------------- retrieval
@torch.no_grad()
def recall_at_k(features: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 2, 4, 8),
                chunk_size: Optional[int] = None) -> Dict[str, float]:
    """Leave-one-out retrieval Recall@K in percent: {'recall@1': ..., 'recall@2': ...}.

    features: (N, D), labels: (N,). Every sample queries all the others by cosine
    similarity (itself excluded); Recall@K is the percentage of queries with at
    least one same-label sample among their K nearest neighbours (the metric of
    deep metric learning, e.g. Zhang et al. 2020 on CUB, evaluated on the test
    split). Chunked over queries like :func:`knn_scores`."""
    n = features.shape[0]
    if n < 2:
        raise ValueError("recall_at_k needs at least 2 samples")
    x = F.normalize(features.float(), dim=1)
    y = labels.to(x.device).long()
    kmax = min(max(ks), n - 1)
    step = _auto_chunk(n, chunk_size)
    first_hit = torch.empty(n, dtype=torch.long, device=x.device)  # rank (0-based) of the first match, kmax if none
    for i in range(0, n, step):
        sim = x[i:i + step] @ x.T
        rows = torch.arange(sim.shape[0], device=x.device)
        sim[rows, rows + i] = float("-inf")  # the query itself
        idx = sim.topk(kmax, dim=1).indices
        match = y[idx] == y[i:i + step, None]
        has = match.any(1)
        first = match.int().argmax(1)
        first_hit[i:i + step] = torch.where(has, first, torch.full_like(first, kmax))
    return {f"recall@{k}": 100.0 * (first_hit < k).float().mean().item() for k in ks}


# ----------------------------------------------------------------------------- alignment / uniformity
@torch.no_grad()
def alignment_uniformity(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2, t: float = 2) -> Dict[str, float]:
    """Alignment and uniformity of Wang & Isola (ICML 2020).

    z1, z2: (N, D) embeddings of two views of the same N images (row i of z1 and
    row i of z2 are a positive pair); both are L2-normalised here.

    * alignment  = mean_i ||z1_i - z2_i||^alpha  (lower is better; 0 for identical views)
    * uniformity = log mean_{i<j} exp(-t ||z_i - z_j||^2) over all distinct pairs of
      ONE view, computed for z1 and for z2 separately and averaged, as in the
      paper's code (``(lunif(x) + lunif(y)) / 2``); lower is more uniform (about
      -2t = -4 for t=2 for points spread uniformly on a high-dimensional sphere,
      0 when all embeddings collapse to one point).

    Uses ``torch.pdist`` (N(N-1)/2 distances per view): keep N to a few thousand."""
    a = F.normalize(z1.float(), dim=1)
    b = F.normalize(z2.float(), dim=1)
    if a.shape != b.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    align = (a - b).norm(dim=1).pow(alpha).mean()

    def lunif(x: torch.Tensor) -> torch.Tensor:
        return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()

    return {"alignment": align.item(), "uniformity": (0.5 * (lunif(a) + lunif(b))).item()}


# ----------------------------------------------------------------------------- linear probe
def _standardise(train: torch.Tensor, *others: torch.Tensor):
    """Centre and scale by the train mean / std (features with std < 1e-6 are only centred)."""
    mean = train.mean(0)
    std = train.std(0)
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    return [(x - mean) / std for x in (train, *others)]


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, epochs: int = 100, lr: float = 0.1, weight_decay: float = 0.0,
                 batch_size: int = 512, momentum: float = 0.9, device: Union[str, torch.device, None] = None,
                 seed: int = 0, num_classes: Optional[int] = None) -> Dict[str, float]:
    """Linear probe on cached (frozen) features: {'linear_top1', 'linear_top5'} in percent.

    train_features: (N, D), train_labels: (N,), test_features: (M, D),
    test_labels: (M,); labels in [0, C), C = ``num_classes`` or the largest label + 1.

    Protocol: features are standardised with the TRAIN mean and std (per
    dimension); one linear layer (D -> C, zero-initialised, so the problem is
    convex and the result does not depend on an init draw) is trained with
    mini-batch SGD (momentum 0.9, PyTorch's formulation) on the mean
    cross-entropy, ``epochs`` passes over a fresh random permutation of the train
    set per epoch, learning rate ``lr`` decayed to 0 by a per-step half cosine,
    weight decay on the weights only. No augmentation (features are cached once).
    Defaults: 100 epochs, batch 512, lr 0.1, no weight decay.

    Deterministic: the only randomness is the epoch permutations, drawn from a
    generator seeded with ``seed`` (same seed + same device -> same result).
    ``device``: where to train (default: the device of ``train_features``)."""
    dev = torch.device(device) if device is not None else train_features.device
    xtr, xte = _standardise(train_features.float().to(dev), test_features.float().to(dev))
    ytr, yte = train_labels.to(dev).long(), test_labels.to(dev).long()
    n, d = xtr.shape
    if n == 0:
        raise ValueError("linear_probe: empty training set")
    c = int(num_classes if num_classes is not None else max(ytr.max().item(), yte.max().item()) + 1)
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(d, c).to(dev)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD([{"params": [head.weight], "weight_decay": weight_decay},
                           {"params": [head.bias], "weight_decay": 0.0}], lr=lr, momentum=momentum)
    bs = min(batch_size, n)
    spe = math.ceil(n / bs)
    total = epochs * spe
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(dev)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        logits = torch.cat([head(xte[i:i + 8192]) for i in range(0, xte.shape[0], 8192)])
        pred = logits.topk(min(5, c), dim=1).indices
        hit = pred == yte.view(-1, 1)
    return {"linear_top1": 100.0 * hit[:, 0].float().mean().item(),
            "linear_top5": 100.0 * hit.any(1).float().mean().item()}


# ----------------------------------------------------------------------------- subsets
def stratified_subset(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a deterministic class-stratified subset of size min(n, N).

    labels: (N,). Classes are filled round-robin (in proportion while all have
    samples left), samples within a class in a random order fixed by ``seed``."""
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
