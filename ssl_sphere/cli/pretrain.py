"""CLI entry: flags + YAML + key=value overrides -> Config -> train().

    python -m ssl_sphere.pretrain --method moco --sec
    python -m ssl_sphere.pretrain --config configs/cifar10/moco_sec.yaml data.root=/data optim.epochs=200
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from .. import config, methods
from ..core import checkpoint
from ..engine.rundir import find_resume
from .common import handle_errors

EPILOG = """\
Any config field can be set with trailing key=value overrides, e.g.
  method.temperature=0.2 sec.weight=0.5 aug.blur_p=[0.5,0.5] eval.every_epochs=5
Precedence: dataclass defaults < --config YAML < flags < key=value.
Sections: data, aug, model, method, sec, see, vmf, optim, eval, run (the configuration reference in
the docs, or the config.yaml saved in every run directory, lists every key and default; the method
section holds the keys of the chosen method).
"""

# flag dest -> config key
FLAG_KEYS = {
    "method": "method.name",
    "sec_weight": "sec.weight",
    "sec_ema": "sec.ema",
    "dataset": "data.dataset",
    "data_root": "data.root",
    "backbone": "model.backbone",
    "epochs": "optim.epochs",
    "max_steps": "optim.max_steps",
    "batch_size": "optim.batch_size",
    "lr": "optim.lr",
    "device": "run.device",
    "output_dir": "run.output_dir",
    "run_name": "run.run_name",
    "resume": "run.resume",
    "seed": "run.seed",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ssl_sphere.pretrain",
        description="Self-supervised contrastive pretraining on the hypersphere with the spherical embedding "
        "constraint. With no flags: MoCo v2 on scikit-learn's bundled digits, a CPU-sized run.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--method", choices=methods.names(), help="pretraining method (default: moco)")
    p.add_argument("--sec", action="store_true", help="add the batch-mean spherical embedding constraint (SEC)")
    p.add_argument("--sec-weight", type=float, metavar="ETA",
                   help="SEC weight eta (implies --sec; default 0.1), relative to the method loss averaged over "
                        "its directions: the same eta is the same strength for every method")
    p.add_argument("--sec-ema", type=float, metavar="RHO",
                   help="EMA variant of SEC: mu_t = (1-RHO) mu_{t-1} + RHO * batch mean, RHO in (0, 1] (implies --sec)")
    p.add_argument("--see", action="store_true",
                   help="spherical embedding expansion: synthetic points as extra negatives (MoCo, MoCo v3), "
                        "anchors of an auxiliary InfoNCE (SimCLR, NNCLR) or around prototypes (DINO, SwAV); "
                        "see.* keys")
    p.add_argument("--vmf", action="store_true",
                   help="auxiliary vMF loss on spherical k-means pseudo-classes (vmf.k, vmf.kappa, vmf.weight, ...)")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML recipe (see configs/)")
    p.add_argument("--dataset", choices=config.DATASET_CHOICES, help="dataset (default: digits, embedded, no download)")
    p.add_argument("--data-root", metavar="DIR",
                   help="dataset directory; imagefolder: DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg")
    p.add_argument("--download", action="store_true",
                   help="download cifar10/cifar100/stl10 if missing (needs internet)")
    p.add_argument("--backbone", choices=config.BACKBONE_CHOICES,
                   help="encoder (default auto: tiny CPU convnet for digits, resnet18 otherwise); vit_*: timm ViTs")
    p.add_argument("--epochs", type=int, metavar="N", help="training epochs (sets the lr/momentum schedules)")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="stop after N optimiser steps (schedules still span --epochs); for smoke runs")
    p.add_argument("--batch-size", type=int, metavar="N", help="batch size per process")
    p.add_argument("--lr", type=float, help="peak learning rate (default: optim.base_lr x global batch / 128, "
                   "base_lr the method's: 0.06 SGD / LARS, SimSiam 0.015; 7.5e-5 AdamW, DINO 2.5e-4)")
    p.add_argument("--device", choices=config.DEVICE_CHOICES, help="training device (default auto: cuda if available)")
    p.add_argument("--output-dir", metavar="DIR", help="parent of run directories (default: runs/)")
    p.add_argument("--run-name", metavar="NAME",
                   help="run directory name (default: <dataset>_<method>[_sec]_s<seed>; -2, -3, ... if taken)")
    p.add_argument("--resume", metavar="PATH|auto",
                   help="continue from a checkpoint (PATH) or from the newest last.pt of this run name (auto)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. method.temperature=0.2")
    return p


def flag_values(args: argparse.Namespace) -> Dict[str, Any]:
    """The config values the command-line flags set: {'section.key': value}."""
    flat = {FLAG_KEYS[k]: v for k, v in vars(args).items() if k in FLAG_KEYS}
    if getattr(args, "sec", False) or "sec_weight" in vars(args) or "sec_ema" in vars(args):
        flat["sec.enabled"] = True
    for flag, key in (("download", "data.download"), ("see", "see.enabled"), ("vmf", "vmf.enabled")):
        if getattr(args, flag, False):
            flat[key] = True
    return flat


def build_config(argv: Optional[Sequence[str]] = None) -> DictConfig:
    """Parse argv into a resolved config for this machine. On --resume the checkpoint's request is
    the base, only what the user gave on this command line is applied on top, and every derived
    value (the learning rate by the number of processes, the kNN monitor's caps by CUDA, ...) is
    derived again for this machine; one line names what changed and why.

    A resume continues in the checkpoint's own run directory unless --run-name or
    --output-dir (or run.run_name= / run.output_dir=) name another one: then it forks
    into that new directory."""
    args = build_parser().parse_intermixed_args(argv)
    values = flag_values(args)
    overrides = getattr(args, "overrides", [])
    layers = dict(config_file=getattr(args, "config", None), values=values, overrides=overrides)
    # Which checkpoint to continue is decided before the method's own keys are read: on a resume
    # the method comes from the checkpoint, so method.queue_size=... for a saved MoCo run must not
    # be checked against the default method's section first.
    def not_method(key: str) -> bool:
        return not key.startswith("method.") or key == "method.name"

    probe = config.layered(config_file=layers["config_file"],
                           values={k: v for k, v in values.items() if not_method(k)},
                           overrides=[o for o in overrides if not_method(o.split("=", 1)[0].strip())])
    ckpt_path = find_resume(probe)
    if ckpt_path is None:
        return config.resolve(config.layered(**layers))
    saved = config.from_container(checkpoint.load(ckpt_path)["config"], f"checkpoint {ckpt_path}")
    request = config.layered(**layers, base=config.request_of(saved))
    resumed = config.resolve(request)
    explicit = set(values) | {item.split("=", 1)[0].strip() for item in overrides}
    if probe.run.resume == "auto" or not explicit & {"run.run_name", "run.output_dir"}:
        run_dir = os.path.dirname(os.path.abspath(ckpt_path))  # in place, wherever the run has moved to
        resumed.run.run_name, resumed.run.output_dir = os.path.basename(run_dir), os.path.dirname(run_dir)
        if saved.run.run_name and os.path.abspath(os.path.join(saved.run.output_dir, saved.run.run_name)) == run_dir:
            # the same directory as saved: keep its spelling, so "runs" -> "/abs/runs" is no changed key
            resumed.run.run_name, resumed.run.output_dir = saved.run.run_name, saved.run.output_dir
    resumed.run.resume = ckpt_path
    for key in config.weight_keys(saved):
        section, name = key.split(".")
        old, new = saved[section].get(name), resumed[section].get(name)
        if old != new:
            raise config.ConfigError(
                f"cannot resume {ckpt_path} with {key} changed ({old} -> {new}): its saved weights are for "
                f"{key}={old}. Keep {key}, or start a new run (drop --resume)")
    derived = set(resumed.derived)
    changed = _diff(saved, resumed, ignore={"run.resume", "data.mean", "data.std"} | derived)
    rederived = [f"{k}: {old} -> {new} ({resumed.derived[k]})" for k, old, new in _changes(saved, resumed, derived)]
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank builds the config; one says so
        if changed:
            print(f"[ssl_sphere] resuming {ckpt_path} with changed keys: {', '.join(changed)}")
        if rederived:
            print(f"[ssl_sphere] re-derived for this machine: {'; '.join(rederived)}")
    return resumed


def _changes(a: DictConfig, b: DictConfig, keys) -> List[tuple]:
    """(key, value in a, value in b) for the keys (section.key) whose values differ."""
    out = []
    for name in sorted(keys):
        section, key = name.split(".")
        old, new = a[section].get(key), b[section].get(key)
        if old != new:
            out.append((name, old, new))
    return out


def _diff(a: DictConfig, b: DictConfig, ignore=()) -> List[str]:
    """'key: old -> new' for every setting that differs between two resolved configs."""
    keys = {f"{section}.{key}" for section in config.SECTIONS for key in OmegaConf.to_container(a[section])}
    return [f"{k}: {old} -> {new}" for k, old, new in _changes(a, b, keys - set(ignore))]


def _main(argv: Optional[Sequence[str]]) -> int:
    from ..engine.train import train

    train(build_config(argv))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI. Exit codes: 0 done; 2 a user error (one line on stderr: what is wrong, which key or
    file, what to do); 75 stopped by SIGTERM / SIGUSR1 after saving (resume it); 130 Ctrl-C
    (after saving at the next step boundary; a second Ctrl-C stops at once)."""
    return handle_errors(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
