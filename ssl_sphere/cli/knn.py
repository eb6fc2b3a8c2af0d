"""Offline weighted-kNN evaluation (+ retrieval Recall@K) of a checkpoint's frozen backbone (CLI).

    python -m ssl_sphere.knn --checkpoint runs/<run>/last.pt          # or: ssl-sphere-knn, python eval/knn.py
    python -m ssl_sphere.knn --checkpoint runs/<run>/last.pt --json --dataset imagefolder --data-root DIR
    python -m ssl_sphere.knn --random-init --backbone resnet18 --dataset imagefolder --data-root ../shared/data/cifar10
    python -m ssl_sphere.knn --bench        # time knn_classify on 50k x 10k cached 512-d features

Protocol (docs/guide/evaluation.md): L2-normalised backbone features of
the eval transform (no augmentation), bank = labelled train split, queries =
test split, cosine similarity, the k = 200 nearest vote with weight
exp(sim / 0.1); top-1 / top-5. Recall@1/2/4/8: leave-one-out retrieval among
the test features.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import torch

from ..engine.device import cpu_name
from ..evaluation.protocols import knn_accuracy, knn_classify, recall_at_k
from . import common


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = common.add_common_args(p)
    src.add_argument("--bench", action="store_true",
                     help="no model or data: time knn_classify (top-5) on random clustered features of "
                          "--limit-train (default 50000) x --limit-test (default 10000) x --bench-dim (512) "
                          "on --device and report wall time and peak extra memory")
    p.add_argument("--bench-dim", type=int, default=512, help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=200, help="neighbours that vote (default 200)")
    p.add_argument("--temperature", type=float, default=0.1, help="vote weight exp(sim / T) (default 0.1)")
    return p


def _rss_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def bench(args) -> int:
    """Wall time and peak extra memory of knn_classify on cached features (synthetic, clustered)."""
    device = common.device_of(args)
    n, m, d, c = args.limit_train or 50000, args.limit_test or 10000, args.bench_dim, 10
    g = torch.Generator().manual_seed(args.seed)
    centers = torch.randn(c, d, generator=g)
    yb, yq = torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (m,), generator=g)
    bank, queries = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    for x, y in ((bank, yb), (queries, yq)):  # in slices: no full-size temporaries before the measurement
        for i in range(0, x.shape[0], 1000):
            x[i:i + 1000] += 0.2 * centers[y[i:i + 1000]]
    bank, yb, queries = bank.to(device), yb.to(device), queries.to(device)
    knn_classify(bank[:1000], yb[:1000], queries[:100], args.k, args.temperature, c, topk=5)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        try:  # reset the peak-RSS counter (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        base = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    pred = knn_classify(bank, yb, queries, args.k, args.temperature, c, topk=5)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        hwm = _rss_kib("VmHWM")
        peak_mib = (hwm - base) / 1024 if hwm is not None and base is not None else None
    top1 = 100.0 * (pred[:, 0] == yq.to(pred.device)).sum().item() / m
    cpu = cpu_name()
    out = {"seconds": seconds, "peak_extra_mib": peak_mib, "n_train": n, "n_test": m, "dim": d, "k": args.k,
           "temperature": args.temperature, "knn_top1": top1, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    common.report(out, args.json, "knn_classify benchmark (synthetic clustered features, top-5 predictions)")
    return 0


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.k < 1 or args.temperature <= 0:
        raise common.EvalError("--k must be >= 1 and --temperature > 0")
    common.check_common_args(args)
    if args.bench:
        return bench(args)

    def compute(f, prep):
        if f.test.shape[0] < 2:
            raise common.EvalError(f"Recall@K needs at least 2 test images, got {f.test.shape[0]}: "
                                     "raise --limit-test")
        res = knn_accuracy(f.train, f.train_labels, f.test, f.test_labels, args.k, args.temperature, f.num_classes)
        return {**res, **recall_at_k(f.test, f.test_labels, (1, 2, 4, 8))}

    def settings(f):  # k as used: at most the bank size
        return {"k": min(args.k, int(f.train.shape[0])), "temperature": args.temperature}

    return common.evaluate_and_report(args, compute, settings, "kNN evaluation", "kNN + recall")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI: exit code 0, or 2 with one line on stderr for a user error."""
    return common.handle_errors(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
