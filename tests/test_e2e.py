"""End-to-end: smoke runs write TensorBoard events, metrics.jsonl, config.yaml and a
checkpoint; resume continues exactly; a non-finite loss stops and keeps the last
good checkpoint; the real CIFAR-10 image folder trains."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ssl_sphere.cli.pretrain import build_config, main
from ssl_sphere.core import checkpoint
from ssl_sphere.engine.train import train

from .conftest import CIFAR_FOLDER, REPO, requires_cifar_folder

FAST = ["run.progress=false", "method.proj_hidden_dim=64"]


def run(tmp_path, *argv):
    cfg = build_config(["--output-dir", str(tmp_path), *FAST, *argv])
    return train(cfg)


def test_cli_smoke_run_writes_everything(tmp_path):
    cmd = [sys.executable, "-m", "ssl_sphere.pretrain", "--method", "moco", "--sec", "--output-dir", str(tmp_path),
           "--max-steps", "3", "--batch-size", "128", "eval.bank_size=300", "eval.test_size=100", "run.log_every=1",
           *FAST]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    run_dir = tmp_path / "digits_moco_sec_s0"
    assert "kNN top-1" in res.stdout and "at start ->" in res.stdout
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "projector_config.pbtxt").exists()  # embedding-projector snapshot of test images
    assert (run_dir / "00003" / "test_features" / "sprite.png").exists()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["method"]["name"] == "moco" and cfg["sec"]["enabled"] and cfg["optim"]["lr"] == pytest.approx(0.06)
    assert cfg["run"]["run_name"] == "digits_moco_sec_s0"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    knn_rows = [r for r in rows if "knn_top1" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert {"loss", "lr", "norm_mean", "norm_std", "sec_loss"} <= set(train_rows[0])
    assert [r["step"] for r in knn_rows] == [0, 3]  # random-init baseline, then the final model
    ck = checkpoint.load(str(run_dir / "last.pt"))
    assert ck["step"] == 3 and ck["config"]["method"]["name"] == "moco"
    assert any(k.endswith("queue.keys") for k in ck["model"]) and any("encoder.target" in k for k in ck["model"])
    assert any(k.endswith("sec.mu") for k in ck["model"])
    assert {"torch", "numpy", "python"} <= set(ck["rng"]) and "optimizer" in ck


def _params(path):
    return checkpoint.load(path)["model"]


@pytest.mark.parametrize("method", ["moco", "byol"])
def test_resume_equals_uninterrupted(tmp_path, method):
    # 5 steps per epoch: the interrupted run stops at step 3 and resumes across the epoch boundary.
    common = ["--method", method, "--sec-ema", "0.5", "--batch-size", "256", "--epochs", "2", "eval.every_epochs=0",
              *(["method.pred_hidden_dim=64"] if method == "byol" else [])]
    a = run(tmp_path / "a", *common, "--max-steps", "7")
    run(tmp_path / "b", *common, "--max-steps", "3")
    b_dir = tmp_path / "b" / f"digits_{method}_sec_s0"
    with open(b_dir / "metrics.jsonl", "a") as f:  # as if the crashed run had logged past its checkpoint
        f.write(json.dumps({"step": 5, "kind": "train", "loss": 123.0}) + "\n")
    b = run(tmp_path / "b", *common, "--max-steps", "7", "--resume", str(b_dir / "last.pt"))
    assert a["step"] == b["step"] == 7 and Path(b["run_dir"]).resolve() == b_dir.resolve()
    pa, pb = _params(str(Path(a["run_dir"]) / "last.pt")), _params(str(b_dir / "last.pt"))
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6, msg=k)
    # the training curve continues instead of restarting
    rows = [json.loads(x) for x in (b_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 7 and not any(r.get("loss") == 123.0 for r in rows)
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    sphere = [r for r in rows if r["kind"] == "sphere"]  # alignment / uniformity at the epoch end
    assert [r["step"] for r in sphere] == [5] and sphere[0]["alignment"] >= 0 and sphere[0]["uniformity"] <= 0


def test_resume_auto_and_no_overwrite(tmp_path):
    args = ["--max-steps", "2", "--batch-size", "256", "eval.every_epochs=0", "--run-name", "r"]
    first = run(tmp_path, *args)
    second = run(tmp_path, *args)  # same name, no --resume: a new directory, first run untouched
    assert Path(second["run_dir"]).name == "r-2" and Path(first["run_dir"]).name == "r"
    cont = run(tmp_path, "--max-steps", "4", "--batch-size", "256", "eval.every_epochs=0", "--run-name", "r",
               "--resume", "auto")
    assert cont["run_dir"] == second["run_dir"] and cont["step"] == 4
    assert checkpoint.load(str(Path(first["run_dir"]) / "last.pt"))["step"] == 2


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import ssl_sphere.methods.simclr as simclr

    calls = {"n": 0}
    real = simclr.nt_xent

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 8 else loss  # step index 7

    monkeypatch.setattr(simclr, "nt_xent", poisoned)
    code = main(["--method", "simclr", "--batch-size", "256", "--output-dir", str(tmp_path), "eval.every_epochs=0",
                 "run.log_every=1", *FAST])
    assert code != 0
    err = capsys.readouterr().err
    assert "non-finite loss at step 7" in err and "last.pt (step 5)" in err
    ck = checkpoint.load(str(tmp_path / "digits_simclr_s0" / "last.pt"))
    assert ck["step"] == 5 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_missing_data_errors_are_clear(tmp_path, capsys):
    assert main(["--dataset", "cifar10", "--data-root", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--download" in err and "cifar-10-batches-py" in err
    assert main(["--dataset", "imagefolder", "--data-root", str(tmp_path / "nowhere")]) == 2
    assert "train/" in capsys.readouterr().err


def test_batch_larger_than_dataset(tmp_path, capsys):
    assert main(["--batch-size", "4096", "method.queue_size=8192", "--output-dir", str(tmp_path), *FAST]) == 2
    assert "larger than the 1437 training images" in capsys.readouterr().err


def test_imagefolder_small_synthetic(tmp_path):
    from PIL import Image

    root = tmp_path / "folder"
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("test", 4)):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(arr).save(d / f"{i}.png")
    from ssl_sphere.data.datasets import load_imagefolder

    ds = load_imagefolder(str(root), 16, workers=2)
    assert ds.train.images.shape == (24, 3, 16, 16) and ds.test.images.shape == (8, 3, 16, 16)
    assert ds.classes == ["a", "b"] and ds.train.labels.tolist() == [0] * 12 + [1] * 12
    (root / "train" / "a" / "bad.jpg").write_bytes(b"not an image")
    from ssl_sphere.data.splits import DataError

    with pytest.raises(DataError, match="bad.jpg"):
        load_imagefolder(str(root), 16, workers=1)


@requires_cifar_folder
def test_real_cifar10_folder_trains(tmp_path):
    s = run(tmp_path, "--dataset", "imagefolder", "--data-root", str(CIFAR_FOLDER), "--backbone", "tiny",
            "--max-steps", "2", "--batch-size", "64", "eval.bank_size=1000", "eval.test_size=500")
    cfg = yaml.safe_load((Path(s["run_dir"]) / "config.yaml").read_text())
    assert cfg["data"]["image_size"] == 32 and s["step"] == 2 and 0 <= s["knn_top1"] <= 100
    from ssl_sphere.data.datasets import load_data

    ds = load_data(build_config(["--dataset", "imagefolder", "--data-root", str(CIFAR_FOLDER)]).data)
    assert ds.train.images.shape == (50000, 3, 32, 32) and ds.test.images.shape == (10000, 3, 32, 32)
    assert ds.num_classes == 10 and torch.bincount(ds.test.labels).tolist() == [1000] * 10
    # channel statistics match the ones documented for these files (shared/data/README.md)
    assert ds.mean == pytest.approx((0.4913, 0.4821, 0.4465), abs=0.01)


def test_logger_values_to_floats_in_one_copy_per_device():
    import torch

    from ssl_sphere.engine.logs import _to_floats

    vals = _to_floats({"loss": torch.tensor(1.5), "lr": 0.1, "n": torch.tensor(2), "one": torch.ones(1), "k": 3})
    assert vals == {"loss": 1.5, "lr": 0.1, "n": 2.0, "one": 1.0, "k": 3.0}
    assert all(type(v) is float for v in vals.values())
