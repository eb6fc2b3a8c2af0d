"""Hypersphere study: kNN top-1 of MoCo v2 and SimCLR with baseline / +SEC / +SEC-EMA /
+SEE / +vMF at a fixed budget, several seeds; prints a markdown table (mean ± std).

    python eval/sphere_study.py --data-root ../shared/data/cifar10 --out benchmarks/results/sphere_study_cpu.json

    python eval/sphere_study.py --budget gpu --cells 2 --out benchmarks/results/sphere_study_gpu.json

    python eval/sphere_study.py --out benchmarks/results/sphere_study_cpu.json --table-only \
        --write docs/benchmarks/hypersphere.md      # re-render the committed tables of the docs

The default budget is CPU-affordable (tiny convnet, 10k-image stratified CIFAR-10
subset, 2 epochs of batch 128 = 156 steps per run); ``--budget gpu`` is the longer
one (ResNet-18, full CIFAR-10 folder, 20 epochs of batch 512 = 1,940 steps, bf16 +
channels_last), sized so that one lent GPU session of ~15 minutes adds a few cells.
A cell is one (seed, method, variant) run. Results are appended to the JSON file as
cells finish, so an interrupted study continues where it stopped; ``--cells N`` runs
only the next N cells not yet in the file, in the order seed -> method -> variant
(seed 0 first, SimCLR before MoCo, baseline first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

VARIANTS = {
    "baseline": [],
    "+SEC": ["--sec"],
    "+SEC-EMA": ["--sec-ema", "0.1"],
    "+SEE": ["--see"],
    "+vMF": ["--vmf"],
}
BUDGETS = {
    "cpu": ["--backbone", "tiny", "--batch-size", "128", "--epochs", "2", "data.train_limit=10000",
            "eval.every_epochs=2", "eval.bank_size=10000", "eval.test_size=2000", "method.queue_size=4096",
            "vmf.k=100"],
    "gpu": ["--backbone", "resnet18", "--batch-size", "512", "--epochs", "20", "eval.every_epochs=5",
            "eval.bank_size=50000", "eval.test_size=10000", "method.queue_size=4096", "vmf.k=100",
            "model.channels_last=true"],
}


def todo(results: list, budget: str, seeds, methods, variants) -> list:
    """The (seed, method, variant) cells of this budget not yet in ``results``, in run order."""
    done = {(r["seed"], r["method"], r["variant"]) for r in results if r["budget"] == budget}
    return [(s, m, v) for s in seeds for m in methods for v in variants if (s, m, v) not in done]


def table(results: list) -> str:
    """Markdown table of one budget's results: mean ± std (n) per method x variant."""
    methods = sorted({r["method"] for r in results})
    lines = ["| method | " + " | ".join(VARIANTS) + " |", "| --- |" + " --- |" * len(VARIANTS)]
    for m in methods:
        cells = []
        for v in VARIANTS:
            xs = [r["knn_top1"] for r in results if r["method"] == m and r["variant"] == v]
            if not xs:
                cells.append("–")
            else:
                sd = f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else ""  # one seed: no spread to show
                cells.append(f"{statistics.mean(xs):.2f}{sd} (n={len(xs)})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_between_markers(path: str, tag: str, text: str) -> None:
    """Replace what stands between <!-- TAG:start --> and <!-- TAG:end --> in ``path``."""
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    doc = open(path).read()
    if start not in doc or end not in doc:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    head, rest = doc.split(start, 1)
    with open(path, "w") as f:
        f.write(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")
    print(f"updated {path} ({tag})")


def _device_name(device: str) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data/cifar10", help="CIFAR-10 image folder (train/, test/)")
    p.add_argument("--methods", nargs="+", default=["simclr", "moco"], choices=["moco", "simclr"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget", choices=list(BUDGETS), default="cpu")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/sphere_study.json", help="results JSON (appended; reruns skip done runs)")
    p.add_argument("--runs-dir", default="runs/sphere_study", help="where the run directories go")
    p.add_argument("--cells", type=int, default=None, metavar="N",
                   help="run only the next N cells (seed, method, variant) not yet in --out (default: all)")
    p.add_argument("--table-only", action="store_true", help="print the table of an existing results file")
    p.add_argument("--write", metavar="FILE.md",
                   help="with --table-only: also replace each budget's table between the markers "
                        "<!-- sphere-study-BUDGET:start/end --> in this file (the committed tables: "
                        "docs/benchmarks/hypersphere.md)")
    args = p.parse_args(argv)
    if args.cells is not None and args.cells < 0:
        p.error("--cells must be >= 0")

    results = json.load(open(args.out)) if os.path.exists(args.out) else []
    if args.table_only:
        for budget in sorted({r["budget"] for r in results}):
            text = table([r for r in results if r["budget"] == budget])
            print(f"budget {budget}:\n{text}\n")
            if args.write:
                write_between_markers(args.write, f"sphere-study-{budget}", text)
        return 0
    cells = todo(results, args.budget, args.seeds, args.methods, args.variants)[:args.cells]
    print(f"[study] budget {args.budget}: {len(cells)} cell(s) to run: "
          + ", ".join(f"{m} {v} s{s}" for s, m, v in cells), flush=True)

    from ssl_sphere.cli.pretrain import build_config
    from ssl_sphere.config import for_method
    from ssl_sphere.data.datasets import load_data
    from ssl_sphere.engine.train import train

    common = ["--dataset", "imagefolder", "--data-root", args.data_root, "--device", args.device,
              "run.progress=false"]
    splits = None
    for seed, m, v in cells:
        name = f"{args.budget}_{m}_{v.strip('+').lower()}_s{seed}"
        argv_run = ["--method", m, *VARIANTS[v], "--seed", str(seed), "--output-dir", args.runs_dir,
                    "--run-name", name, *common, *for_method(BUDGETS[args.budget], m)]
        cfg = build_config(argv_run)
        if splits is None:
            splits = load_data(cfg.data)  # decoded once for the whole study
        t0 = time.time()
        s = train(cfg, splits)
        row = {"method": m, "variant": v, "seed": seed, "budget": args.budget,
               "knn_top1": s["knn_top1"], "knn_top5": s["knn_top5"], "start_knn_top1": s["start_knn_top1"],
               "steps": s["step"], "seconds": round(time.time() - t0, 1), "device": _device_name(cfg.run.device),
               "command": "python -m ssl_sphere.pretrain " + " ".join(argv_run)}
        results.append(row)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.out)  # a kill mid-write never loses the cells already recorded
        print(f"[study] {m} {v} seed {seed}: kNN top-1 {s['knn_top1']:.2f}% ({time.time() - t0:.0f}s)",
              flush=True)
    print(table([r for r in results if r["budget"] == args.budget]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
