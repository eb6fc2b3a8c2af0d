"""Export a pretrained backbone from a checkpoint as a plain state_dict (CLI).

    python -m ssl_sphere.export --checkpoint runs/<run>/last.pt --out backbone.pt     # or: ssl-sphere-export

writes ``backbone.pt``, a plain ``{name: tensor}`` state_dict that loads with
``torch.load(..., weights_only=True)``, and ``backbone.json`` beside it: architecture,
small-image stem, image size, normalisation mean / std, feature dimension, and where it
came from. For a ResNet the keys are torchvision's own, without ``fc``: a stock
``torchvision.models.resnet18()`` (resnet34, resnet50, ...) loads it with strict=True once
its classifier is ``nn.Identity()`` and, for small images (``small_images`` in the JSON),
its stem is the 3x3 stride-1 conv without max-pool (README "Using a pretrained backbone").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from . import checkpoint
from .config import ConfigError
from .errors import run_cli
from .model import backbone_state_dict, load_pretrained


def export(checkpoint_path: str, out: str, part: str = "backbone") -> dict:
    """Write the backbone of ``checkpoint_path`` to ``out`` (+ its .json); returns the metadata."""
    p = load_pretrained(checkpoint_path, part=part)
    state = backbone_state_dict(p.module)
    meta = {"arch": p.arch, "small_images": p.small_images, "image_size": p.image_size, "mean": list(p.mean),
            "std": list(p.std), "feature_dim": p.feature_dim, "part": part, "method": p.config["method"]["name"],
            "checkpoint": os.path.abspath(checkpoint_path), "step": p.step,
            "values": sum(t.numel() for t in state.values())}
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ConfigError(f"output directory {parent} does not exist; create it or choose another --out")
    checkpoint.save(out, state)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="ssl_sphere checkpoint (e.g. runs/<run>/last.pt)")
    p.add_argument("--out", required=True, metavar="FILE.pt", help="where to write the state_dict (+ FILE.json)")
    p.add_argument("--part", default="backbone", choices=("backbone", "momentum_backbone"),
                   help="backbone (default) or MoCo's / BYOL's momentum encoder")
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    meta = export(args.checkpoint, args.out, args.part)
    print(f"[ssl_sphere] exported {meta['arch']} ({meta['part']}, {meta['values']:,} values, step {meta['step']}) "
          f"to {args.out} and {os.path.splitext(args.out)[0]}.json")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
