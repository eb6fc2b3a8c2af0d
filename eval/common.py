"""Shared code of the offline evaluation CLIs (eval/knn.py, eval/linear.py).

Builds the model from a checkpoint (its saved, resolved config + strict
state_dict load) or at random initialisation (config built like pretraining),
loads the labelled splits, takes deterministic stratified subsets and extracts
frozen backbone features with the eval transform (no augmentation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python eval/knn.py` from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from ssl_sphere import config as C  # noqa: E402
from ssl_sphere.data import DataError  # noqa: E402


class EvalError(RuntimeError):
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
    p.add_argument("--backbone", choices=C.BACKBONE_CHOICES,
                   help="with --random-init: encoder (default as pretraining: tiny for digits, resnet18 "
                        "otherwise); with --checkpoint it must be the backbone the checkpoint was trained with")
    p.add_argument("--dataset", choices=C.DATASET_CHOICES,
                   help="dataset (default: the checkpoint's; digits with --random-init)")
    p.add_argument("--data-root", metavar="DIR",
                   help="dataset directory (imagefolder: DIR/train/<class>/*, DIR/test/<class>/*)")
    p.add_argument("--limit-train", type=int, metavar="N",
                   help="use a deterministic class-stratified subset of N train images")
    p.add_argument("--limit-test", type=int, metavar="M", help="use a class-stratified subset of M test images")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="feature extraction batch size (default: the config's eval.batch_size, 512)")
    p.add_argument("--device", choices=C.DEVICE_CHOICES, default="auto",
                   help="device (default auto: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets and of --random-init weights (default 0)")
    p.add_argument("--save-features", metavar="FILE.pt",
                   help="also save the extracted features and labels (train/test) to FILE.pt")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line of stdout")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="with --random-init: config overrides as in pretraining, e.g. data.image_size=32")
    return src


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------- model + config
def _random_init_config(args: argparse.Namespace):
    layers: List = []
    if args.config:
        layers.append((C.load_yaml(args.config), f"config file {args.config}"))
    flat: Dict[str, Any] = {}
    if args.dataset:
        flat["data.dataset"] = args.dataset
    if args.data_root:
        flat["data.root"] = args.data_root
    if args.backbone:
        flat["model.backbone"] = args.backbone
    if flat:
        nested: Dict[str, Dict[str, Any]] = {}
        for key, value in flat.items():
            section, field = key.split(".")
            nested.setdefault(section, {})[field] = value
        layers.append((nested, "command-line flags"))
    cfg = C.structured()
    for values, where in layers:
        cfg = C.merge(cfg, values, where)
    cfg = C.apply_overrides(cfg, args.overrides)
    return C.resolve(cfg)


def _checkpoint_config(args: argparse.Namespace, ckpt: Dict[str, Any], path: str):
    if args.config or args.overrides:
        raise EvalError("--config and key=value overrides only apply with --random-init; a checkpoint's model "
                        "is built from the config saved in it")
    try:
        cfg = C.from_container(ckpt["config"], f"checkpoint {path}")
    except C.ConfigError as exc:
        raise EvalError(f"{path}: its saved config does not fit this version of ssl_sphere: "
                        f"{_first_line(exc)}") from None
    trained_backbone = cfg.model.backbone
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
    if args.data_root:
        cfg.data.root = args.data_root  # same kind of data elsewhere: keep the trained image size
    if args.backbone and args.backbone != "auto":
        cfg.model.backbone = args.backbone
    return C.resolve(cfg), trained_backbone


def _n_train(cfg, state: Optional[Dict[str, Any]] = None) -> int:
    """The training-set size build_model needs (vMF keeps one pseudo-label per image):
    read from the checkpoint's vMF buffer; for --random-init any size >= vmf.k will do
    (the buffer does not take part in the features)."""
    if state is not None and torch.is_tensor(state.get("vmf.labels")):
        return int(state["vmf.labels"].shape[0])
    vmf = cfg.get("vmf") if hasattr(cfg, "get") else None
    return int(vmf.k) if vmf is not None and vmf.get("enabled") else 0


@dataclass
class Loaded:
    cfg: Any
    model: Any  # ssl_sphere.train.Pretrainer
    checkpoint: Optional[str]
    device: torch.device


def load_model(args: argparse.Namespace) -> Loaded:
    if args.checkpoint and not os.path.isfile(args.checkpoint):  # before the slow imports
        raise EvalError(f"checkpoint not found: {args.checkpoint}")
    from ssl_sphere import checkpoint as ckpt_io
    from ssl_sphere.train import build_model, resolve_device

    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:
        raise EvalError(str(exc)) from None
    if args.random_init:
        cfg = _random_init_config(args)
        torch.manual_seed(args.seed)
        model = build_model(cfg, _n_train(cfg))
        return Loaded(cfg, model.to(device), None, device)

    path = args.checkpoint
    try:
        ckpt = ckpt_io.load(path)
    except FileNotFoundError:
        raise EvalError(f"checkpoint not found: {path}") from None
    except RuntimeError as exc:
        raise EvalError(_first_line(exc)) from None
    if not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("model"), dict):
        raise EvalError(f"{path} is not an ssl_sphere checkpoint (its 'model'/'config' entries are not mappings)")
    cfg, trained_backbone = _checkpoint_config(args, ckpt, path)
    try:
        model = build_model(cfg, _n_train(cfg, ckpt["model"]))
    except ValueError as exc:
        raise EvalError(f"cannot build the model of {path}: {_first_line(exc)}") from None
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        if cfg.model.backbone != trained_backbone:
            raise EvalError(
                f"the weights in {path} do not fit backbone '{cfg.model.backbone}': the checkpoint was trained "
                f"with backbone '{trained_backbone}'; drop --backbone (or pass --backbone {trained_backbone})"
            ) from None
        detail = _first_line(exc).replace("Error(s) in loading state_dict for Pretrainer:", "").strip()
        raise EvalError(
            f"the weights in {path} do not fit the model built from its saved config (backbone "
            f"'{trained_backbone}'): {detail or 'state_dict mismatch'}"
        ) from None
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


def features(args: argparse.Namespace, loaded: Loaded) -> Features:
    from ssl_sphere.augment import Augmenter
    from ssl_sphere.data import Split, load_data
    from ssl_sphere.evaluation import extract_features

    cfg = loaded.cfg
    t0 = time.perf_counter()
    splits = load_data(cfg.data)
    bank, test = splits.bank, splits.test
    # unlabelled samples (label -1) cannot be evaluated
    for name, limit in (("bank", args.limit_train), ("test", args.limit_test)):
        s = bank if name == "bank" else test
        keep = s.labels >= 0
        if not bool(keep.all()):
            s = Split(s.images[keep], s.labels[keep])
        flag = "--limit-train" if name == "bank" else "--limit-test"
        s = Split(*_subset(s.images, s.labels, limit, args.seed, flag))
        if name == "bank":
            bank = s
        else:
            test = s
    if len(bank) == 0 or len(test) == 0:
        raise EvalError(f"{splits.name}: no labelled {'train' if len(bank) == 0 else 'test'} images to evaluate")
    t1 = time.perf_counter()
    aug = Augmenter(cfg.aug, cfg.data.image_size, splits.mean, splits.std).to(loaded.device)
    bs = args.batch_size or cfg.eval.batch_size
    method = loaded.model.method
    f_train = extract_features(method, bank, bs, loaded.device, aug.eval_transform)
    f_test = extract_features(method, test, bs, loaded.device, aug.eval_transform)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)
    t2 = time.perf_counter()
    dev = loaded.device
    out = Features(f_train, bank.labels.to(dev), f_test, test.labels.to(dev), splits.num_classes,
                   cfg.data.dataset, cfg.data.root, t1 - t0, t2 - t1)
    if args.save_features:
        torch.save({"train_features": out.train.cpu(), "train_labels": out.train_labels.cpu(),
                    "test_features": out.test.cpu(), "test_labels": out.test_labels.cpu(),
                    "num_classes": out.num_classes, "dataset": out.dataset,
                    "data_root": out.data_root, "checkpoint": loaded.checkpoint,
                    "backbone": cfg.model.backbone}, args.save_features)
    return out


def _subset(x: torch.Tensor, y: torch.Tensor, limit: Optional[int], seed: int, flag: str):
    from ssl_sphere.evaluation import stratified_subset

    if limit is None:
        return x, y
    if limit < 1:
        raise EvalError(f"{flag} must be >= 1, got {limit}")
    idx = stratified_subset(y.cpu(), limit, seed).to(y.device)
    return x[idx], y[idx]


def saved_features(args: argparse.Namespace, device: torch.device):
    """(Features, the file's dict) of a file written by --save-features; limits as for images."""
    path = args.features
    if not os.path.isfile(path):
        raise EvalError(f"features file not found: {path}")
    t0 = time.perf_counter()
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EvalError(f"cannot read features file {path} (corrupt?): {_first_line(exc)}") from None
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
        from ssl_sphere.train import resolve_device

        try:
            device = resolve_device(args.device)
        except RuntimeError as exc:
            raise EvalError(str(exc)) from None
        f, meta = saved_features(args, device)
        ckpt, backbone = meta.get("checkpoint"), meta.get("backbone", "?")
        return Prepared(f, ckpt, f"features {args.features} (of {ckpt or 'a random-init ' + str(backbone)})",
                        str(backbone), device)
    loaded = load_model(args)
    f = features(args, loaded)
    src = loaded.checkpoint or f"random init ({loaded.cfg.model.backbone}, seed {args.seed})"
    return Prepared(f, loaded.checkpoint, src, loaded.cfg.model.backbone, loaded.device)


# ----------------------------------------------------------------------------- output
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


def run(main_fn, argv: Optional[Sequence[str]]) -> int:
    """Call ``main_fn(argv)``; user-facing errors -> one line on stderr, exit code 2."""
    try:
        return main_fn(argv)
    except (EvalError, DataError, C.ConfigError) as exc:
        print(f"error: {_first_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
