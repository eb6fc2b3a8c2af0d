"""The offline evaluation CLIs (eval/knn.py, eval/linear.py) on a smoke checkpoint:
JSON output, agreement with the live kNN monitor, --random-init, and the error
cases (exit code 2, one line on stderr, no traceback)."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from .conftest import CIFAR_FOLDER, REPO, requires_cifar_folder

KNN_KEYS = {"knn_top1", "knn_top5", "recall@1", "recall@2", "recall@4", "recall@8", "checkpoint", "dataset",
            "n_train", "n_test", "k", "temperature", "seconds"}
LINEAR_KEYS = {"linear_top1", "linear_top5", "checkpoint", "dataset", "n_train", "n_test", "seconds"}


def load_cli(name):
    spec = importlib.util.spec_from_file_location(f"ssl_sphere_eval_{name}", REPO / "eval" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cli(name, *argv, timeout=300):
    """Run ``python eval/<name>.py ARGV`` from the repo root -> CompletedProcess."""
    return subprocess.run([sys.executable, f"eval/{name}.py", *map(str, argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def last_json(res):
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def in_process(name, *argv):
    """(exit code, stdout, stderr) of the CLI's main with its error handling, in this process."""
    import contextlib
    import io

    mod = load_cli(name)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = mod.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A 2-step MoCo + SEC + vMF digits run (tiny backbone) with the live kNN monitor on.
    (vMF keeps one pseudo-label per training image in the state_dict: the CLIs must size the model from it.)"""
    from ssl_sphere.cli.pretrain import build_config
    from ssl_sphere.engine.train import train

    tmp = tmp_path_factory.mktemp("smoke")
    summary = train(build_config(["--output-dir", str(tmp), "--sec", "--vmf", "--max-steps", "2", "--batch-size",
                                  "128", "run.progress=false", "eval.every_epochs=1", "method.proj_hidden_dim=64",
                                  "vmf.k=20"]))
    run_dir = next(tmp.glob("digits_moco*"))
    assert "vmf.labels" in torch.load(run_dir / "last.pt", weights_only=True)["model"]
    return {"ckpt": run_dir / "last.pt", "summary": summary, "tmp": tmp}


def test_knn_cli_json_matches_live_monitor(smoke):
    out = last_json(cli("knn", "--checkpoint", smoke["ckpt"], "--json"))
    assert set(out) == KNN_KEYS
    assert out["dataset"] == "digits" and out["n_train"] == 1437 and out["n_test"] == 360
    assert out["k"] == 200 and out["temperature"] == 0.1 and out["checkpoint"] == str(smoke["ckpt"])
    for key in KNN_KEYS - {"checkpoint", "dataset", "n_train", "n_test", "k", "temperature", "seconds"}:
        assert 10 <= out[key] <= 100, key
    assert out["knn_top1"] <= out["knn_top5"]
    assert out["recall@1"] <= out["recall@2"] <= out["recall@4"] <= out["recall@8"]
    # same checkpoint, same bank/queries, same eval transform: the offline number is the live one
    assert out["knn_top1"] == pytest.approx(smoke["summary"]["knn_top1"], abs=1e-6)
    assert out["knn_top5"] == pytest.approx(smoke["summary"]["knn_top5"], abs=1e-6)


def test_linear_cli_json(smoke):
    res = cli("linear", "--checkpoint", smoke["ckpt"], "--json", "--limit-train", "1000", "--epochs", "30")
    out = last_json(res)
    assert set(out) == LINEAR_KEYS
    assert out["n_train"] == 1000 and out["n_test"] == 360 and out["dataset"] == "digits"
    assert 50 < out["linear_top1"] <= out["linear_top5"] <= 100  # digits features are linearly separable-ish
    assert out["seconds"] > 0


def test_random_init_and_readable_table(smoke):
    rc, stdout, _ = in_process("knn", "--random-init", "--limit-train", "300", "--limit-test", "100", "--json")
    assert rc == 0
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["checkpoint"] is None and out["n_train"] == 300 and out["n_test"] == 100
    assert out["knn_top1"] > 20  # random tiny convnet on digits: well above chance (10%)
    rc, stdout, _ = in_process("linear", "--random-init", "--limit-train", "300", "--limit-test", "100",
                               "--epochs", "5")
    assert rc == 0 and "linear_top1" in stdout and "random init (tiny" in stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(stdout.strip().splitlines()[-1])


def test_save_features_and_limits_are_deterministic(smoke, tmp_path):
    args = ["--checkpoint", smoke["ckpt"], "--limit-train", "200", "--limit-test", "50", "--k", "20"]
    rc1, out1, _ = in_process("knn", *args, "--json", "--save-features", tmp_path / "f.pt")
    rc2, out2, _ = in_process("knn", *args, "--json")
    assert rc1 == rc2 == 0
    a, b = json.loads(out1.splitlines()[-1]), json.loads(out2.splitlines()[-1])
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    saved = torch.load(tmp_path / "f.pt", weights_only=True)
    assert saved["train_features"].shape == (200, 128) and saved["test_features"].shape == (50, 128)
    assert torch.bincount(saved["train_labels"]).tolist() == [20] * 10
    # the saved features evaluate to the same numbers without model or images
    rc3, out3, _ = in_process("knn", "--features", tmp_path / "f.pt", "--k", "20", "--json")
    c = json.loads(out3.splitlines()[-1])
    assert rc3 == 0 and {k: v for k, v in c.items() if k != "seconds"} == {k: v for k, v in a.items() if k != "seconds"}


def test_missing_checkpoint_exits_2_without_traceback(tmp_path):
    res = cli("knn", "--checkpoint", tmp_path / "nope.pt", "--json")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "checkpoint not found" in res.stderr and "nope.pt" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and res.stdout == ""


def test_wrong_backbone_names_the_trained_one(smoke):
    rc, _, err = in_process("knn", "--checkpoint", smoke["ckpt"], "--backbone", "resnet18")
    assert rc == 2 and "trained with backbone 'tiny'" in err and "resnet18" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["corrupt", "foreign"])
def test_bad_checkpoint_files(tmp_path, kind):
    path = tmp_path / "bad.pt"
    if kind == "corrupt":
        path.write_bytes(b"not a torch file at all")
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    rc, _, err = in_process("linear", "--checkpoint", path)
    assert rc == 2 and "bad.pt" in err and len(err.strip().splitlines()) == 1
    assert ("corrupt" in err) if kind == "corrupt" else ("not an ssl_sphere checkpoint" in err)


def test_missing_data_and_misused_flags(smoke, tmp_path):
    rc, _, err = in_process("knn", "--checkpoint", smoke["ckpt"], "--dataset", "imagefolder",
                            "--data-root", tmp_path / "nowhere")
    assert rc == 2 and "nowhere" in err and len(err.strip().splitlines()) == 1
    rc, _, err = in_process("knn", "--checkpoint", smoke["ckpt"], "method.temperature=0.3")
    assert rc == 2 and "--random-init" in err
    with pytest.raises(SystemExit):  # argparse: exactly one of --checkpoint / --random-init
        in_process("knn", "--json")


@requires_cifar_folder
def test_knn_random_init_on_real_cifar_folder():
    res = cli("knn", "--random-init", "--backbone", "tiny", "--dataset", "imagefolder", "--data-root", CIFAR_FOLDER,
              "--limit-train", "2000", "--limit-test", "500", "--json", timeout=900)
    out = last_json(res)
    assert out["n_train"] == 2000 and out["n_test"] == 500 and out["dataset"] == "imagefolder"
    assert out["knn_top1"] > 15  # chance is 10%; a random tiny convnet gets about 25-30%
