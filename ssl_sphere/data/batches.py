"""The order of training batches: an epoch is a permutation of indices, a pure function of (seed,
epoch), so a run resumed at any step sees exactly the batches it would have seen."""

from __future__ import annotations

from typing import Iterator, Tuple

import torch

from .splits import DataError


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Optimiser steps per epoch (drop_last over the global batch)."""
    global_batch = batch_size * world
    if global_batch > n:
        raise DataError(
            f"global batch {global_batch} (batch {batch_size} x {world} ranks) is larger than the "
            f"{n} training images; lower --batch-size"
        )
    return n // global_batch

def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's index order: a pure function of (seed, epoch), so resuming
    mid-epoch replays exactly the remaining batches."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g)

def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0,
                  world: int = 1) -> Iterator[torch.Tensor]:
    """Yield this rank's (batch_size,) index tensors of ``epoch`` from batch ``start`` on.
    Each rank takes a disjoint slice of every global batch."""
    perm = epoch_permutation(n, seed, epoch)
    global_batch = batch_size * world
    for i in range(start, steps_per_epoch(n, batch_size, world)):
        yield perm[i * global_batch + rank * batch_size: i * global_batch + (rank + 1) * batch_size]

def step_batches(n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0,
                 world: int = 1) -> Iterator[Tuple[int, torch.Tensor]]:
    """(step, this rank's (batch_size,) indices) for the global steps start <= step < stop,
    across epoch boundaries: step s is batch s % steps_per_epoch of epoch s // steps_per_epoch,
    so a run resumed at any step sees exactly the batches it would have seen."""
    per_epoch = steps_per_epoch(n, batch_size, world)
    step = start
    while step < stop:
        for idx in epoch_batches(n, batch_size, seed, step // per_epoch, step % per_epoch, rank, world):
            yield step, idx
            step += 1
            if step >= stop:
                return
