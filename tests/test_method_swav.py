"""SwAV (ssl_sphere/methods/swav.py): the loss against lightly's SwaVLoss (with and without the queue),
Sinkhorn's double normalisation, the prototypes frozen for the first epoch and unit-norm, forward /
backward with and without SEC, SEE on the prototypes, the queue, an exact mid-epoch resume with the
queue in use, export, and the 2-rank Sinkhorn against one process with the whole batch."""

from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from lightly.loss import SwaVLoss
from lightly.loss.swav_loss import sinkhorn as lightly_sinkhorn

import ssl_sphere.methods.swav  # noqa: F401  (registers --method swav until ssl_sphere.methods imports it)
from ssl_sphere import config
from ssl_sphere.augment.views import Augmenter
from ssl_sphere.cli.pretrain import build_config
from ssl_sphere.config import layered, resolve
from ssl_sphere.core import checkpoint, dist
from ssl_sphere.engine.optim import build_optimizer
from ssl_sphere.engine.step import TrainStep
from ssl_sphere.engine.train import train
from ssl_sphere.methods.swav import sinkhorn, swav_loss, swav_see_loss
from ssl_sphere.models.pretrained import export, load_pretrained
from ssl_sphere.models.ssl_model import build_model
from ssl_sphere.sphere.stats import code_entropy

from .conftest import REPO
from .test_distributed import WORLD, _spawn

SMALL = {"method.name": "swav", "method.proj_hidden_dim": 32, "method.proj_dim": 16, "method.n_prototypes": 12,
         "optim.batch_size": 8}


def make_cfg(**over):
    return resolve(layered(values={**SMALL, **over}))


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def _raw(n, d, seed):
    """Raw projections with row norms spread over ~[0.05, 20] (the loss must normalise them)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.exp(torch.empty(n, 1).uniform_(-3, 3, generator=g))


def _views(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 16, 16, generator=g), torch.randn(b, 3, 16, 16, generator=g)]


# ----------------------------------------------------------------------------- the loss and Sinkhorn
@pytest.mark.parametrize("with_queue", [False, True])
def test_loss_codes_and_gradients_equal_lightly_swav_loss(with_queue):
    b, d, k, t = 6, 8, 10, 0.1
    z0, w0 = _raw(2 * b, d, 1), _unit(k, d, 2)
    queue = torch.stack([_unit(12, d, 3), _unit(12, d, 4)]) if with_queue else None
    z, w = z0.clone().requires_grad_(), w0.clone().requires_grad_()
    loss, codes = swav_loss(z, w, 2, t, queue=queue)
    loss.backward()

    rz, rw = z0.clone().requires_grad_(), w0.clone().requires_grad_()
    scores = F.normalize(rz, dim=1) @ rw.T  # what lightly's SwaVPrototypes sees after the normalisation
    s1, s2 = scores[:b], scores[b:]
    queue_scores = [queue[0] @ w0.T, queue[1] @ w0.T] if with_queue else None
    ref = SwaVLoss(temperature=t)([s1, s2], [], queue_scores)
    ref.backward()
    torch.testing.assert_close(loss, ref.squeeze(), rtol=1e-5, atol=1e-6)
    assert z.grad.abs().max() > 0 and w.grad.abs().max() > 0
    torch.testing.assert_close(z.grad, rz.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, rw.grad, rtol=1e-4, atol=1e-6)
    # the codes: lightly's sinkhorn over the view's scores (and its queue's), the batch rows kept
    for i, s in enumerate((s1, s2)):
        full = torch.cat([s.detach(), queue_scores[i]]) if with_queue else s.detach()
        torch.testing.assert_close(codes[i * b:(i + 1) * b], lightly_sinkhorn(full)[:b], rtol=1e-5, atol=1e-6)
    # the queue changes the codes (the comparison above would notice it being ignored)
    if with_queue:
        assert not torch.allclose(codes, swav_loss(z0, w0, 2, t)[1], atol=1e-4)


def test_loss_is_invariant_to_the_norms_of_the_projections():
    z, w = _raw(8, 6, 5), _unit(5, 6, 6)
    scale = torch.exp(torch.empty(8, 1).uniform_(-2, 2, generator=torch.Generator().manual_seed(7)))
    torch.testing.assert_close(swav_loss(z * scale, w, 2)[0], swav_loss(z, w, 2)[0], rtol=1e-5, atol=1e-6)
    swapped = torch.cat([z[4:], z[:4]])  # swapping the views' roles keeps the mean over both directions
    torch.testing.assert_close(swav_loss(swapped, w, 2)[0], swav_loss(z, w, 2)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,k", [(16, 5), (4, 12)])
def test_sinkhorn_codes_are_doubly_normalised(n, k):
    scores = _unit(n, 8, 8) @ _unit(k, 8, 9).T  # cosines
    q = sinkhorn(scores)
    assert q.shape == (n, k) and (q >= 0).all()
    # each sample's code is an assignment (the reference's columns of 1/B, times B) ...
    torch.testing.assert_close(q.sum(1), torch.ones(n), rtol=0, atol=1e-5)
    # ... and the prototypes share the samples equally: close after 3 iterations, exact in the limit
    start = F.softmax(scores / 0.05, dim=1).sum(0)
    assert (q.sum(0) - n / k).abs().max() < (start - n / k).abs().max()
    torch.testing.assert_close(sinkhorn(scores, iterations=200).sum(0), torch.full((k,), n / k), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q, lightly_sinkhorn(scores), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the method
def test_prototypes_frozen_for_the_first_epoch_then_trained_and_always_unit():
    """Through the engine's step (engine/step.py: begin_step -> forward -> backward ->
    before_optimizer_step -> optimizer.step -> after_step), 2 steps per epoch."""
    torch.manual_seed(0)
    cfg = make_cfg(**{"optim.lr": 0.5, "optim.warmup_epochs": 0})
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.optim)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    aug = Augmenter(cfg.aug, cfg.data.image_size, [0.5] * 3, [0.25] * 3)
    step = TrainStep(model, model.method, opt, aug, images, True, cfg, 4, 0, torch.device("cpu"), 2)
    m = model.method
    torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(12))  # unit from the start
    w0, p0 = m.prototypes.weight.detach().clone(), m.projector.layers[0].weight.detach().clone()
    for i in range(2):  # epoch 0: frozen
        step(i, torch.arange(8))
        # no update (renormalising unit rows moves them by rounding only), while the projector learns
        torch.testing.assert_close(m.prototypes.weight, w0, rtol=0, atol=1e-6)
        assert opt.state.get(m.prototypes.weight, {}) == {}  # no momentum built up either
    assert not torch.allclose(m.projector.layers[0].weight, p0)
    for i in range(2, 4):
        before = m.prototypes.weight.detach().clone()
        step(i, torch.arange(8))
        assert (m.prototypes.weight - before).abs().max() > 1e-4  # trained from epoch 1 on
        torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(12), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sec", [False, True])
def test_forward_backward_with_and_without_sec(sec):
    torch.manual_seed(0)
    model = build_model(make_cfg(**{"sec.enabled": sec, "sec.weight": 0.3, "sec.ramp": "none"}))
    assert model.method.loss_directions == 1  # a mean over the two swapped directions
    total, method_loss, logs, out = model(_views(), 0.5)
    assert out.embeddings.shape == (16, 16) and out.views == 2 and out.embeddings.requires_grad
    assert not torch.allclose(out.embeddings.norm(dim=1), torch.ones(16), atol=1e-3)  # raw: no head normalises
    assert 0 < float(logs["code_entropy"]) <= 1 + 1e-6 and not logs["code_entropy"].requires_grad
    assert {"norm_mean", "norm_std"} <= set(logs) and ("sec_loss" in logs) == sec
    if sec:
        torch.testing.assert_close(total - method_loss, 0.3 * logs["sec_loss"], rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(total, method_loss)
    total.backward()
    m = model.method
    for part in (m.backbone, m.projector, m.prototypes):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    # the loss the method returns is swav_loss on its embeddings; code_entropy is that of the prototype
    # predictions softmax(<z, c> / T) (Sinkhorn's codes are equipartitioned by construction)
    with torch.no_grad():
        loss, codes = swav_loss(out.embeddings, m.prototypes.weight, 2)
        probs = F.softmax(F.normalize(out.embeddings, dim=1) @ m.prototypes.weight.T / m.cfg.temperature, dim=1)
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(logs["code_entropy"], code_entropy(probs))


def test_see_trains_the_prototypes_only():
    torch.manual_seed(0)
    z, w = _raw(6, 12, 10).requires_grad_(), _unit(5, 12, 11).requires_grad_()
    assigned = torch.tensor([0, 1, 2, 3, 4, 0])
    swav_see_loss(z, w, assigned, 4, 0.5, 0.1).backward()
    assert z.grad is None and w.grad.abs().sum() > 0
    cfg = make_cfg(**{"see.enabled": True, "see.n": 4})
    model = build_model(cfg)
    model.method.set_progress(1.0)
    _, method_loss, logs, out = model(_views(), 1.0)
    assert logs["see_loss"] > 0
    with torch.no_grad():
        plain = swav_loss(out.embeddings, model.method.prototypes.weight, 2)[0]
    torch.testing.assert_close(method_loss - plain, cfg.see.weight * logs["see_loss"], rtol=1e-5, atol=1e-6)
    model.method.set_progress(0.0)  # the ramp starts at 0: no SEE term
    assert "see_loss" not in model(_views(), 0.0)[2]


def test_queue_fills_from_its_epoch_and_is_used_once_full():
    torch.manual_seed(0)
    m = build_model(make_cfg(**{"method.queue_size": 24, "method.queue_start_epoch": 1})).method
    m.begin_step(0.5)
    m(_views())
    assert int(m.queue_filled) == 0 and int(m.queue[0].ptr) == 0  # before its start epoch: untouched
    for step in range(3):
        m.begin_step(1.0 + step / 10)
        assert m.queue_share() is None  # filling: not used yet
        out = m(_views(seed=step))
    assert int(m.queue_filled) == 24 and m.queue_share().shape == (2, 24, 16)
    # the last step's projections of each view are in its queue, normalised
    torch.testing.assert_close(m.queue[1].keys[16:], F.normalize(out.embeddings[8:].detach(), dim=1))
    codes_with = m.swapped_prediction(out.embeddings.detach(), 2)[1]
    m.eval()
    m(_views(seed=9))
    assert int(m.queue[0].ptr) == 0  # 24 rows written, wrapped; eval mode enqueues nothing
    m.queue = None
    assert not torch.allclose(codes_with, m.swapped_prediction(out.embeddings.detach(), 2)[1], atol=1e-4)


def test_config_checks_and_recipes():
    with pytest.raises(config.ConfigError, match="method.queue_size.*at least the projections of one step"):
        make_cfg(**{"method.queue_size": 4})
    with pytest.raises(config.ConfigError, match="method.epsilon"):
        make_cfg(**{"method.epsilon": 0.01})
    assert make_cfg(**{"see.enabled": True}).see.enabled  # SEE applies
    assert config.weight_keys(make_cfg())[-4:] == ["method.proj_hidden_dim", "method.proj_dim", "method.n_prototypes",
                                                   "method.queue_size"]
    for recipe in ("swav.yaml", "swav_sec.yaml"):
        cfg = build_config(["--config", str(REPO / "configs" / "cifar10" / recipe)])
        assert (cfg.method.queue_size, cfg.method.n_prototypes, cfg.optim.optimizer) == (3840, 3000, "lars")
        assert cfg.optim.lr == pytest.approx(1.2) and cfg.sec.enabled == recipe.endswith("_sec.yaml")  # 0.6 x 512 / 256


# ----------------------------------------------------------------------------- training, resume, export
FAST = ["--method", "swav", "--sec", "--batch-size", "32", "--epochs", "2", "data.train_limit=128",
        "eval.every_epochs=0", "run.progress=false", "method.proj_hidden_dim=64", "method.n_prototypes=32",
        "method.queue_size=64", "method.queue_start_epoch=0"]


def test_resume_mid_epoch_with_the_queue_equals_uninterrupted_and_exports(tmp_path):
    # 128 digits at batch 32: 4 steps per epoch; the queue (2 steps of projections) is full from step 2 on,
    # so the run stopped at step 3 saves a full queue in use; the prototypes start learning at step 4
    a = train(build_config([*FAST, "--output-dir", str(tmp_path / "a"), "--max-steps", "7"]))
    train(build_config([*FAST, "--output-dir", str(tmp_path / "b"), "--max-steps", "3"]))
    b_dir = tmp_path / "b" / "digits_swav_sec_s0"
    mid = checkpoint.load(str(b_dir / "last.pt"))["model"]
    assert int(mid["method.queue_filled"]) == 64 and int(mid["method.queue.0.ptr"]) == 3 * 32 % 64
    b = train(build_config([*FAST, "--output-dir", str(tmp_path / "b"), "--max-steps", "7", "--resume",
                            str(b_dir / "last.pt")]))
    pa = checkpoint.load(str(Path(a["run_dir"]) / "last.pt"))["model"]
    pb = checkpoint.load(str(b_dir / "last.pt"))["model"]
    assert pa.keys() == pb.keys() and "method.queue.1.keys" in pa
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.allclose(pa["method.prototypes.weight"], mid["method.prototypes.weight"], atol=1e-4)
    torch.testing.assert_close(pa["method.prototypes.weight"].norm(dim=1), torch.ones(32))

    meta = export(str(b_dir / "last.pt"), str(tmp_path / "backbone.pt"))
    assert meta["method"] == "swav" and meta["step"] == b["step"] == 7
    state = torch.load(tmp_path / "backbone.pt", weights_only=True)
    p = load_pretrained(str(b_dir / "last.pt"))
    assert state.keys() == p.module.state_dict().keys()
    for k, v in state.items():
        torch.testing.assert_close(v, pb[f"method.backbone.{k}"], rtol=0, atol=0)
    assert p.module(torch.randn(2, 3, 32, 32)).shape == (2, p.feature_dim)


# ----------------------------------------------------------------------------- two ranks
B = 4


def _two_rank_data():
    """Projections of 2 ranks x B samples x 2 views, and 2 steps of queue entries per rank."""
    z = _raw(2 * WORLD * B, 16, 20).view(2, WORLD, B, 16)  # (view, rank, sample, D)
    fill = _raw(2 * 2 * WORLD * B, 16, 21).view(2, 2, WORLD * B, 16)  # (step, view, rank-major rows, D)
    return z, fill


def _method():
    torch.manual_seed(0)  # the same weights on every rank (DDP would broadcast them)
    m = build_model(make_cfg(**{"method.queue_size": 16, "method.queue_start_epoch": 0, "optim.batch_size": B})).method
    m.begin_step(1.0)
    return m


def _codes_two_ranks(rank):
    """A 2-rank gloo worker (spawned: it imports this module, whose imports register swav)."""
    z, fill = _two_rank_data()
    m = _method()
    for step in range(2):  # each rank enqueues its own rows; the queue holds both ranks' (gathered)
        m._enqueue(torch.cat([fill[step, v, rank * B:(rank + 1) * B] for v in range(2)]))
    local = torch.cat([z[0, rank], z[1, rank]]).requires_grad_()
    loss, codes = m.swapped_prediction(local, 2)
    loss.backward()
    grads = [m.prototypes.weight.grad.clone(), local.grad]
    assert tdist.get_world_size() == WORLD
    return {"loss": dist.all_reduce_sum(loss.detach()) / WORLD, "queue": m.queue[0].keys.clone(),
            "w_grad": dist.all_reduce_sum(grads[0]) / WORLD,  # what DDP averages
            "codes": dist.gather_no_grad(codes), "z_grad": dist.gather_no_grad(grads[1])}  # (rank, view, sample)


def test_sinkhorn_over_two_ranks_equals_one_process_with_both_batches(tmp_path):
    res = _spawn(_codes_two_ranks, tmp_path)
    z, fill = _two_rank_data()
    m = _method()
    for step in range(2):
        m._enqueue(torch.cat([fill[step, 0], fill[step, 1]]))
    torch.testing.assert_close(res["queue"], m.queue[0].keys, rtol=0, atol=0)  # the same global queue
    full = torch.cat([z[0].reshape(-1, 16), z[1].reshape(-1, 16)]).requires_grad_()
    loss, codes = m.swapped_prediction(full, 2)
    (loss * WORLD).backward()  # each rank's loss is a mean over its B: the rank sum is WORLD x the global mean
    # codes per rank, (rank, view, sample) order -> (view, rank, sample) as in the one process
    ranked = res["codes"].view(WORLD, 2, B, -1).transpose(0, 1).reshape(2 * WORLD * B, -1)
    torch.testing.assert_close(ranked, codes, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res["w_grad"], m.prototypes.weight.grad / WORLD, rtol=1e-4, atol=1e-6)
    per_rank = res["z_grad"].view(WORLD, 2, B, -1).transpose(0, 1).reshape(2 * WORLD * B, -1)
    torch.testing.assert_close(per_rank, full.grad, rtol=1e-4, atol=1e-6)
