"""NNCLR (ssl_sphere/methods/nnclr.py): the loss against lightly's NNCLR pipeline (NNMemoryBankModule +
NTXentLoss), the nearest neighbour against a naive argmax of cosines, the support set (one view, after the
lookup, gathered across ranks, checkpointed), SEC / SEE on the raw predictions, an exact mid-epoch resume, two
gloo ranks against one process, export and load_pretrained."""

from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from lightly.models.modules import NNMemoryBankModule

import ssl_sphere.methods.nnclr  # noqa: F401  registers --method nnclr (until ssl_sphere.methods imports it)
from ssl_sphere.cli.pretrain import build_config
from ssl_sphere.config import ConfigError, layered, resolve, weight_keys
from ssl_sphere.core import checkpoint
from ssl_sphere.engine.optim import build_optimizer
from ssl_sphere.engine.train import train
from ssl_sphere.methods.losses import see_anchor_loss
from ssl_sphere.methods.nnclr import nearest_neighbour, nnclr_loss
from ssl_sphere.models.pretrained import export, load_pretrained
from ssl_sphere.models.ssl_model import build_model

from .test_distributed import WORLD, _spawn
from .test_losses import _raw

SMALL = {"method.name": "nnclr", "method.proj_hidden_dim": 64, "method.pred_hidden_dim": 64, "method.proj_dim": 32,
         "method.queue_size": 36, "optim.batch_size": 8}


def _cfg(**over):
    return resolve(layered(values={**SMALL, **over}))


def _images(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randn(n, 3, 16, 16, generator=g)


def _lightly(z1, z2, p1, p2, support, t):
    """lightly's NNCLR example on the same projections, predictions and support set content: NNMemoryBankModule
    (view 0 looked up, view 1 looked up and enqueued) + NTXentLoss, 0.5 * (L(nn0, p1) + L(nn1, p0))."""
    bank = NNMemoryBankModule(size=tuple(support.shape))
    bank.bank = support.clone()
    crit = NTXentLoss(temperature=t)
    return 0.5 * (crit(bank(z1.detach(), update=False), p2) + crit(bank(z2.detach(), update=True), p1))


def _step(model, views, progress=0.5):
    """model(views) with the projector / predictor outputs captured: (total, method loss, logs, out, z, p)."""
    z, p = [], []
    hooks = [model.method.projector.register_forward_hook(lambda mod, i, o: z.append(o)),
             model.method.predictor.register_forward_hook(lambda mod, i, o: p.append(o))]
    try:
        return (*model(views, progress), z, p)
    finally:
        for h in hooks:
            h.remove()


# ----------------------------------------------------------------------------- the loss and the neighbour
@pytest.mark.parametrize("b,k,d,t", [(8, 32, 16, 0.1), (5, 17, 8, 0.5)])
def test_loss_equals_lightly_pipeline_on_random_inputs(b, k, d, t):
    z1, z2, q1, q2 = (_raw(b, d, s).float() for s in (1, 2, 3, 4))  # raw: row norms spread over ~[0.05, 20]
    support = F.normalize(_raw(k, d, 5).float(), dim=1)
    p1, p2 = q1.clone().requires_grad_(), q2.clone().requires_grad_()
    nn1, nn2 = nearest_neighbour(torch.cat([z1, z2]), support)[0].chunk(2)
    ours = nnclr_loss(nn1, nn2, p1, p2, t)
    ours.backward()
    r1, r2 = q1.clone().requires_grad_(), q2.clone().requires_grad_()
    ref = _lightly(z1, z2, r1, r2, support, t)
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p1.grad, r1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(p2.grad, r2.grad, rtol=1e-4, atol=1e-6)
    assert p1.grad.abs().max() > 0
    # the pairing matters: each neighbour goes with the OTHER view's prediction
    assert not torch.allclose(nnclr_loss(nn1, nn2, q2, q1, t), ref, atol=1e-4)


def test_nearest_neighbour_is_the_argmax_cosine_row_of_the_support_set():
    z = _raw(12, 6, 7).float().requires_grad_()
    support = F.normalize(_raw(40, 6, 8).float(), dim=1)
    nn, cos = nearest_neighbour(z, support)
    for i in range(12):
        sims = [F.cosine_similarity(z[i].detach().double(), s.double(), dim=0).item() for s in support]
        j = max(range(len(sims)), key=sims.__getitem__)
        assert torch.equal(nn[i], support[j]), i
        assert cos[i].item() == pytest.approx(sims[j], abs=1e-6)
    assert not nn.requires_grad and not cos.requires_grad  # no gradient into the support set
    assert len({tuple(r.tolist()) for r in nn}) > 1  # not one row for everything
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 even under bf16 autocast
        nn_bf, cos_bf = nearest_neighbour(z, support)
    assert cos_bf.dtype == torch.float32 and torch.equal(nn_bf, nn) and torch.equal(cos_bf, cos)


# ----------------------------------------------------------------------------- the method's step
def test_step_is_lightly_pipeline_and_enqueues_the_first_view_after_the_lookup():
    torch.manual_seed(0)
    model = build_model(_cfg())
    m = model.method
    keys0, ptr0 = m.support.keys.clone(), int(m.support.ptr)
    total, method_loss, logs, out, (z1, z2), (p1, p2) = _step(model, _images(8, 1))
    # SEC, vMF and the norm statistics act on the raw predictions of both views
    assert out.views == 2 and torch.equal(out.embeddings, torch.cat([p1, p2]))
    assert out.embeddings.shape == (16, 32) and out.embeddings.requires_grad
    assert not torch.allclose(out.embeddings.norm(dim=1), torch.ones(16), atol=1e-3)
    # lightly's pipeline on the same tensors and the support set as it was before the step
    torch.testing.assert_close(method_loss, _lightly(z1, z2, p1, p2, keys0, m.cfg.temperature), rtol=1e-5, atol=1e-6)
    assert "nn_cosine" in logs and -1 <= float(logs["nn_cosine"]) <= 1
    # the support set gained the first view's projections, unit, and nothing else
    assert int(m.support.ptr) == ptr0 + 8
    torch.testing.assert_close(m.support.keys[:8], F.normalize(z1.detach(), dim=1))
    assert torch.equal(m.support.keys[8:], keys0[8:])
    m.eval()
    model(_images(8, 2), 0.5)
    assert int(m.support.ptr) == ptr0 + 8  # no enqueue in eval mode
    # wrap-around writes modulo the size (36 is no multiple of 8): steps 2-5 put 8 rows each from 8 on
    m.train()
    for s in range(4):
        z = _step(model, _images(8, 3 + s))[4][0]
    assert int(m.support.ptr) == 40 % 36
    torch.testing.assert_close(m.support.keys[torch.arange(32, 40) % 36], F.normalize(z.detach(), dim=1))


@pytest.mark.parametrize("sec", [False, True])
def test_forward_backward_with_and_without_sec(sec):
    torch.manual_seed(0)
    cfg = _cfg(**{"sec.enabled": sec, "sec.weight": 0.3, "sec.ramp": "none"})
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.optim)
    assert model.method.loss_directions == 1  # a mean of the two NT-Xent directions
    total, method_loss, logs, out = model(_images(8, 4), 0.5)
    assert torch.isfinite(total) and {"norm_mean", "norm_std"} <= set(logs)
    if sec:
        torch.testing.assert_close(total - method_loss, 0.3 * logs["sec_loss"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(logs["sec_mu"], out.embeddings.detach().norm(dim=1).mean())  # on the predictions
    else:
        assert "sec_loss" not in logs and torch.equal(total, method_loss)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt.zero_grad()
    total.backward()
    for part in (model.method.backbone, model.method.projector, model.method.predictor):
        grads = [q.grad for q in part.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    opt_ids = {id(q) for g in opt.param_groups for q in g["params"]}
    assert id(model.method.support.keys) not in opt_ids and not model.method.support.keys.requires_grad
    opt.step()
    model.method.after_step(0.5)
    after = model.state_dict()
    assert not torch.equal(before["method.predictor.layers.0.weight"], after["method.predictor.layers.0.weight"])
    assert model.method.features(_images(8, 5)[0]).shape == (8, model.method.feature_dim)
    assert model.method.embed(_images(8, 5)[0]).shape == (8, 32)  # vMF: same dimension as the predictions


def test_see_adds_synthetic_anchors_around_the_predictions():
    torch.manual_seed(0)
    model = build_model(_cfg(**{"see.enabled": True, "see.n": 4, "see.weight": 0.2}))
    m = model.method
    m.set_progress(1.0)  # SEE's ramp at its end: see.fraction of the pairs expanded
    keys0 = m.support.keys.clone()
    torch.manual_seed(7)
    _, method_loss, logs, _, (z1, z2), (p1, p2) = _step(model, _images(8, 6))
    nn1, nn2 = nearest_neighbour(torch.cat([z1, z2]), keys0)[0].chunk(2)
    torch.manual_seed(7)  # the same synthetic points (the forward draws nothing else)
    see = see_anchor_loss(nn1, p2, 4, m.see_fraction(), 0.1) + see_anchor_loss(nn2, p1, 4, m.see_fraction(), 0.1)
    torch.testing.assert_close(logs["see_loss"], see.detach())
    torch.testing.assert_close(method_loss, nnclr_loss(nn1, nn2, p1, p2, 0.1) + 0.2 * see, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="see.n"):
        _cfg(**{"see.enabled": True, "see.n": 31})  # 31 synthetic points need proj_dim >= 33


def test_config_checks_and_weight_keys():
    cfg = _cfg()
    assert cfg.aug.blur_p == [0.0, 0.0] and cfg.aug.solarize_p == [0.0, 0.2]  # BYOL's views, no blur at 32 px
    assert _cfg(**{"data.image_size": 96}).aug.blur_p == [1.0, 0.1]
    assert {"method.queue_size", "method.pred_hidden_dim", "method.proj_dim"} <= set(weight_keys(cfg))
    with pytest.raises(ConfigError, match="method.queue_size"):
        _cfg(**{"method.queue_size": 4})  # fewer rows than one step's projections (8)


# ----------------------------------------------------------------------------- resume, export
FAST = ["--method", "nnclr", "--sec", "--batch-size", "64", "--epochs", "1", "eval.every_epochs=0",
        "run.progress=false", "method.proj_hidden_dim=64", "method.pred_hidden_dim=64", "method.proj_dim=32",
        "method.queue_size=160"]


def test_exact_mid_epoch_resume_then_export_and_load_pretrained(tmp_path):
    # digits: 22 steps an epoch at batch 64; stop at step 3 and resume to 6, against 6 uninterrupted steps
    a = train(build_config([*FAST, "--output-dir", str(tmp_path / "a"), "--max-steps", "6"]))
    b_dir = tmp_path / "b"
    train(build_config([*FAST, "--output-dir", str(b_dir), "--max-steps", "3"]))
    b = train(build_config([*FAST, "--output-dir", str(b_dir), "--resume", "auto", "--max-steps", "6"]))
    assert a["step"] == b["step"] == 6
    last = str(Path(a["run_dir"]) / "last.pt")
    pa = checkpoint.load(last)["model"]
    pb = checkpoint.load(str(Path(b["run_dir"]) / "last.pt"))["model"]
    assert pa.keys() == pb.keys() and {"method.support.keys", "method.support.ptr", "sec.mu"} <= set(pa)
    assert int(pa["method.support.ptr"]) == 6 * 64 % 160  # one view of 64 a step, modulo the size
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6, msg=k)

    meta = export(last, str(tmp_path / "backbone.pt"))
    assert meta["method"] == "nnclr" and meta["part"] == "backbone"
    state = torch.load(tmp_path / "backbone.pt", weights_only=True)
    p = load_pretrained(last)
    assert state.keys() == p.module.state_dict().keys()
    for k, v in state.items():
        assert torch.equal(v, pa[f"method.backbone.{k}"]), k
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert p.module(p.preprocess(x)).shape == (4, p.feature_dim)
    with pytest.raises(ConfigError, match="no momentum encoder"):
        load_pretrained(last, part="momentum_backbone")


# ----------------------------------------------------------------------------- two gloo ranks
N_LOCAL = 4


def _two_rank_setup():
    """The method (same weights and support set on every rank, as DDP would broadcast them) with its BN layers
    on running statistics, so that a rank's half of the batch computes what the whole batch does; the whole
    batch of 2 x N_LOCAL images per view."""
    import ssl_sphere.methods.nnclr  # noqa: F401, F811  (a spawned worker registers the method here too)

    cfg = _cfg(**{"optim.batch_size": N_LOCAL, "method.queue_size": 20})
    torch.manual_seed(0)
    m = build_model(cfg).method
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.eval()
    assert m.training
    return m, _images(WORLD * N_LOCAL, 9)


def _grads(m):
    return torch.cat([q.grad.flatten() for q in m.parameters() if q.requires_grad])


def _two_ranks(rank):
    m, (x1, x2) = _two_rank_setup()
    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    out = m([x1[sl], x2[sl]])
    out.loss.backward()
    grad, loss = _grads(m), out.loss.detach().clone()
    for t in (grad, loss):  # what DDP does with the gradients: the mean over ranks
        tdist.all_reduce(t)
        t /= WORLD
    keys = [torch.empty_like(m.support.keys) for _ in range(WORLD)]
    tdist.all_gather(keys, m.support.keys)
    return {"loss": loss, "grad": grad, "keys": keys, "ptr": int(m.support.ptr)}


def test_two_gloo_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    res = _spawn(_two_ranks, tmp_path)
    m, (x1, x2) = _two_rank_setup()
    out = m([x1, x2])
    out.loss.backward()
    torch.testing.assert_close(res["loss"], out.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res["grad"], _grads(m), rtol=1e-4, atol=1e-6)
    # the support set after the step: the same on both ranks, both ranks' first views in rank order
    assert torch.equal(res["keys"][0], res["keys"][1])
    torch.testing.assert_close(res["keys"][0], m.support.keys, rtol=1e-5, atol=1e-6)
    assert res["ptr"] == int(m.support.ptr) == WORLD * N_LOCAL
