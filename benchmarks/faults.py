"""Fault injection: kill -9 at random moments (half of them while a checkpoint is being written),
SIGTERM, SIGINT and a full disk, against `python -m ssl_sphere.pretrain` on the digits data.

    python benchmarks/faults.py --trials 10 --out benchmarks/results/faults.json

After every fault it checks that each checkpoint in the run directory loads with
weights_only=True; every interrupted run is then resumed with --resume auto until it finishes,
and the finished run must have the uninterrupted run's weights exactly, a metrics.jsonl
with every train step (and every kNN evaluation) exactly once, and no temp files left.
The full-disk case needs root (a small tmpfs); it is reported as skipped otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RUN = ["--method", "moco", "--sec", "--batch-size", "64", "--epochs", "2", "run.ckpt_every_steps=2",
       "run.ckpt_every_minutes=0", "run.log_every=1", "run.progress=false", "eval.every_epochs=1",
       "eval.bank_size=300", "eval.test_size=100",
       "method.queue_size=65536"]  # a 32 MiB queue makes every save slow enough to be caught mid-write
STEPS = 44  # 2 epochs of 22 steps (1437 digits, batch 64)


def pretrain(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "ssl_sphere.pretrain", "--output-dir", str(out), "--run-name", "r",
                             *RUN, *extra], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def load_all(run_dir: Path) -> list:
    """Problems with the checkpoints of a run directory (each must load with weights_only=True)."""
    from ssl_sphere.core import checkpoint

    bad = []
    for p in sorted(run_dir.glob("*.pt")):
        if p.name.startswith(checkpoint.TEMP_PREFIX):
            continue  # a killed save's temp file: never read, removed by the next start
        try:
            checkpoint.load(str(p))
        except Exception as exc:  # noqa: BLE001 - every failure is a finding
            bad.append(f"{p.name}: {exc}")
    return bad


def final_checks(run_dir: Path, ref: Path) -> list:
    """Problems with a finished run: weights vs the uninterrupted run, metrics rows, temp files."""
    from ssl_sphere.core import checkpoint

    problems = load_all(run_dir)
    a, b = checkpoint.load(str(run_dir / "last.pt")), checkpoint.load(str(ref / "last.pt"))
    if a["step"] != STEPS:
        problems.append(f"finished at step {a['step']}, not {STEPS}")
    diff = [k for k in b["model"] if not torch.equal(a["model"][k], b["model"][k])]
    if diff:
        problems.append(f"{len(diff)} tensors differ from the uninterrupted run (e.g. {diff[0]})")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["step"] for r in rows if r["kind"] == "train"]
    evals = [r["step"] for r in rows if r["kind"] == "eval"]
    if train != list(range(1, STEPS + 1)):
        problems.append(f"metrics.jsonl train steps are not 1..{STEPS} exactly once: {len(train)} rows")
    if evals != [0, 22, 44]:
        problems.append(f"metrics.jsonl kNN evaluations at {evals}, expected [0, 22, 44]")
    temps = list(run_dir.glob(".tmp-*"))
    if temps:
        problems.append(f"temp files left: {[t.name for t in temps]}")
    return problems


def run_dirs(out: Path) -> list:
    """r, r-2, ...: a run killed before its first checkpoint leaves a directory without one, and
    --resume auto then starts afresh in the next."""
    return sorted(out.glob("r*"), key=lambda d: int(d.name.split("-")[1]) if "-" in d.name else 1)


def kill_trial(out: Path, ref: Path, during_write: bool, rng: random.Random, kills: int) -> dict:
    """``kills`` kill -9 of one run (at a random moment, or as soon as a checkpoint temp file
    appears), checks after each, then resumes until the run finishes."""
    from ssl_sphere.core import checkpoint

    events, problems = [], []
    def temps():
        return {p for d in run_dirs(out) for p in d.glob(".tmp-*.pt")}

    for _ in range(kills):
        left = temps()  # an earlier kill's temp file: the new run removes it at start-up
        skip = rng.randrange(8)  # let this many saves complete, kill during the next one
        proc = pretrain(out, "--resume", "auto")
        t0, killed = time.time(), False
        deadline = t0 + (60 if during_write else rng.uniform(1.0, 8.0))
        while proc.poll() is None and time.time() < deadline:
            new = temps() - left
            if during_write and new:
                if skip == 0:
                    break
                skip -= 1
                left |= new
            time.sleep(0.002)
        if proc.poll() is None:
            proc.kill()
            killed = True
        proc.communicate()
        events.append({"after_s": round(time.time() - t0, 2), "killed": killed,
                       "temp_files_at_kill": len(temps() - left)})
        for d in run_dirs(out):
            problems += load_all(d)
    for _ in range(5):  # resume until done
        proc = pretrain(out, "--resume", "auto")
        _, err = proc.communicate()
        if proc.returncode != 0:
            problems.append(f"resume failed (exit {proc.returncode}): {err.strip().splitlines()[-1:]}")
            break
        done = [d for d in run_dirs(out) if checkpoint.peek_step(str(d / "last.pt")) == STEPS]
        if done:
            break
    with_ckpt = [d for d in run_dirs(out) if (d / "last.pt").exists()]
    if not with_ckpt:
        return {"kind": "kill -9", "events": events, "problems": problems + ["no run finished"]}
    problems += final_checks(with_ckpt[-1], ref)
    return {"kind": "kill -9 during a checkpoint write" if during_write else "kill -9 at a random moment",
            "events": events, "problems": problems}


def signal_trial(out: Path, ref: Path, sig: int, code: int) -> dict:
    run_dir, problems = out / "r", []
    proc = pretrain(out)
    while proc.poll() is None:
        rows = (run_dir / "metrics.jsonl").read_text().count('"train"') if (run_dir / "metrics.jsonl").exists() else 0
        if rows >= 5:
            break
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate()
    if proc.returncode != code:
        problems.append(f"exit code {proc.returncode}, expected {code}")
    lines = [x for x in err.strip().splitlines() if x]
    if len(lines) != 1 or "--resume" not in lines[0] or "Traceback" in err:
        problems.append(f"stderr is not one line saying how to resume: {lines[-3:]}")
    problems += load_all(run_dir)
    proc = pretrain(out, "--resume", "auto")
    proc.communicate()
    problems += final_checks(run_dir, ref)
    return {"kind": signal.Signals(sig).name, "message": lines[-1] if lines else "", "problems": problems}


def full_disk_trial(work: Path, ref: Path) -> dict:
    """A tmpfs with room for about one checkpoint: the second save fails with a clear line, the
    first stays intact and resumes (copied to a roomy disk) to the uninterrupted run's weights."""
    from ssl_sphere.core import checkpoint

    mnt = work / "tmpfs"
    mnt.mkdir()
    size_mib = (ref / "last.pt").stat().st_size * 1.6 / 2**20 + 1
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib:.0f}m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        return {"kind": "full disk", "skipped": f"cannot mount a tmpfs ({res.stderr.strip() or 'needs root'})",
                "problems": []}
    problems = []
    try:
        proc = pretrain(mnt)
        _, err = proc.communicate()
        lines = [x for x in err.strip().splitlines() if x]
        if proc.returncode != 2:
            problems.append(f"exit code {proc.returncode}, expected 2")
        if len(lines) != 1 or "no space left" not in lines[0] or "Traceback" in err:
            problems.append(f"stderr is not one clear line: {lines[-3:]}")
        run_dir = mnt / "r"
        problems += load_all(run_dir)
        step = checkpoint.peek_step(str(run_dir / "last.pt"))
        if step is None:
            problems.append("no readable last.pt after the disk filled up")
        if list(run_dir.glob(".tmp-*")):
            problems.append("a temp file was left on the full disk")
        saved = work / "rescued"
        shutil.copytree(run_dir, saved / "r")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    proc = pretrain(saved, "--resume", "auto")
    proc.communicate()
    problems += final_checks(saved / "r", ref)
    return {"kind": "full disk", "tmpfs_mib": round(size_mib), "stopped_at_step": step,
            "message": lines[-1] if lines else "", "problems": problems}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=10, help="kill -9 trials (half during checkpoint writes)")
    p.add_argument("--kills", type=int, default=2, help="kill -9 per trial before it may finish (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the JSON record here")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="ssl_sphere_faults_"))
    try:
        ref = work / "ref"
        proc = pretrain(ref)
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"the uninterrupted reference run failed: {err[-2000:]}")
        ref = ref / "r"
        trials = []
        for i in range(args.trials):
            trials.append(kill_trial(work / f"kill{i}", ref, during_write=i % 2 == 0, rng=rng, kills=args.kills))
            print(f"[faults] {trials[-1]['kind']}: {len(trials[-1]['problems'])} problems", flush=True)
        for sig, code in ((signal.SIGTERM, 75), (signal.SIGINT, 130)):
            trials.append(signal_trial(work / f"sig{sig}", ref, sig, code))
            print(f"[faults] {trials[-1]['kind']}: {len(trials[-1]['problems'])} problems", flush=True)
        trials.append(full_disk_trial(work, ref))
        print(f"[faults] full disk: {trials[-1].get('skipped') or str(len(trials[-1]['problems'])) + ' problems'}",
              flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kills = [e for t in trials for e in t.get("events", [])]
    summary = {"kill9": sum(e["killed"] for e in kills),
               "kill9_during_write": sum(e["killed"] and e["temp_files_at_kill"] > 0 for e in kills),
               "trials": len(trials), "failed_trials": sum(bool(t["problems"]) for t in trials),
               "problems": [p for t in trials for p in t["problems"]]}
    rec = {"command": "python benchmarks/faults.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.time() - t0),
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
           "torch": torch.__version__, "summary": summary, "trials": trials}
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")
    return 1 if summary["failed_trials"] else 0


if __name__ == "__main__":
    sys.exit(main())
