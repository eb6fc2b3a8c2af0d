"""The live kNN monitor: the kNN protocol on a capped bank and query set during training."""

from __future__ import annotations

import time
from typing import Dict, Optional

from ..core import dist
from ..data.splits import stratified_subset
from .features import extract_features
from .protocols import knn_accuracy


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
        if self.start is None:
            self.start = res["knn_top1"]
        self.best = max(self.best, res["knn_top1"])
        res["knn_best_top1"] = self.best
        res["knn_seconds"] = time.perf_counter() - t0
        self.last = dict(res, step=step)
        return res
