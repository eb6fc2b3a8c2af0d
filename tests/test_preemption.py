"""Runs that survive preemption and mistakes: signal-time and mid-epoch checkpoints with exact
resume (one process and 2 gloo ranks), atomic run-directory claims, forks instead of
overwrites, stale temp files, permissions, and resumes with nothing left to do."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssl_sphere.cli.pretrain import build_config, main
from ssl_sphere.core import checkpoint
from ssl_sphere.engine import rundir as run_mod
from ssl_sphere.engine.train import train

from .conftest import REPO

FAST = ["run.progress=false", "method.proj_hidden_dim=64", "eval.every_epochs=0",
        "run.ckpt_every_minutes=0"]


def run(tmp_path, *argv):
    return train(build_config(["--output-dir", str(tmp_path), *FAST, *argv]))


def params(path):
    return checkpoint.load(str(path))["model"]


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-6, atol=1e-7, msg=k)


def train_rows(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["kind"] == "train"]


def wait_for_rows(run_dir, n, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if len(train_rows(run_dir)) >= n:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the run did not start logging")


COMMON = ["--method", "moco", "--sec", "--batch-size", "64", "--epochs", "3", "run.log_every=1"]


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 75), (signal.SIGUSR1, 75), (signal.SIGINT, 130)])
def test_signal_saves_at_a_step_boundary_and_resume_is_exact(tmp_path, sig, code):
    out = tmp_path / "stopped"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, "-m", "ssl_sphere.pretrain", "--output-dir", str(out), "--run-name", "r",
                             *FAST, *COMMON], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_rows(out / "r", 3, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-2000:]
    ck = checkpoint.load(str(out / "r" / "last.pt"))
    step = ck["step"]
    assert 3 <= step < 66 and f"stopped by {signal.Signals(sig).name} at step {step}" in stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert train_rows(out / "r") == list(range(1, step + 1))
    # resume to the end == the run that was never interrupted (same batches, same augmentation draws)
    done = run(out, "--resume", str(out / "r" / "last.pt"), *COMMON)
    ref = run(tmp_path / "ref", *COMMON)
    assert done["step"] == ref["step"] == 66
    assert_same_params(out / "r" / "last.pt", Path(ref["run_dir"]) / "last.pt")
    assert train_rows(out / "r") == list(range(1, 67))


def test_mid_epoch_saves_every_steps_and_minutes(tmp_path, monkeypatch):
    saved = []
    real = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda path, payload: (saved.append(payload["step"]), real(path, payload)))
    run(tmp_path / "steps", "--batch-size", "64", "--max-steps", "8", "run.ckpt_every_steps=3")
    assert saved == [3, 6, 8]  # 22 steps per epoch: all mid-epoch, then the stop
    saved.clear()
    run(tmp_path / "minutes", "--batch-size", "64", "--max-steps", "4", "run.ckpt_every_minutes=1e-9")
    assert saved == [1, 2, 3, 4]  # "due" by the clock at every step boundary


def _two_ranks(tmp_path, *args, signal_rank1=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "ssl_sphere.pretrain", "--output-dir", str(tmp_path), "--device", "cpu", *FAST, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if signal_rank1 is not None:
        run_dir = tmp_path / args[args.index("--run-name") + 1]
        wait_for_rows(run_dir, 3, proc, timeout=300)
        # the workers are torchrun's children; rank 1 is the second one started
        children = sorted(int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())
        os.kill(children[1], signal_rank1)
    stdout, stderr = proc.communicate(timeout=600)
    return proc.returncode, stdout, stderr


def test_two_rank_resume_is_exact_and_ranks_agree_on_the_stop_step(tmp_path):
    common = ["--method", "moco", "--batch-size", "32", "--epochs", "4", "run.log_every=1"]
    rc, _, err = _two_ranks(tmp_path, *common, "--run-name", "ref")
    assert rc == 0, err[-3000:]
    # SIGUSR1 to rank 1 only: the flag is all-reduced, so both ranks stop after the same step and rank 0 saves
    rc, _, err = _two_ranks(tmp_path, *common, "--run-name", "cut", signal_rank1=signal.SIGUSR1)
    assert rc != 0 and "stopped by SIGUSR1" in err
    ck = checkpoint.load(str(tmp_path / "cut" / "last.pt"))
    assert 3 <= ck["step"] < 88 and ck["world_size"] == 2 and len(ck["rng_per_rank"]) == 2
    assert not torch.equal(ck["rng_per_rank"][0]["torch"], ck["rng_per_rank"][1]["torch"])
    rc, _, err = _two_ranks(tmp_path, *common, "--run-name", "cut", "--resume", str(tmp_path / "cut" / "last.pt"))
    assert rc == 0, err[-3000:]
    assert_same_params(tmp_path / "cut" / "last.pt", tmp_path / "ref" / "last.pt")


def _claim(out, q):
    from omegaconf import OmegaConf

    q.put(run_mod.claim_run_dir(OmegaConf.create({"run": {"resume": None, "output_dir": out, "run_name": "r"}}))[0])


def test_concurrent_runs_claim_distinct_directories(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(str(tmp_path), q)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    dirs = sorted(q.get(timeout=5) for _ in procs)
    assert len(set(dirs)) == 6 and {Path(d).name for d in dirs} == {"r", "r-2", "r-3", "r-4", "r-5", "r-6"}


def test_older_checkpoint_refused_fork_and_overwrite(tmp_path, capsys):
    common = ["--batch-size", "256", "--epochs", "2", "run.ckpt_every_epochs=1", "--run-name", "r", "run.log_every=1"]
    run(tmp_path, *common)
    r = tmp_path / "r"
    last_bytes, metrics = (r / "last.pt").read_bytes(), (r / "metrics.jsonl").read_text()
    # resuming the epoch-1 checkpoint in place would replace 5 newer steps: refused, nothing touched
    assert main(["--resume", str(r / "epoch_0001.pt"), "--output-dir", str(tmp_path), *FAST]) == 2
    err = capsys.readouterr().err
    assert "epoch_0001.pt is at step 5" in err and "step 10" in err and "--run-name NEW" in err
    assert (r / "last.pt").read_bytes() == last_bytes and (r / "metrics.jsonl").read_text() == metrics
    # a fork: the epoch-1 state continues in a new directory, the original run stays as it was
    s = train(build_config(["--resume", str(r / "epoch_0001.pt"), "--run-name", "fork", *FAST]))
    assert Path(s["run_dir"]) == tmp_path / "fork" and s["step"] == 10
    assert checkpoint.load(str(tmp_path / "fork" / "last.pt"))["step"] == 10
    assert (r / "last.pt").read_bytes() == last_bytes and (r / "metrics.jsonl").read_text() == metrics
    assert train_rows(tmp_path / "fork") == list(range(6, 11))
    # another --output-dir is honoured too (a fork there, keeping the run name)
    s = train(build_config(["--resume", str(r / "epoch_0001.pt"), "--output-dir", str(tmp_path / "elsewhere"),
                            *FAST]))
    assert Path(s["run_dir"]) == tmp_path / "elsewhere" / "r"
    # in place only on purpose
    s = train(build_config(["--resume", str(r / "epoch_0001.pt"), "run.overwrite_newer=true", *FAST]))
    assert Path(s["run_dir"]) == r and train_rows(r) == list(range(1, 11))


def test_stale_temp_files_permissions_and_noop_resume(tmp_path, capsys):
    s = run(tmp_path, "--batch-size", "256", "--max-steps", "3", "--run-name", "r", "eval.every_epochs=1",
            "eval.bank_size=200", "eval.test_size=50")
    r = Path(s["run_dir"])
    (r / ".tmp-killed.pt").write_bytes(b"half a checkpoint")
    assert (r / "last.pt").stat().st_mode & 0o777 == (r / "config.yaml").stat().st_mode & 0o777
    metrics = (r / "metrics.jsonl").read_text()
    # nothing left to do: no new rows, no new checkpoint, and the killed save's temp file is gone
    assert main(["--resume", "auto", "--run-name", "r", "--output-dir", str(tmp_path), "--batch-size", "256",
                 "--max-steps", "3", *FAST, "eval.every_epochs=1"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (r / "metrics.jsonl").read_text() == metrics and not list(r.glob(".tmp-*"))


def test_slurm_script_requeues_on_usr1_and_the_requeued_job_resumes(tmp_path):
    """launch/slurm.sbatch with stand-ins for srun / scontrol: SIGUSR1 to the batch script (what
    --signal=B:USR1@120 sends) requeues the job and stops the ranks after a save; running the
    script again (the requeued job) continues from that checkpoint to the end."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\nif [ "$1" = show ]; then echo localhost; '
                                      f'else echo "$@" >> {tmp_path}/requeued; fi\n')
    # srun runs its command (torchrun) in its place, so SIGTERM to srun reaches torchrun as on a cluster
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "torchrun").write_text(f'#!/usr/bin/env bash\nexec {sys.executable} -m torch.distributed.run "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_GPUS_ON_NODE="2",
               SLURM_RESTART_COUNT="0", MASTER_PORT=str(29500 + os.getpid() % 1000), OMP_NUM_THREADS="1")
    args = ["--device", "cpu", "--output-dir", str(tmp_path / "runs"), "--method", "moco", "--batch-size", "32",
            "--epochs", "3", "run.log_every=1", *FAST]
    script = str(REPO / "launch" / "slurm.sbatch")
    job = subprocess.Popen(["bash", script, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "slurm_4242"
    wait_for_rows(run_dir, 3, job, timeout=300)
    job.send_signal(signal.SIGUSR1)
    out, err = job.communicate(timeout=300)
    assert "requeueing" in out and (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    assert "stopped by SIGTERM" in err, err[-3000:]
    stopped = checkpoint.load(str(run_dir / "last.pt"))["step"]
    assert 3 <= stopped < 66
    # the requeued job: same script, same arguments
    env["SLURM_RESTART_COUNT"] = "1"
    res = subprocess.run(["bash", script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed at step {stopped}" in res.stdout and checkpoint.load(str(run_dir / "last.pt"))["step"] == 66
    assert train_rows(run_dir) == list(range(1, 67))


def test_a_stop_at_an_epoch_end_saves_without_the_knn_evaluation(tmp_path, monkeypatch):
    from ssl_sphere.engine.signals import StopRequested
    from ssl_sphere.engine.train import Run

    polls = {"n": 0}

    def poll(run):  # a SIGTERM that arrives during the last step of epoch 1 (5 steps of 256 on digits)
        polls["n"] += 1
        return (int(signal.SIGTERM) if polls["n"] == 5 else 0), False

    monkeypatch.setattr(Run, "poll", poll)
    with pytest.raises(StopRequested) as stop:
        run(tmp_path, "--batch-size", "256", "--epochs", "3", "--run-name", "r", "eval.every_epochs=1",
            "eval.bank_size=200", "eval.test_size=50")
    assert stop.value.step == 5 and checkpoint.load(str(tmp_path / "r" / "last.pt"))["step"] == 5
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0]  # the random-init baseline only
    monkeypatch.undo()
    run(tmp_path, "--batch-size", "256", "--epochs", "2", "--run-name", "r", "eval.every_epochs=1",
        "eval.bank_size=200", "eval.test_size=50", "--resume", "auto")
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 5, 10]  # the skipped one made on resume


def test_a_second_run_into_a_locked_run_directory_is_refused(tmp_path, capsys):
    args = ["--batch-size", "256", "--max-steps", "2", "--run-name", "r", "--output-dir", str(tmp_path), *FAST]
    assert main(args) == 0
    # a first run still writing there (a requeued job's twin): another process holding the lock
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from ssl_sphere.engine.rundir import lock_run_dir; "
                               f"lock = lock_run_dir({str(tmp_path / 'r')!r}); print('held', flush=True); "
                               "sys.stdin.read()"], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(args[:3] + ["4", *args[4:], "--resume", "auto"]) == 2
        err = capsys.readouterr().err
        assert "another run is writing into" in err and ".lock" in err
        assert checkpoint.load(str(tmp_path / "r" / "last.pt"))["step"] == 2
    finally:
        holder.communicate("")
    assert main(args[:3] + ["4", *args[4:], "--resume", "auto"]) == 0  # released: the resume goes ahead


def test_torn_metrics_line_and_mismatched_optimiser_state_on_resume(tmp_path, capsys):
    r = tmp_path / "r"
    run(tmp_path, "--batch-size", "256", "--max-steps", "2", "--run-name", "r", "run.log_every=1")
    with open(r / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "kind": "tra')  # a kill in the middle of a line
    run(tmp_path, "--batch-size", "256", "--max-steps", "4", "--run-name", "r", "run.log_every=1", "--resume",
        "auto")
    assert train_rows(r) == [1, 2, 3, 4]
    # an optimiser state that does not fit (e.g. edited, or another optimiser's): a clear error
    ck = checkpoint.load(str(r / "last.pt"))
    ck["optimizer"]["param_groups"] = ck["optimizer"]["param_groups"][:1] * 3
    checkpoint.save(str(r / "last.pt"), ck)
    capsys.readouterr()
    assert main(["--resume", str(r / "last.pt"), "--max-steps", "6", *FAST]) == 2
    err = capsys.readouterr().err
    assert "optimiser state in" in err and "last.pt" in err and "Traceback" not in err
    # and a change of optim.decay_norm_and_bias (other parameter groups) is refused up front
    assert main(["--resume", str(r / "last.pt"), "optim.decay_norm_and_bias=true", *FAST]) == 2
    assert "optim.decay_norm_and_bias changed" in capsys.readouterr().err


def test_non_finite_loss_in_a_fork_names_the_checkpoint_it_started_from(tmp_path, monkeypatch, capsys):
    import ssl_sphere.methods.simclr as simclr

    run(tmp_path, "--method", "simclr", "--batch-size", "256", "--max-steps", "2", "--run-name", "r")
    real = simclr.nt_xent
    monkeypatch.setattr(simclr, "nt_xent", lambda *a, **k: real(*a, **k) * float("nan"))
    assert main(["--resume", str(tmp_path / "r" / "last.pt"), "--run-name", "fork", "--max-steps", "4",
                 "run.log_every=1", *FAST]) != 0
    err = capsys.readouterr().err
    assert "non-finite loss at step 2" in err and f"{tmp_path / 'r' / 'last.pt'} (step 2)" in err
