"""The README's default run at five seeds: kNN top-1 at step 0 (random init) and at the end.

    python benchmarks/default_run_seeds.py                      # seeds 0-4, print the table
    python benchmarks/default_run_seeds.py --out benchmarks/results/default_run_seeds.json
    python benchmarks/default_run_seeds.py --seeds 0 1 -- optim.batch_size=128   # try a variant (not recorded)

Each seed runs ``python -m ssl_sphere.pretrain --method moco --sec --seed S`` as its own process
(what a new user types, so start-up is in the wall time), one after the other: run it alone on the
machine, the wall times are only meaningful then. The start and end kNN come from the run's
metrics.jsonl; the record keeps the machine, the load average and the commands.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = [sys.executable, "-m", "ssl_sphere.pretrain", "--method", "moco", "--sec"]


def machine() -> dict:
    import torch

    from ssl_sphere.engine.device import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def run_seed(seed: int, extra: list, out_dir: str) -> dict:
    cmd = [*RUN, "--seed", str(seed), "--output-dir", out_dir, "run.progress=false", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"seed {seed} failed with exit code {proc.returncode}")
    run_dir = next(Path(out_dir).glob(f"*_s{seed}"))
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"kind": "eval"' in line]
    start, end = evals[0]["knn_top1"], evals[-1]["knn_top1"]
    return {"seed": seed, "start_knn_top1": start, "knn_top1": end, "gain": round(end - start, 4),
            "wall_s": round(wall, 1), "steps": evals[-1]["step"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", metavar="FILE.json", help="write the record here")
    p.add_argument("extra", nargs="*", help="key=value overrides for a variant (after --); not for records")
    args = p.parse_args(argv)
    if args.out and args.extra:
        p.error("a record is of the default run itself: drop the overrides or --out")
    load_start = list(os.getloadavg())
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            r = run_seed(seed, args.extra, tmp)
            runs.append(r)
            print(f"seed {seed}: {r['start_knn_top1']:.2f} -> {r['knn_top1']:.2f} (gain {r['gain']:+.2f}) "
                  f"in {r['wall_s']:.0f} s, {r['steps']} steps", flush=True)
    gains = [r["gain"] for r in runs]
    rec = {"command": "python benchmarks/default_run_seeds.py" + (f" --out {args.out}" if args.out else ""),
           "run_command": " ".join(["python -m ssl_sphere.pretrain --method moco --sec --seed S", *args.extra]),
           "machine": machine(), "load_avg_start": load_start, "load_avg_end": list(os.getloadavg()),
           "recorded": datetime.date.today().isoformat(), "runs": runs,
           "min_gain": min(gains), "median_gain": statistics.median(gains)}
    print(f"min gain {rec['min_gain']:.2f}, median gain {rec['median_gain']:.2f}; load "
          f"{load_start[0]:.2f} -> {rec['load_avg_end'][0]:.2f}")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
