"""What training watches at each evaluation: the kNN protocol on a capped bank and query set
(KnnMonitor) and the signs of a collapse of the representation (CollapseMonitor)."""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

import torch

from ..core import dist
from ..data.splits import stratified_subset
from ..sphere.stats import effective_rank, normalised_std
from .features import extract_features
from .protocols import knn_accuracy

#: below these, a statistic warns of a collapse (docs/guide/evaluation.md#collapse): the normalised
#: std of the embeddings (about 1 when they spread on the sphere, 0 at a collapse to a point; SimSiam
#: Sec. 4.1), the effective rank (RankMe) of the embeddings as a share of its largest possible value
#: min(N, D) (1 / min(N, D) at a collapse to one direction), and the normalised entropy of the
#: batch-mean codes of prototype methods (0 when one prototype takes every sample). The backbone
#: features' effective rank is logged, not warned on: a random-init network already has a low one.
COLLAPSE_THRESHOLDS = {"embedding_std": 0.1, "embedding_rank_share": 0.02, "code_entropy": 0.1}


def feature_stats(features: torch.Tensor) -> Dict[str, float]:
    """features: (N, F) backbone features -> their effective rank (RankMe) and its share of min(N, F)."""
    rank = float(effective_rank(features))
    return {"feature_rank": rank, "feature_rank_share": rank / min(features.shape)}


class CollapseMonitor:
    """Collapse statistics at each evaluation, from the last training step's raw embeddings
    (StepOutput) and the kNN bank's backbone features; a statistic below its threshold
    (COLLAPSE_THRESHOLDS) warns once per run."""

    def __init__(self):
        self.warned: set = set()

    def __call__(self, out=None, features: Optional[Dict[str, float]] = None) -> Tuple[Dict[str, float], List[str]]:
        """out: the StepOutput of the last training step (None before the first); features: the
        backbone features' statistics (feature_stats). Returns ({statistic: value}, the warnings raised now)."""
        stats: Dict[str, float] = dict(features or {})
        if out is not None:
            z = out.embeddings.detach()
            stats["embedding_std"] = float(normalised_std(z))
            stats["embedding_rank"] = float(effective_rank(z))
            stats["embedding_rank_share"] = stats["embedding_rank"] / min(z.shape)
            if "code_entropy" in out.logs:
                stats["code_entropy"] = float(out.logs["code_entropy"])
        warnings = []
        for key, threshold in COLLAPSE_THRESHOLDS.items():
            if key in stats and stats[key] < threshold and key not in self.warned:
                self.warned.add(key)
                warnings.append(f"{key} = {stats[key]:.3g} is below {threshold}: the representation may be "
                                "collapsing (docs/guide/evaluation.md#collapse)")
        return stats, warnings


class KnnMonitor:
    """kNN top-1/top-5 of backbone features: bank = (capped, stratified) train
    split, queries = (capped) test split, eval transform only.

    Keeps the run's first result (``start``: the random-init baseline of a fresh run),
    the best top-1 so far and the last result with its step; the checkpointer saves
    start and best.

    Under DDP every rank calls it: each extracts features for its round-robin
    shard of bank and queries, the shards are gathered so the bank is the whole
    (capped) train split on every rank, and no rank waits on another's solo work."""

    def __init__(self, splits, transform, ecfg, device, seed: int = 0, progress: bool = False):
        self.cfg, self.transform, self.device, self.progress = ecfg, transform, device, progress
        # indices into the splits, not copies: a memory-mapped bank is read one batch at a time
        self.bank_i = stratified_subset(splits.bank.labels, ecfg.bank_size, seed)
        self.test_i = stratified_subset(splits.test.labels, ecfg.test_size, seed)
        self.bank_x, self.bank_y = splits.bank.images, splits.bank.labels[self.bank_i]
        self.test_x, self.test_y = splits.test.images, splits.test.labels[self.test_i]
        self.num_classes = splits.num_classes
        self.start: Optional[float] = None
        self.best = float("-inf")
        self.last: Dict[str, float] = {}

    def __call__(self, model, step: int) -> Dict[str, float]:
        """Evaluate ``model`` (anything with ``features``) at training step ``step``."""
        t0 = time.perf_counter()
        c = self.cfg
        r, w = dist.rank(), dist.world_size()
        show = self.progress and r == 0
        bank = extract_features(model, self.bank_x, c.batch_size, self.device, self.transform, self.bank_i[r::w],
                                show, "kNN monitor: bank")
        queries = extract_features(model, self.test_x, c.batch_size, self.device, self.transform, self.test_i[r::w],
                                   show, "kNN monitor: queries")
        bank = dist.gather_sharded(bank, len(self.bank_y))
        queries = dist.gather_sharded(queries, len(self.test_y))
        res = knn_accuracy(bank, self.bank_y, queries, self.test_y, c.knn_k, c.knn_temperature, self.num_classes)
        # the collapse monitor's feature rank, kept as two floats: holding the (N, F) bank between
        # evaluations would pin 100 MB of device memory for a 50k bank of ResNet-18 features (400 MB: ResNet-50)
        self.feature_stats = feature_stats(bank)
        if self.start is None:
            self.start = res["knn_top1"]
        self.best = max(self.best, res["knn_top1"])
        res["knn_best_top1"] = self.best
        res["knn_seconds"] = time.perf_counter() - t0
        self.last = dict(res, step=step)
        return res
