"""MoCo v3 (ssl_sphere/methods/mocov3.py): the loss against a naive loop of Algorithm 1 (2 tau factor,
rank offset, SEE's extra negatives), the heads against the reference's _build_mlp, forward / backward with
and without SEC, the EMA key encoder, exact mid-epoch resume, 2 gloo ranks against one process with the
double batch, export / load_pretrained / momentum_backbone."""

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

import ssl_sphere.methods.mocov3  # noqa: F401  (registers --method mocov3 until methods/__init__ imports it)
from ssl_sphere.cli.pretrain import build_config
from ssl_sphere.config import ConfigError, layered, resolve
from ssl_sphere.core import checkpoint
from ssl_sphere.engine.optim import build_optimizer
from ssl_sphere.engine.train import train
from ssl_sphere.methods.heads import mlp
from ssl_sphere.methods.losses import see_points
from ssl_sphere.methods.mocov3 import mocov3_contrastive
from ssl_sphere.models.pretrained import export, load_pretrained
from ssl_sphere.models.ssl_model import build_model

from .test_distributed import WORLD, _spawn

SMALL = {"method.proj_hidden_dim": 64, "method.pred_hidden_dim": 64, "method.proj_dim": 16}


def make_cfg(**over):
    return resolve(layered(values={"method.name": "mocov3", **SMALL, "optim.batch_size": 8, **over}))


def _raw(*shape, seed):
    """Un-normalised float64 rows with norms spread over ~[0.05, 20]."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, generator=g, dtype=torch.float64)
    return z * torch.empty(shape[0], 1, dtype=torch.float64).uniform_(-3, 3, generator=g).exp()


def _naive_ctr(q, keys, t, rank, extra=None, valid=None):
    """Algorithm 1's ctr(q, k) = 2 tau CrossEntropy(q k^T / tau, labels), one query at a time in Python floats;
    the labels of rank r's queries are r * B + i (the reference's gathered keys); extra: further negatives
    that query i sees where valid[i][j]."""
    qn = F.normalize(q.double(), dim=1).tolist()
    kn = F.normalize(keys.double(), dim=1).tolist()
    en = F.normalize(extra.double(), dim=1).tolist() if extra is not None else []

    def dot(a, c):
        return sum(x * y for x, y in zip(a, c))

    total = 0.0
    for i, qi in enumerate(qn):
        logits = [dot(qi, k) / t for k in kn] + [dot(qi, e) / t for j, e in enumerate(en) if valid[i][j]]
        top = max(logits)
        lse = top + math.log(sum(math.exp(x - top) for x in logits))
        total += lse - logits[rank * len(qn) + i]
    return 2 * t * total / len(qn)


@pytest.mark.parametrize("b, d, t, world, rank", [(4, 8, 0.2, 1, 0), (3, 5, 1.0, 2, 1), (5, 16, 0.7, 3, 2),
                                                  (2, 3, 0.1, 2, 0)])
def test_loss_matches_a_naive_loop_of_algorithm_1(b, d, t, world, rank):
    q, keys = _raw(b, d, seed=1).float(), _raw(world * b, d, seed=2).float()
    ours = mocov3_contrastive(q, keys, t, rank)
    assert ours.ndim == 0 and ours.dtype == torch.float32
    assert ours.item() == pytest.approx(_naive_ctr(q, keys, t, rank), rel=1e-5, abs=1e-5)
    if world > 1:  # the rank offset matters: another block of keys holds other positives
        assert abs(mocov3_contrastive(q, keys, t, (rank + 1) % world).item() - ours.item()) > 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):  # logits stay float32 under autocast
        assert mocov3_contrastive(q, keys, t, rank).dtype == torch.float32


def test_loss_scale_is_two_tau_times_the_cross_entropy_and_keys_get_no_gradient():
    q, keys = _raw(6, 8, seed=3).float().requires_grad_(), _raw(6, 8, seed=4).float().requires_grad_()
    for t in (0.2, 1.0, 2.0):
        ce = F.cross_entropy(F.normalize(q, dim=1) @ F.normalize(keys, dim=1).T / t, torch.arange(6))
        torch.testing.assert_close(mocov3_contrastive(q, keys, t), 2 * t * ce)
    mocov3_contrastive(q, keys, 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0 and keys.grad is None  # stop-gradient on k


def test_ranks_together_are_the_global_batch():
    """The mean over 2 ranks of the per-rank losses (rank r: its B queries, every rank's keys, labels offset
    by r * B) is the one-process loss of the 2B batch: what DDP's gradient averaging optimises."""
    b, d, t = 4, 6, 0.3
    q, keys = _raw(2 * b, d, seed=5).float(), _raw(2 * b, d, seed=6).float()
    per_rank = [mocov3_contrastive(q[r * b:(r + 1) * b], keys, t, r) for r in range(2)]
    torch.testing.assert_close((per_rank[0] + per_rank[1]) / 2, mocov3_contrastive(q, keys, t))
    assert not torch.allclose(per_rank[0], per_rank[1], atol=1e-4)


def test_see_extra_negatives_match_the_naive_loop_and_skip_the_own_instance():
    b, d, n = 5, 12, 4
    q, k = _raw(b, d, seed=7).float(), _raw(b, d, seed=8).float()
    torch.manual_seed(0)
    points, valid = see_points(q, k, n, 0.4)  # ceil(0.4 * 5) = 2 most confident pairs, 4 points each
    assert points.shape == (2 * n, d) and valid.shape == (b, 2 * n) and not points.requires_grad
    torch.testing.assert_close(points.norm(dim=1), torch.ones(2 * n), atol=1e-5, rtol=0)
    cos = (F.normalize(q, dim=1) * F.normalize(k, dim=1)).sum(1)
    chosen = cos.topk(2).indices
    for c, owner in enumerate(chosen.tolist()):  # each point keeps its pair's cosine to the key ...
        block = points[c * n:(c + 1) * n]
        torch.testing.assert_close(block @ F.normalize(k[owner], dim=0), cos[owner].expand(n), atol=1e-5, rtol=0)
        assert not valid[owner, c * n:(c + 1) * n].any()  # ... and its own query never sees it
    assert valid.sum() == (b - 1) * 2 * n
    ours = mocov3_contrastive(q, k, 0.2, 0, points, valid)
    assert ours.item() == pytest.approx(_naive_ctr(q, k, 0.2, 0, points, valid.tolist()), rel=1e-5, abs=1e-5)
    assert ours.item() > mocov3_contrastive(q, k, 0.2).item()  # more negatives, larger loss


def _reference_build_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    """moco-v3 moco/builder.py ``_build_mlp``, as the reference writes it."""
    layers = []
    for i in range(num_layers):
        dim1 = input_dim if i == 0 else mlp_dim
        dim2 = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(dim1, dim2, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*layers)


@pytest.mark.parametrize("layers, last_bn", [(2, True), (3, True), (2, False), (1, True)])
def test_heads_are_the_reference_build_mlp(layers, last_bn):
    torch.manual_seed(0)
    ours = mlp(layers, 12, 32, 8, last_bn)
    torch.manual_seed(0)
    ref = _reference_build_mlp(layers, 12, 32, 8, last_bn)
    assert [type(m) for m in ours.layers] == [type(m) for m in ref]
    assert [(k.split(".", 1)[1], v.shape) for k, v in ours.state_dict().items()] == \
           [(k, v.shape) for k, v in ref.state_dict().items()]  # no bias, no affine output BN: as the reference
    x = torch.randn(10, 12)
    torch.testing.assert_close(ours(x), ref(x))  # same init order, same function (train-mode BN)


def test_config_views_heads_and_checks():
    cfg = make_cfg()
    assert cfg.method.temperature == 1.0 and cfg.method.momentum_final == 1.0  # the reference's ResNet defaults
    assert list(cfg.aug.blur_p) == [0.0, 0.0] and list(cfg.aug.solarize_p) == [0.0, 0.2]  # 32 px: no blur
    vit = make_cfg(**{"model.backbone": "vit_tiny"})  # the reference's ViT settings, derived
    assert vit.method.temperature == 0.2 and vit.method.proj_layers == 3 and vit.method.freeze_patch_embed
    assert make_cfg(**{"model.backbone": "vit_tiny", "method.temperature": 0.5}).method.temperature == 0.5
    big = make_cfg(**{"data.image_size": 96})
    assert list(big.aug.blur_p) == [1.0, 0.1] and list(big.aug.solarize_p) == [0.0, 0.2]  # BYOL's views
    method = build_model(make_cfg(**{"method.proj_layers": 3, "see.enabled": True})).method
    assert sum(isinstance(m, nn.Linear) for m in method.encoder.online[1].modules()) == 3
    assert sum(isinstance(m, nn.Linear) for m in method.predictor.modules()) == 2
    assert not isinstance(method.predictor.layers[-1], nn.BatchNorm1d)  # the ResNet predictor: no output BN
    with pytest.raises(ConfigError, match="method.proj_layers"):
        make_cfg(**{"method.proj_layers": 0})
    with pytest.raises(ConfigError, match="see.n"):  # SEE applies; it needs proj_dim >= n + 2
        make_cfg(**{"see.enabled": True, "method.proj_dim": 8})


@pytest.mark.parametrize("sec", [False, True])
def test_forward_backward_sec_on_the_queries(sec):
    cfg = make_cfg(**{"sec.enabled": sec, "sec.ramp": "none", "sec.weight": 0.3})
    torch.manual_seed(0)
    model = build_model(cfg)
    method = model.method
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    total, method_loss, logs, out = model([x1, x2], 0.5)
    assert out.views == 2 and out.embeddings.shape == (16, 16) and out.embeddings.requires_grad
    # the embeddings are the raw predictor outputs q1, q2 and the loss is ctr(q1, k2) + ctr(q2, k1)
    q1, q2 = method.predictor(method.encoder.online(x1)), method.predictor(method.encoder.online(x2))
    torch.testing.assert_close(out.embeddings, torch.cat([q1, q2]))
    assert not torch.allclose(out.embeddings.norm(dim=1), torch.ones(16), atol=1e-2)  # not normalised
    with torch.no_grad():
        k1, k2 = method.encoder.target(x1), method.encoder.target(x2)
    torch.testing.assert_close(method_loss, mocov3_contrastive(q1, k2, 1.0) + mocov3_contrastive(q2, k1, 1.0))
    assert method.loss_directions == 2
    if sec:  # the SEC term is D * eta * L_sec with D = 2 directions
        torch.testing.assert_close(total - method_loss, 2 * 0.3 * logs["sec_loss"], rtol=1e-5, atol=1e-6)
    else:
        assert "sec_loss" not in logs and torch.equal(total, method_loss)
    total.backward()
    for part in (method.backbone, method.encoder.online[1], method.predictor):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None and not p.requires_grad for p in method.encoder.target.parameters())


def test_see_term_in_forward():
    cfg = make_cfg(**{"see.enabled": True, "see.n": 4})
    torch.manual_seed(0)
    method = build_model(cfg).method
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    assert "see_loss" not in method([x1, x2]).logs  # progress 0: the SEE ramp is at 0
    method.set_progress(1.0)
    out = method([x1, x2])
    q1, q2 = out.embeddings.split(8)
    with torch.no_grad():
        k1, k2 = method.encoder.target(x1), method.encoder.target(x2)
    main = mocov3_contrastive(q1, k2, 1.0) + mocov3_contrastive(q2, k1, 1.0)
    torch.testing.assert_close(out.loss - main, cfg.see.weight * out.logs["see_loss"], rtol=1e-5, atol=1e-6)
    assert out.logs["see_loss"] > main  # the same ctr with more negatives


def test_ema_target_moves_after_step_and_gets_no_gradient():
    cfg = make_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    method = model.method
    opt = build_optimizer(model, cfg.optim)
    target = method.encoder.target
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in target.parameters())  # the optimiser never sees the EMA copy
    assert all(id(p) in in_opt for p in method.predictor.parameters())  # the predictor has no EMA copy
    assert len(method.momentum_pairs()) == 1 and method.momentum_pairs()[0][0] is method.encoder.online
    total, *_ = model([torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)], 0.0)
    opt.zero_grad()
    total.backward()
    assert all(p.grad is None for p in target.parameters())
    opt.step()
    before = [p.clone() for p in target.parameters()]
    online = [p.detach().clone() for p in method.encoder.online.parameters()]
    assert any(not torch.equal(o, t) for o, t in zip(online, before))  # the step moved the online weights
    method.after_step(0.3)
    m = method.momentum_at(0.3)
    assert m == pytest.approx(1 - 0.01 * (math.cos(math.pi * 0.3) + 1) / 2)  # 0.99 -> 1 along a half cosine
    for t0, o, t1 in zip(before, online, target.parameters()):
        torch.testing.assert_close(t1, m * t0 + (1 - m) * o)
    assert any(not torch.equal(t0, t1) for t0, t1 in zip(before, target.parameters()))
    assert method.momentum_backbone() is target[0] and method.embed(torch.randn(4, 3, 16, 16)).shape == (4, 16)


FAST = ["--method", "mocov3", "--sec", "--see", "--batch-size", "64", "--epochs", "2", "eval.every_epochs=0",
        "run.progress=false", *(f"{k}={v}" for k, v in SMALL.items())]


def test_resume_mid_epoch_equals_uninterrupted_and_export(tmp_path):
    a = train(build_config([*FAST, "--output-dir", str(tmp_path / "a"), "--max-steps", "5"]))
    b_dir = tmp_path / "b"
    stopped = train(build_config([*FAST, "--output-dir", str(b_dir), "--max-steps", "2"]))
    assert 0 < checkpoint.load(str(Path(stopped["run_dir"]) / "last.pt"))["epoch"] < 1  # stopped mid-epoch
    b = train(build_config([*FAST, "--output-dir", str(b_dir), "--resume", "auto", "--max-steps", "5"]))
    assert a["step"] == b["step"] == 5
    pa = checkpoint.load(str(Path(a["run_dir"]) / "last.pt"))["model"]
    pb = checkpoint.load(str(Path(b["run_dir"]) / "last.pt"))["model"]
    assert pa.keys() == pb.keys() and any("encoder.target" in k for k in pa) and any("predictor" in k for k in pa)
    for k in pa:  # SEE's random points, SEC's mean and the EMA included
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(pa["method.encoder.target.1.layers.0.weight"], pa["method.encoder.online.1.layers.0.weight"])
    with pytest.raises(ConfigError, match="method.pred_hidden_dim changed"):
        build_config([*FAST, "--output-dir", str(b_dir), "--resume", "auto", "method.pred_hidden_dim=32"])

    last = str(Path(a["run_dir"]) / "last.pt")
    meta = export(last, str(tmp_path / "backbone.pt"))
    assert meta["method"] == "mocov3"
    state = torch.load(tmp_path / "backbone.pt", weights_only=True)
    p = load_pretrained(last)
    assert state.keys() == p.module.state_dict().keys()
    for k, v in state.items():  # the online backbone, not the EMA copy
        torch.testing.assert_close(v, pa[f"method.backbone.{k}"], rtol=0, atol=0)
    ema = load_pretrained(last, part="momentum_backbone")
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, pa[f"method.encoder.target.0.{k}"], rtol=0, atol=0)
    x = p.preprocess(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert p.module(x).shape == ema.module(x).shape == (2, p.feature_dim)


B = 4  # per rank


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * B, 3, 16, 16, generator=g), torch.randn(WORLD * B, 3, 16, 16, generator=g)


def _loss_and_grads(x1, x2):
    """The method's loss and gradients in eval-mode BN (running statistics: one process or several, every
    image is normalised alike, so the comparison isolates the gathered keys and the rank offset)."""
    torch.manual_seed(0)  # same initial weights everywhere (DDP would broadcast rank 0's)
    method = build_model(make_cfg(**{"optim.batch_size": B})).method.eval()
    loss = method([x1, x2]).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in method.parameters() if p.requires_grad]


def _two_ranks(rank):
    import ssl_sphere.methods.mocov3  # noqa: F401, F811  (a spawned worker registers it itself)

    x1, x2 = _data()
    sl = slice(rank * B, (rank + 1) * B)
    loss, grads = _loss_and_grads(x1[sl], x2[sl])
    for t in [loss, *grads]:  # what DDP does: average over ranks
        tdist.all_reduce(t)
        t /= WORLD
    return {"loss": loss, "grads": grads}


def test_two_ranks_equal_one_process_with_the_double_batch(tmp_path):
    res = _spawn(_two_ranks, tmp_path)
    loss, grads = _loss_and_grads(*_data())
    torch.testing.assert_close(res["loss"], loss, rtol=1e-5, atol=1e-6)
    assert len(res["grads"]) == len(grads) and any(g.abs().sum() > 0 for g in grads)
    for g2, g1 in zip(res["grads"], grads):
        torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)
