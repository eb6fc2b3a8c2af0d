"""Evaluation protocols (docs/guide/evaluation.md): functions of feature tensors.

The offline CLIs (``ssl_sphere.cli.knn`` / ``linear``) and the live kNN monitor (``monitor.py``)
are thin layers over these functions and ``features.extract_features``.

* :func:`knn_classify` / :func:`knn_accuracy` -- the weighted kNN classifier of
  Wu et al. 2018 (InstDisc) as used by MoCo / SimCLR / lightly: cosine similarity,
  the k = 200 nearest bank entries vote with weight exp(sim / T), T = 0.1.
* :func:`linear_probe` -- a linear classifier trained on cached, standardised features.
* :func:`recall_at_k` -- leave-one-out retrieval Recall@K (the metric of the SEC paper).
* :func:`alignment_uniformity` -- Wang & Isola (2020) statistics of normalised embeddings.

All similarity computations are chunked over queries so that the largest
temporary is about :data:`CHUNK_ELEMENTS` floats (64 MiB) whatever the sizes:
a 50k-bank x 10k-query kNN needs the normalised bank copy (N x D floats) plus
that block.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

#: elements of the (queries x bank) similarity block computed at once (64 MiB of float32)
CHUNK_ELEMENTS = 1 << 24


def _percent(hit: torch.Tensor) -> float:
    """Percentage of True entries of a bool tensor, exact in float64."""
    return 100.0 * hit.sum().item() / max(1, hit.numel())


def _auto_chunk(n_bank: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, min(4096, CHUNK_ELEMENTS // max(1, n_bank)))


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
    step = min(_auto_chunk(bank.shape[0], chunk_size), max(1, test_features.shape[0]))
    scores = torch.empty(test_features.shape[0], c, device=bank.device)
    buf = torch.empty(step, bank.shape[0], device=bank.device)  # reused: no page faults per chunk
    for i in range(0, test_features.shape[0], step):
        q = F.normalize(test_features[i:i + step].float().to(bank.device), dim=1)
        sim, idx = torch.mm(q, bank.T, out=buf[:q.shape[0]]).topk(k, dim=1)
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
    return {"knn_top1": _percent(hit[:, 0]), "knn_top5": _percent(hit.any(1))}


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
    kmax = min(max(ks), n - 1)  # a K past N - 1 sees every other sample: the same as K = N - 1
    step = _auto_chunk(n, chunk_size)
    # rank (0-based) of the first match among the kmax nearest; max(ks) if there is none
    first_hit = torch.empty(n, dtype=torch.long, device=x.device)
    buf = torch.empty(min(step, n), n, device=x.device)
    for i in range(0, n, step):
        q = x[i:i + step]
        sim = torch.mm(q, x.T, out=buf[:q.shape[0]])
        rows = torch.arange(sim.shape[0], device=x.device)
        sim[rows, rows + i] = float("-inf")  # the query itself
        idx = sim.topk(kmax, dim=1).indices
        match = y[idx] == y[i:i + step, None]
        has = match.any(1)
        first = match.int().argmax(1)
        first_hit[i:i + step] = first.masked_fill(~has, max(ks))  # no match: a rank no K counts
    return {f"recall@{k}": _percent(first_hit < k) for k in ks}


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


def train_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int = 100, lr: float = 0.1,
                 weight_decay: float = 0.0, batch_size: int = 512, momentum: float = 0.9,
                 seed: int = 0) -> nn.Linear:
    """Softmax regression trained by mini-batch SGD: returns the ``nn.Linear`` (D -> C).

    x: (N, D) float features (already standardised), y: (N,) labels in [0, C).
    The layer starts at zero (the problem is convex: no init draw). Every epoch
    visits a fresh random permutation of the N samples (``torch.randperm`` from a
    generator seeded with ``seed``, the only randomness) in batches of
    ``batch_size`` (the last one smaller); ``torch.optim.SGD`` with momentum, weight
    decay on the weight only (not the bias), lr decayed from ``lr`` to 0 by a per-step
    half cosine, lr_t = lr * (1 + cos(pi * t / T)) / 2 (``CosineAnnealingLR`` over all steps)."""
    dev = x.device
    n, d = x.shape
    if n == 0:
        raise ValueError("train_linear: empty training set")
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(d, num_classes, device=dev)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    opt = torch.optim.SGD([{"params": [layer.weight], "weight_decay": weight_decay},
                           {"params": [layer.bias], "weight_decay": 0.0}], lr=lr, momentum=momentum)
    bs = max(1, min(batch_size, n))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * math.ceil(n / bs))
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(dev)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            loss = F.cross_entropy(layer(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return layer.requires_grad_(False)


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, epochs: int = 100, lr: float = 0.1, weight_decay: float = 0.0,
                 batch_size: int = 512, momentum: float = 0.9, device: Union[str, torch.device, None] = None,
                 seed: int = 0, num_classes: Optional[int] = None) -> Dict[str, float]:
    """Linear probe on cached (frozen) features: {'linear_top1', 'linear_top5'} in percent.

    train_features: (N, D), train_labels: (N,), test_features: (M, D),
    test_labels: (M,); labels in [0, C), C = ``num_classes`` or the largest label + 1
    (with fewer than 5 classes top-5 counts all classes).

    Protocol: features are standardised with the TRAIN mean and std per dimension
    (dimensions with std < 1e-6 are only centred), then one linear layer D -> C is
    trained on them by :func:`train_linear`: zero init, mini-batch SGD with
    momentum 0.9, ``epochs`` passes over a fresh permutation each, lr decayed to 0
    by a per-step cosine, weight decay on the weights only, no augmentation
    (features are cached once). Defaults: 100 epochs, batch 512, lr 0.1, no weight
    decay.

    Deterministic: the only randomness is the epoch permutations, drawn from a
    generator seeded with ``seed`` (same seed, inputs and device -> same result).
    ``device``: where to train (default: the device of ``train_features``)."""
    dev = torch.device(device) if device is not None else train_features.device
    xtr, xte = _standardise(train_features.float().to(dev), test_features.float().to(dev))
    ytr, yte = train_labels.to(dev).long(), test_labels.to(dev).long()
    c = int(num_classes if num_classes is not None else max(ytr.max().item(), yte.max().item()) + 1)
    with torch.enable_grad():
        layer = train_linear(xtr, ytr, c, epochs, lr, weight_decay, batch_size, momentum, seed)
    with torch.no_grad():
        pred = layer(xte).topk(min(5, c), dim=1).indices
        hit = pred == yte.view(-1, 1)
    return {"linear_top1": _percent(hit[:, 0]), "linear_top5": _percent(hit.any(1))}
