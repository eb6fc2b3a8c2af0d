"""SimSiam (ssl_sphere/methods/simsiam.py): the loss against lightly's, the stop-gradient, the heads,
SEC on the predictor outputs, the predictor's fixed lr through the engine's optimiser, exact mid-epoch
resume, export and load_pretrained."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules.heads import SimSiamProjectionHead

import ssl_sphere.methods.simsiam  # noqa: F401  (registers --method simsiam until methods/__init__ imports it)
from ssl_sphere.cli.pretrain import build_config
from ssl_sphere.config import ConfigError, layered, resolve
from ssl_sphere.core import checkpoint
from ssl_sphere.core.schedules import lr_at
from ssl_sphere.engine.optim import build_optimizer
from ssl_sphere.engine.train import train
from ssl_sphere.methods.heads import mlp
from ssl_sphere.methods.simsiam import simsiam_loss
from ssl_sphere.models.pretrained import export, load_pretrained
from ssl_sphere.models.ssl_model import build_model

SMALL = {"method.proj_hidden_dim": 64, "method.proj_dim": 32, "method.pred_hidden_dim": 16}


def make_cfg(**over):
    return resolve(layered(values={"method.name": "simsiam", **SMALL, "optim.batch_size": 8, **over}))


def lightly_simsiam_loss(p1, p2, z1, z2):
    """lightly's SimSiam example: 0.5 * (D(z0, p1) + D(z1, p0)) with NegativeCosineSimilarity, z detached."""
    d = NegativeCosineSimilarity()
    return 0.5 * (d(z1.detach(), p2) + d(z2.detach(), p1))


def _raw(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.empty(shape[0], 1).uniform_(-3, 3, generator=g).exp()


@pytest.mark.parametrize("b, d", [(2, 3), (8, 16), (7, 64)])
def test_loss_equals_lightlys_and_stops_the_gradient_of_z(b, d):
    p1, p2, z1, z2 = (_raw(b, d, seed=s).requires_grad_() for s in range(4))  # norms over ~[0.05, 20]
    ours = simsiam_loss(p1, p2, z1, z2)
    ref = lightly_simsiam_loss(p1, p2, z1, z2)
    assert ours.dtype == torch.float32 and -1 <= ours.item() <= 1
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    g_ours = torch.autograd.grad(ours, (p1, p2), retain_graph=True)
    g_ref = torch.autograd.grad(ref, (p1, p2))
    for a, r in zip(g_ours, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)
    ours.backward()
    assert z1.grad is None and z2.grad is None and p1.grad is not None
    # Eq. 1 extremes: a prediction along its target -> -1, opposite -> +1, whatever the norms
    assert simsiam_loss(p1, p2, 3 * p2, 0.5 * p1).item() == pytest.approx(-1.0, abs=1e-6)
    assert simsiam_loss(p1, p2, -p2, -p1).item() == pytest.approx(1.0, abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the cosines stay float32 under autocast
        assert simsiam_loss(p1, p2, z1, z2).dtype == torch.float32


def test_projector_layers_and_predictor():
    # 3 layers: lightly's SimSiamProjectionHead, layer for layer (the ImageNet head, Sec. 3)
    ours, ref = mlp(3, 24, 40, 16, last_bn=True), SimSiamProjectionHead(24, 40, 16)
    assert [repr(m) for m in ours.layers] == [repr(m) for m in ref.layers]
    # 2 layers: the CIFAR variant (Appendix D), its output BN without affine parameters
    two = mlp(2, 24, 40, 16, last_bn=True).layers
    assert [type(m).__name__ for m in two] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert two[0].bias is None and two[3].bias is None and not two[4].affine
    assert make_cfg().method.proj_layers == 2 and make_cfg(**{"data.image_size": 96}).method.proj_layers == 3
    m = build_model(make_cfg()).method
    pred = m.predictor.layers  # 32-16-32 bottleneck: BN + ReLU on the hidden fc, a plain output fc
    assert [type(x).__name__ for x in pred] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert pred[0].out_features == 16 and pred[3].out_features == 32 and pred[3].bias is not None
    with pytest.raises(ConfigError, match="SEE does not apply to simsiam: .*neither negatives nor prototypes"):
        build_config(["--method", "simsiam", "--see"])
    with pytest.raises(ConfigError, match="method.proj_layers"):
        make_cfg(**{"method.proj_layers": 0})


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sec", [False, True])
def test_forward_backward_on_the_tiny_backbone(sec):
    torch.manual_seed(0)
    cfg = make_cfg(**{"sec.enabled": sec, "sec.weight": 0.3, "sec.ramp": "none"})
    model = build_model(cfg)
    m = model.method
    assert m.loss_directions == 1 and m.momentum_backbone() is None and m.momentum_pairs() == []
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    total, method_loss, logs, out = model([x1, x2], 0.5)
    assert out.views == 2 and out.embeddings.shape == (16, 32) and out.embeddings.requires_grad
    assert not torch.allclose(out.embeddings.norm(dim=1), torch.ones(16), atol=1e-3)  # raw: no head normalises
    assert m.embed(x1).shape == (8, 32)  # vMF's space: the dimension of the embeddings
    if sec:  # eta x L_sec on the predictor outputs [p1; p2], once (the loss is a mean over its two directions)
        assert "sec_loss" in logs
        torch.testing.assert_close(total - method_loss, 0.3 * logs["sec_loss"], rtol=1e-5, atol=1e-7)
    else:
        assert "sec_loss" not in logs and torch.equal(total, method_loss)
    model.zero_grad()
    total.backward()
    got = _grads(model)
    assert all(got[k].abs().sum() > 0 for k in got) and {k.split(".")[1] for k in got} == {
        "backbone", "projector", "predictor"}

    # the same step written out: z1, z2 reach the loss only through p (their direct paths stop), so the
    # gradients are those of lightly's loss with detached targets, and differ without the stop-gradient
    def rerun(stop):
        model.zero_grad()
        z1, z2 = m.projector(m.backbone(x1)), m.projector(m.backbone(x2))
        p1, p2 = m.predictor(z1), m.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if stop else (z1, z2)
        loss = -0.5 * (F.cosine_similarity(p1, t2).mean() + F.cosine_similarity(p2, t1).mean())
        if sec:
            loss = loss + model.sec(torch.cat([p1, p2]), 0.5)[0]
        loss.backward()
        return _grads(model)

    ref = rerun(stop=True)
    assert got.keys() == ref.keys()
    for k in got:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)
    no_stop = rerun(stop=False)
    assert not torch.allclose(no_stop["method.projector.layers.0.weight"], ref["method.projector.layers.0.weight"])


def test_predictor_lr_groups():
    model = build_model(make_cfg())
    opt = build_optimizer(model, make_cfg().optim)
    pred = {id(p) for p in model.method.predictor.parameters()}
    fixed = [g for g in opt.param_groups if g.get("fixed_lr")]
    assert {id(p) for g in fixed for p in g["params"]} == pred
    plain = make_cfg(**{"method.fix_pred_lr": False})  # lightly's pipeline: the predictor decays with the rest
    assert not any(g.get("fixed_lr") for g in build_optimizer(build_model(plain), plain.optim).param_groups)


FAST = ["--method", "simsiam", "--sec", "--sec-ema", "0.5", "--batch-size", "64", "--epochs", "2",
        "data.train_limit=256", "eval.every_epochs=0", "run.progress=false",
        *(f"{k}={v}" for k, v in SMALL.items())]


def _check_fixed_lr(ckpt, step, total, warmup):
    """The checkpoint's optimiser: the predictor's groups at the peak lr, every other group on the
    schedule at the last step taken (``step`` - 1)."""
    cfg = build_config(FAST)
    model = build_model(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    fresh = build_optimizer(model, cfg.optim).param_groups  # the same groups, in the same order
    saved = ckpt["optimizer"]["param_groups"]
    assert [len(g["params"]) for g in saved] == [len(g["params"]) for g in fresh]
    peak, scheduled = cfg.optim.lr, lr_at(step - 1, total, warmup, cfg.optim.lr)
    assert scheduled < peak
    for g_saved, g_fresh in zip(saved, fresh):
        in_predictor = {names[id(p)].startswith("method.predictor.") for p in g_fresh["params"]}
        assert in_predictor == {bool(g_saved.get("fixed_lr"))}
        assert g_saved["lr"] == pytest.approx(peak if g_saved.get("fixed_lr") else scheduled)


def test_resume_equals_uninterrupted_fixed_lr_and_export(tmp_path):
    # 4 steps per epoch (256 images / 64); the interrupted run stops mid-epoch at step 3 and resumes
    # across the epoch boundary; warm-up: the first epoch
    a = train(build_config([*FAST, "--output-dir", str(tmp_path / "a")]))
    b_dir = tmp_path / "b"
    train(build_config([*FAST, "--output-dir", str(b_dir), "--max-steps", "3"]))
    mid = checkpoint.load(str(next(b_dir.iterdir()) / "last.pt"))
    assert mid["step"] == 3
    _check_fixed_lr(mid, 3, 8, 4)  # in the warm-up: the rest at 3/4 of the peak
    b = train(build_config([*FAST, "--output-dir", str(b_dir), "--resume", "auto", "--max-steps", "10"]))
    assert a["step"] == b["step"] == 8
    ca, cb = (checkpoint.load(str(Path(r["run_dir"]) / "last.pt")) for r in (a, b))
    pa, pb = ca["model"], cb["model"]
    assert pa.keys() == pb.keys() and "sec.mu" in pa and not any("target" in k for k in pa)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6, msg=k)
    _check_fixed_lr(ca, 8, 8, 4)  # the last step of the cosine: the rest near 0, the predictor at the peak
    with pytest.raises(ConfigError, match="method.fix_pred_lr changed"):
        build_config([*FAST, "--output-dir", str(b_dir), "--resume", "auto", "method.fix_pred_lr=false"])

    last = str(Path(a["run_dir"]) / "last.pt")
    meta = export(last, str(tmp_path / "backbone.pt"))
    assert meta["method"] == "simsiam" and meta["part"] == "backbone"
    state = torch.load(tmp_path / "backbone.pt", weights_only=True)
    p = load_pretrained(last)
    assert state.keys() == p.module.state_dict().keys()
    for k, v in state.items():
        torch.testing.assert_close(v, pa[f"method.backbone.{k}"], rtol=0, atol=0)
    assert p.module(p.preprocess(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))).shape == (2, 128)
    with pytest.raises(ConfigError, match="simsiam, which has no momentum encoder"):
        load_pretrained(last, part="momentum_backbone")
