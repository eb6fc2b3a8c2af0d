"""Training batches from a dataset that stays on the host (in memory or memory-mapped): gathered
by index into reused (pinned, on CUDA) buffers by a background thread, one step ahead of the
step that uses them, then copied to the device.

Hand-written rather than a torch DataLoader: the dataset is already one uint8 array and a batch
is one index_select, so worker processes, collation and per-sample calls would only add copies.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Optional, Tuple

import torch


class Prefetcher:
    """Iterate (step, idx, batch) over ``batches`` ((step, idx) pairs): batch is
    ``images[idx]`` on ``device``. While step k runs, a background thread gathers the
    next ``depth`` batches (index_select releases the GIL; page faults of a memory-mapped
    dataset are served there, not in the step). Buffers are reused round-robin; on CUDA
    they are pinned, copied with non_blocking=True, and a buffer is refilled only after its
    copy has completed (a CUDA event)."""

    def __init__(self, images: torch.Tensor, device: torch.device, batch_size: int, depth: int = 2):
        self.images, self.device, self.depth = images, device, depth
        self.cuda = device.type == "cuda"
        shape = (batch_size, *images.shape[1:])
        self.buffers = [torch.empty(shape, dtype=images.dtype, pin_memory=self.cuda) for _ in range(depth + 1)]
        self.copied: list[Optional[torch.cuda.Event]] = [None] * (depth + 1)

    def _gather(self, slot: int, idx: torch.Tensor) -> torch.Tensor:
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()  # the last copy out of this buffer has finished
        buf = self.buffers[slot][: idx.numel()]
        torch.index_select(self.images, 0, idx, out=buf)
        return buf

    def __call__(self, batches: Iterable[Tuple[int, torch.Tensor]]) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
        it = iter(batches)
        pending: deque = deque()
        n = 0
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssl_sphere-batches") as pool:

            def submit() -> None:
                nonlocal n
                nxt = next(it, None)
                if nxt is not None:
                    slot = n % len(self.buffers)
                    pending.append((nxt[0], nxt[1], slot, pool.submit(self._gather, slot, nxt[1])))
                    n += 1

            for _ in range(self.depth):
                submit()
            try:
                while pending:
                    step, idx, slot, fut = pending.popleft()
                    host = fut.result()
                    if self.cuda:
                        x = host.to(self.device, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record()
                        self.copied[slot] = event
                    else:
                        x = host
                    submit()  # the gather of a later batch overlaps this step
                    yield step, idx, x
            finally:
                for *_, fut in pending:
                    fut.cancel()
