"""Vision Transformers (timm), the optimiser a ViT needs (AdamW, no decay on tokens, weight-decay
schedule, per-parameter clipping), multi-crop view groups, and the export a timm model loads."""

import math
from pathlib import Path

import pytest
import torch

from ssl_sphere import methods
from ssl_sphere.augment.views import Augmenter, view_groups
from ssl_sphere.cli.pretrain import build_config
from ssl_sphere.config import for_method
from ssl_sphere.core.schedules import cosine_schedule
from ssl_sphere.engine.optim import build_optimizer, clip_gradients, set_hyperparameters
from ssl_sphere.models.backbones import build_backbone
from ssl_sphere.models.ssl_model import build_model

VIT = ["--backbone", "vit_tiny", "data.image_size=16", "--batch-size", "8", "method.queue_size=64",
       "method.proj_hidden_dim=64", "method.pred_hidden_dim=64", "method.proj_dim=64", "method.out_dim=64",
       "method.n_prototypes=32", "run.progress=false"]


def vit_cfg(method="simclr", *extra):
    return build_config(for_method(["--method", method, *VIT, *extra], method))


def test_vit_backbones_from_timm():
    net, dim = build_backbone("vit_tiny", image_size=32, patch_size=4)
    assert dim == 192 and net.patch_embed.patch_size == (4, 4) and net.global_pool == "token"
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    mean, _ = build_backbone("vit_small", image_size=32, patch_size=4, pool="mean", drop_path=0.1)
    assert mean.global_pool == "avg" and hasattr(mean.fc_norm, "weight")  # the norm after pooling: other weights
    assert mean.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    # patch size derived from the image size: 8 x 8 patches on small images, 16 from 128 px up
    assert vit_cfg().model.patch_size == 2 and vit_cfg("simclr", "data.image_size=32").model.patch_size == 4
    assert build_config(["--backbone", "vit_small", "--dataset", "stl10", "data.image_size=224"]).model.patch_size == 16
    with pytest.raises(Exception, match="model.patch_size"):
        vit_cfg("simclr", "model.patch_size=3")
    with pytest.raises(Exception, match="only ViTs have patches"):
        build_config(["model.patch_size=4"])
    # local crops: a multiple of the patch (derived as one), and only with interpolated positions
    assert vit_cfg("dino", "data.image_size=32", "aug.local_crops=2").aug.local_size == 12  # 13.7 px -> 3 patches of 4
    with pytest.raises(Exception, match="aug.local_size"):
        vit_cfg("dino", "data.image_size=32", "aug.local_crops=2", "aug.local_size=14")
    with pytest.raises(Exception, match="model.dynamic_img_size"):
        vit_cfg("dino", "data.image_size=32", "aug.local_crops=2", "model.dynamic_img_size=false")


def test_positional_embeddings_are_interpolated_to_another_input_size():
    """A ViT trained at 32 px evaluated at 48 px: timm resamples its positional embedding (bicubic)
    to the 12 x 12 grid; the result equals a ViT built at 48 px with that resampled embedding."""
    import timm
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    net, _ = build_backbone("vit_tiny", image_size=32, patch_size=4)
    net.eval()
    x = torch.randn(2, 3, 48, 48)
    big = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=48, patch_size=4)
    state = net.state_dict()
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], (12, 12), num_prefix_tokens=1)
    big.load_state_dict(state)
    big.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), big(x), rtol=1e-4, atol=1e-4)
    fixed, _ = build_backbone("vit_tiny", image_size=32, patch_size=4, dynamic_img_size=False)
    with pytest.raises(Exception):
        fixed(x)  # without interpolation another size is refused


@pytest.mark.parametrize("method", methods.names())
def test_every_method_trains_a_vit(method):
    torch.manual_seed(0)
    cfg = vit_cfg(method, "--sec")
    model = build_model(cfg)
    total, _, logs, out = model([torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)], 0.5)
    total.backward()
    assert torch.isfinite(total) and "sec_loss" in logs
    grads = [p.grad for p in model.method.backbone.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and model.method.backbone.pos_embed.grad.abs().sum() > 0


def test_adamw_groups_weight_decay_schedule_and_clipping():
    cfg = vit_cfg("simclr", "optim.optimizer=adamw", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4",
                  "optim.betas=[0.9,0.95]")
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.optim)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
    # a ViT gets AdamW by default, with the ViT papers' lr and weight decay (SGD's 0.06 per 128 diverges a
    # ViT); a convnet keeps SGD, and an asked optimiser is kept
    plain = vit_cfg("simclr").optim
    assert (plain.optimizer, plain.base_lr, plain.weight_decay) == ("adamw", 7.5e-5, 0.1)
    dino = vit_cfg("dino").optim
    assert (dino.optimizer, dino.base_lr, dino.weight_decay) == ("adamw", 2.5e-4, 0.04)
    sgd = vit_cfg("simclr", "optim.optimizer=sgd").optim
    assert (sgd.optimizer, sgd.base_lr, sgd.weight_decay) == ("sgd", 0.06, 5e-4)
    conv = build_config(["--method", "dino", "run.progress=false"]).optim
    assert (conv.optimizer, conv.base_lr, conv.weight_decay) == ("sgd", 0.06, 5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    kept = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    bb = "method.backbone."
    assert {bb + "pos_embed", bb + "cls_token", bb + "blocks.0.norm1.weight", bb + "blocks.0.attn.qkv.bias"} <= kept
    assert {bb + "blocks.0.attn.qkv.weight", bb + "patch_embed.proj.weight"} <= decayed
    # DINO's cosine weight-decay schedule, applied to the decayed groups only
    for progress in (0.0, 0.5, 1.0):
        wd = cosine_schedule(progress, 0.04, 0.4)
        set_hyperparameters(opt, 0.1, 0.1, wd)
        assert sorted({g["weight_decay"] for g in opt.param_groups}) == pytest.approx([0.0, wd])
    # the groups are marked at build: a schedule through 0 does not lose which ones it decays
    set_hyperparameters(opt, 0.1, 0.1, 0.0)
    set_hyperparameters(opt, 0.1, 0.1, 0.3, betas=(0.8, 0.9))
    assert {g["weight_decay"] for g in opt.param_groups if g["decay"]} == {0.3}
    assert {g["weight_decay"] for g in opt.param_groups if not g["decay"]} == {0.0}
    assert {g["betas"] for g in opt.param_groups} == {(0.8, 0.9)}
    assert cosine_schedule(0.5, 0.04, 0.4) == pytest.approx(0.22)

    # per-parameter clipping as DINO's utils.clip_gradients
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    for p, scale in zip(params, (0.1, 3.0, 10.0)):
        p.grad = torch.randn(5) * scale
    expected = []
    for p in params:
        norm = p.grad.norm()
        expected.append(p.grad * (2.0 / (norm + 1e-6)) if 2.0 / (norm + 1e-6) < 1 else p.grad.clone())
    clip_gradients(params, 2.0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e)
    assert all(p.grad.norm() <= 2.0 + 1e-5 for p in params)


def test_multi_crop_view_groups_shapes_and_local_draws(monkeypatch):
    """Two global views at the image size and n local crops at their own size, each group drawn in
    one pass with its own crop scale and per-view blur / solarisation."""
    from ssl_sphere.augment import views as V

    cfg = vit_cfg("simclr", "data.image_size=32")
    aug = cfg.aug
    aug.local_crops, aug.local_size, aug.local_blur_p, aug.local_solarize_p = 3, 12, 0.5, 0.5
    groups = view_groups(aug, 32)
    assert [(g.count, g.size, g.crop_scale) for g in groups] == [(2, 32, (0.2, 1.0)), (3, 12, (0.05, 0.4))]
    assert groups[1].blur_p == (0.5, 0.5, 0.5) and groups[1].solarize_p == (0.5, 0.5, 0.5)
    seen = []
    real = V.sample_crops
    monkeypatch.setattr(V, "sample_crops", lambda n, h, w, scale, ratio, dev: seen.append((n, scale)) or
                        real(n, h, w, scale, ratio, dev))
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(0)
    views = Augmenter(aug, 32, (0.5,) * 3, (0.25,) * 3).views(x)
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 12, 12)] * 3
    assert seen == [(8, (0.2, 1.0)), (12, (0.05, 0.4))]  # one batched draw per group, its own scale
    torch.manual_seed(0)
    again = Augmenter(aug, 32, (0.5,) * 3, (0.25,) * 3).views(x)
    assert all(torch.equal(a, b) for a, b in zip(views, again))  # the draws come from the (checkpointed) RNG


def test_local_crop_size_and_refusal():
    cfg = build_config(["--backbone", "vit_tiny", "data.image_size=32", "--method", "simclr"])
    assert cfg.aug.local_crops == 0 and cfg.aug.local_size is None
    with pytest.raises(Exception, match="aug.local_crops"):
        build_config(["--method", "simclr", "aug.local_crops=6"])  # SimCLR takes two views
    # local blur: DINO's 0.5 from 96 px crops of 224, none at CIFAR size (as the global views there)
    dino = ["--method", "dino", "aug.local_crops=6"]
    assert build_config(dino + ["data.image_size=32"]).aug.local_blur_p == 0.0
    assert build_config(dino + ["data.image_size=96"]).aug.local_blur_p == 0.5
    assert build_config(dino + ["data.image_size=32", "aug.local_blur_p=0.3"]).aug.local_blur_p == 0.3


def test_export_of_a_vit_loads_into_timm(tmp_path):
    """The exported state_dict loads with strict=True into the model its JSON names, rebuilt by
    timm.create_model(name, num_classes=0, **kwargs), and computes the same features; load_pretrained
    gives the same module."""
    import json

    import timm

    from ssl_sphere import load_pretrained
    from ssl_sphere.engine.train import train
    from ssl_sphere.models.pretrained import export

    s = train(vit_cfg("moco", "--max-steps", "1", "eval.every_epochs=0", "--output-dir", str(tmp_path)))
    ckpt = str(Path(s["run_dir"]) / "last.pt")
    meta = export(ckpt, str(tmp_path / "vit.pt"))
    saved = json.loads((tmp_path / "vit.json").read_text())
    assert saved["library"] == "timm" and saved["name"] == "vit_tiny_patch16_224" == meta["name"]
    assert saved["kwargs"]["patch_size"] == 2 and saved["kwargs"]["img_size"] == 16
    net = timm.create_model(saved["name"], num_classes=0, **saved["kwargs"])
    net.load_state_dict(torch.load(tmp_path / "vit.pt", weights_only=True), strict=True)
    p = load_pretrained(ckpt)
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(p.preprocess(x)), p.module(p.preprocess(x)))
    ema = load_pretrained(ckpt, part="momentum_backbone")
    assert ema.module.pos_embed.shape == p.module.pos_embed.shape and math.isclose(ema.feature_dim, 192)


MULTI = ["--batch-size", "32", "data.train_limit=160", "--epochs", "2", "eval.every_epochs=0", "run.progress=false",
         "aug.local_crops=2", "method.proj_hidden_dim=64"]
SMALL = {"dino": ["method.out_dim=64"], "swav": ["method.n_prototypes=32"]}


@pytest.mark.parametrize("method", ["dino", "swav"])
def test_multi_crop_methods_take_view_groups(method):
    cfg = build_config(["--method", method, *MULTI, *SMALL[method]])
    assert cfg.aug.local_size == 14  # 96/224 of 32 px
    model = build_model(cfg)
    views = Augmenter(cfg.aug, 32, (0.5,) * 3, (0.25,) * 3).views(torch.randint(0, 256, (8, 3, 32, 32),
                                                                                 dtype=torch.uint8))
    assert [v.shape[-1] for v in views] == [32, 32, 14, 14]
    total, _, _, out = model(views, 0.5)
    total.backward()
    assert out.views == 4 and out.embeddings.shape[0] == 4 * 8 and torch.isfinite(total)


@pytest.mark.parametrize("method", ["dino", "swav"])
def test_exact_resume_with_multi_crop(tmp_path, method):
    """2 epochs of 5 steps with 2 global + 2 local crops: a run stopped mid-epoch (step 3) and resumed
    ends with the uninterrupted run's weights: the crops come from the checkpointed RNG."""
    from ssl_sphere.core import checkpoint
    from ssl_sphere.engine.train import train

    argv = ["--method", method, *MULTI, *SMALL[method], "--sec"]
    a = train(build_config([*argv, "--output-dir", str(tmp_path / "a")]))
    train(build_config([*argv, "--output-dir", str(tmp_path / "b"), "--max-steps", "3"]))
    b = train(build_config([*argv, "--output-dir", str(tmp_path / "b"), "--resume", "auto", "--max-steps", "10"]))
    pa = checkpoint.load(str(Path(a["run_dir"]) / "last.pt"))["model"]
    pb = checkpoint.load(str(Path(b["run_dir"]) / "last.pt"))["model"]
    assert a["step"] == b["step"] == 10 and pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6, msg=k)
