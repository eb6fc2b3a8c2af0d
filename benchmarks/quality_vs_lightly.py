"""Representation quality at an equal budget: ssl_sphere against lightly's reference pipeline.

    python benchmarks/quality_vs_lightly.py --steps 40 --batch 64 --out benchmarks/results/quality_vs_lightly_cpu.json
    python benchmarks/quality_vs_lightly.py --device cuda --steps 3900 --batch 256 --out ...gpu.json   # a real budget
    python benchmarks/quality_vs_lightly.py --table-only benchmarks/results/quality_vs_lightly_cpu.json \
        --write README.md docs/benchmarks/quality.md          # re-render a record's table where it is cited

--methods takes any registered method (default simclr moco byol; also simsiam, mocov3, nnclr,
dino, swav: lightly's pipeline for each is in reference_pipelines.py).

Both libraries get the same data (a stratified 10,000-image subset of the CIFAR-10 folder,
decoded once by ssl_sphere's cache and handed to lightly as the same pixels), the same
torchvision ResNet-18 with the small-image stem, the same batch, number of steps, SGD
(momentum 0.9, weight decay 5e-4 on every parameter) and cosine lr schedule, and the same
method hyper-parameters where both expose them (heads, temperature, queue, EMA momentum
0.99 -> 1, augmentation strengths); the lr and EMA schedules run over the same total (whole
epochs of the subset; --steps may stop before its end). Each library does the rest its own
way: ssl_sphere its training loop (on-device augmentation, split BN + key shuffle for MoCo,
its losses); lightly its transforms in DataLoader workers, heads, losses (NTXentLoss with a
memory bank, NegativeCosineSimilarity, NNMemoryBankModule, DINOLoss, SwaVLoss; MoCo v3's ctr from
torch's cross-entropy) and update_momentum, as in lightly's examples and CIFAR-10 benchmark.

Evaluation, identical for both: kNN top-1 (k 200, T 0.1) of the backbone's features, bank =
the 10,000 pretraining images, queries = 2,000 stratified test images; seeds 0, 1, 2; and each
library's random-initialised network.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from make_table import write_between
from reference_pipelines import LightlyStep

from ssl_sphere.augment.views import Augmenter
from ssl_sphere.cli.pretrain import build_config
from ssl_sphere.config import for_method
from ssl_sphere.core.schedules import lr_at
from ssl_sphere.data.datasets import load_data
from ssl_sphere.data.splits import stratified_subset
from ssl_sphere.engine.train import train
from ssl_sphere.evaluation.features import extract_features
from ssl_sphere.evaluation.protocols import knn_accuracy
from ssl_sphere.methods import names as method_names

REPO = Path(__file__).resolve().parents[1]
CIFAR = Path(os.environ.get("SSL_SPHERE_CIFAR10", REPO.parent / "shared" / "data" / "cifar10"))


def config(method: str, args, seed: int, out: Path):
    """One config for both libraries: the budget as epochs of the subset, max_steps = --steps."""
    per_epoch = args.train_size // args.batch
    return build_config(for_method([
        "--method", method, "--dataset", "imagefolder", "--data-root", str(args.data_root), "--backbone", "resnet18",
        "--batch-size", str(args.batch), "--epochs", str(math.ceil(args.steps / per_epoch)), "--max-steps",
        str(args.steps), "--seed", str(seed), "--device", args.device, "--output-dir", str(out),
        "--run-name", f"{method}_s{seed}", f"data.train_limit={args.train_size}", "optim.warmup_epochs=0",
        "optim.weight_decay=5e-4", "optim.decay_norm_and_bias=true", "method.queue_size=4096",
        "method.momentum=0.99", "method.momentum_final=1.0", "eval.every_epochs=0", "run.progress=false",
        "run.ckpt_every_minutes=0"], method))


def knn(module, splits, test_idx, device, aug) -> float:
    """kNN top-1 of ``module`` (anything with .features or a backbone): bank = the pretraining
    images, queries = the stratified test subset."""
    bank = extract_features(module, splits.train.images, 256, device, aug.eval_transform)
    queries = extract_features(module, splits.test.images, 256, device, aug.eval_transform, index=test_idx)
    return knn_accuracy(bank, splits.train.labels, queries, splits.test.labels[test_idx], 200, 0.1, 10)["knn_top1"]


def run_lightly(cfg, splits, device, steps: int, workers: int, seed: int):
    """lightly's pipeline for ``steps`` steps on ssl_sphere's schedules (the same cosine lr and EMA
    momentum over the same total: optim.epochs x steps per epoch); returns its backbone."""
    torch.manual_seed(seed)
    per_epoch = len(splits.train) // cfg.optim.batch_size
    pipe = LightlyStep(cfg, splits.train.images, splits.mean, splits.std, device, n_batches=per_epoch,
                       workers=workers)
    pipe.total = total = cfg.optim.epochs * per_epoch
    for i in range(steps):
        for g in pipe.optimizer.param_groups:
            g["lr"] = lr_at(i, total, 0, cfg.optim.lr)
        pipe()
    return pipe.online[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=str(CIFAR))
    p.add_argument("--methods", nargs="+", default=["simclr", "moco", "byol"], choices=method_names(),
                   metavar="METHOD", help="registered methods (default simclr moco byol): " + ", ".join(method_names()))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="lightly's DataLoader workers")
    p.add_argument("--out", help="JSON record (rows are appended as runs finish)")
    p.add_argument("--work", default="/tmp/ssl_sphere_quality")
    p.add_argument("--table-only", metavar="RECORD.json", help="print the table block of a record, run nothing")
    p.add_argument("--write", nargs="+", metavar="FILE.md",
                   help="with --table-only: also replace the block between <!-- TAG:start/end --> (TAG: the "
                        "record's file name without .json, '_' as '-', e.g. quality-vs-lightly-cpu) in each of "
                        "these files that has the markers")
    args = p.parse_args(argv)
    if args.table_only:
        text = block(args.table_only)
        print(text)
        if args.write:
            start, end = block_markers(args.table_only)
            if not write_between(args.write, start, end, text):
                raise SystemExit(f"markers {start} / {end} found in none of {', '.join(args.write)}")
        return 0
    device = torch.device(args.device)
    out = Path(args.work)
    cmd = "python benchmarks/quality_vs_lightly.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rec = {"command": cmd,
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
           "torch": torch.__version__, "rows": []}
    if args.out and Path(args.out).exists():  # appending: keep every command that added rows
        old = json.loads(Path(args.out).read_text())
        rec["rows"] = old["rows"]
        rec["command"] = old["command"] if isinstance(old["command"], list) else [old["command"]]
        if rec["command"][-1] != cmd:
            rec["command"].append(cmd)
    done = {(r["library"], r["method"], r["seed"]) for r in rec["rows"]}

    def save(row):
        rec["rows"].append(row)
        print("[quality]", json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")

    base = config("simclr", args, 0, out)
    splits = load_data(base.data, progress=False, say=lambda *a: None)
    test_idx = stratified_subset(splits.test.labels, args.test_size, seed=0)
    aug = Augmenter(base.aug, base.data.image_size, splits.mean, splits.std)
    for library in ("ssl_sphere", "lightly"):
        if (library, "random_init", 0) not in done:
            torch.manual_seed(0)
            from ssl_sphere.models.backbones import build_backbone

            net = build_backbone("resnet18", True)[0].to(device)
            save({"library": library, "method": "random_init", "seed": 0, "knn_top1": knn(net, splits, test_idx,
                                                                                           device, aug)})
    for seed in args.seeds:
        for method in args.methods:
            cfg = config(method, args, seed, out)
            for library in ("ssl_sphere", "lightly"):
                if (library, method, seed) in done:
                    continue
                t0 = time.time()
                if library == "ssl_sphere":
                    s = train(cfg, splits)
                    from ssl_sphere.models.pretrained import load_pretrained

                    net = load_pretrained(str(Path(s["run_dir"]) / "last.pt"), device=device).module
                else:
                    net = run_lightly(cfg, splits, device, args.steps, args.workers, seed)
                save({"library": library, "method": method, "seed": seed, "steps": args.steps, "batch": args.batch,
                      "knn_top1": knn(net, splits, test_idx, device, aug), "seconds": round(time.time() - t0)})
    print(table(rec["rows"]))
    return 0


def block_markers(record: str) -> tuple:
    tag = Path(record).stem.replace("_", "-")
    return f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"


def block(record: str) -> str:
    """A record's table (kNN top-1 %, mean ± std over seeds) and the commands that wrote it."""
    rec = json.loads(Path(record).read_text())
    cmds = rec["command"] if isinstance(rec["command"], list) else [rec["command"]]
    return "\n".join([table(rec["rows"]), "", f"kNN top-1 %, mean ± std (n seeds); record "
                       f"`benchmarks/results/{Path(record).name}`, written by:", "", *(f"    {c}" for c in cmds)])


def table(rows) -> str:
    """One line per method of the rows: the random network first, then the methods in the registry's order."""
    lines = ["| method | ssl_sphere | lightly |", "| --- | --- | --- |"]
    present = {r["method"] for r in rows}
    for method in ["random_init"] + [m for m in method_names() if m in present]:
        cells = []
        for library in ("ssl_sphere", "lightly"):
            xs = [r["knn_top1"] for r in rows if r["library"] == library and r["method"] == method]
            if not xs:
                cells.append("–")
            elif len(xs) == 1:
                cells.append(f"{xs[0]:.2f} (n=1)")
            else:
                cells.append(f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f} (n={len(xs)})")
        lines.append(f"| {method.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
