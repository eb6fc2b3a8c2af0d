"""Every recipe value in configs/ against the source the recipe cites for it.

A row is (config key, value, source): the value as the source states it. A recipe may only
differ from a cited source where its YAML marks the value [ours] with a reason; those values
are listed here under OURS so that a changed value is a deliberate edit of this table too."""

from pathlib import Path

import pytest
import yaml

from ssl_sphere.cli.pretrain import build_config

REPO = Path(__file__).resolve().parents[1]

DEMO = "MoCo authors' CIFAR-10 demo (moco_cifar10_demo.ipynb)"
LIGHTLY = "lightly's CIFAR-10 benchmark (cifar10_benchmark.py)"
SIMCLR = "SimCLR, Appendix B.9"
BYOL = "BYOL, Sec. 3.3 / Table 6"
MOCOV2 = "MoCo v2 paper and main_moco.py"

CIFAR_MOCO = [
    ("model.small_images", True, DEMO), ("model.split_bn", 8, DEMO), ("aug.crop_scale", [0.08, 1.0], DEMO),
    ("aug.blur_p", [0.0, 0.0], DEMO), ("aug.brightness", 0.4, DEMO), ("aug.hue", 0.1, DEMO),
    ("aug.jitter_p", 0.8, DEMO), ("aug.grayscale_p", 0.2, DEMO),
    ("optim.optimizer", "sgd", DEMO), ("optim.epochs", 200, DEMO), ("optim.batch_size", 512, DEMO),
    ("optim.lr", 0.06, DEMO), ("optim.momentum", 0.9, DEMO), ("optim.weight_decay", 5e-4, DEMO),
    ("optim.decay_norm_and_bias", True, DEMO), ("optim.warmup_epochs", 0, DEMO),
    ("method.temperature", 0.1, DEMO), ("method.proj_dim", 128, DEMO), ("method.queue_size", 4096, DEMO),
    ("method.momentum", 0.99, DEMO), ("method.momentum_final", 0.99, DEMO), ("method.symmetric", True, DEMO),
    ("method.proj_hidden_dim", 2048, "MoCo v2 MLP head"),
]
LIGHTLY_OPTIM = [
    ("optim.optimizer", "sgd", LIGHTLY), ("optim.epochs", 200, LIGHTLY), ("optim.batch_size", 512, LIGHTLY),
    ("optim.lr", 0.06 * 512 / 128, LIGHTLY), ("optim.momentum", 0.9, LIGHTLY),
    ("optim.weight_decay", 5e-4, LIGHTLY), ("optim.decay_norm_and_bias", True, LIGHTLY),
    ("optim.warmup_epochs", 0, LIGHTLY), ("model.small_images", True, LIGHTLY),
]
CIFAR_SIMCLR = LIGHTLY_OPTIM + [
    ("aug.crop_scale", [0.08, 1.0], SIMCLR), ("aug.brightness", 0.4, SIMCLR), ("aug.contrast", 0.4, SIMCLR),
    ("aug.saturation", 0.4, SIMCLR), ("aug.hue", 0.1, SIMCLR), ("aug.blur_p", [0.0, 0.0], SIMCLR),
    ("method.temperature", 0.5, SIMCLR), ("method.proj_dim", 128, SIMCLR),
]
CIFAR_BYOL = LIGHTLY_OPTIM + [
    ("aug.crop_scale", [0.08, 1.0], BYOL), ("aug.saturation", 0.2, BYOL), ("aug.blur_p", [1.0, 0.1], BYOL),
    ("aug.solarize_p", [0.0, 0.2], BYOL), ("method.proj_hidden_dim", 4096, BYOL), ("method.proj_dim", 256, BYOL),
    ("method.pred_hidden_dim", 4096, BYOL), ("method.momentum", 0.99, LIGHTLY),
    ("method.momentum_final", 1.0, BYOL),
]
IMAGENET100_MOCO = [
    ("data.image_size", 224, MOCOV2), ("data.eval_crop", 0.875, MOCOV2), ("model.backbone", "resnet50", MOCOV2),
    ("aug.crop_scale", [0.2, 1.0], MOCOV2), ("aug.blur_p", [0.5, 0.5], MOCOV2), ("aug.blur_sigma", [0.1, 2.0], MOCOV2),
    ("method.temperature", 0.2, MOCOV2), ("method.proj_hidden_dim", 2048, MOCOV2), ("method.proj_dim", 128, MOCOV2),
    ("method.queue_size", 65536, MOCOV2), ("method.momentum", 0.999, MOCOV2), ("method.momentum_final", 0.999, MOCOV2),
    ("method.symmetric", False, MOCOV2), ("optim.epochs", 200, MOCOV2), ("optim.batch_size", 256, MOCOV2),
    ("optim.lr", 0.03, MOCOV2), ("optim.momentum", 0.9, MOCOV2), ("optim.weight_decay", 1e-4, MOCOV2),
    ("optim.decay_norm_and_bias", True, MOCOV2), ("optim.warmup_epochs", 0, MOCOV2),
]

TABLE = {
    "cifar10/moco.yaml": CIFAR_MOCO, "cifar10/moco_sec.yaml": CIFAR_MOCO,
    "cifar10/simclr.yaml": CIFAR_SIMCLR, "cifar10/simclr_sec.yaml": CIFAR_SIMCLR,
    "cifar10/byol.yaml": CIFAR_BYOL, "cifar10/byol_sec.yaml": CIFAR_BYOL,
    "imagenet100/moco_sec.yaml": IMAGENET100_MOCO,
}
# values a recipe marks as this project's own ([ours] in the YAML, with the reason there)
OURS = {
    "cifar10/simclr.yaml": {"method.proj_hidden_dim": 2048},
    "imagenet100/moco_sec.yaml": {"data.store_size": 256, "model.channels_last": True},
    "*_sec.yaml": {"sec.weight": 0.1},
}


def resolved(recipe: str):
    return build_config(["--config", str(REPO / "configs" / recipe)])


def get(cfg, key):
    section, name = key.split(".")
    value = cfg[section][name]
    return list(value) if hasattr(value, "__len__") and not isinstance(value, str) else value


@pytest.mark.parametrize("recipe", sorted(TABLE))
def test_recipe_values_match_their_sources(recipe):
    cfg = resolved(recipe)
    for key, value, source in TABLE[recipe]:
        got = get(cfg, key)
        assert got == pytest.approx(value), f"{recipe}: {key} = {got}, but {source} says {value}"


def test_values_marked_ours_are_marked_in_the_yaml():
    for recipe, values in OURS.items():
        paths = sorted((REPO / "configs").rglob(recipe)) if "*" in recipe else [REPO / "configs" / recipe]
        for path in paths:
            text = path.read_text()
            cfg = resolved(str(path.relative_to(REPO / "configs")))
            for key, value in values.items():
                assert get(cfg, key) == value, (path, key)
                line = next(x for x in text.splitlines() if x.strip().startswith(key.split(".")[1] + ":"))
                assert "[ours]" in line, f"{path}: {key} is this project's choice but not marked [ours]"


def test_every_recipe_cites_its_sources():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        text = path.read_text()
        assert "[" in text and ("Sources" in text or "[ours]" in text), f"{path} cites no source"
        data = yaml.safe_load(text)
        assert data["data"]["dataset"]  # and it is a recipe at all


def test_sec_recipes_are_their_base_plus_sec():
    for sec in sorted((REPO / "configs" / "cifar10").glob("*_sec.yaml")):
        a = yaml.safe_load(sec.read_text())
        b = yaml.safe_load((sec.parent / sec.name.replace("_sec", "")).read_text())
        assert a.pop("sec")["enabled"] and a == b, sec


def test_lars_trust_coefficient_default_is_the_papers():
    assert build_config([]).optim.lars_eta == 0.001  # You et al. 2017; lightly's LARS default
