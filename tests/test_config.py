"""Config precedence, validation errors and the recipes in configs/."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ssl_sphere import config as C
from ssl_sphere import methods
from ssl_sphere.cli.pretrain import build_config, build_parser

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").rglob("*.yaml"))


def test_defaults_resolve_to_concrete_values(tmp_path):
    cfg = build_config(["--output-dir", str(tmp_path)])
    assert cfg.method.name == "moco" and cfg.data.dataset == "digits"
    assert cfg.model.backbone == "tiny"
    assert cfg.method.temperature == 0.1 and cfg.method.proj_dim == 128
    assert cfg.optim.lr == pytest.approx(0.06 * cfg.optim.batch_size / 128)
    assert cfg.aug.blur_p == [0.0, 0.0] and cfg.aug.solarize_p == [0.0, 0.0]
    assert not cfg.sec.enabled


def test_method_defaults_follow_method(tmp_path):
    cfg = build_config(["--method", "byol", "--output-dir", str(tmp_path)])
    assert cfg.method.proj_dim == 256 and cfg.method.proj_hidden_dim == 4096
    assert cfg.aug.blur_p == [1.0, 0.1] and cfg.aug.solarize_p == [0.0, 0.2]
    assert build_config(["--method", "simclr"]).method.temperature == 0.5


def test_precedence_defaults_yaml_flags_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  batch_size: 64\n  epochs: 7\nmethod:\n  temperature: 0.3\nsec:\n  weight: 0.7\n")
    cfg = build_config(["--config", str(y)])
    assert (cfg.optim.batch_size, cfg.optim.epochs, cfg.method.temperature) == (64, 7, 0.3)
    cfg = build_config(["--config", str(y), "--batch-size", "32"])
    assert cfg.optim.batch_size == 32 and cfg.optim.epochs == 7  # flag beats YAML, YAML kept elsewhere
    cfg = build_config(["--config", str(y), "--batch-size", "32", "optim.batch_size=16", "method.temperature=0.2"])
    assert cfg.optim.batch_size == 16 and cfg.method.temperature == 0.2  # key=value beats flag and YAML
    assert cfg.sec.weight == 0.7


def test_sec_flags():
    assert build_config(["--sec"]).sec.enabled
    cfg = build_config(["--sec-ema", "0.1"])
    assert cfg.sec.enabled and cfg.sec.ema == 0.1
    cfg = build_config(["--sec-weight", "0.5"])
    assert cfg.sec.enabled and cfg.sec.weight == 0.5


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["method.temprature=0.2"], "method.temprature"),
        (["bogus.key=1"], "bogus"),
        (["optim.batch_size=abc"], "optim.batch_size"),
        (["method.name=barlow"], "simclr, moco, byol, simsiam, mocov3, nnclr, dino, swav"),
        (["--sec-ema", "1.5"], "sec.ema"),
        (["aug.jitter_p=1.5"], "aug.jitter_p"),
        (["--batch-size", "512", "method.queue_size=100"], "method.queue_size"),
        (["--dataset", "imagefolder"], "data.root"),
        (["notakeyvalue"], "section.key=value"),
    ],
)
def test_bad_config_names_the_key(argv, needle):
    with pytest.raises(C.ConfigError) as e:
        build_config(argv)
    assert needle in str(e.value)


def test_unknown_key_lists_valid_choices():
    with pytest.raises(C.ConfigError) as e:
        build_config(["sec.wieght=1"])
    assert "sec.weight" in str(e.value) and "sec.ema" in str(e.value)


def test_yaml_unknown_key_and_type(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("optim:\n  epochz: 3\n")
    with pytest.raises(C.ConfigError, match="optim.epochz"):
        build_config(["--config", str(y)])
    y.write_text("optim:\n  epochs: many\n")
    with pytest.raises(C.ConfigError, match="optim.epochs"):
        build_config(["--config", str(y)])


def test_bad_flag_choice_is_argparse_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--method", "barlow"])
    assert "invalid choice" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in ["--method", "--sec", "--sec-weight", "--sec-ema", "--config", "--dataset", "--data-root", "--download",
                 "--backbone", "--epochs", "--max-steps", "--batch-size", "--lr", "--device", "--output-dir",
                 "--run-name", "--resume", "--seed", "key=value"]:
        assert flag in out


def test_recipes_exist():
    names = {p.relative_to(REPO / "configs").as_posix() for p in RECIPES}
    for m in ("simclr", "moco", "byol"):
        assert f"cifar10/{m}.yaml" in names and f"cifar10/{m}_sec.yaml" in names
    assert any(n.startswith("stl10/") for n in names) and any(n.startswith("imagenet100/") for n in names)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_every_recipe_loads_and_validates(path):
    cfg = build_config(["--config", str(path)])
    assert cfg.method.name in methods.names()
    if path.stem.endswith("_sec"):
        assert cfg.sec.enabled
    if path.parent.name == "cifar10":
        if path.stem.endswith("_vit"):  # the ViT recipes: a ViT-Tiny with 4 x 4 patches
            assert cfg.model.backbone == "vit_tiny" and cfg.model.patch_size == 4
        else:
            assert cfg.model.backbone == "resnet18" and cfg.model.small_images
        assert cfg.optim.epochs == 200 and cfg.optim.batch_size == 512
    # the saved form round-trips
    again = C.from_container(C.to_container(cfg))
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_overrides_may_be_interleaved_with_flags():
    cfg = build_config(["run.progress=false", "--method", "simclr", "method.temperature=0.3", "--epochs", "3"])
    assert (cfg.run.progress, cfg.method.name, cfg.method.temperature, cfg.optim.epochs) == (False, "simclr", 0.3, 3)
