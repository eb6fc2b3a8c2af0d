"""Every mistake a user can make gets one clear line (what is wrong, which file or key, what
to do) and exit code 2 through the one error path of the commands, never a traceback; and
never loses saved work."""

import errno
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_sphere.cli.knn import main as knn_main
from ssl_sphere.cli.pretrain import main
from ssl_sphere.core import checkpoint

from .conftest import REPO, make_image_folder

FAST = ["run.progress=false", "method.proj_hidden_dim=64", "eval.every_epochs=0", "run.ckpt_every_minutes=0"]


def fails(capsys, argv, *needles, cli=main):
    """Run a command in this process: exit code 2, one line on stderr holding every needle."""
    capsys.readouterr()
    assert cli([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "Traceback" not in err and "weights_only" not in err
    return err


@pytest.fixture(scope="module")
def moco_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad")
    assert main(["--output-dir", str(out), "--run-name", "r", "--max-steps", "2", "--batch-size", "256", *FAST]) == 0
    return out / "r"


# ----------------------------------------------------------------------------- config values
@pytest.mark.parametrize("override,needle", [
    ("optim.weight_decay=-0.5", "optim.weight_decay"), ("optim.momentum=5", "optim.momentum"),
    ("eval.batch_size=0", "eval.batch_size"), ("eval.bank_size=0", "eval.bank_size"),
    ("eval.test_size=0", "eval.test_size"), ("data.decode_workers=-1", "data.decode_workers"),
    ("run.ckpt_every_steps=-1", "run.ckpt_every_steps"), ("optim.lars_eta=0", "optim.lars_eta"),
    ("data.train_limit=0", "data.train_limit"), ("method.nonsense=1", "unknown config key 'method.nonsense'"),
])
def test_bad_config_values(capsys, tmp_path, override, needle):
    fails(capsys, ["--output-dir", tmp_path, override], needle)
    assert not list(tmp_path.iterdir())  # refused before a run directory was made


def test_data_root_with_digits_is_refused(capsys, tmp_path):
    fails(capsys, ["--data-root", tmp_path, "--output-dir", tmp_path], "data.root", "digits")


def test_digits_image_size_past_ram_is_refused_before_allocating(capsys, tmp_path):
    fails(capsys, ["--output-dir", tmp_path, "data.image_size=4096", *FAST], "GiB in memory", "data.image_size")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is valid here")
def test_device_cuda_without_cuda(capsys, tmp_path):
    fails(capsys, ["--device", "cuda", "--output-dir", tmp_path, *FAST], "CUDA is not available", "--device cpu")


# ----------------------------------------------------------------------------- checkpoints
def _bad_files(d: Path, good: Path):
    d.mkdir(exist_ok=True)
    (d / "empty.pt").write_bytes(b"")
    (d / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    data = good.read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 3])
    torch.save({"conv1.weight": torch.zeros(4)}, d / "state_dict.pt")  # a plain (torchvision-style) state_dict

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"model": Evil(), "config": {}}, d / "pickle.pt")
    return d


@pytest.mark.parametrize("name,needle", [("empty", "empty"), ("random", "not a torch checkpoint file"),
                                         ("truncated", "not a torch checkpoint file"),
                                         ("state_dict", "not an ssl_sphere checkpoint"),
                                         ("pickle", "refused to load")])
def test_unusable_checkpoints(capsys, tmp_path, moco_run, name, needle):
    d = _bad_files(tmp_path / "files", moco_run / "last.pt")
    err = fails(capsys, ["--resume", d / f"{name}.pt", *FAST], f"{name}.pt", needle)
    assert "this must never run" not in err + capsys.readouterr().out


@pytest.mark.parametrize("flag,needle", [(["--method", "simclr"], "method.name changed (moco -> simclr)"),
                                         (["--backbone", "resnet18"], "model.backbone changed (tiny -> resnet18)")])
def test_resume_with_another_architecture(capsys, moco_run, flag, needle):
    fails(capsys, ["--resume", moco_run / "last.pt", *flag, *FAST], needle, "drop --resume")


def test_full_disk_keeps_the_last_checkpoint(capsys, tmp_path, monkeypatch):
    assert main(["--output-dir", str(tmp_path), "--run-name", "r", "--max-steps", "2", "--batch-size", "256",
                 *FAST]) == 0
    before = (tmp_path / "r" / "last.pt").read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    fails(capsys, ["--resume", tmp_path / "r" / "last.pt", "--max-steps", "4", *FAST], "no space left",
          "last.pt is intact")
    assert (tmp_path / "r" / "last.pt").read_bytes() == before and not list((tmp_path / "r").glob(".tmp-*"))


def test_output_dir_that_cannot_be_created(capsys, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    fails(capsys, ["--output-dir", tmp_path / "file" / "runs", *FAST], "cannot create", "--output-dir")


# ----------------------------------------------------------------------------- image folders
def test_zero_byte_and_non_image_first_files(capsys, tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=3, n_test=2)
    first = root / "train" / "a" / "0.png"
    first.write_bytes(b"")
    fails(capsys, ["--dataset", "imagefolder", "--data-root", root, "--output-dir", tmp_path, *FAST], "0.png")
    first.write_text("plain text, not an image")
    fails(capsys, ["--dataset", "imagefolder", "--data-root", root, "--output-dir", tmp_path, *FAST], "0.png")
    # not the first file: found while decoding
    make_image_folder(root, n_train=3, n_test=2)
    (root / "train" / "b" / "2.png").write_bytes(b"\x89PNG broken")
    fails(capsys, ["--dataset", "imagefolder", "--data-root", root, "--output-dir", tmp_path, *FAST], "2.png")


def test_16_bit_images_are_scaled_to_8_bit(tmp_path):
    from PIL import Image

    from ssl_sphere.data.datasets import load_imagefolder

    root = make_image_folder(tmp_path / "data", n_train=2, n_test=1, hw=(16, 16))
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0 .. 65535
    Image.fromarray(ramp).save(root / "train" / "a" / "0.png")
    assert Image.open(root / "train" / "a" / "0.png").mode.startswith("I")
    ds = load_imagefolder(str(root), 16, workers=1)
    img = ds.train.images[0]
    assert torch.equal(img[0], img[1]) and torch.equal(img[0].flatten(), torch.arange(256, dtype=torch.uint8))


# ----------------------------------------------------------------------------- evaluation CLIs
def test_eval_cli_inputs(capsys, tmp_path, moco_run):
    ck = moco_run / "last.pt"
    fails(capsys, ["--checkpoint", ck, "--limit-test", "1"], "at least 2 test images", cli=knn_main)
    fails(capsys, ["--checkpoint", ck, "--batch-size", "0"], "--batch-size must be >= 1", cli=knn_main)
    fails(capsys, ["--checkpoint", ck, "--save-features", tmp_path / "missing" / "f.pt"], "does not exist",
          cli=knn_main)
    # --k larger than the bank: reported as used
    capsys.readouterr()
    assert knn_main([str(a) for a in ["--checkpoint", ck, "--limit-train", "50", "--limit-test", "20", "--k",
                                      "100000", "--json"]]) == 0
    import json

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["k"] == 50


def test_no_traceback_from_the_real_commands(tmp_path):
    for cmd in (["-m", "ssl_sphere.pretrain", "--output-dir", str(tmp_path), "optim.momentum=5"],
                ["-m", "ssl_sphere.pretrain", "--resume", str(tmp_path / "nope.pt")],
                ["-m", "ssl_sphere.knn", "--checkpoint", str(tmp_path / "nope.pt")],
                ["-m", "ssl_sphere.export", "--checkpoint", str(tmp_path / "nope.pt"), "--out",
                 str(tmp_path / "b.pt")]):
        res = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert res.returncode == 2 and "Traceback" not in res.stderr, (cmd, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, (cmd, res.stderr)


def test_a_background_thread_error_takes_the_one_error_path(capsys):
    """An exception that ends a background thread (TensorBoard's event writer on a full disk) is not
    printed as a traceback by the thread: the command reports it as its one line, exit code 2."""
    import threading

    from ssl_sphere.cli.common import handle_errors

    def command(argv):
        def writer():
            raise OSError(errno.ENOSPC, "No space left on device", "/full/events.out")

        t = threading.Thread(target=writer)
        t.start()
        t.join()
        return 0

    assert handle_errors(command) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err
    assert err.strip().splitlines() == ["error: No space left on device (/full/events.out); free space there or choose "
                                        "another --output-dir / data.cache_dir (saved checkpoints are intact)"]


@pytest.fixture
def nearly_full_disk(tmp_path):
    """A 1 MiB tmpfs (needs root to mount; skipped otherwise), unmounted afterwards."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill ({res.stderr.strip() or 'needs root'})")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("pages", [1, 2, 3])
def test_a_full_output_disk_is_one_line_whoever_hits_it(nearly_full_disk, pages):
    """With 1-3 pages left on the output disk the first write to fail is TensorBoard's (its own
    thread), config.yaml / metrics.jsonl, or the checkpoint: every time exit code 2 and one line."""
    import os

    free = os.statvfs(nearly_full_disk)
    (nearly_full_disk / "filler").write_bytes(b"\0" * (free.f_bavail * free.f_frsize - pages * 4096))
    res = subprocess.run([sys.executable, "-m", "ssl_sphere.pretrain", "--output-dir", str(nearly_full_disk / "runs"),
                          "--max-steps", "3", "run.progress=false", "eval.every_epochs=0"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "Exception in thread" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "space" in lines[0], res.stderr
