"""Export a pretrained backbone from a checkpoint as a plain state_dict (CLI).

    python -m ssl_sphere.export --checkpoint runs/<run>/last.pt --out backbone.pt     # or: ssl-sphere-export

writes ``backbone.pt``, a plain ``{name: tensor}`` state_dict that loads with
``torch.load(..., weights_only=True)``, and ``backbone.json`` beside it: architecture,
small-image stem, image size, normalisation mean / std, feature dimension, and where it
came from. For a ResNet the keys are torchvision's own, without ``fc``: a stock
``torchvision.models.resnet18()`` (resnet34, resnet50, ...) loads it with strict=True once
its classifier is ``nn.Identity()`` and, for small images (``small_images`` in the JSON),
its stem is the 3x3 stride-1 conv without max-pool (docs/guide/evaluation.md#using-a-pretrained-backbone).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from ..models.pretrained import export
from . import common


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="ssl_sphere checkpoint (e.g. runs/<run>/last.pt)")
    p.add_argument("--out", required=True, metavar="FILE.pt", help="where to write the state_dict (+ FILE.json)")
    p.add_argument("--part", default="backbone", choices=("backbone", "momentum_backbone"),
                   help="backbone (default) or the momentum encoder of MoCo, BYOL, MoCo v3 or DINO (DINO's teacher)")
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    meta = export(args.checkpoint, args.out, args.part)
    print(f"[ssl_sphere] exported {meta['arch']} ({meta['part']}, {meta['values']:,} values, step {meta['step']}) "
          f"to {args.out} and {os.path.splitext(args.out)[0]}.json")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.handle_errors(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
