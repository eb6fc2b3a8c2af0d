"""Every method: forward / backward / after_step on the tiny backbone."""

import math

import pytest
import torch

from ssl_sphere.config import layered, resolve
from ssl_sphere.core.registry import METHODS
from ssl_sphere.core.schedules import cosine_schedule, lr_at
from ssl_sphere.engine.optim import build_optimizer
from ssl_sphere.methods.base import StepOutput
from ssl_sphere.models.ssl_model import build_model


def make_cfg(method, **over):
    small = {"moco": {"method.queue_size": 64}, "byol": {"method.pred_hidden_dim": 64},
             "simsiam": {"method.proj_dim": 32, "method.pred_hidden_dim": 16},
             "mocov3": {"method.pred_hidden_dim": 64}, "nnclr": {"method.pred_hidden_dim": 64, "method.queue_size": 64},
             "dino": {"method.out_dim": 64}, "swav": {"method.n_prototypes": 64}}.get(method, {})
    return resolve(layered(values={"method.name": method, "method.proj_hidden_dim": 64, **small,
                                   "optim.batch_size": 8, "sec.enabled": True, **over}))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_forward_backward_after_step(name):
    torch.manual_seed(0)
    cfg = make_cfg(name)
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.optim)
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    out = model.method([x1, x2])
    assert isinstance(out, StepOutput) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    n_views = 2 if (name != "moco" or cfg.method.symmetric) else 1
    assert out.embeddings.shape == (8 * n_views, cfg.method.proj_dim)
    assert out.embeddings.requires_grad
    # raw embeddings: not normalised by any head
    assert not torch.allclose(out.embeddings.norm(dim=1), torch.ones(8 * n_views), atol=1e-3)

    total, method_loss, logs, out = model([x1, x2], 0.5)
    assert {"norm_mean", "norm_std", "sec_loss"} <= set(logs)
    assert total.item() >= method_loss.item() - 1e-6
    opt.zero_grad()
    total.backward()
    grads = [p.grad for p in model.method.backbone.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt.step()
    model.method.after_step(0.5)
    after = model.state_dict()
    if model.method.momentum_pairs():  # moco, byol, mocov3, dino
        target = model.method.encoder.target
        assert all(not p.requires_grad and p.grad is None for p in target.parameters())
        moved = [k for k in after if "encoder.target" in k and "weight" in k and not torch.equal(before[k], after[k])]
        assert moved, "EMA target did not move after after_step"
        # the optimiser never sees target parameters
        opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
        assert not any(id(p) in opt_ids for p in target.parameters())
    assert (model.method.features(x1).shape == (8, model.method.feature_dim))


def test_moco_enqueues_both_key_sets():
    torch.manual_seed(0)
    cfg = make_cfg("moco")
    m = build_model(cfg).method
    ptr0 = int(m.queue.ptr)
    m([torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)])
    assert int(m.queue.ptr) == ptr0 + 16
    m.eval()
    m([torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)])
    assert int(m.queue.ptr) == ptr0 + 16  # no enqueue in eval mode


def test_ema_update_formula():
    torch.manual_seed(0)
    cfg = make_cfg("byol")
    m = build_model(cfg).method
    with torch.no_grad():
        for p in m.encoder.online.parameters():
            p.add_(1.0)
    t_before = [p.clone() for p in m.encoder.target.parameters()]
    online = [p.clone() for p in m.encoder.online.parameters()]
    m.after_step(0.0)
    mom = cosine_schedule(0.0, 0.99, 1.0)
    assert mom == pytest.approx(0.99)
    for t0, o, t1 in zip(t_before, online, m.encoder.target.parameters()):
        torch.testing.assert_close(t1, mom * t0 + (1 - mom) * o)


def test_cosine_schedule_and_lr_schedule_are_pure_functions():
    assert cosine_schedule(0.0, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine_schedule(1.0, 0.99, 1.0) == pytest.approx(1.0)
    assert cosine_schedule(0.5, 0.99, 1.0) == pytest.approx(0.995)
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, 100, 10, 1.0, min_ratio=0.1) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_and_biases():
    cfg = make_cfg("simclr")
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.optim)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == cfg.optim.weight_decay and no_decay["weight_decay"] == 0.0
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    assert any(p is bn.weight for p in no_decay["params"])
    assert all(p.ndim > 1 for p in decay["params"])


def test_lars_optimizer_builds_and_steps():
    cfg = make_cfg("simclr", **{"optim.optimizer": "lars"})
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.optim)
    loss, *_ = model([torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)], 0.0)
    loss.backward()
    opt.step()
    assert type(opt).__name__ == "LARS"


@pytest.mark.parametrize("name", ["resnet18", "tiny"])
def test_backbones_small_stem(name):
    from ssl_sphere.models.backbones import build_backbone

    net, dim = build_backbone(name, small_images=True)
    y = net(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, dim)
    if name == "resnet18":
        assert dim == 512 and net.conv1.stride == (1, 1) and isinstance(net.maxpool, torch.nn.Identity)


def test_split_batchnorm_equals_batchnorm_per_group_and_plain_bn_in_eval():
    from ssl_sphere.models.backbones import SplitBatchNorm, split_batchnorm

    torch.manual_seed(0)
    x = torch.randn(16, 5, 6, 6) * 3 + 1
    bn = SplitBatchNorm(5, num_splits=4)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    out = bn(x)
    groups = [x[j::4] for j in range(4)]  # sample n is in group n mod 4
    ref = torch.empty_like(x)
    means, vars_ = [], []
    for j, g in enumerate(groups):
        ref[j::4] = torch.nn.functional.batch_norm(g, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        means.append(g.mean((0, 2, 3)))
        vars_.append(g.var((0, 2, 3), unbiased=True))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # running statistics: the mean over the groups of BN's own update (momentum 0.1 from 0 / 1)
    torch.testing.assert_close(bn.running_mean, 0.1 * torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * torch.stack(vars_).mean(0), rtol=1e-5, atol=1e-6)
    bn.eval()
    plain = torch.nn.BatchNorm2d(5).eval()
    plain.load_state_dict(bn.state_dict())
    torch.testing.assert_close(bn(x), plain(x))
    # conversion keeps every parameter and buffer (checkpoints move between the two)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5))
    keys = net.state_dict().keys()
    split_batchnorm(net, 2)
    assert isinstance(net[1], SplitBatchNorm) and net.state_dict().keys() == keys


def test_split_bn_default_and_single_process_key_shuffle():
    # MoCo in one process: BN groups of >= 64 images, at most 8 (the authors' CIFAR demo: 8 x 64)
    assert make_cfg("moco", **{"optim.batch_size": 512, "method.queue_size": 1024}).model.split_bn == 8
    assert make_cfg("moco", **{"optim.batch_size": 128, "method.queue_size": 256}).model.split_bn == 2
    assert make_cfg("moco").model.split_bn == 1  # a batch of 8: no group of 64
    cfg = make_cfg("moco", **{"model.split_bn": 8})
    assert make_cfg("simclr").model.split_bn == 1 and make_cfg("byol").model.split_bn == 1
    with pytest.raises(Exception, match="model.split_bn"):
        make_cfg("moco", **{"optim.batch_size": 12, "model.split_bn": 8})
    torch.manual_seed(0)
    model = build_model(cfg)
    moco = model.method
    assert moco.split_bn == 8 and sum(type(m).__name__ == "SplitBatchNorm" for m in moco.modules()) > 0
    x = torch.randn(16, 3, 16, 16)
    torch.manual_seed(1)
    shuffled = moco._keys(x)  # keys in the input order, computed on a shuffled batch
    moco.cfg.shuffle_bn = False
    plain = moco._keys(x)
    assert shuffled.shape == plain.shape and not torch.allclose(shuffled, plain, atol=1e-4)  # other BN groups
    moco.eval()  # without batch statistics the shuffle is invisible
    moco.cfg.shuffle_bn = True
    with_shuffle = moco._keys(x)
    moco.cfg.shuffle_bn = False
    torch.testing.assert_close(with_shuffle, moco._keys(x))


@pytest.mark.parametrize("name,symmetric,directions", [("simclr", True, 1), ("moco", True, 2), ("moco", False, 1),
                                                        ("byol", True, 2), ("simsiam", True, 1), ("mocov3", True, 2),
                                                        ("nnclr", True, 1), ("dino", True, 1), ("swav", True, 1)])
def test_sec_strength_is_relative_to_the_per_direction_loss(name, symmetric, directions):
    """total = L_method + D * eta * L_sec with D the directions L_method sums: relative to the
    per-direction mean loss L_method / D, SEC's gradient has the same scale eta for every method."""
    only_moco = {"method.symmetric": symmetric} if name == "moco" else {}
    cfg = make_cfg(name, **{"sec.weight": 0.3, "sec.ramp": "none", **only_moco})
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.method.loss_directions == directions
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    total, method_loss, logs, out = model([x1, x2], 0.5)
    emb = out.embeddings
    torch.testing.assert_close(total - method_loss, directions * 0.3 * logs["sec_loss"], rtol=1e-5, atol=1e-6)
    # gradient of the SEC part w.r.t. the embeddings over that of the per-direction loss: D-free
    g_sec = torch.autograd.grad(total - method_loss, emb, retain_graph=True)[0]
    g_sec_alone = torch.autograd.grad(model.sec(emb, 0.5)[0], emb)[0]  # eta * L_sec on its own
    torch.testing.assert_close(g_sec / directions, g_sec_alone, rtol=1e-5, atol=1e-7)


def test_fixed_lr_modules_keep_the_peak_lr():
    """A method's fixed_lr_modules (SimSiam's predictor) get groups of their own kept at
    the peak lr while the schedule moves the others; without any, the two groups as before."""
    from ssl_sphere.engine.optim import set_hyperparameters

    cfg = make_cfg("byol")
    model = build_model(cfg)
    assert len(build_optimizer(model, cfg.optim).param_groups) == 2
    model.method.fixed_lr_modules = lambda: [model.method.predictor]
    opt = build_optimizer(model, cfg.optim)
    fixed = [g for g in opt.param_groups if g.get("fixed_lr")]
    pred = {id(p) for p in model.method.predictor.parameters()}
    assert fixed and {id(p) for g in fixed for p in g["params"]} == pred
    assert not pred & {id(p) for g in opt.param_groups if not g.get("fixed_lr") for p in g["params"]}
    set_hyperparameters(opt, 0.001, 0.3, cfg.optim.weight_decay)
    assert {g["lr"] for g in fixed} == {0.3} and {g["lr"] for g in opt.param_groups if not g.get("fixed_lr")} == {0.001}
