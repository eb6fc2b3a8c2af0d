"""Offline linear probe of a checkpoint's frozen backbone on cached features (CLI).

    python -m ssl_sphere.linear --checkpoint runs/<run>/last.pt        # or: ssl-sphere-linear, python eval/linear.py
    python -m ssl_sphere.linear --checkpoint runs/<run>/last.pt --json \
        --dataset imagefolder --data-root ../shared/data/cifar10

Protocol: backbone features of the eval transform (no augmentation) are
extracted once for the labelled train and test splits, standardised with the
train mean/std, and a single linear layer (zero init) is trained on them with
SGD (momentum 0.9, batch 512, lr 0.1 with per-step cosine decay, 100 epochs,
no weight decay, seed 0); top-1 / top-5 accuracy on the test split.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..evaluation.protocols import linear_probe
from . import common


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--epochs", type=int, default=100, help="probe epochs over the cached features (default 100)")
    p.add_argument("--lr", type=float, default=0.1, help="probe SGD learning rate, cosine-decayed (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="probe weight decay (default 0)")
    p.add_argument("--probe-batch-size", type=int, default=512, help="probe SGD batch size (default 512)")
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.epochs < 1 or args.lr <= 0 or args.weight_decay < 0 or args.probe_batch_size < 1:
        raise common.EvalError("need --epochs >= 1, --lr > 0, --weight-decay >= 0, --probe-batch-size >= 1")
    common.check_common_args(args)

    def compute(f, prep):
        return linear_probe(f.train, f.train_labels, f.test, f.test_labels, epochs=args.epochs, lr=args.lr,
                            weight_decay=args.weight_decay, batch_size=args.probe_batch_size, device=prep.device,
                            seed=args.seed, num_classes=f.num_classes)

    timing = (f"probe ({args.epochs} epochs, lr {args.lr}, wd {args.weight_decay}, "
              f"batch {args.probe_batch_size})")
    return common.evaluate_and_report(args, compute, lambda f: {}, "Linear probe", timing)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI: exit code 0, or 2 with one line on stderr for a user error."""
    return common.handle_errors(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
