"""DINO (ssl_sphere/methods/dino.py): the loss, centre and temperature warm-up against lightly's DINOLoss;
the raw bottleneck path against lightly's head; steps against lightly's pipeline; the frozen last layer;
forward / backward with SEC, SEE and local crops; exact mid-epoch resume, export and the teacher's backbone;
the centre all-reduced over 2 gloo ranks."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss
from lightly.models.utils import update_momentum

import ssl_sphere.methods.dino  # noqa: F401  (registers --method dino until ssl_sphere.methods imports it)
from ssl_sphere.cli.pretrain import build_config
from ssl_sphere.config import ConfigError, layered, resolve
from ssl_sphere.core import checkpoint
from ssl_sphere.engine.optim import build_optimizer
from ssl_sphere.engine.train import train
from ssl_sphere.methods.dino import (
    dino_loss,
    dino_see_loss,
    prototype_logits,
    teacher_distribution,
    teacher_temperature,
    update_center,
)
from ssl_sphere.models.pretrained import export, load_pretrained
from ssl_sphere.models.ssl_model import build_model

from .test_distributed import _spawn

B = 8
SMALL = {"method.name": "dino", "method.proj_hidden_dim": 32, "method.proj_dim": 16, "method.out_dim": 64,
         "optim.batch_size": B}


def make_cfg(**over):
    return resolve(layered(values={**SMALL, **over}))


def views(n=2, seed=0, size=16, batch=B):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]


def bn_eval(module):
    """BN layers in eval mode (running statistics): a sample's output no longer depends on its batch."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


# ----------------------------------------------------------------------------- loss, centre, warm-up vs lightly
@pytest.mark.parametrize("n_student,epoch", [(2, 3.4), (2, 12.0), (4, 0.0)])
def test_loss_centre_and_warmup_equal_lightly(n_student, epoch):
    k, t_views = 32, 2
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(t_views, B, k, generator=g) * 3
    student = (torch.randn(n_student, B, k, generator=g) * 3).requires_grad_()
    center = torch.randn(1, k, generator=g)
    ref = DINOLoss(output_dim=k, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=10,
                   student_temp=0.1, center_momentum=0.9)
    ref.center.copy_(center.view(1, 1, k))
    ref_student = student.detach().clone().requires_grad_()
    expected = ref(list(teacher), list(ref_student), epoch=int(epoch))  # lightly indexes its schedule by epoch

    temp = teacher_temperature(epoch, 0.04, 0.07, 10)
    loss = dino_loss(teacher_distribution(teacher, center, temp), student, 0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    assert student.grad.abs().max() > 0
    torch.testing.assert_close(student.grad, ref_student.grad, rtol=1e-4, atol=1e-7)
    # the centre: EMA of the batch mean of both global views' teacher logits
    torch.testing.assert_close(update_center(center, teacher.flatten(0, 1), 0.9), ref.center.view(1, k))
    # a view pairing mixed up (teacher view 0 against student view 0) is a different loss
    swapped = student.detach()[[1, 0, *range(2, n_student)]]
    assert not torch.allclose(dino_loss(teacher_distribution(teacher, center, temp), swapped, 0.1), loss, atol=1e-4)


def test_teacher_temperature_is_the_authors_schedule():
    ref = DINOLoss(output_dim=4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30)
    for e in range(30):  # np.linspace(0.04, 0.07, 30) by whole epoch, in mid-epoch steps too
        assert teacher_temperature(e + 0.7, 0.04, 0.07, 30) == pytest.approx(float(ref.teacher_temp_schedule[e]))
    assert teacher_temperature(0.0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert teacher_temperature(29.9, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temperature(30.0, 0.04, 0.07, 30) == teacher_temperature(150.0, 0.04, 0.07, 30) == 0.07
    assert teacher_temperature(0.0, 0.04, 0.07, 0) == 0.07  # no warm-up


def test_config_defaults_per_backbone_and_checks():
    cfg = make_cfg()
    assert cfg.method.batch_norm is True and "method.batch_norm" in cfg.derived  # a convnet: BN in the head
    assert make_cfg(**{"model.backbone": "vit_tiny"}).method.batch_norm is False  # a ViT: BN-free (Sec. 3.1)
    assert make_cfg(**{"method.batch_norm": False}).method.batch_norm is False
    assert cfg.aug.blur_p == [0.0, 0.0] and cfg.aug.solarize_p == [0.0, 0.2]  # 32 px: no blur
    assert make_cfg(**{"data.image_size": 96}).aug.blur_p == [1.0, 0.1]  # DataAugmentationDINO above 64 px
    assert make_cfg(**{"aug.local_crops": 2}).aug.local_size == 14  # multi-crop accepted
    for key, value in (("student_temp", 0.0), ("center_momentum", 1.5), ("out_dim", 1), ("freeze_last_layer", -1)):
        with pytest.raises(ConfigError, match=f"method.{key}"):
            make_cfg(**{f"method.{key}": value})


# ----------------------------------------------------------------------------- the head
@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_raw_bottleneck_path_equals_the_heads_forward(norm_last_layer):
    torch.manual_seed(0)
    m = build_model(make_cfg(**{"method.norm_last_layer": norm_last_layer})).method
    bn_eval(m)  # student and teacher keep equal BN statistics
    head = m.encoder.online[1]
    assert head.last_layer.weight_g.requires_grad == (not norm_last_layer)
    if not norm_last_layer:  # a trained gain: prototype_logits must apply it
        with torch.no_grad():
            head.last_layer.weight_g.uniform_(0.5, 2.0)
    f = m.backbone(views(1)[0])
    z = head.layers(f)
    ours = prototype_logits(z, head.last_layer.weight_v, head.last_layer.weight_g)
    torch.testing.assert_close(ours, head(f), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(z.norm(dim=1), torch.ones(B), atol=1e-3)  # raw: no head normalises
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert prototype_logits(z, head.last_layer.weight_v, head.last_layer.weight_g).dtype == torch.float32
    # the student's embeddings are this bottleneck, view blocks stacked; the teacher starts as the student
    x = views(2)
    out = m(x)
    torch.testing.assert_close(out.embeddings, torch.cat([head.layers(m.backbone(v)) for v in x]), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(m.embed(x[0]), out.embeddings[:B], rtol=1e-5, atol=1e-6)


def _step(model, opt, epoch, x, progress=0.5):
    """One step in the engine's order (engine/step.py): begin_step, forward, backward, before_optimizer_step,
    optimiser, after_step (EMA)."""
    model.method.begin_step(epoch)
    loss, *_ = model(x, progress)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    model.method.before_optimizer_step()
    opt.step()
    model.method.after_step(progress)


def test_last_layer_frozen_in_the_first_epoch_then_trained():
    torch.manual_seed(0)
    cfg = make_cfg()
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.optim)
    head = model.method.encoder.online[1]
    v0, mlp0 = head.last_layer.weight_v.detach().clone(), head.layers[0].weight.detach().clone()
    for epoch in (0.0, 0.5, 0.99):  # epoch < freeze_last_layer = 1: no gradient, no decay, no update
        _step(model, opt, epoch, views(2, seed=int(epoch * 10)))
        assert head.last_layer.weight_v.grad is None
    assert torch.equal(head.last_layer.weight_v, v0) and not torch.equal(head.layers[0].weight, mlp0)
    assert torch.equal(head.last_layer.weight_g, torch.ones_like(head.last_layer.weight_g))  # norm_last_layer
    _step(model, opt, 1.0, views(2, seed=10))
    assert not torch.equal(head.last_layer.weight_v, v0)
    assert torch.equal(head.last_layer.weight_g, torch.ones_like(head.last_layer.weight_g))


def test_steps_equal_lightlys_pipeline():
    """4 steps of 2 per epoch against lightly's pipeline on a copy of the same networks: DINOProjectionHead's
    forward, DINOLoss by epoch, cancel_last_layer_gradients, update_momentum on the cosine schedule. Covers
    the frozen last layer (epoch 0), the temperature warm-up (3 epochs), the centre and the teacher's EMA."""
    torch.manual_seed(0)
    cfg = make_cfg(**{"method.warmup_teacher_temp_epochs": 3, "optim.weight_decay": 5e-4})
    model = build_model(cfg)
    m = model.method
    student, teacher = copy.deepcopy(m.encoder.online), copy.deepcopy(m.encoder.target)
    ref = DINOLoss(output_dim=64, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3)
    ours = torch.optim.SGD([p for p in m.encoder.online.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                           weight_decay=5e-4)
    theirs = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                             weight_decay=5e-4)

    def heads(net, x):  # the authors' MultiCropWrapper: the global views as one backbone batch
        return list(net[1](net[0](torch.cat(x))).chunk(len(x)))

    for step in range(4):
        x, epoch, progress = views(2, seed=step), step / 2, (step + 1) / 4
        _step(model, ours, epoch, x, progress)
        with torch.no_grad():
            t = heads(teacher, x)
        loss = ref(t, heads(student, x), epoch=int(epoch))
        theirs.zero_grad(set_to_none=True)
        loss.backward()
        student[1].cancel_last_layer_gradients(int(epoch))
        theirs.step()
        update_momentum(student, teacher, m.momentum_at(progress))
    torch.testing.assert_close(m.center, ref.center.view(1, -1), rtol=1e-5, atol=1e-7)
    for mine, other in ((m.encoder.online, student), (m.encoder.target, teacher)):
        a, b = mine.state_dict(), other.state_dict()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=5e-5, msg=k)  # float sums in another order
    assert not torch.equal(m.encoder.target[1].last_layer.weight_v, m.encoder.online[1].last_layer.weight_v)


# ----------------------------------------------------------------------------- the step
@pytest.mark.parametrize("sec", [False, True])
def test_forward_backward_with_and_without_sec(sec):
    torch.manual_seed(0)
    model = build_model(make_cfg(**{"sec.enabled": sec, "sec.weight": 0.3, "sec.ramp": "none"}))
    m = model.method
    total, method_loss, logs, out = model(views(2), 0.5)
    assert m.loss_directions == 1 and out.views == 2 and out.embeddings.requires_grad
    assert out.embeddings.shape == (2 * B, m.cfg.proj_dim)  # the student bottleneck of both views
    assert torch.isfinite(total) and 0.0 < float(logs["code_entropy"]) <= 1.0
    assert logs["teacher_temp"] == pytest.approx(m.cfg.warmup_teacher_temp)
    if sec:  # one direction: total = L + 1 * eta * L_sec
        torch.testing.assert_close(total - method_loss, 0.3 * logs["sec_loss"], rtol=1e-5, atol=1e-6)
    else:
        assert "sec_loss" not in logs and torch.equal(total, method_loss)
    total.backward()
    student = m.encoder.online
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert any(p.grad.abs().sum() > 0 for p in m.backbone.parameters())
    assert all(p.grad is None and not p.requires_grad for p in m.encoder.target.parameters())
    # the centre moves in training only
    c1 = m.center.clone()
    assert c1.abs().sum() > 0
    m.eval()
    m(views(2, seed=3))
    assert torch.equal(m.center, c1)


def test_more_views_loop_over_the_view_pairs():
    """Two global views and two smaller local ones: the teacher sees the global ones, the loss is the
    mean over the 2 x 4 - 2 pairs of different views (multi-crop, Eq. 3)."""
    torch.manual_seed(0)
    m = build_model(make_cfg()).method
    bn_eval(m)
    x = views(2) + views(2, seed=1, size=8)
    out = m(x)
    assert out.views == 4 and out.embeddings.shape == (4 * B, 16)
    student, teacher = m.encoder.online, m.encoder.target

    def logits(net, v):
        last = net[1].last_layer
        return prototype_logits(net[1].layers(net[0](v)), last.weight_v, last.weight_g)

    p = [teacher_distribution(logits(teacher, v), torch.zeros(1, 64), m.cfg.warmup_teacher_temp) for v in x[:2]]
    logq = [F.log_softmax(logits(student, v) / 0.1, dim=-1) for v in x]
    pairs = [-(p[i] * logq[j]).sum(-1).mean() for i in range(2) for j in range(4) if i != j]
    torch.testing.assert_close(out.loss, torch.stack(pairs).mean(), rtol=1e-5, atol=1e-6)


def test_see_trains_the_prototypes_only():
    torch.manual_seed(0)
    cfg = build_config(["--method", "dino", "--see", "see.fraction=1.0", "see.n=4", "--batch-size", str(B),
                        *[f"{k}={v}" for k, v in SMALL.items() if k.startswith("method.") and k != "method.name"]])
    m = build_model(cfg).method
    m.set_progress(1.0)  # end of SEE's ramp: every sample expanded
    m.eval()  # fixed BN statistics and centre: the forwards below see the same state
    x = views(2)
    torch.manual_seed(5)  # see_expand draws the orientation of its simplex
    out = m(x)
    assert out.logs["see_loss"] > 0
    see = m.see
    m.see = None
    torch.testing.assert_close(out.loss - cfg.see.weight * out.logs["see_loss"], m(x).loss, rtol=1e-5, atol=1e-6)
    m.see = see
    # its gradient: the prototypes only, not the student network whose bottleneck it expands
    student, teacher = m.encoder.online, m.encoder.target
    z = m._bottleneck(student, x).unflatten(0, (2, B))
    with torch.no_grad():
        probs = teacher_distribution(m._logits(teacher, m._bottleneck(teacher, x)), m.center, 0.04).unflatten(0, (2, B))
    last = student[1].last_layer
    torch.manual_seed(5)
    see_loss = dino_see_loss(z, probs, last.weight_v, last.weight_g, 4, 1.0, 0.1)
    torch.testing.assert_close(see_loss, out.logs["see_loss"])
    params = [last.weight_v, *m.backbone.parameters(), *student[1].layers.parameters()]
    grads = torch.autograd.grad(see_loss, params, allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert all(g is None for g in grads[1:])
    m.set_progress(0.0)
    assert "see_loss" not in m(x).logs


# ----------------------------------------------------------------------------- training, resume, export
FAST = ["--method", "dino", "--sec", "--sec-ema", "0.5", "--batch-size", "32", "data.train_limit=160", "--epochs", "2",
        "eval.every_epochs=0", "run.progress=false", "method.proj_hidden_dim=64", "method.out_dim=256"]


def test_resume_equals_uninterrupted_then_export(tmp_path):
    """5 steps per epoch: the interrupted run stops mid-epoch 0 (step 3, last layer frozen) and resumes
    across the epoch boundary, where the last layer starts training."""
    a = train(build_config([*FAST, "--output-dir", str(tmp_path / "a"), "--max-steps", "7"]))
    train(build_config([*FAST, "--output-dir", str(tmp_path / "b"), "--max-steps", "3"]))
    b_ckpt = tmp_path / "b" / "digits_dino_sec_s0" / "last.pt"
    mid = checkpoint.load(str(b_ckpt))["model"]
    b = train(build_config([*FAST, "--output-dir", str(tmp_path / "b"), "--max-steps", "7", "--resume",
                            str(b_ckpt)]))
    assert a["step"] == b["step"] == 7
    a_ckpt = Path(a["run_dir"]) / "last.pt"
    pa, pb = checkpoint.load(str(a_ckpt))["model"], checkpoint.load(str(b_ckpt))["model"]
    assert pa.keys() == pb.keys() and "method.center" in pa and "method.encoder.target.1.last_layer.weight_v" in pa
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6, msg=k)
    assert pa["method.center"].abs().sum() > 0 and not torch.equal(pa["method.center"], mid["method.center"])
    last = "method.encoder.online.1.last_layer.weight_v"
    assert not torch.equal(pa[last], mid[last])  # trained in epoch 1
    assert not torch.equal(pa["method.encoder.target.0.0.0.weight"], pa["method.encoder.online.0.0.0.weight"])

    meta = export(str(a_ckpt), str(tmp_path / "backbone.pt"))
    assert meta["method"] == "dino"
    state = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert state.keys() == load_pretrained(str(a_ckpt)).module.state_dict().keys()
    for k, v in state.items():
        torch.testing.assert_close(v, pa[f"method.backbone.{k}"], rtol=0, atol=0)
    teacher = load_pretrained(str(a_ckpt), part="momentum_backbone").module.state_dict()
    for k, v in teacher.items():
        torch.testing.assert_close(v, pa[f"method.encoder.target.0.{k}"], rtol=0, atol=0)


# ----------------------------------------------------------------------------- 2 ranks
def _centre_after_one_step(rank):
    import ssl_sphere.methods.dino  # noqa: F401, F811  (registers dino in this spawned worker)

    torch.manual_seed(0)  # the same weights on both ranks (DDP would broadcast them)
    m = build_model(make_cfg()).method
    bn_eval(m)
    x = views(2, batch=2 * B)
    m([v[rank * B:(rank + 1) * B] for v in x])  # this rank's half of the global batch
    return {"center": m.center.clone()}


def test_centre_all_reduced_over_two_ranks_equals_one_process_with_both_halves(tmp_path):
    res = _spawn(_centre_after_one_step, tmp_path)
    torch.manual_seed(0)
    m = build_model(make_cfg()).method
    bn_eval(m)
    x = views(2, batch=2 * B)
    before = m.center.clone()
    m(x)
    torch.testing.assert_close(res["center"], m.center, rtol=1e-5, atol=1e-7)
    m.center.copy_(before)
    m([v[:B] for v in x])  # rank 0's half alone: another centre (the test sees a missing all-reduce)
    assert not torch.allclose(res["center"], m.center, atol=1e-5)
