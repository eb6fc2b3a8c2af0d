"""A run keeps what the user asked apart from what the machine decided: config.yaml and every
checkpoint hold the request (null / auto where a value is derived), the resolved values and how
each derived value was obtained; a resume derives them again for its own machine and keeps every
asked value."""

from pathlib import Path

import pytest
import torch
import yaml

from ssl_sphere import config
from ssl_sphere.cli.pretrain import build_config
from ssl_sphere.core import checkpoint
from ssl_sphere.engine.train import train

FAST = ["run.progress=false", "eval.every_epochs=0", "method.proj_hidden_dim=64", "--batch-size", "64",
        "--run-name", "r"]


def _on(monkeypatch, world=1, cuda=False):
    """Make build_config see a machine of ``world`` processes, with or without CUDA."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)


def _saved_as(run_dir: Path, cfg) -> Path:
    """The run's last.pt with its config replaced by ``cfg`` (as written by a run on cfg's machine)."""
    ck = checkpoint.load(str(run_dir / "last.pt"))
    ck["config"] = config.to_container(cfg)
    checkpoint.save(str(run_dir / "last.pt"), ck)
    return run_dir / "last.pt"


def test_config_yaml_and_checkpoint_hold_request_resolved_and_derivations(tmp_path):
    s = train(build_config(["--output-dir", str(tmp_path), "--max-steps", "1", *FAST]))
    saved = yaml.safe_load((Path(s["run_dir"]) / "config.yaml").read_text())
    assert saved["optim"]["lr"] == pytest.approx(0.03) and saved["request"]["optim"]["lr"] is None
    assert saved["model"]["backbone"] == "tiny" and saved["request"]["model"]["backbone"] == "auto"
    assert saved["eval"]["bank_size"] == 5000 and saved["request"]["eval"]["bank_size"] is None
    assert "global batch 64" in saved["derived"]["optim.lr"] and "CPU" in saved["derived"]["eval.bank_size"]
    assert saved["request"]["optim"]["max_steps"] == 1  # asked
    ck = checkpoint.load(str(Path(s["run_dir"]) / "last.pt"))
    assert ck["config"]["request"] == saved["request"] and ck["config"]["derived"] == saved["derived"]
    # the run's config.yaml is a recipe: its request starts a new run on this machine
    again = build_config(["--config", str(Path(s["run_dir"]) / "config.yaml"), "--output-dir", str(tmp_path)])
    assert again.run.resume is None and again.optim.lr == pytest.approx(0.03) and again.optim.max_steps == 1


def test_two_rank_run_resumed_on_one_rank_gets_the_one_rank_lr(tmp_path, monkeypatch, capsys):
    fast = [*FAST, "--batch-size", "128"]
    s = train(build_config(["--output-dir", str(tmp_path), "--max-steps", "1", *fast]))
    _on(monkeypatch, world=2)
    two = build_config(["--output-dir", str(tmp_path), *fast])
    assert two.optim.lr == pytest.approx(0.06 * 128 * 2 / 128) and two.model.split_bn == 1
    path = _saved_as(Path(s["run_dir"]), two)
    _on(monkeypatch, world=1)
    capsys.readouterr()
    one = build_config(["--resume", str(path), *fast])
    assert one.optim.lr == pytest.approx(0.06 * 128 / 128)
    assert one.model.split_bn == 2  # MoCo in one process: split BN (2 groups of 64) again
    line = [x for x in capsys.readouterr().out.splitlines() if "re-derived for this machine" in x]
    assert len(line) == 1 and "optim.lr: 0.12 -> 0.06" in line[0] and "1 process" in line[0]
    assert "model.split_bn: 1 -> 2" in line[0]


def test_cuda_config_resumed_on_a_cpu_gets_the_cpu_caps(tmp_path, monkeypatch, capsys):
    s = train(build_config(["--output-dir", str(tmp_path), "--max-steps", "1", *FAST]))
    _on(monkeypatch, cuda=True)
    gpu = build_config(["--output-dir", str(tmp_path), *FAST])
    assert (gpu.eval.bank_size, gpu.eval.test_size) == (50000, 10000)
    path = _saved_as(Path(s["run_dir"]), gpu)
    _on(monkeypatch, cuda=False)
    cpu = build_config(["--resume", str(path), *FAST])
    assert (cpu.eval.bank_size, cpu.eval.test_size) == (5000, 1000)
    out = capsys.readouterr().out
    assert "eval.bank_size: 50000 -> 5000" in out and "eval.test_size: 10000 -> 1000" in out


@pytest.mark.parametrize("world,cuda", [(1, False), (2, False), (1, True), (4, True)])
def test_an_asked_value_survives_any_resume(tmp_path, monkeypatch, capsys, world, cuda):
    s = train(build_config(["--output-dir", str(tmp_path), "--max-steps", "1", "--lr", "0.2",
                            "eval.bank_size=300", *FAST]))
    first = checkpoint.load(str(Path(s["run_dir"]) / "last.pt"))["config"]
    assert first["request"]["optim"]["lr"] == 0.2 and "optim.lr" not in first["derived"]
    _on(monkeypatch, world=world, cuda=cuda)
    again = build_config(["--resume", str(Path(s["run_dir"]) / "last.pt"), *FAST])
    assert again.optim.lr == 0.2 and again.eval.bank_size == 300  # asked: kept on every machine
    assert "optim.lr" not in capsys.readouterr().out


LEGACY_METHOD_KEYS = dict(temperature=None, proj_hidden_dim=2048, proj_dim=128, pred_hidden_dim=4096, momentum=0.99,
                          momentum_final=1.0, queue_size=1024, symmetric=True, shuffle_bn=True)


def legacy(ck: dict) -> dict:
    """A checkpoint's config as written before the method sections were per method: one flat method
    section with every method's keys, no request and no derivations."""
    cfg = {k: v for k, v in ck["config"].items() if k not in ("request", "derived")}
    cfg["method"] = {"name": cfg["method"]["name"], **LEGACY_METHOD_KEYS, **cfg["method"]}
    return dict(ck, config=cfg)


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_checkpoints_from_before_the_per_method_sections_still_load(tmp_path, method, capsys):
    from ssl_sphere import load_pretrained
    from ssl_sphere.cli.knn import main as knn_main

    s = train(build_config(["--method", method, "--output-dir", str(tmp_path), "--max-steps", "2", *FAST]))
    path = Path(s["run_dir"]) / "last.pt"
    ck = checkpoint.load(str(path))
    checkpoint.save(str(path), legacy(ck))
    p = load_pretrained(str(path))
    assert p.step == 2 and p.config["method"]["name"] == method
    assert knn_main(["--checkpoint", str(path), "--limit-train", "100", "--limit-test", "20"]) == 0
    resumed = build_config(["--resume", str(path), "--max-steps", "3", *FAST])
    # the other methods' keys of the flat section are dropped, the method's own kept
    assert resumed.method.name == method and ("queue_size" in resumed.method) == (method == "moco")
    assert train(resumed)["step"] == 3


def test_a_resume_takes_the_checkpoints_method_keys_on_the_command_line(tmp_path, capsys):
    # DINO's teacher_temp is not a key of the default method (MoCo): the resume must read it
    # against the checkpoint's method, not refuse it before it knows which method it continues
    s = train(build_config(["--method", "dino", "--output-dir", str(tmp_path), "--max-steps", "1", *FAST]))
    path = Path(s["run_dir"]) / "last.pt"
    resumed = build_config(["--resume", str(path), "method.teacher_temp=0.05", "--max-steps", "2", *FAST])
    assert resumed.method.name == "dino" and resumed.method.teacher_temp == 0.05
    assert "method.teacher_temp: 0.07 -> 0.05" in capsys.readouterr().out
    # without a checkpoint to continue the key is still checked against the method asked for
    with pytest.raises(config.ConfigError, match="teacher_temp"):
        build_config(["--output-dir", str(tmp_path / "new"), "method.teacher_temp=0.05", *FAST])


def test_a_resume_with_another_weight_decay_and_momentum_trains_with_them(tmp_path, capsys):
    # the optimiser's groups come back from the checkpoint with their saved hyper-parameters; the
    # config's must replace them, on the decayed groups only
    s = train(build_config(["--output-dir", str(tmp_path), "--max-steps", "1", *FAST]))
    path = Path(s["run_dir"]) / "last.pt"
    assert train(build_config(["--resume", str(path), "--max-steps", "2", "optim.weight_decay=0.01",
                               "optim.momentum=0.5", *FAST]))["step"] == 2
    groups = checkpoint.load(str(path))["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups if g["decay"]} == {0.01}
    assert {g["weight_decay"] for g in groups if not g["decay"]} == {0.0}
    assert {g["momentum"] for g in groups} == {0.5}


def test_a_resume_in_place_names_no_changed_keys(tmp_path, monkeypatch, capsys):
    """Resuming a run where it is, from a relative --output-dir, is no change of run.output_dir /
    run.run_name ("runs" -> "/abs/runs" would be noise in the changed-keys line); a moved run is one."""
    monkeypatch.chdir(tmp_path)
    train(build_config(["--output-dir", "runs", "--max-steps", "1", *FAST]))
    capsys.readouterr()
    cfg = build_config(["--output-dir", "runs", "--resume", "auto", *FAST])
    assert cfg.run.output_dir == "runs" and cfg.run.run_name == "r"
    assert "changed keys" not in capsys.readouterr().out
    (tmp_path / "runs").rename(tmp_path / "moved")
    build_config(["--resume", str(tmp_path / "moved" / "r" / "last.pt"), *[a for a in FAST if a != "--run-name"
                                                                             and a != "r"]])
    assert f"run.output_dir: runs -> {tmp_path / 'moved'}" in capsys.readouterr().out
