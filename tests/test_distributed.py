"""Distributed correctness on CPU with 2 gloo processes: gathered SimCLR negatives and
SEC's global mean give the single-process loss and gradients; MoCo queues agree
across ranks; checkpoints move between 1 and 2 processes; torchrun launches."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from ssl_sphere.core import checkpoint, dist
from ssl_sphere.methods.losses import nt_xent
from ssl_sphere.sphere.sec import SEC

from .conftest import REPO

WORLD = 2
B, D_IN, D = 8, 12, 6


def _exit_without_teardown():
    """End a spawned worker that succeeded without the interpreter's C++ static teardown:
    rank 1 of these workers died there now and then ("terminate called without an active
    exception", SIGABRT) after its work was done and its result written, failing the test
    for no fault of the code under test. Errors still propagate: this is only reached on success."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _data():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(D_IN, D, generator=g)
    x1, x2 = torch.randn(B, D_IN, generator=g), torch.randn(B, D_IN, generator=g)
    return w, x1, x2


def _objective(w, x1, x2, gather, rank):
    """BN-free model z = x W; SimCLR loss + batch-mean SEC (global mu), as the trainer adds them."""
    z1, z2 = x1 @ w, x2 @ w
    sec = SEC(weight=0.7, ema=1.0, ramp="none")
    sec_term, _ = sec(torch.cat([z1, z2]), 1.0)
    return nt_xent(z1, z2, 0.5, gather=gather, rank=rank) + sec_term


def _spawn(body, tmp_path):
    """Run body(rank) -> dict on WORLD gloo processes; returns rank 0's dict."""
    out = tmp_path / "out.pt"
    mp.spawn(_worker, args=(body, str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    return torch.load(out)


def _worker(rank, body, init_file, out_file):
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        res = body(rank)
        if rank == 0:
            torch.save(res, out_file)
        tdist.barrier()  # no rank tears gloo down while its peer is still using the connection
    finally:
        tdist.destroy_process_group()
    _exit_without_teardown()


def _equivalence(rank):
    w, x1, x2 = _data()
    w.requires_grad_(True)
    sl = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    loss = _objective(w, x1[sl], x2[sl], dist.gather_with_grad, dist.rank())
    loss.backward()
    grad = w.grad.clone()
    tdist.all_reduce(grad)  # what DDP does: average over ranks
    grad /= WORLD
    mean_loss = loss.detach().clone()
    tdist.all_reduce(mean_loss)
    mean_loss /= WORLD
    return {"loss": mean_loss, "grad": grad}


def test_simclr_gather_and_sec_match_single_process(tmp_path):
    res = _spawn(_equivalence, tmp_path)
    w, x1, x2 = _data()
    w.requires_grad_(True)
    loss = _objective(w, x1, x2, lambda t: t, 0)
    loss.backward()
    torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res["grad"], w.grad, rtol=1e-4, atol=1e-6)


def _moco_queue(rank):
    from ssl_sphere.config import layered, resolve
    from ssl_sphere.models.ssl_model import build_model

    cfg = resolve(layered(values={"method.queue_size": 64, "method.proj_hidden_dim": 32, "optim.batch_size": 4}))
    torch.manual_seed(0)  # same initial weights and queue on both ranks (DDP would broadcast them)
    m = build_model(cfg).method
    torch.manual_seed(100 + rank)  # different data per rank
    m([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)])
    keys = [torch.empty_like(m.queue.keys) for _ in range(WORLD)]
    tdist.all_gather(keys, m.queue.keys)
    x = torch.arange(14.0).view(7, 2)  # 7 rows over 2 ranks: uneven shards
    sharded = dist.gather_sharded(x[rank::WORLD], 7)
    return {"keys": keys, "ptr": int(m.queue.ptr), "sharded_ok": torch.equal(sharded, x)}


def test_moco_queue_identical_on_every_rank(tmp_path):
    res = _spawn(_moco_queue, tmp_path)
    torch.testing.assert_close(res["keys"][0], res["keys"][1], rtol=0, atol=0)
    assert res["ptr"] == 2 * 4 * WORLD  # both views' keys of both ranks were enqueued
    assert res["sharded_ok"]  # kNN monitor shards reassemble in the original order


def _torchrun(tmp_path, *args, script=False):
    """2 CPU ranks through torchrun directly, or through launch/torchrun.sh (script=True)."""
    launcher = (["bash", str(REPO / "launch" / "torchrun.sh"), str(WORLD)] if script else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                 "-m", "ssl_sphere.pretrain"])
    cmd = [*launcher, "--output-dir", str(tmp_path), "--device", "cpu",
           "run.progress=false", "method.proj_hidden_dim=64", *args]
    # the venv's torchrun must be on PATH for the launch script
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    return res


def test_torchrun_two_ranks_then_resume_on_one_and_back(tmp_path):
    from ssl_sphere.cli.pretrain import build_config
    from ssl_sphere.engine.train import train

    res = _torchrun(tmp_path, "--method", "moco", "--sec", "--batch-size", "64", "--max-steps", "2",
                    "eval.bank_size=200", "eval.test_size=100", "--run-name", "r")
    run_dir = tmp_path / "r"
    assert res.stdout.count("[ssl_sphere] run dir") == 1  # rank 0 alone prints and logs
    assert not (tmp_path / "r-2").exists()  # both ranks agreed on one run directory
    ck = checkpoint.load(str(run_dir / "last.pt"))
    assert ck["step"] == 2 and ck["world_size"] == WORLD
    assert ck["config"]["optim"]["lr"] == pytest.approx(0.06 * 64 * WORLD / 128)  # global-batch lr
    knn = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [r["step"] for r in knn] == [0, 2]

    # 2-rank checkpoint resumes on 1 process: 2 steps of global batch 128 = 256 samples = step 4 of batch 64,
    # so the schedules continue where they were (progress counted in samples seen) ...
    assert ck["samples_seen"] == 256 and len(ck["rng_per_rank"]) == WORLD
    s = train(build_config(["--resume", str(run_dir / "last.pt"), "--max-steps", "6", "run.progress=false"]))
    ck = checkpoint.load(str(run_dir / "last.pt"))
    assert s["step"] == 6 and ck["samples_seen"] == 256 + 2 * 64 and ck["world_size"] == 1
    # the lr was not asked, so it is derived again for 1 process (linear scaling on the new global batch)
    assert ck["config"]["optim"]["lr"] == pytest.approx(0.06 * 64 / 128)
    assert ck["config"]["request"]["optim"]["lr"] is None and "optim.lr" in ck["config"]["derived"]
    # ... and a 1-process checkpoint resumes on 2 ranks: 384 samples = step 3 of global batch 128
    res = _torchrun(tmp_path, "--resume", str(run_dir / "last.pt"), "--max-steps", "5", script=True)
    assert "continues on 2 process(es), global batch 128, at step 3" in res.stdout
    ck = checkpoint.load(str(run_dir / "last.pt"))
    assert ck["step"] == 5 and ck["samples_seen"] == 384 + 2 * 128 and ck["world_size"] == WORLD
    assert ck["config"]["optim"]["lr"] == pytest.approx(0.06 * 64 * WORLD / 128)
    line = next(x for x in res.stdout.splitlines() if "re-derived for this machine:" in x)
    assert "optim.lr: 0.03 -> 0.06" in line

