"""SEE geometry and training wiring; vMF loss, k-means refresh and the NPID special case."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_sphere.cli.pretrain import build_config
from ssl_sphere.config import ConfigError, resolve, structured
from ssl_sphere.methods.losses import see_negatives_loss
from ssl_sphere.models.ssl_model import build_model
from ssl_sphere.sphere.see import see_expand, see_select, simplex_centres
from ssl_sphere.sphere.vmf import VMF, spherical_kmeans, vmf_loss


@pytest.mark.parametrize("L, d", [(2, 1), (3, 2), (4, 3), (9, 8), (10, 32), (101, 128)])
def test_simplex_centres_unit_and_equiangular(L, d):
    m = simplex_centres(L, d, dtype=torch.float64)
    assert m.shape == (L, d)
    gram = m @ m.T
    torch.testing.assert_close(gram.diagonal(), torch.ones(L, dtype=torch.float64))
    off = gram[~torch.eye(L, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1.0 / (L - 1)))
    assert m.sum(0).norm() < 1e-6  # centred: the centroid of a regular simplex is the origin


def test_simplex_centres_rejects_too_few_dims():
    with pytest.raises(ValueError, match="d >= L - 1"):
        simplex_centres(10, 8)


@pytest.mark.parametrize("b, d, n", [(5, 10, 8), (7, 16, 3), (3, 130, 8), (4, 6, 4)])
def test_see_expand_geometry(b, d, n):
    torch.manual_seed(b * d + n)
    z = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=1).float()
    w = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=1).float()
    s = see_expand(z, w, n)
    assert s.shape == (b, n, d)
    torch.testing.assert_close(s.norm(dim=2), torch.ones(b, n), atol=1e-5, rtol=0)
    cos_w = (s * w[:, None]).sum(2)
    torch.testing.assert_close(cos_w, (z * w).sum(1, keepdim=True).expand(b, n), atol=1e-5, rtol=0)
    # the w-perp components of z and the n points form a regular (n+1)-simplex
    perp = lambda v: F.normalize(v - (v * w[:, None]).sum(-1, keepdim=True) * w[:, None], dim=-1)  # noqa: E731
    pts = torch.cat([perp(z[:, None]), perp(s)], 1)  # (b, n+1, d)
    gram = pts @ pts.transpose(1, 2)
    off = gram[:, ~torch.eye(n + 1, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1.0 / n), atol=1e-4, rtol=0)


def test_see_expand_parallel_z_has_no_nan_and_needs_dims():
    w = F.normalize(torch.randn(4, 12), dim=1)
    s = see_expand(w.clone(), w, 8)
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s, w[:, None].expand_as(s), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="n \\+ 2"):
        see_expand(w[:, :9], F.normalize(w[:, :9], dim=1), 8)


def test_see_select_topk():
    conf = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])
    assert sorted(see_select(conf, 0.4).tolist()) == [1, 3]
    assert see_select(conf, 0.0).numel() == 0


def _cfg(method, *extra):
    queue = ["method.queue_size=64"] if method == "moco" else []
    return build_config(["--method", method, "--batch-size", "8", *queue, "method.proj_hidden_dim=32", *extra])


@pytest.mark.parametrize("method", ["moco", "simclr"])
def test_see_adds_lambda_times_its_loss(method):
    import copy

    torch.manual_seed(0)
    cfg = _cfg(method, "--see", "see.fraction=1.0", "see.n=4")
    m = build_model(cfg).method
    m.set_progress(1.0)  # ramp at its end: every sample expanded
    m.eval()  # no enqueue, fixed BN statistics: both forwards see the same state
    plain = copy.deepcopy(m)
    plain.see = None
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    out = m([x1, x2])
    assert "see_loss" in out.logs and out.logs["see_loss"] > 0
    torch.testing.assert_close(out.loss.detach() - cfg.see.weight * out.logs["see_loss"],
                               plain([x1, x2]).loss.detach(), atol=1e-4, rtol=1e-4)
    m.set_progress(0.0)  # start of the ramp: nothing expanded, no SEE term
    assert "see_loss" not in m([x1, x2]).logs


def test_see_synthetic_points_are_detached_from_their_source():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(6, 12), dim=1).requires_grad_(True)
    w = F.normalize(torch.randn(6, 12), dim=1)
    s = see_expand(z.detach(), w, 4)
    assert not s.requires_grad
    # in SimCLR's auxiliary loss only the anchor view receives gradient
    from ssl_sphere.methods.losses import see_anchor_loss

    za = torch.randn(6, 128, requires_grad=True)
    zo = torch.randn(6, 128, requires_grad=True)
    see_anchor_loss(zo, za, 4, 1.0, 0.5).backward()
    assert zo.grad is None and za.grad is not None and za.grad.abs().sum() > 0


def test_see_moco_never_uses_own_instance_as_negative():
    """Two pairs, only the more confident one expanded, no queue: the expanded instance's
    own query must see none of its synthetic points (its CE term is 0: a single logit),
    the other query sees all n of them."""
    torch.manual_seed(0)
    cfg = _cfg("moco", "--see", "see.n=4")
    q, k = torch.randn(2, 128), torch.randn(2, 128)
    torch.manual_seed(1)  # see_expand completes its basis at random: replay the same draws below
    loss = see_negatives_loss(q, k, torch.zeros(0, 128), 4, 0.5, cfg.method.temperature)
    own = int(F.cosine_similarity(q, k, dim=1).argmax())
    other = 1 - own
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    torch.manual_seed(1)
    synth = see_expand(qn[[own]], kn[[own]], 4)[0]  # only the expanded pair's points are drawn
    t = cfg.method.temperature
    logits = torch.cat([(qn[other] @ kn[other])[None], qn[other] @ synth.T]) / t
    expected = -(logits[0] - torch.logsumexp(logits, 0)) / 2  # mean over the 2 queries; own term is 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.item() > 0


def test_see_rejected_for_byol():
    with pytest.raises(ConfigError, match="BYOL"):
        build_config(["--method", "byol", "--see"])


def test_see_needs_embedding_dim():
    with pytest.raises(ConfigError, match="see.n"):
        build_config(["--method", "moco", "--see", "see.n=200"])


def test_vmf_loss_equals_naive():
    torch.manual_seed(0)
    z, mu = torch.randn(7, 5), torch.randn(4, 5)
    y = torch.randint(0, 4, (7,))
    kappa = 10.0
    naive = 0.0
    for i in range(7):
        zi = z[i] / z[i].norm()
        logits = [kappa * float(zi @ (mu[c] / mu[c].norm())) for c in range(4)]
        naive += -(logits[y[i]] - math.log(sum(math.exp(v) for v in logits)))
    assert vmf_loss(z, mu, y, kappa).item() == pytest.approx(naive / 7, rel=1e-5)


def test_vmf_instance_level_reduces_to_npid():
    """k = dataset size, mu = memory bank of normalised features, labels = instance ids:
    the vMF loss is NPID's non-parametric softmax (Wu et al. 2018, Eq. 2) with tau = 1/kappa."""
    torch.manual_seed(1)
    n, d, tau = 20, 8, 0.07
    bank = F.normalize(torch.randn(n, d), dim=1)
    idx = torch.tensor([3, 11, 0, 19])
    f = torch.randn(4, d)
    npid = 0.0
    for row, i in enumerate(idx.tolist()):
        v = F.normalize(f[row], dim=0)
        p = torch.exp(bank[i] @ v / tau) / torch.exp(bank @ v / tau).sum()
        npid += -torch.log(p).item()
    assert vmf_loss(f, bank, idx, 1 / tau).item() == pytest.approx(npid / 4, rel=1e-4)


def test_spherical_kmeans_unit_means_valid_labels_and_recovers_clusters():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(5, 16), dim=1)
    truth = torch.arange(5).repeat_interleave(40)
    x = centres[truth] + 0.05 * torch.randn(200, 16)
    means, labels = spherical_kmeans(x, 5, seed=0)
    torch.testing.assert_close(means.norm(dim=1), torch.ones(5))
    assert labels.shape == (200,) and labels.min() >= 0 and labels.max() < 5
    # the clustering matches the truth up to a permutation
    for c in range(5):
        assert labels[truth == c].unique().numel() == 1
    assert labels.unique().numel() == 5
    m2, l2 = spherical_kmeans(x, 5, seed=0)
    assert torch.equal(l2, labels) and torch.equal(m2, means)


def test_vmf_module_refresh_and_state():
    torch.manual_seed(0)
    v = VMF(k=3, dim=4, n_train=10, kappa=10.0, weight=0.5)
    v.refresh(torch.randn(10, 4), seed=0)
    assert bool(v.initialised) and v.labels.max() < 3
    z = torch.randn(6, 4, requires_grad=True)
    term, logs = v(z, torch.tensor([0, 1, 2]))  # 2 views x 3 images
    expected = 0.5 * vmf_loss(z, v.means, v.labels[torch.tensor([0, 1, 2])].repeat(2), 10.0)
    torch.testing.assert_close(term, expected)
    term.backward()
    assert z.grad is not None
    w = VMF(k=3, dim=4, n_train=10, kappa=10.0, weight=0.5)
    w.load_state_dict(v.state_dict())
    assert torch.equal(w.labels, v.labels) and torch.equal(w.means, v.means)


def test_vmf_k_larger_than_dataset_is_clear():
    cfg = resolve(structured())
    cfg.vmf.enabled, cfg.vmf.k = True, 50
    with pytest.raises(ConfigError, match="vmf.k"):
        build_model(cfg, n_train=10)


@pytest.mark.parametrize("argv", [["--method", "moco", "--see", "--vmf"], ["--method", "simclr", "--see"],
                                  ["--method", "byol", "--vmf", "vmf.refresh_epochs=1", "method.pred_hidden_dim=64"]])
def test_see_and_vmf_train_end_to_end(tmp_path, argv):
    import json
    from pathlib import Path

    from ssl_sphere.core import checkpoint
    from ssl_sphere.engine.train import train

    cfg = build_config([*argv, "--output-dir", str(tmp_path), "--batch-size", "256", "--max-steps", "6",
                        "run.progress=false", "run.log_every=1", "eval.every_epochs=0", "method.proj_hidden_dim=64",
                        "vmf.k=20"])
    s = train(cfg)
    rows = [json.loads(x) for x in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows[1:])
    if "--see" in argv:
        assert "see_loss" in keys
    if "--vmf" in argv:
        assert "vmf_loss" in keys
        ck = checkpoint.load(str(Path(s["run_dir"]) / "last.pt"))
        assert bool(ck["model"]["vmf.initialised"]) and ck["model"]["vmf.labels"].shape == (1437,)
        assert ck["model"]["vmf.labels"].unique().numel() > 1


def test_see_progress_host_mirror_follows_state_dict():
    """SEE's ramp reads a host mirror of the checkpointed progress buffer (no device sync per
    step); loading a state_dict must replace the mirror with the loaded value."""
    cfg = _cfg("moco", "--see", "see.fraction=0.4")
    a, b = build_model(cfg).method, build_model(cfg).method
    a.after_step(0.75)
    assert a.see_fraction() == pytest.approx(0.3)
    b.set_progress(0.1)
    assert b.see_fraction() == pytest.approx(0.04)
    b.load_state_dict(a.state_dict())
    assert b.see_fraction() == pytest.approx(0.3)
    assert float(b.progress) == pytest.approx(0.75)
