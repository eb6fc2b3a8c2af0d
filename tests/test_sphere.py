"""Tests for ssl_sphere/sphere.py: SEC loss, its weight ramp, the EMA of the mean
norm, the stateful SEC module and the norm statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_sphere.sphere.sec import SEC, ema_update, sec_loss, sec_weight
from ssl_sphere.sphere.stats import norm_stats


def _raw(b: int, d: int, seed: int, spread: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, d, generator=g, dtype=torch.float64)
    return z * torch.exp(torch.empty(b, 1, dtype=torch.float64).uniform_(-spread, spread, generator=g))


def _row_norms(z: torch.Tensor) -> torch.Tensor:
    return z.double().pow(2).sum(1).sqrt()


# ----------------------------------------------------------------------------- sec_loss


@pytest.mark.parametrize("norm", [0.3, 1.0, 7.5])
def test_sec_loss_zero_for_equal_norms(norm):
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(16, 10, generator=g, dtype=torch.float64), dim=1) * norm
    assert sec_loss(z, torch.tensor(norm)).item() == pytest.approx(0.0, abs=1e-10)
    # ... but not against another target
    assert sec_loss(z, torch.tensor(norm + 0.5)).item() == pytest.approx(0.25, rel=1e-5)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sec_loss_formula(seed):
    z = _raw(12, 7, seed)
    mu = torch.tensor(1.3)
    expected = ((_row_norms(z) - 1.3) ** 2).mean().item()
    assert sec_loss(z, mu).item() == pytest.approx(expected, rel=1e-5)
    # with mu = the batch mean norm it is the (biased) variance of the norms
    n = _row_norms(z)
    assert sec_loss(z, n.mean()).item() == pytest.approx(n.var(unbiased=False).item(), rel=1e-5)


def test_sec_loss_treats_mu_as_constant():
    z = _raw(6, 4, 4).requires_grad_()
    mu = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    sec_loss(z, mu).backward()
    assert mu.grad is None
    assert z.grad is not None and z.grad.abs().max() > 0


def test_sec_gradient_step_is_radial_and_moves_norms_to_mu():
    z0 = _raw(20, 9, 5)
    mu = torch.tensor(1.0)
    z = z0.clone().requires_grad_()
    sec_loss(z, mu).backward()
    lr = 0.05
    with torch.no_grad():
        z1 = z0 - lr * z.grad
    cos = F.cosine_similarity(z1, z0, dim=1)
    assert torch.all((cos - 1).abs() < 1e-6), (cos - 1).abs().max()
    before, after = (_row_norms(z0) - 1.0).abs(), (_row_norms(z1) - 1.0).abs()
    assert torch.all(after < before)
    # the step is exactly radial: ||z1|| = ||z0|| - lr * 2 (||z0|| - mu) / B
    expected = _row_norms(z0) - lr * 2 * (_row_norms(z0) - 1.0) / z0.shape[0]
    assert torch.allclose(_row_norms(z1), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- weight and EMA


@pytest.mark.parametrize("progress,expected", [(-0.5, 0.0), (0.0, 0.0), (0.3, 0.06), (1.0, 0.2), (1.7, 0.2)])
def test_sec_weight_linear_ramp_clipped(progress, expected):
    assert sec_weight(0.2, "linear", progress) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("progress", [-1.0, 0.0, 0.4, 1.0, 3.0])
def test_sec_weight_none_is_constant(progress):
    assert sec_weight(0.2, "none", progress) == pytest.approx(0.2, abs=1e-12)


@pytest.mark.parametrize("rho", [0.1, 0.5, 0.9])
def test_ema_update_formula(rho):
    prev, batch = torch.tensor(2.0), torch.tensor(5.0)
    out = ema_update(prev, batch, rho)
    assert out.item() == pytest.approx((1 - rho) * 2.0 + rho * 5.0, rel=1e-6)


def test_ema_update_rho_one_is_batch_mean():
    assert ema_update(torch.tensor(3.0), torch.tensor(7.25), 1.0).item() == pytest.approx(7.25, abs=1e-7)


# ----------------------------------------------------------------------------- SEC module


def test_sec_module_batch_variant_uses_current_batch_mean():
    sec = SEC(weight=0.5, ema=1.0, ramp="linear").train()
    for seed in (6, 7):  # the second call must not remember the first batch
        z = _raw(10, 5, seed).float().requires_grad_()
        loss, logs = sec(z, progress=0.5)
        n = _row_norms(z.detach())
        assert logs["sec_mu"].item() == pytest.approx(n.mean().item(), rel=1e-5)
        raw = ((n - n.mean()) ** 2).mean().item()
        assert logs["sec_loss"].item() == pytest.approx(raw, rel=1e-4)
        assert logs["sec_weight"].item() == pytest.approx(0.25)
        assert loss.item() == pytest.approx(0.25 * raw, rel=1e-4)
        loss.backward()
        assert z.grad is not None and z.grad.abs().max() > 0


def test_sec_module_ema_variant():
    sec = SEC(weight=1.0, ema=0.5, ramp="none").train()
    assert not bool(sec.initialised)
    z1 = _raw(8, 6, 8).float()
    _, logs1 = sec(z1, progress=1.0)
    m1 = _row_norms(z1).mean().item()
    assert bool(sec.initialised)
    assert sec.mu.item() == pytest.approx(m1, rel=1e-5)  # first call: no zero-biased start
    assert logs1["sec_mu"].item() == pytest.approx(m1, rel=1e-5)

    z2 = _raw(8, 6, 9).float() * 3.0
    loss2, logs2 = sec(z2, progress=1.0)
    m2 = _row_norms(z2).mean().item()
    mu2 = 0.5 * m1 + 0.5 * m2
    assert abs(m2 - m1) > 0.1  # the batches really differ
    assert sec.mu.item() == pytest.approx(mu2, rel=1e-5)
    # the loss uses the EMA, not the batch mean
    assert loss2.item() == pytest.approx(((_row_norms(z2) - mu2) ** 2).mean().item(), rel=1e-4)


def test_sec_module_state_dict_round_trip():
    a = SEC(weight=0.1, ema=0.3).train()
    a(_raw(8, 4, 10).float(), progress=1.0)
    a(_raw(8, 4, 11).float(), progress=1.0)
    sd = a.state_dict()
    assert {"mu", "initialised"} <= set(sd)
    b = SEC(weight=0.1, ema=0.3)
    assert not bool(b.initialised) and b.mu.item() == 0.0
    b.load_state_dict(sd)
    assert b.mu.item() == a.mu.item() and bool(b.initialised)
    z = _raw(8, 4, 12).float()
    la, _ = a(z, progress=1.0)
    lb, _ = b(z, progress=1.0)
    assert la.item() == lb.item() and a.mu.item() == b.mu.item()


@pytest.mark.parametrize("ema", [0.5, 1.0])
def test_sec_module_eval_does_not_update_mu(ema):
    sec = SEC(weight=1.0, ema=ema, ramp="none").train()
    sec(_raw(8, 4, 13).float(), progress=1.0)
    mu, init = sec.mu.clone(), sec.initialised.clone()
    sec.eval()
    z = _raw(8, 4, 14).float() * 5.0
    loss, logs = sec(z, progress=1.0)
    assert sec.mu.item() == mu.item() and bool(sec.initialised) == bool(init)
    n = _row_norms(z)
    target = mu.item() if ema < 1.0 else n.mean().item()
    assert logs["sec_mu"].item() == pytest.approx(target, rel=1e-5)
    assert loss.item() == pytest.approx(((n - target) ** 2).mean().item(), rel=1e-4)


# ----------------------------------------------------------------------------- norm_stats


@pytest.mark.parametrize("seed", [15, 16])
def test_norm_stats_against_numpy(seed):
    z = _raw(33, 12, seed)
    s = norm_stats(z)
    n = np.linalg.norm(z.numpy(), axis=1)
    assert s["norm_mean"].item() == pytest.approx(float(n.mean()), rel=1e-5)
    assert s["norm_std"].item() == pytest.approx(float(n.std()), rel=1e-4)
    assert isinstance(s["norm_mean"], torch.Tensor) and s["norm_mean"].ndim == 0
