"""Run logging (TensorBoard + metrics.jsonl, rank 0 only) and the live kNN monitor."""

from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional

import torch
from torch.utils.tensorboard import SummaryWriter

from . import dist
from .evaluation import extract_features, knn_accuracy, stratified_subset


def _to_floats(values: Dict[str, object]) -> Dict[str, float]:
    """Python floats of scalars and 0-d tensors; the tensors come to the host in ONE copy
    (one device sync per log call instead of one per value)."""
    got: Dict[str, float] = {}
    for dev in {v.device for v in values.values() if torch.is_tensor(v)}:
        keys = [k for k, v in values.items() if torch.is_tensor(v) and v.device == dev]
        got.update(zip(keys, torch.stack([values[k].detach().float().reshape(()) for k in keys]).tolist()))
    return {k: got[k] if k in got else float(v) for k, v in values.items()}


def _keep(line: str, purge_step: int) -> bool:
    """A metrics.jsonl line logged at or before ``purge_step``; a line torn by a kill goes."""
    try:
        return json.loads(line)["step"] <= purge_step
    except (ValueError, KeyError, TypeError):
        return False


def _purge_jsonl(path: str, purge_step: int) -> None:
    """Drop the lines after ``purge_step`` (and torn ones) from metrics.jsonl, atomically: a kill
    during the rewrite leaves the old file, never a truncated one."""
    with open(path) as f:
        keep = [line for line in f if line.strip() and _keep(line, purge_step)]
    tmp = os.path.join(os.path.dirname(path), f".tmp-metrics-{os.getpid()}.jsonl")  # swept like checkpoint temps
    with open(tmp, "w") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in keep)
    os.replace(tmp, path)


class RunLogger:
    """Writes scalars to TensorBoard and one JSON object per call to metrics.jsonl.
    Inactive (all no-ops) on ranks other than 0."""

    def __init__(self, run_dir: str, active: bool = True, purge_step: Optional[int] = None):
        self.active = active
        self.writer = None
        if active:
            # on resume, TensorBoard and metrics.jsonl drop what the interrupted run logged
            # after its checkpoint, so the curves continue without duplicates
            self.writer = SummaryWriter(run_dir, purge_step=purge_step)
            path = os.path.join(run_dir, "metrics.jsonl")
            if purge_step is not None and os.path.exists(path):
                _purge_jsonl(path, purge_step)
            self.jsonl = open(path, "a", buffering=1)

    def log(self, step: int, values: Dict[str, object], prefix: str, **extra) -> Dict[str, float]:
        """Host-syncs the values (call at log intervals only), returns them as floats."""
        vals = _to_floats(values)
        if self.active:
            for k, v in vals.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
            self.jsonl.write(json.dumps({"step": step, "kind": prefix, **extra, **vals}) + "\n")
        return vals

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        if self.active:
            self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def projector(self, features: torch.Tensor, labels, images: torch.Tensor, step: int) -> None:
        """TensorBoard embedding-projector snapshot: features (N, F), class names (N,),
        thumbnails (N, 3, H, W) uint8."""
        if self.active:
            self.writer.add_embedding(features.float().cpu(), metadata=list(labels),
                                      label_img=images.float().div(255).cpu(), global_step=step, tag="test_features")

    def close(self) -> None:
        if self.active:
            self.writer.close()
            self.jsonl.close()


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
