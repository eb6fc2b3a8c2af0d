"""The data path at scale: start-up cold (cache build) vs warm (memory map) vs decoding into
memory, peak memory of a run, anonymous memory against dataset size, the memory of 2 ranks,
and training throughput from the memory map against an in-memory tensor.

    python benchmarks/data_scale.py --out benchmarks/results/cpu_data_scale.json [--big 200000] [--baseline REV]

Memory is sampled from /proc every 20 ms for the whole process tree (VmRSS, RssAnon and the
proportional set size Pss, which splits pages shared between processes: libraries and the
page cache of a memory-mapped dataset). ``--baseline REV`` also runs the code of git revision
REV (e.g. the commit before the cache) from a temporary worktree for the "today" figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CIFAR = Path(os.environ.get("SSL_SPHERE_CIFAR10", REPO.parent / "shared" / "data" / "cifar10"))


def tree(pid: int) -> list:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def kib(pid: int, path: str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list, env: dict = None, cwd=REPO, only_python: bool = True) -> dict:
    """Run cmd; wall seconds, stdout, and the peaks (MiB) of RSS / RssAnon / Pss summed over the
    process tree's Python processes (and of the largest single one)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peak = {"rss_total": 0, "anon_total": 0, "pss_total": 0, "rss_max": 0, "anon_max": 0}
    while proc.poll() is None:
        pids = [p for p in tree(proc.pid) if not only_python or "python" in _comm(p)]
        rss = [kib(p, "status", "VmRSS") for p in pids]
        anon = [kib(p, "status", "RssAnon") for p in pids]
        pss = [kib(p, "smaps_rollup", "Pss") for p in pids]
        for k, v in (("rss_total", sum(rss)), ("anon_total", sum(anon)), ("pss_total", sum(pss)),
                     ("rss_max", max(rss, default=0)), ("anon_max", max(anon, default=0))):
            peak[k] = max(peak[k], v)
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{err[-3000:]}")
    m = re.search(r"data ready in ([0-9.]+)s", out)
    return {"wall_s": round(time.time() - t0, 2), "data_ready_s": float(m.group(1)) if m else None,
            **{k: round(v / 1024, 1) for k, v in peak.items()}}


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def pretrain(out: Path, *args) -> list:
    return [sys.executable, "-m", "ssl_sphere.pretrain", "--output-dir", str(out), "run.progress=false", *args]


def synthetic_folder(root: Path, n: int, size: int, classes: int = 10) -> None:
    """n smooth synthetic JPEGs (colour gradients and a disc, ~3 KB each) in classes folders."""
    import numpy as np

    code = (
        "import sys, numpy as np; from PIL import Image\n"
        "root, lo, hi, size, classes = sys.argv[1], *map(int, sys.argv[2:])\n"
        "yy, xx = np.mgrid[0:size, 0:size] / size\n"
        "for i in range(lo, hi):\n"
        "    r = np.random.default_rng(i); c = r.random((3, 3))\n"
        "    img = c[:, 0, None, None] * xx + c[:, 1, None, None] * yy + c[:, 2, None, None] * 0.3\n"
        "    cx, cy, rad = r.random(3); img[:, (xx - cx) ** 2 + (yy - cy) ** 2 < (0.1 + 0.2 * rad) ** 2] *= 0.5\n"
        "    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)).save(\n"
        "        f'{root}/train/{i % classes}/{i}.jpg', quality=85)\n")
    for split in ("train", "test"):
        for c in range(classes):
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
    workers = os.cpu_count() or 1
    bounds = np.linspace(0, n, workers + 1).astype(int)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root), str(a), str(b), str(size), str(classes)])
             for a, b in zip(bounds[:-1], bounds[1:])]
    for p in procs:
        p.wait()
    for i in range(classes * 20):  # a small test split
        shutil.copy(root / "train" / str(i % classes) / f"{i}.jpg", root / "test" / str(i % classes) / f"{i}.jpg")


def throughput(backbone: str, batch: int, steps: int) -> dict:
    """Median step time of the training loop's step fed by the Prefetcher from the memory-mapped
    CIFAR-10 cache and from the same images as an in-memory tensor, interleaved in blocks."""
    import torch

    from ssl_sphere.augment.views import Augmenter
    from ssl_sphere.cli.pretrain import build_config
    from ssl_sphere.data.batches import step_batches
    from ssl_sphere.data.datasets import load_data
    from ssl_sphere.engine.optim import build_optimizer
    from ssl_sphere.engine.step import TrainStep
    from ssl_sphere.models.ssl_model import build_model

    cfg = build_config(["--dataset", "imagefolder", "--data-root", str(CIFAR), "--backbone", backbone,
                        "--batch-size", str(batch), "eval.every_epochs=0"])
    splits = load_data(cfg.data, progress=False, say=lambda *a: None)
    sources = {"memory_map": splits.train.images, "in_memory": splits.train.images.clone()}
    device = torch.device("cpu")
    aug = Augmenter(cfg.aug, 32, splits.mean, splits.std)
    times = {k: [] for k in sources}
    n = len(splits.train)
    for block in range(steps // 5):
        for name, images in sources.items():
            torch.manual_seed(0)
            model = build_model(cfg, n, device)
            step = TrainStep(model, model.method, build_optimizer(model, cfg.optim), aug, images, False, cfg,
                             1000, 10, device, n // batch)
            batches = step_batches(n, batch, block, 0, 6)
            for i, (s, idx, x) in enumerate(step.batches(batches)):  # the loop's data path
                t = time.perf_counter()
                step(s, idx, x=x)
                if i > 0:  # the first step of a block warms the model up
                    times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"backbone": backbone, "batch": batch, "steps_each": len(times["in_memory"]),
            "median_step_s": {k: round(v, 4) for k, v in med.items()},
            "ratio_memory_map_vs_in_memory": round(med["in_memory"] / med["memory_map"], 3)}


def table(rec: dict) -> str:
    """The docs block of a record (docs/benchmarks/data-scale.md)."""
    lines = []
    s = rec.get("startup_tiny_1_step")
    if s:
        today = s.get("today_decode", {}).get("wall_s")
        lines += ["| start-up (CIFAR-10 folder, 60k images) | data ready | whole 1-step run |", "| --- | --- | --- |",
                  f"| before the cache (decode in every run) | – | {today} s |" if today else "",
                  f"| decode into memory (`data.cache=off`) | {s['decode_into_memory']['data_ready_s']} s | "
                  f"{s['decode_into_memory']['wall_s']} s |",
                  f"| cache build (cold) | {s['cold_build']['data_ready_s']} s | {s['cold_build']['wall_s']} s |",
                  f"| cache hit (warm, median of 3) | {s['summary']['warm_data_ready_s']} s | "
                  f"{statistics.median(w['wall_s'] for w in s['warm'])} s |", "",
                  f"Warm is {s['summary']['decode_over_warm']}x faster than decoding (data ready).", ""]
    m = rec.get("peak_memory")
    if m:
        f = m["import_floor"]
        lines += ["| peak memory (MiB) | RSS | anonymous |", "| --- | --- | --- |",
                  f"| importing the training code only (torch + torchvision + lightly) | {f['rss_max']} | "
                  f"{f['anon_max']} |"]
        for name, label in (("tiny_1_step", "1 step, tiny convnet"), ("resnet18_1_step", "1 step, ResNet-18")):
            r = m[name]
            if "today" in r:
                lines.append(f"| {label}, before the cache | {r['today']['rss_max']} | {r['today']['anon_max']} |")
            lines.append(f"| {label}, warm cache | {r['new_warm_cache']['rss_max']} | "
                         f"{r['new_warm_cache']['anon_max']} |")
        lines.append("")
    a = rec.get("anon_vs_dataset_size")
    if a:
        lines += ["| 30 steps + kNN monitor, tiny convnet, batch 64, 96 px | images | cache | peak anonymous MiB | "
                  "peak RSS MiB |", "| --- | --- | --- | --- | --- |"]
        for name in ("small", "big"):
            r = a[name]
            lines.append(f"| synthetic folder ({name}) | {r['images']:,} | {r['cache_gib']} GiB | "
                         f"{r['run']['anon_max']} | {r['run']['rss_max']} |")
        lines.append("")
    t = rec.get("two_ranks")
    if t:
        lines += ["| 5 steps, tiny convnet, CPU | processes | total Pss MiB | total RSS MiB | total anonymous MiB |",
                  "| --- | --- | --- | --- | --- |"]
        for name, label, n in (("one_process", "one process", 1), ("two_ranks_torchrun", "torchrun, 2 ranks", 2),
                               ("today_two_ranks_torchrun", "torchrun, 2 ranks, before the cache", 2)):
            if name in t:
                r = t[name]
                lines.append(f"| {label} | {n} | {r['pss_total']} | {r['rss_total']} | {r['anon_total']} |")
        lines.append("")
    for r in rec.get("throughput", []):
        lines.append(f"- step throughput, {r['backbone']} batch {r['batch']}: memory map / in-memory tensor = "
                     f"{r['ratio_memory_map_vs_in_memory']} (median step {r['median_step_s']['memory_map']} s vs "
                     f"{r['median_step_s']['in_memory']} s, {r['steps_each']} steps each, interleaved)")
    return "\n".join(x for x in lines if x is not None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the JSON record here")
    p.add_argument("--big", type=int, default=200000, help="images in the synthetic folder (default 200000)")
    p.add_argument("--big-size", type=int, default=96)
    p.add_argument("--baseline", help="git revision of the code before the cache, for the 'today' figures")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: startup,rss,anon,ranks,throughput")
    p.add_argument("--table-only", metavar="RECORD.json", help="print the tables of a record")
    p.add_argument("--write", metavar="FILE.md",
                   help="with --table-only: write them between the <!-- data-scale:start/end --> markers of "
                        "this file (the committed tables: docs/benchmarks/data-scale.md)")
    args = p.parse_args(argv)
    if args.table_only:
        text = table(json.loads(Path(args.table_only).read_text()))
        print(text)
        if args.write:
            doc = Path(args.write).read_text()
            head, rest = doc.split("<!-- data-scale:start -->", 1)
            Path(args.write).write_text(f"{head}<!-- data-scale:start -->\n{text}\n<!-- data-scale:end -->"
                                        f"{rest.split('<!-- data-scale:end -->', 1)[1]}")
        return 0
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="ssl_sphere_data_scale_"))
    rec = {"command": "python benchmarks/data_scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
           "load_avg_start": list(os.getloadavg())}
    env = dict(os.environ, SSL_SPHERE_CACHE=str(work / "cache"))
    folder = ["--dataset", "imagefolder", "--data-root", str(CIFAR)]
    one_step = [*folder, "--backbone", "tiny", "--max-steps", "1", "eval.every_epochs=0"]
    try:
        base_env = None
        if args.baseline:
            subprocess.run(["git", "worktree", "add", "--detach", str(work / "baseline"), args.baseline], cwd=REPO,
                           check=True, capture_output=True)
            base_env = dict(env, PYTHONPATH=str(work / "baseline"))
        if "startup" not in skip:
            r = {}
            if base_env:
                r["today_decode"] = measure(pretrain(work / "o", *one_step), base_env, cwd=work / "baseline")
            r["decode_into_memory"] = measure(pretrain(work / "o", *one_step, "data.cache=off"), env)
            r["cold_build"] = measure(pretrain(work / "o", *one_step, "data.cache=rebuild"), env)
            r["warm"] = [measure(pretrain(work / "o", *one_step), env) for _ in range(3)]
            warm = statistics.median(w["data_ready_s"] for w in r["warm"])
            r["summary"] = {"warm_data_ready_s": warm, "cold_data_ready_s": r["cold_build"]["data_ready_s"],
                            "in_memory_data_ready_s": r["decode_into_memory"]["data_ready_s"],
                            "decode_over_warm": round(r["decode_into_memory"]["data_ready_s"] / warm, 1)}
            rec["startup_tiny_1_step"] = r
            print("[data_scale] startup", json.dumps(r["summary"]), flush=True)
        if "rss" not in skip:
            # the floor: a process that only imports the training code (torch, torchvision, lightly, kornia)
            floor = measure([sys.executable, "-c", "import ssl_sphere.engine.train"], env)
            r = {"import_floor": floor}
            for name, cmd in (("tiny_1_step", one_step), ("resnet18_1_step", [*folder, "--max-steps", "1",
                                                                              "eval.every_epochs=0"])):
                r[name] = {"new_warm_cache": measure(pretrain(work / "o", *cmd), env)}
                if base_env:
                    r[name]["today"] = measure(pretrain(work / "o", *cmd), base_env, cwd=work / "baseline")
            rec["peak_memory"] = r
            print("[data_scale] rss", json.dumps(r), flush=True)
        if "anon" not in skip:
            big = work / "big"
            t = time.time()
            synthetic_folder(big, args.big, args.big_size)
            small = work / "small"
            for d in big.rglob("*"):  # the first tenth of the same images
                if d.is_file() and (d.parent.parent.name == "test" or int(d.stem) < args.big // 10):
                    (small / d.relative_to(big)).parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(d, small / d.relative_to(big))
            gen_s = time.time() - t
            run = ["--backbone", "tiny", "--batch-size", "64", "--max-steps", "30", "eval.every_epochs=1"]
            r = {"generated_s": round(gen_s)}
            for name, root in (("small", small), ("big", big)):
                build = measure(pretrain(work / "o", "--dataset", "imagefolder", "--data-root", str(root),
                                         "--max-steps", "1", "--backbone", "tiny", "eval.every_epochs=0"), env)
                r[name] = {"images": sum(1 for _ in (root / "train").rglob("*.jpg")),
                           "cache_gib": round(sum(f.stat().st_size for f in (work / "cache").glob(
                               f"{root.name}-*/*.u8")) / 2**30, 2),
                           "build_s": build["data_ready_s"],
                           "run": measure(pretrain(work / "o", "--dataset", "imagefolder", "--data-root", str(root),
                                                   *run), env)}
            rec["anon_vs_dataset_size"] = r
            print("[data_scale] anon", json.dumps(r), flush=True)
            shutil.rmtree(big, ignore_errors=True)
        if "ranks" not in skip:
            cmd = [*folder, "--backbone", "tiny", "--max-steps", "5", "eval.every_epochs=0", "--device", "cpu",
                   "--batch-size", "128"]
            one = measure(pretrain(work / "o", *cmd), dict(env, OMP_NUM_THREADS="1"))
            two = measure([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "ssl_sphere.pretrain", "--output-dir", str(work / "o"), "run.progress=false", *cmd],
                          dict(env, OMP_NUM_THREADS="1"))
            rec["two_ranks"] = {"one_process": one, "two_ranks_torchrun": two,
                                "pss_ratio": round(two["pss_total"] / one["pss_total"], 2),
                                "rss_ratio": round(two["rss_total"] / one["rss_total"], 2)}
            if base_env:
                today = measure([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "ssl_sphere.pretrain", "--output-dir", str(work / "o"), "run.progress=false",
                                 *cmd], dict(base_env, OMP_NUM_THREADS="1"), cwd=work / "baseline")
                rec["two_ranks"]["today_two_ranks_torchrun"] = today
            print("[data_scale] ranks", json.dumps(rec["two_ranks"]), flush=True)
        if "throughput" not in skip:
            os.environ["SSL_SPHERE_CACHE"] = str(work / "cache")
            rec["throughput"] = [throughput("tiny", 256, 30), throughput("resnet18", 128, 15)]
            print("[data_scale] throughput", json.dumps(rec["throughput"]), flush=True)
    finally:
        if args.baseline:
            subprocess.run(["git", "worktree", "remove", "--force", str(work / "baseline")], cwd=REPO,
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    rec["load_avg_end"] = list(os.getloadavg())
    if args.out:
        Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
