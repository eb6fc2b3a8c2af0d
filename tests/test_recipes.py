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
SIMSIAM = "SimSiam, Sec. 3 / 4.2 / Appendix D and main_simsiam.py"
SOLO_SIMSIAM = "solo-learn scripts/pretrain/cifar/simsiam.yaml"
V3 = "MoCo v3 reference code (facebookresearch/moco-v3: main_moco.py, moco/builder.py, moco/optimizer.py)"
SOLO_V3 = "solo-learn's CIFAR MoCo v3 recipe (scripts/pretrain/cifar/mocov3.yaml, augmentations/asymmetric.yaml)"
SOLO_SWAV = "solo-learn's CIFAR recipe (scripts/pretrain/cifar/swav.yaml) and its defaults"
NNCLR = "NNCLR (Dwibedi et al. 2021), implementation details; BYOL's augmentations (BYOL Table 6)"
SOLO_NNCLR = "solo-learn's CIFAR recipe (scripts/pretrain/cifar/nnclr.yaml, augmentations/asymmetric.yaml)"
DINO = "DINO, Sec. 3.1 / 3.2 and main_dino.py"
V3_VIT = "MoCo v3 reference code, CONFIG.md ViT-Small (adamw, lr 1.5e-4 / 256, wd 0.1, 40 warm-up, stop-grad-conv1)"
DINO_VIT = "DINO main_dino.py ViT-S/16 defaults (lr 0.0005 / 256, min_lr 1e-6, wd 0.04 -> 0.4, clip 3, 8 local crops)"
SOLO_VIT = "solo-learn's CIFAR ViTs (4 x 4 patches at 32 px)"

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

CIFAR_SIMSIAM = [
    ("model.small_images", True, SIMSIAM), ("aug.crop_scale", [0.08, 1.0], LIGHTLY),
    ("aug.crop_scale", [0.08, 1.0], SOLO_SIMSIAM), ("aug.brightness", 0.4, SIMSIAM), ("aug.contrast", 0.4, SIMSIAM),
    ("aug.saturation", 0.4, SIMSIAM), ("aug.hue", 0.1, SIMSIAM), ("aug.jitter_p", 0.8, SIMSIAM),
    ("aug.grayscale_p", 0.2, SIMSIAM), ("aug.hflip_p", 0.5, SIMSIAM), ("aug.blur_p", [0.0, 0.0], SIMSIAM),
    ("aug.solarize_p", [0.0, 0.0], SIMSIAM), ("optim.optimizer", "sgd", SIMSIAM), ("optim.epochs", 200, LIGHTLY),
    ("optim.batch_size", 512, SIMSIAM), ("optim.base_lr", 0.015, SIMSIAM), ("optim.lr", 0.03 * 512 / 256, SIMSIAM),
    ("optim.lr", 0.06, LIGHTLY), ("optim.momentum", 0.9, SIMSIAM), ("optim.weight_decay", 5e-4, SIMSIAM),
    ("optim.decay_norm_and_bias", True, SIMSIAM), ("optim.warmup_epochs", 0, SIMSIAM),
    ("optim.min_lr_ratio", 0.0, SIMSIAM), ("method.proj_hidden_dim", 2048, SIMSIAM),
    ("method.proj_dim", 2048, SIMSIAM), ("method.proj_layers", 2, SIMSIAM), ("method.pred_hidden_dim", 512, SIMSIAM),
    ("method.fix_pred_lr", True, SIMSIAM), ("method.proj_hidden_dim", 2048, SOLO_SIMSIAM),
    ("method.proj_dim", 2048, SOLO_SIMSIAM), ("method.pred_hidden_dim", 512, SOLO_SIMSIAM),
]
CIFAR_MOCOV3 = [
    ("model.backbone", "resnet18", SOLO_V3), ("model.small_images", True, SOLO_V3), ("model.sync_bn", True, V3),
    ("aug.crop_scale", [0.08, 1.0], V3), ("aug.brightness", 0.4, V3), ("aug.contrast", 0.4, V3),
    ("aug.saturation", 0.2, V3), ("aug.hue", 0.1, V3), ("aug.jitter_p", 0.8, V3), ("aug.grayscale_p", 0.2, V3),
    ("aug.blur_p", [0.0, 0.0], SOLO_V3), ("aug.solarize_p", [0.0, 0.2], V3),
    ("optim.optimizer", "lars", V3), ("optim.epochs", 200, LIGHTLY), ("optim.batch_size", 512, LIGHTLY),
    ("optim.base_lr", 0.15, SOLO_V3), ("optim.lr", 0.3 * 512 / 256, SOLO_V3), ("optim.momentum", 0.9, V3),
    ("optim.weight_decay", 1e-6, V3),
    ("optim.decay_norm_and_bias", False, V3), ("optim.lars_eta", 0.02, SOLO_V3), ("optim.warmup_epochs", 10, V3),
    ("method.temperature", 0.2, SOLO_V3), ("method.proj_hidden_dim", 4096, V3), ("method.proj_dim", 256, V3),
    ("method.pred_hidden_dim", 4096, V3), ("method.proj_layers", 2, V3), ("method.momentum", 0.99, V3),
    ("method.momentum_final", 1.0, V3),
]
CIFAR_SWAV = [
    ("model.small_images", True, LIGHTLY), ("aug.crop_scale", [0.14, 1.0], LIGHTLY),
    ("aug.brightness", 0.8, LIGHTLY), ("aug.contrast", 0.8, LIGHTLY), ("aug.saturation", 0.8, LIGHTLY),
    ("aug.hue", 0.2, LIGHTLY), ("aug.jitter_p", 0.8, LIGHTLY), ("aug.grayscale_p", 0.2, LIGHTLY),
    ("aug.hflip_p", 0.5, LIGHTLY), ("aug.blur_p", [0.0, 0.0], LIGHTLY), ("optim.epochs", 200, LIGHTLY),
    ("optim.optimizer", "lars", SOLO_SWAV), ("optim.batch_size", 512, LIGHTLY), ("optim.base_lr", 0.3, SOLO_SWAV),
    ("optim.lr", 0.6 * 512 / 256, SOLO_SWAV),
    ("optim.momentum", 0.9, SOLO_SWAV), ("optim.weight_decay", 1e-6, SOLO_SWAV),
    ("optim.decay_norm_and_bias", False, SOLO_SWAV), ("optim.lars_eta", 0.02, SOLO_SWAV),
    ("optim.warmup_epochs", 10, SOLO_SWAV), ("optim.min_lr_ratio", 0.0, SOLO_SWAV),
    ("method.temperature", 0.1, SOLO_SWAV), ("method.proj_hidden_dim", 2048, SOLO_SWAV),
    ("method.proj_dim", 128, SOLO_SWAV), ("method.n_prototypes", 3000, SOLO_SWAV),
    ("method.sinkhorn_iterations", 3, SOLO_SWAV), ("method.epsilon", 0.05, SOLO_SWAV),
    ("method.queue_size", 3840, SOLO_SWAV), ("method.queue_start_epoch", 50, SOLO_SWAV),
    ("method.freeze_prototypes_epochs", 2, SOLO_SWAV),
]
CIFAR_NNCLR = LIGHTLY_OPTIM + [
    ("aug.crop_scale", [0.08, 1.0], NNCLR), ("aug.brightness", 0.4, NNCLR), ("aug.contrast", 0.4, NNCLR),
    ("aug.saturation", 0.2, NNCLR), ("aug.hue", 0.1, NNCLR), ("aug.jitter_p", 0.8, NNCLR),
    ("aug.grayscale_p", 0.2, NNCLR), ("aug.solarize_p", [0.0, 0.2], NNCLR), ("aug.blur_p", [0.0, 0.0], SOLO_NNCLR),
    ("method.temperature", 0.1, NNCLR), ("method.proj_hidden_dim", 2048, NNCLR), ("method.proj_dim", 256, NNCLR),
    ("method.pred_hidden_dim", 4096, NNCLR), ("method.queue_size", 8192, LIGHTLY),
]
CIFAR_DINO = LIGHTLY_OPTIM + [
    ("aug.crop_scale", [0.4, 1.0], LIGHTLY), ("aug.brightness", 0.4, LIGHTLY), ("aug.contrast", 0.4, LIGHTLY),
    ("aug.saturation", 0.2, LIGHTLY), ("aug.hue", 0.1, LIGHTLY), ("aug.jitter_p", 0.8, LIGHTLY),
    ("aug.grayscale_p", 0.2, LIGHTLY), ("aug.hflip_p", 0.5, LIGHTLY), ("aug.blur_p", [0.0, 0.0], LIGHTLY),
    ("aug.solarize_p", [0.0, 0.2], LIGHTLY),
    ("method.proj_hidden_dim", 2048, LIGHTLY), ("method.proj_dim", 256, LIGHTLY), ("method.out_dim", 2048, LIGHTLY),
    ("method.batch_norm", True, LIGHTLY), ("method.norm_last_layer", True, LIGHTLY),
    ("method.student_temp", 0.1, LIGHTLY), ("method.center_momentum", 0.9, LIGHTLY), ("method.momentum", 0.99, LIGHTLY),
    ("method.momentum_final", 1.0, DINO), ("method.freeze_last_layer", 1, DINO), ("method.teacher_temp", 0.07, DINO),
    ("method.warmup_teacher_temp", 0.04, DINO), ("method.warmup_teacher_temp_epochs", 30, DINO),
]
VIT_V3 = [
    ("model.pool", "cls", V3_VIT), ("aug.crop_scale", [0.08, 1.0], V3_VIT), ("aug.saturation", 0.2, V3_VIT),
    ("aug.solarize_p", [0.0, 0.2], V3_VIT), ("optim.optimizer", "adamw", V3_VIT), ("optim.base_lr", 7.5e-5, V3_VIT),
    ("optim.weight_decay", 0.1, V3_VIT), ("optim.decay_norm_and_bias", True, V3_VIT),
    ("optim.warmup_epochs", 40, V3_VIT), ("method.temperature", 0.2, V3_VIT), ("method.proj_hidden_dim", 4096, V3_VIT),
    ("method.proj_dim", 256, V3_VIT), ("method.pred_hidden_dim", 4096, V3_VIT), ("method.proj_layers", 3, V3_VIT),
    ("method.pred_last_bn", True, V3_VIT), ("method.freeze_patch_embed", True, V3_VIT),
    ("method.momentum", 0.99, V3_VIT), ("method.momentum_final", 1.0, V3_VIT),
]
CIFAR_MOCOV3_VIT = VIT_V3 + [
    ("model.patch_size", 4, SOLO_VIT), ("optim.epochs", 200, LIGHTLY), ("optim.batch_size", 512, LIGHTLY),
    ("optim.lr", 1.5e-4 * 512 / 256, V3_VIT),
]
IMAGENET100_MOCOV3_VIT = VIT_V3 + [
    ("model.backbone", "vit_small", V3_VIT), ("model.patch_size", 16, V3_VIT), ("data.image_size", 224, V3_VIT),
    ("aug.blur_p", [1.0, 0.1], V3_VIT), ("optim.epochs", 300, V3_VIT), ("optim.batch_size", 1024, V3_VIT),
    ("optim.lr", 1.5e-4 * 1024 / 256, V3_VIT),
]
VIT_DINO = [
    ("model.pool", "cls", DINO_VIT), ("model.drop_path", 0.1, DINO_VIT), ("aug.crop_scale", [0.4, 1.0], DINO_VIT),
    ("aug.saturation", 0.2, DINO_VIT), ("aug.solarize_p", [0.0, 0.2], DINO_VIT), ("aug.local_crops", 8, DINO_VIT),
    ("aug.local_crop_scale", [0.05, 0.4], DINO_VIT), ("optim.optimizer", "adamw", DINO_VIT),
    ("optim.base_lr", 0.00025, DINO_VIT), ("optim.weight_decay", 0.04, DINO_VIT),
    ("optim.weight_decay_end", 0.4, DINO_VIT), ("optim.clip_grad", 3.0, DINO_VIT),
    ("optim.warmup_epochs", 10, DINO_VIT),
    ("optim.decay_norm_and_bias", False, DINO_VIT), ("method.batch_norm", False, DINO),
    ("method.norm_last_layer", True, DINO_VIT), ("method.freeze_last_layer", 1, DINO_VIT),
    ("method.student_temp", 0.1, DINO_VIT), ("method.teacher_temp", 0.07, DINO),
    ("method.warmup_teacher_temp", 0.04, DINO), ("method.warmup_teacher_temp_epochs", 30, DINO),
    ("method.momentum", 0.996, DINO_VIT), ("method.momentum_final", 1.0, DINO_VIT),
]
CIFAR_DINO_VIT = VIT_DINO + [
    ("model.patch_size", 4, SOLO_VIT), ("method.out_dim", 4096, "solo-learn's CIFAR DINO"),
    ("optim.epochs", 200, LIGHTLY), ("optim.batch_size", 512, LIGHTLY), ("optim.lr", 0.0005 * 512 / 256, DINO_VIT),
    ("optim.min_lr_ratio", 1e-6 / 0.001, DINO_VIT), ("aug.local_blur_p", 0.0, SIMCLR),
]
IMAGENET100_DINO_VIT = VIT_DINO + [
    ("model.backbone", "vit_small", DINO_VIT), ("model.patch_size", 16, DINO_VIT), ("data.image_size", 224, DINO_VIT),
    ("aug.blur_p", [1.0, 0.1], DINO_VIT), ("aug.local_blur_p", 0.5, DINO_VIT), ("aug.local_size", 96, DINO_VIT),
    ("method.out_dim", 65536, DINO_VIT), ("optim.epochs", 100, DINO_VIT), ("optim.batch_size", 1024, DINO_VIT),
    ("optim.lr", 0.0005 * 1024 / 256, DINO_VIT), ("optim.min_lr_ratio", 1e-6 / 0.002, DINO_VIT),
]

TABLE = {
    "cifar10/moco.yaml": CIFAR_MOCO, "cifar10/moco_sec.yaml": CIFAR_MOCO,
    "cifar10/simclr.yaml": CIFAR_SIMCLR, "cifar10/simclr_sec.yaml": CIFAR_SIMCLR,
    "cifar10/byol.yaml": CIFAR_BYOL, "cifar10/byol_sec.yaml": CIFAR_BYOL,
    "imagenet100/moco_sec.yaml": IMAGENET100_MOCO,
    "cifar10/simsiam.yaml": CIFAR_SIMSIAM, "cifar10/simsiam_sec.yaml": CIFAR_SIMSIAM,
    "cifar10/mocov3.yaml": CIFAR_MOCOV3, "cifar10/mocov3_sec.yaml": CIFAR_MOCOV3,
    "cifar10/swav.yaml": CIFAR_SWAV, "cifar10/swav_sec.yaml": CIFAR_SWAV,
    "cifar10/nnclr.yaml": CIFAR_NNCLR, "cifar10/nnclr_sec.yaml": CIFAR_NNCLR,
    "cifar10/dino.yaml": CIFAR_DINO, "cifar10/dino_sec.yaml": CIFAR_DINO,
    "cifar10/mocov3_vit.yaml": CIFAR_MOCOV3_VIT, "imagenet100/mocov3_vit_small.yaml": IMAGENET100_MOCOV3_VIT,
    "cifar10/dino_vit.yaml": CIFAR_DINO_VIT, "imagenet100/dino_vit_small.yaml": IMAGENET100_DINO_VIT,
}
# values a recipe marks as this project's own ([ours] in the YAML, with the reason there)
OURS = {
    "cifar10/simclr.yaml": {"method.proj_hidden_dim": 2048},
    "imagenet100/moco_sec.yaml": {"data.store_size": 256, "model.channels_last": True},
    "imagenet100/mocov3_vit_small.yaml": {"data.store_size": 256},
    "imagenet100/dino_vit_small.yaml": {"data.store_size": 256},
    "cifar10/mocov3_vit.yaml": {"model.backbone": "vit_tiny"},
    "cifar10/dino_vit.yaml": {"model.backbone": "vit_tiny", "aug.blur_p": [0.0, 0.0]},
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
