"""Offline linear probe of a checkpoint's frozen backbone on cached features.

    python eval/linear.py --checkpoint runs/<run>/last.pt
    python eval/linear.py --checkpoint runs/<run>/last.pt --json \
        --dataset imagefolder --data-root ../shared/data/cifar10

Protocol: backbone features of the eval transform (no augmentation) are
extracted once for the labelled train and test splits, standardised with the
train mean/std, and a single linear layer (zero init) is trained on them with
SGD (momentum 0.9, batch 512, lr 0.1 with per-step cosine decay, 100 epochs,
no weight decay, seed 0); top-1 / top-5 accuracy on the test split.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (eval/common.py; also puts the repo root on sys.path)

from ssl_sphere.evaluation import linear_probe  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python eval/linear.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--epochs", type=int, default=100, help="probe epochs over the cached features (default 100)")
    p.add_argument("--lr", type=float, default=0.1, help="probe SGD learning rate, cosine-decayed (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="probe weight decay (default 0)")
    p.add_argument("--probe-batch-size", type=int, default=512, help="probe SGD batch size (default 512)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.epochs < 1 or args.lr <= 0 or args.weight_decay < 0 or args.probe_batch_size < 1:
        raise common.EvalError("need --epochs >= 1, --lr > 0, --weight-decay >= 0, --probe-batch-size >= 1")
    t0 = time.perf_counter()
    prep = common.prepare(args)
    f = prep.features
    t1 = time.perf_counter()
    res = linear_probe(f.train, f.train_labels, f.test, f.test_labels, epochs=args.epochs, lr=args.lr,
                       weight_decay=args.weight_decay, batch_size=args.probe_batch_size, device=prep.device,
                       seed=args.seed, num_classes=f.num_classes)
    t2 = time.perf_counter()
    out = {**res, "checkpoint": prep.checkpoint, "dataset": f.dataset, "n_train": int(f.train.shape[0]),
           "n_test": int(f.test.shape[0]), "seconds": t2 - t0}
    common.report(out, args.json, f"Linear probe of {prep.source}", extra=[
        f"  (data {f.seconds_data:.1f}s, features {f.seconds_features:.1f}s, probe {t2 - t1:.1f}s: {args.epochs} "
        f"epochs, lr {args.lr}, wd {args.weight_decay}, batch {args.probe_batch_size}; "
        f"{prep.backbone}, {f.train.shape[1]}-d features, device {prep.device})"])
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main, None))
