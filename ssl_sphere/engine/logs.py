"""Run logging: TensorBoard scalars / histograms / projector and metrics.jsonl, rank 0 only."""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch
from torch.utils.tensorboard import SummaryWriter


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
