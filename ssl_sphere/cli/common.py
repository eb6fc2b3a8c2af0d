"""What every command shares: the one error path (``handle_errors``: exit code 2 and one line for a
user error, 75 / 130 after a stop on a signal), and for the offline evaluation CLIs (knn, linear)
their common flags, the model from a checkpoint or at random initialisation, the labelled splits and
their frozen features (or features saved earlier), and the report."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from .. import config, methods  # noqa: F401  (methods: the registry the config schema reads)
from ..augment.ops import eval_transform
from ..core import checkpoint
from ..core.errors import ThreadErrors, UserError, first_line
from ..data.datasets import load_data
from ..data.splits import Split, stratified_subset
from ..engine.device import resolve_device
from ..engine.signals import StopRequested
from ..evaluation.features import extract_features
from ..models.ssl_model import SSLModel, build_model, model_from_checkpoint


def handle_errors(main_fn: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run a command's ``main_fn(argv)`` and map what it raises to an exit code:
    UserError / FileNotFoundError -> 2; other OSError (a full or read-only disk) -> 2; a stop on
    SIGTERM / SIGUSR1 after saving -> 75, on Ctrl-C -> 130 (see ssl_sphere.engine.signals).
    An exception that ends a background thread (TensorBoard's writer on a full disk, say) takes
    the same path (core.errors.ThreadErrors): no traceback for anything a user can cause."""
    try:
        with ThreadErrors():
            return main_fn(argv)
    except StopRequested as stop:
        if os.environ.get("RANK", "0") == "0":  # every rank stops; one says so
            print(f"[ssl_sphere] {stop}; continue with: python -m ssl_sphere.pretrain --resume {stop.checkpoint} "
                  "(or the same command with --resume auto)", file=sys.stderr)
        return stop.exit_code
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        hint = ("free space there or choose another --output-dir / data.cache_dir" if exc.errno == errno.ENOSPC
                else "check the path and its permissions")
        print(f"error: {exc.strerror or first_line(exc)}{where}; {hint} (saved checkpoints are intact)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint (if any) is intact; continue with --resume auto", file=sys.stderr)
        return 130


class EvalError(UserError, RuntimeError):
    """A user-facing problem: printed as one line on stderr, exit code 2."""


def add_common_args(p: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """The flags both CLIs share; returns the (required) model-source group."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="ssl_sphere checkpoint (e.g. runs/<run>/last.pt)")
    src.add_argument("--random-init", action="store_true",
                     help="evaluate a randomly initialised model (baseline); built from --config / flags "
                          "like pretraining")
    src.add_argument("--features", metavar="FILE.pt",
                     help="evaluate features saved earlier with --save-features (no model, no images)")
    p.add_argument("--config", metavar="FILE.yaml", help="with --random-init: YAML recipe for the model and data")
    p.add_argument("--backbone", choices=config.BACKBONE_CHOICES,
                   help="with --random-init: encoder (default as pretraining: tiny for digits, resnet18 "
                        "otherwise); with --checkpoint it must be the backbone the checkpoint was trained with")
    p.add_argument("--dataset", choices=config.DATASET_CHOICES,
                   help="dataset (default: the checkpoint's; digits with --random-init)")
    p.add_argument("--data-root", metavar="DIR",
                   help="dataset directory (imagefolder: DIR/train/<class>/*, DIR/test/<class>/*)")
    p.add_argument("--limit-train", type=int, metavar="N",
                   help="use a deterministic class-stratified subset of N train images")
    p.add_argument("--limit-test", type=int, metavar="M", help="use a class-stratified subset of M test images")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="feature extraction batch size (default: the config's eval.batch_size, 512)")
    p.add_argument("--device", choices=config.DEVICE_CHOICES, default="auto",
                   help="device (default auto: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets and of --random-init weights (default 0)")
    p.add_argument("--save-features", metavar="FILE.pt",
                   help="also save the extracted features and labels (train/test) to FILE.pt")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line of stdout")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="with --random-init: config overrides as in pretraining, e.g. data.image_size=32")
    return src


def check_common_args(args: argparse.Namespace) -> None:
    """The shared flags' values, before any work: sizes >= 1, an existing --save-features directory."""
    for flag, value in (("--batch-size", args.batch_size), ("--limit-train", args.limit_train),
                        ("--limit-test", args.limit_test)):
        if value is not None and value < 1:
            raise EvalError(f"{flag} must be >= 1, got {value}")
    if args.save_features:
        parent = os.path.dirname(os.path.abspath(args.save_features))
        if not os.path.isdir(parent):
            raise EvalError(f"--save-features {args.save_features}: the directory {parent} does not exist; "
                            "create it first")


def device_of(args: argparse.Namespace) -> torch.device:
    try:
        return resolve_device(args.device)
    except config.ConfigError as exc:
        raise EvalError(str(exc)) from None


# ----------------------------------------------------------------------------- model + config
def _random_init_config(args: argparse.Namespace):
    flags = {"data.dataset": args.dataset, "data.root": args.data_root, "model.backbone": args.backbone}
    return config.resolve(config.layered(args.config, {k: v for k, v in flags.items() if v}, args.overrides))


def _checkpoint_config(args: argparse.Namespace, ckpt: Dict[str, Any], path: str):
    """The checkpoint's saved config, pointed at the data the user asked for."""
    if args.config or args.overrides:
        raise EvalError("--config and key=value overrides only apply with --random-init; a checkpoint's model "
                        "is built from the config saved in it")
    try:
        cfg = config.from_container(ckpt["config"], f"checkpoint {path}")
    except config.ConfigError as exc:
        raise EvalError(f"{path}: its saved config does not fit this version of ssl_sphere: "
                        f"{first_line(exc)}") from None
    if "train_limit" in cfg.data:  # a pretraining subset: the kNN bank / probe train set is the whole train split
        cfg.data.train_limit = None
    if args.dataset and args.dataset != cfg.data.dataset:
        # another dataset: its own root, native image size and statistics
        cfg.data.dataset = args.dataset
        cfg.data.root = None
        cfg.data.image_size = None
        cfg.data.mean = None
        cfg.data.std = None
        cfg.data.download = False
        cfg.data.store_size = None
        cfg.data.eval_crop = 1.0
    if args.data_root:
        cfg.data.root = args.data_root  # same kind of data elsewhere: keep the trained image size and statistics
    if args.backbone and args.backbone != "auto":
        cfg.model.backbone = args.backbone
    return config.resolve(cfg)


@dataclass
class Loaded:
    cfg: Any
    model: SSLModel
    checkpoint: Optional[str]
    device: torch.device


def load_model(args: argparse.Namespace) -> Loaded:
    """The model of --checkpoint (its saved config + strict weights) or of --random-init."""
    if args.checkpoint and not os.path.isfile(args.checkpoint):  # before the slow parts
        raise EvalError(f"checkpoint not found: {args.checkpoint}")
    device = device_of(args)
    if args.random_init:
        cfg = _random_init_config(args)
        torch.manual_seed(args.seed)
        # vMF keeps one pseudo-label per training image; any size >= vmf.k will do for features
        model = build_model(cfg, cfg.vmf.k if cfg.vmf.enabled else 0)
        return Loaded(cfg, model.to(device), None, device)

    path = args.checkpoint
    try:
        ckpt = checkpoint.load(path)
    except FileNotFoundError:
        raise EvalError(f"checkpoint not found: {path}") from None
    except checkpoint.CheckpointError as exc:
        raise EvalError(first_line(exc)) from None
    if not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("model"), dict):
        raise EvalError(f"{path} is not an ssl_sphere checkpoint (its 'model'/'config' entries are not mappings)")
    cfg = _checkpoint_config(args, ckpt, path)
    try:
        model = model_from_checkpoint(ckpt, path, cfg)
    except config.ConfigError as exc:
        trained = ckpt["config"].get("model", {}).get("backbone")
        hint = f"; drop --backbone (or pass --backbone {trained})" if trained != cfg.model.backbone else ""
        raise EvalError(first_line(exc) + hint) from None
    return Loaded(cfg, model.to(device), path, device)


# ----------------------------------------------------------------------------- data + features
@dataclass
class Features:
    train: torch.Tensor  # (N, F) float32 on the evaluation device
    train_labels: torch.Tensor  # (N,)
    test: torch.Tensor  # (M, F)
    test_labels: torch.Tensor  # (M,)
    num_classes: int
    dataset: str
    data_root: Optional[str]
    seconds_data: float
    seconds_features: float


def _subset(x: torch.Tensor, y: torch.Tensor, limit: Optional[int], seed: int, flag: str):
    if limit is None:
        return x, y
    if limit < 1:
        raise EvalError(f"{flag} must be >= 1, got {limit}")
    idx = stratified_subset(y.cpu(), limit, seed).to(y.device)
    return x[idx], y[idx]


def _labelled(s: Split, limit: Optional[int], seed: int, flag: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, labels) of the labelled samples of a split (label -1 cannot be evaluated), limited to a
    stratified subset. Rows, not images: a memory-mapped split is read one batch at a time."""
    rows = torch.nonzero(s.labels >= 0).squeeze(1)
    return _subset(rows, s.labels[rows], limit, seed, flag)


def features(args: argparse.Namespace, loaded: Loaded) -> Features:
    """Frozen backbone features of the labelled train (bank) and test splits, eval transform only."""
    cfg, dev = loaded.cfg, loaded.device
    t0 = time.perf_counter()
    splits = load_data(cfg.data)
    bank_rows, bank_y = _labelled(splits.bank, args.limit_train, args.seed, "--limit-train")
    test_rows, test_y = _labelled(splits.test, args.limit_test, args.seed, "--limit-test")
    if len(bank_rows) == 0 or len(test_rows) == 0:
        raise EvalError(f"{splits.name}: no labelled {'train' if len(bank_rows) == 0 else 'test'} images to "
                        "evaluate")
    t1 = time.perf_counter()
    mean = torch.tensor(splits.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(splits.std, device=dev).view(1, 3, 1, 1)
    transform = partial(eval_transform, size=cfg.data.image_size, mean=mean, std=std, crop=cfg.data.eval_crop)
    bs = args.batch_size or cfg.eval.batch_size
    method = loaded.model.method
    f_train = extract_features(method, splits.bank.images, bs, dev, transform, index=bank_rows)
    f_test = extract_features(method, splits.test.images, bs, dev, transform, index=test_rows)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t2 = time.perf_counter()
    out = Features(f_train, bank_y.to(dev), f_test, test_y.to(dev), splits.num_classes,
                   cfg.data.dataset, cfg.data.root, t1 - t0, t2 - t1)
    if args.save_features:
        torch.save({"train_features": out.train.cpu(), "train_labels": out.train_labels.cpu(),
                    "test_features": out.test.cpu(), "test_labels": out.test_labels.cpu(),
                    "num_classes": out.num_classes, "dataset": out.dataset,
                    "data_root": out.data_root, "checkpoint": loaded.checkpoint,
                    "backbone": cfg.model.backbone}, args.save_features)
    return out


def saved_features(args: argparse.Namespace, device: torch.device):
    """(Features, the file's dict) of a file written by --save-features; limits as for images."""
    path = args.features
    if not os.path.isfile(path):
        raise EvalError(f"features file not found: {path}")
    t0 = time.perf_counter()
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EvalError(f"cannot read features file {path} (corrupt?): {first_line(exc)}") from None
    keys = ("train_features", "train_labels", "test_features", "test_labels", "num_classes")
    if not isinstance(d, dict) or any(k not in d for k in keys):
        raise EvalError(f"{path} is not a features file written by --save-features (needs {', '.join(keys)})")
    xtr, ytr = _subset(d["train_features"], d["train_labels"], args.limit_train, args.seed, "--limit-train")
    xte, yte = _subset(d["test_features"], d["test_labels"], args.limit_test, args.seed, "--limit-test")
    f = Features(xtr.to(device), ytr.to(device), xte.to(device), yte.to(device), int(d["num_classes"]),
                 d.get("dataset", "?"), d.get("data_root"), time.perf_counter() - t0, 0.0)
    return f, d


@dataclass
class Prepared:
    features: Features
    checkpoint: Optional[str]  # the evaluated checkpoint (None: random init)
    source: str  # for the readable report
    backbone: str
    device: torch.device


def prepare(args: argparse.Namespace) -> Prepared:
    """Features to evaluate from --checkpoint / --random-init (model + data) or --features (a saved file)."""
    if args.features:
        if args.config or args.overrides or args.backbone or args.dataset or args.data_root or args.save_features:
            raise EvalError("--features evaluates saved features: --config, --backbone, --dataset, --data-root, "
                            "--save-features and overrides do not apply")
        device = device_of(args)
        f, meta = saved_features(args, device)
        ckpt, backbone = meta.get("checkpoint"), meta.get("backbone", "?")
        return Prepared(f, ckpt, f"features {args.features} (of {ckpt or 'a random-init ' + str(backbone)})",
                        str(backbone), device)
    loaded = load_model(args)
    f = features(args, loaded)
    src = loaded.checkpoint or f"random init ({loaded.cfg.model.backbone}, seed {args.seed})"
    return Prepared(f, loaded.checkpoint, src, loaded.cfg.model.backbone, loaded.device)


# ----------------------------------------------------------------------------- output
def evaluate_and_report(args: argparse.Namespace, compute: Callable[[Features, Prepared], Dict[str, float]],
                        settings: Callable[[Features], Dict[str, Any]], title: str, timing: str) -> int:
    """Features (prepare), the protocol's numbers (compute), then one report: the numbers, what was
    evaluated, ``settings(features)`` (the protocol's parameters as used) and the wall time after
    start-up. ``timing`` names the protocol's share of the time."""
    t0 = time.perf_counter()
    prep = prepare(args)
    f = prep.features
    t1 = time.perf_counter()
    res = compute(f, prep)
    t2 = time.perf_counter()
    out = {**res, "checkpoint": prep.checkpoint, "dataset": f.dataset, "n_train": int(f.train.shape[0]),
           "n_test": int(f.test.shape[0]), **settings(f), "seconds": t2 - t0}
    report(out, args.json, f"{title} of {prep.source}", extra=[
        f"  (data {f.seconds_data:.1f}s, features {f.seconds_features:.1f}s, {timing} {t2 - t1:.1f}s; "
        f"{prep.backbone}, {f.train.shape[1]}-d features, device {prep.device})"])
    return 0


def report(result: Dict[str, Any], as_json: bool, title: str, extra: Sequence[str] = ()) -> None:
    if as_json:
        print(json.dumps(result))
        return
    print(title)
    width = max(len(k) for k in result) + 2
    for key, value in result.items():
        if isinstance(value, float):
            value = f"{value:.2f}" + (" %" if ("top" in key or "recall" in key) else "")
        print(f"  {key:<{width}}{value}")
    for line in extra:
        print(line)
