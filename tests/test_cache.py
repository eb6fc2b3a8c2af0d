"""The decoded-image cache (ssl_sphere/cache.py): bit-identical to a direct decode, rebuilt on
every kind of folder change, built once by concurrent processes, never trusted after a killed
build, clear errors for damaged files, a read-only dataset root, the same batches from the
memory map as from memory, stored size separate from training size, and the eval CLIs."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_sphere.cli.pretrain import build_config, main
from ssl_sphere.data import cache
from ssl_sphere.data.datasets import load_imagefolder
from ssl_sphere.data.loader import Prefetcher
from ssl_sphere.engine.train import train

from .conftest import CIFAR_FOLDER, REPO, make_image_folder, requires_cifar_folder

QUIET = dict(progress=False, say=lambda *a: None)


def load(root, cdir, size=16, **kw):
    return load_imagefolder(str(root), size, workers=1, cache=kw.pop("cache", "auto"), cache_dir=str(cdir),
                            **{**QUIET, **kw})


def builds(cdir) -> int:
    return sum(len(p.read_text().splitlines()) for p in Path(cdir).glob("*.builds.log"))


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "data", n_train=6, n_test=3, classes=("a", "b", "c"), hw=(20, 24))


def test_cache_equals_direct_decode_and_is_memory_mapped(folder, tmp_path):
    off = load(folder, tmp_path / "c", cache="off")
    cached = load(folder, tmp_path / "c")
    for a, b in ((off.train, cached.train), (off.test, cached.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert off.classes == cached.classes and off.mean == pytest.approx(cached.mean)
    assert not cached.train.images.is_contiguous() or cached.train.images.untyped_storage().nbytes() > 0
    assert builds(tmp_path / "c") == 1
    load(folder, tmp_path / "c")  # warm: no second build
    assert builds(tmp_path / "c") == 1


@pytest.mark.parametrize("change", ["added", "removed", "resized", "modified"])
def test_every_kind_of_folder_change_rebuilds(folder, tmp_path, change, capsys):
    from PIL import Image

    load(folder, tmp_path / "c")
    f = folder / "train" / "a" / "0.png"
    if change == "added":
        Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(folder / "train" / "b" / "new.png")
    elif change == "removed":
        f.unlink()
    elif change == "resized":
        Image.fromarray(np.full((30, 30, 3), 7, np.uint8)).save(f)
    else:  # same bytes' length, new content and time stamp
        arr = np.asarray(Image.open(f)).copy()
        arr[0, 0] ^= 255
        Image.fromarray(arr).save(f)
        os.utime(f, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    again = load(folder, tmp_path / "c")
    assert builds(tmp_path / "c") == 2
    out = capsys.readouterr().out
    assert f"file(s) {change}" in out or (change == "resized" and "file(s) modified" in out), out
    direct = load(folder, tmp_path / "c", cache="off")
    assert torch.equal(again.train.images, direct.train.images)


def _build_in_process(root, cdir, q):
    ds = load(root, cdir)
    q.put(int(ds.train.images.sum()))


def test_concurrent_builders_make_one_cache(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=60, n_test=10, hw=(48, 48))
    ctx = mp.get_context("spawn")  # a fork after torch ran OpenMP regions in this process can hang the child
    q = ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(root, tmp_path / "c", q)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    sums = {q.get(timeout=5) for _ in procs}
    assert len(sums) == 1 and all(p.exitcode == 0 for p in procs)
    assert builds(tmp_path / "c") == 1  # one built, the others waited and mapped it


def test_killed_build_leaves_nothing_trusted(tmp_path, capsys):
    root = make_image_folder(tmp_path / "data", n_train=1500, n_test=10, classes=("a",), hw=(64, 64))
    cdir = tmp_path / "c"
    code = (f"from ssl_sphere.data.datasets import load_imagefolder; load_imagefolder({str(root)!r}, 64, workers=1, "
            f"cache='auto', cache_dir={str(cdir)!r}, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    t0 = time.time()
    while not list(cdir.glob("*.tmp-*/train.u8")) and time.time() - t0 < 60:
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    entry = Path(cache.entry_dir(str(root), 64, str(cdir)))
    assert not entry.exists() and list(cdir.glob("*.tmp-*"))  # only the temp directory, which no run reads
    ds = load(root, cdir, 64)
    assert "no cache yet" in capsys.readouterr().out and not list(cdir.glob("*.tmp-*"))
    assert ds.train.images.shape == (1500, 3, 64, 64)


def test_damaged_cache_files_are_clear_errors(folder, tmp_path, capsys):
    load(folder, tmp_path / "c")
    entry = Path(cache.entry_dir(str(folder), 16, str(tmp_path / "c")))
    with open(entry / "train.u8", "r+b") as f:
        f.truncate(100)
    with pytest.raises(cache.CacheError, match="train.u8.*data.cache=rebuild"):
        load(folder, tmp_path / "c")
    args = ["--dataset", "imagefolder", "--data-root", folder, "data.image_size=16", "--output-dir", tmp_path / "o",
            f"data.cache_dir={tmp_path / 'c'}", "run.progress=false", "eval.every_epochs=0", "--max-steps", "1",
            "--batch-size", "8", "--backbone", "tiny"]
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "train.u8" in err and "data.cache=rebuild" in err and len(err.strip().splitlines()) == 1
    assert main([str(a) for a in args + ["data.cache=rebuild"]]) == 0  # the fix it names works
    (entry / "manifest.json").write_text("{not json")
    with pytest.raises(cache.CacheError, match="manifest"):
        load(folder, tmp_path / "c")


def test_no_space_for_the_cache_is_refused_before_decoding(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(cache.CacheError, match="needs .* GiB .* data.cache_dir"):
        load(folder, tmp_path / "c")
    assert not list((tmp_path / "c").glob("*.tmp-*"))


def test_read_only_dataset_root(folder, tmp_path):
    before = sorted(str(p) for p in folder.rglob("*"))
    for p in [folder, *folder.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        ds = load(folder, tmp_path / "c")
    finally:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert len(ds.train) == 18 and sorted(str(p) for p in folder.rglob("*")) == before  # nothing written there


def test_same_batches_from_the_memory_map_and_from_memory(folder, tmp_path):
    mapped = load(folder, tmp_path / "c").train.images
    memory = load(folder, tmp_path / "c", cache="off").train.images
    batches = [(s, torch.randperm(18, generator=torch.Generator().manual_seed(s))[:4]) for s in range(6)]
    a = [(s, i, x.clone()) for s, i, x in Prefetcher(mapped, torch.device("cpu"), 4)(batches)]
    for (s, i, x), (s2, i2) in zip(a, batches):
        assert s == s2 and torch.equal(i, i2) and torch.equal(x, memory[i])
    assert len(a) == len(batches)


def test_training_from_the_cache_equals_training_from_memory(folder, tmp_path):
    common = ["--dataset", "imagefolder", "--data-root", str(folder), "data.image_size=16", "--backbone", "tiny",
              "--batch-size", "8", "--max-steps", "4", "run.progress=false", "eval.every_epochs=0",
              "method.queue_size=64", f"data.cache_dir={tmp_path / 'c'}"]
    runs = [train(build_config([*common, "--output-dir", str(tmp_path / mode), f"data.cache={mode}"]))
            for mode in ("off", "auto")]
    a, b = (torch.load(Path(r["run_dir"]) / "last.pt", weights_only=True)["model"] for r in runs)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_store_size_keeps_context_for_random_crops(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=4, n_test=2, hw=(40, 60))
    cfg = build_config(["--dataset", "imagefolder", "--data-root", str(root), "data.image_size=16",
                        "data.store_size=32", "data.eval_crop=0.5", f"data.cache_dir={tmp_path / 'c'}"])
    assert cfg.data.store_size == 32 and cfg.data.image_size == 16
    from ssl_sphere.augment.views import Augmenter
    from ssl_sphere.data.datasets import load_data

    ds = load_data(cfg.data, **QUIET)
    assert ds.train.images.shape == (8, 3, 32, 32)  # stored larger than the training size
    aug = Augmenter(cfg.aug, 16, ds.mean, ds.std, cfg.data.eval_crop)
    v1, v2 = aug.views(ds.train.images[:4])
    assert v1.shape == (4, 3, 16, 16)
    # eval: the centred half (16 px of 32) at 16 px: exactly that crop, no resampling
    ev = aug.eval_transform(ds.train.images[:1])
    crop = ds.train.images[:1, :, 8:24, 8:24].float() / 255
    expect = (crop - torch.tensor(ds.mean).view(1, 3, 1, 1)) / torch.tensor(ds.std).view(1, 3, 1, 1)
    torch.testing.assert_close(ev, expect)
    with pytest.raises(Exception, match="data.store_size"):
        build_config(["data.store_size=64"])  # digits: arrays of their own size


def test_eval_clis_use_the_cache(folder, tmp_path):
    env = dict(os.environ, SSL_SPHERE_CACHE=str(tmp_path / "c"))
    cmd = [sys.executable, "-m", "ssl_sphere.knn", "--random-init", "--backbone", "tiny", "--dataset", "imagefolder",
           "--data-root", str(folder), "data.image_size=16", "--json"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert first.returncode == second.returncode == 0, first.stderr[-2000:]
    assert "building the image cache" in first.stdout + first.stderr
    assert "building" not in second.stdout + second.stderr and builds(tmp_path / "c") == 1
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (first, second))
    assert a["knn_top1"] == b["knn_top1"]


@requires_cifar_folder
def test_cifar10_folder_cache_is_bit_identical(tmp_path):
    cached = load_imagefolder(str(CIFAR_FOLDER), 32, cache="auto", cache_dir=str(tmp_path / "c"), **QUIET)
    direct = load_imagefolder(str(CIFAR_FOLDER), 32, cache="off")
    assert cached.train.images.shape == (50000, 3, 32, 32)
    assert torch.equal(cached.train.images, direct.train.images) and torch.equal(cached.test.images,
                                                                                 direct.test.images)
    assert torch.equal(cached.train.labels, direct.train.labels) and cached.mean == pytest.approx(direct.mean)


def test_two_ranks_build_once_and_share_the_cache(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=40, n_test=10, hw=(32, 32))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "ssl_sphere.pretrain", "--dataset", "imagefolder", "--data-root", str(root), "--backbone", "tiny",
           "--batch-size", "8", "--max-steps", "2", "--device", "cpu", "--output-dir", str(tmp_path / "o"),
           "run.progress=false", "eval.every_epochs=1", "method.queue_size=64", f"data.cache_dir={tmp_path / 'c'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert builds(tmp_path / "c") == 1 and (res.stdout + res.stderr).count("building the image cache") == 1


def test_rebuild_once_per_run_token_and_dead_builds_only_of_this_host(folder, tmp_path, monkeypatch):
    cdir = tmp_path / "c"
    load(folder, cdir)
    assert builds(cdir) == 1
    load(folder, cdir, cache="rebuild", rebuild_token="run-a")  # the run's first process rebuilds
    load(folder, cdir, cache="rebuild", rebuild_token="run-a")  # its other ranks map that build
    assert builds(cdir) == 2
    load(folder, cdir, cache="rebuild", rebuild_token="run-b")  # the next run asks again: rebuilt again
    assert builds(cdir) == 3
    # temps of a dead process on this host go; a live process's and another host's stay
    entry = cache.entry_dir(str(folder), 16, str(cdir))
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # above pid_max: never a live process
    host = cache._host()
    names = {"dead": f"{entry}.tmp-{host}-{dead}", "live": f"{entry}.tmp-{host}-{os.getpid()}",
             "other_host": f"{entry}.tmp-elsewhere-{dead}", "old_format": f"{entry}.tmp-{dead}"}
    for d in names.values():
        os.makedirs(d)
    assert cache.remove_dead_builds(entry) == 2
    assert not os.path.exists(names["dead"]) and not os.path.exists(names["old_format"])
    assert os.path.exists(names["live"]) and os.path.exists(names["other_host"])


def test_a_decode_worker_killed_is_a_clear_error(folder, tmp_path, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    from ssl_sphere.data import decode as data

    class Broken:
        def __init__(self, *a, **k):
            pass

        def map(self, *a, **k):
            raise BrokenProcessPool("a child process terminated abruptly")

        def shutdown(self, *a, **k):
            pass

        __enter__ = lambda self: self  # noqa: E731
        __exit__ = lambda self, *exc: None  # noqa: E731

    monkeypatch.setattr(data, "ProcessPoolExecutor", Broken)  # data.decode_map: the decode and the cache build
    files = [str(p) for p in sorted(Path(folder).rglob("*.png"))]
    with pytest.raises(data.DataError, match="decode_workers"):
        data.decode_images(files, 16, workers=2)
    with pytest.raises(cache.CacheError, match="decode_workers"):
        load_imagefolder(str(folder), 16, workers=2, cache="auto", cache_dir=str(tmp_path / "c"), **QUIET)
    assert not list((tmp_path / "c").glob("*-s16/manifest.json"))  # no entry trusted
