"""Tests for ssl_sphere/losses.py: NT-Xent, InfoNCE and the BYOL regression loss.

References: lightly 1.6 ``NTXentLoss`` (with and without memory bank) and naive
per-anchor Python loops written here from the papers' equations.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss

from ssl_sphere.methods.losses import byol_regression, info_nce, nt_xent

CASES = [(2, 3, 0.5), (5, 8, 0.1), (8, 16, 0.2), (7, 4, 1.0)]  # (B, D, T)


def _raw(b: int, d: int, seed: int) -> torch.Tensor:
    """Un-normalised float64 embeddings with row norms spread over ~[0.05, 20]."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, d, generator=g, dtype=torch.float64)
    scale = torch.exp(torch.empty(b, 1, dtype=torch.float64).uniform_(-3.0, 3.0, generator=g))
    return z * scale


def _naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """Chen et al. 2020 Eq. 1, one anchor at a time, in float64 Python arithmetic."""
    b = z1.shape[0]
    v = torch.cat([F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)]).tolist()

    def sim(a, c):
        return sum(x * y for x, y in zip(a, c))

    total = 0.0
    for i in range(2 * b):
        pos = (i + b) % (2 * b)
        den = sum(math.exp(sim(v[i], v[j]) / t) for j in range(2 * b) if j != i)
        total += -math.log(math.exp(sim(v[i], v[pos]) / t) / den)
    return total / (2 * b)


def _naive_info_nce(q: torch.Tensor, k: torch.Tensor, negs: torch.Tensor, t: float) -> float:
    """He et al. 2020 Eq. 1: -log softmax over [positive, negatives], mean over queries."""
    qn = F.normalize(q.double(), dim=1).tolist()
    kn = F.normalize(k.double(), dim=1).tolist()
    nn_ = F.normalize(negs.double(), dim=1).tolist()

    def sim(a, c):
        return sum(x * y for x, y in zip(a, c))

    total = 0.0
    for i in range(len(qn)):
        logits = [sim(qn[i], kn[i]) / t] + [sim(qn[i], n) / t for n in nn_]
        m = max(logits)
        lse = m + math.log(sum(math.exp(x - m) for x in logits))
        total += lse - logits[0]
    return total / len(qn)


# ----------------------------------------------------------------------------- NT-Xent


@pytest.mark.parametrize("b,d,t", CASES)
def test_nt_xent_matches_lightly_and_naive_loop(b, d, t):
    z1, z2 = _raw(b, d, 1), _raw(b, d, 2)
    ours = nt_xent(z1, z2, t)
    ref = NTXentLoss(temperature=t)(z1, z2)
    naive = _naive_nt_xent(z1, z2, t)
    assert ours.ndim == 0
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-5), (ours.item(), ref.item())
    assert ours.item() == pytest.approx(naive, rel=1e-5, abs=1e-5)


def test_nt_xent_naive_reference_is_sensitive():
    """Guard for the reference itself: swapping the pairing changes the loss."""
    z1, z2 = _raw(6, 8, 3), _raw(6, 8, 4)
    perm = torch.roll(torch.arange(6), 1)
    assert abs(_naive_nt_xent(z1, z2, 0.2) - _naive_nt_xent(z1, z2[perm], 0.2)) > 1e-3
    assert abs(nt_xent(z1, z2, 0.2).item() - nt_xent(z1, z2[perm], 0.2).item()) > 1e-3


@pytest.mark.parametrize("b,d,t", CASES)
def test_nt_xent_gradient_matches_lightly(b, d, t):
    a1, a2 = _raw(b, d, 5), _raw(b, d, 6)
    z1, z2 = a1.clone().requires_grad_(), a2.clone().requires_grad_()
    nt_xent(z1, z2, t).backward()
    r1, r2 = a1.clone().requires_grad_(), a2.clone().requires_grad_()
    NTXentLoss(temperature=t)(r1, r2).backward()
    assert z1.grad is not None and z2.grad is not None
    assert z1.grad.abs().max() > 0
    for g, rg in ((z1.grad, r1.grad), (z2.grad, r2.grad)):
        assert torch.allclose(g, rg, rtol=1e-4, atol=1e-6), (g - rg).abs().max()


def _fake_gather(local_halves, other_halves, rank):
    """Simulated all-gather for 2 ranks. nt_xent hands the gather its *normalised*
    local z1 or z2; we recognise which one it is and put it (with its grad) at
    position ``rank``, the other rank's matching (normalised) tensor at the other."""

    def gather(x):
        for local, other in zip(local_halves, other_halves):
            if x.shape == local.shape and torch.allclose(x.detach().double(), local.double(), atol=1e-6):
                parts = [other.to(x.dtype), other.to(x.dtype)]
                parts[rank] = x
                return torch.cat(parts, 0)
        raise AssertionError("gather called with an unexpected tensor")

    return gather


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_fake_two_rank_gather_equals_full_batch(t):
    b, d = 4, 6
    z1, z2 = _raw(2 * b, d, 7), _raw(2 * b, d, 8)
    full = nt_xent(z1, z2, t)
    halves1, halves2 = z1.split(b), z2.split(b)
    per_rank = []
    for r in range(2):
        o = 1 - r
        local = [F.normalize(halves1[r].float(), dim=1), F.normalize(halves2[r].float(), dim=1)]
        other = [F.normalize(halves1[o].float(), dim=1).detach(), F.normalize(halves2[o].float(), dim=1).detach()]
        l1 = halves1[r].clone().requires_grad_()
        l2 = halves2[r].clone().requires_grad_()
        loss = nt_xent(l1, l2, t, gather=_fake_gather(local, other, r), rank=r)
        loss.backward()  # the local tensors carry grad through the fake gather
        assert l1.grad is not None and l1.grad.abs().max() > 0
        per_rank.append(loss)
    avg = (per_rank[0] + per_rank[1]) / 2
    assert torch.allclose(avg, full, rtol=1e-5, atol=1e-6), (avg.item(), full.item())
    # each rank alone is a different number (the test would notice a rank mix-up)
    assert not torch.allclose(per_rank[0], per_rank[1], atol=1e-4)


def test_nt_xent_fake_gather_gradient_equals_full_batch():
    """With a gather whose remote parts also carry gradient (as lightly's GatherLayer
    all-reduces them), the sum of the per-rank losses / world has the full-batch gradient."""
    b, d, t = 3, 5, 0.3
    a1, a2 = _raw(2 * b, d, 9), _raw(2 * b, d, 10)
    z1, z2 = a1.clone().requires_grad_(), a2.clone().requires_grad_()
    nt_xent(z1, z2, t).backward()

    w1, w2 = a1.clone().requires_grad_(), a2.clone().requires_grad_()
    n1, n2 = F.normalize(w1.float(), dim=1), F.normalize(w2.float(), dim=1)
    total = 0.0
    for r in range(2):
        o = 1 - r
        sl, so = slice(r * b, (r + 1) * b), slice(o * b, (o + 1) * b)
        local = [n1[sl].detach(), n2[sl].detach()]
        other = [n1[so], n2[so]]  # remote parts keep their graph here
        total = total + nt_xent(w1[sl], w2[sl], t, gather=_fake_gather(local, other, r), rank=r) / 2
    total.backward()
    assert torch.allclose(w1.grad, z1.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(w2.grad, z2.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize("b,k,d,t", [(3, 5, 4, 0.1), (6, 17, 8, 0.2), (1, 1, 3, 0.5)])
def test_info_nce_matches_naive_loop(b, k, d, t):
    q, kk, negs = _raw(b, d, 11), _raw(b, d, 12), _raw(k, d, 13)
    ours = info_nce(q, kk, negs, t)
    assert ours.item() == pytest.approx(_naive_info_nce(q, kk, negs, t), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("b,k,d,t", [(4, 9, 6, 0.1), (8, 32, 16, 0.2)])
def test_info_nce_matches_lightly_memory_bank(b, k, d, t):
    q, kk, negs = _raw(b, d, 14), _raw(b, d, 15), _raw(k, d, 16)
    ref_fn = NTXentLoss(temperature=t, memory_bank_size=(k, d))
    ref_fn.memory_bank.bank = F.normalize(negs, dim=1)  # lightly stores unit (K, D) rows
    ref = ref_fn(q, kk)  # q has no grad: the bank is read but not updated
    ours = info_nce(q, kk, negs, t)
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-5), (ours.item(), ref.item())


def test_info_nce_gradient_matches_lightly_memory_bank():
    b, k, d, t = 5, 11, 7, 0.2
    aq, kk, negs = _raw(b, d, 17), _raw(b, d, 18), _raw(k, d, 19)
    q = aq.clone().requires_grad_()
    info_nce(q, kk, negs, t).backward()
    ref_fn = NTXentLoss(temperature=t, memory_bank_size=(k, d))
    ref_fn.memory_bank.bank = F.normalize(negs, dim=1)
    rq = aq.clone().requires_grad_()
    ref_fn(rq, kk).backward()
    assert q.grad.abs().max() > 0
    assert torch.allclose(q.grad, rq.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- BYOL


@pytest.mark.parametrize("b,d", [(1, 3), (6, 8), (10, 32)])
def test_byol_regression_matches_naive_loop(b, d):
    p, z = _raw(b, d, 20), _raw(b, d, 21)
    total = 0.0
    for i in range(b):
        pi, zi = p[i].tolist(), z[i].tolist()
        dot = sum(x * y for x, y in zip(pi, zi))
        cos = dot / (math.sqrt(sum(x * x for x in pi)) * math.sqrt(sum(y * y for y in zi)))
        total += 2 - 2 * cos
    assert byol_regression(p, z).item() == pytest.approx(total / b, rel=1e-5, abs=1e-6)


def test_byol_regression_extremes():
    p = _raw(4, 5, 22)
    assert byol_regression(p, 3.0 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_regression(p, -p).item() == pytest.approx(4.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_byol_regression_target_gets_no_gradient(dtype):
    p = _raw(5, 6, 23).to(dtype).requires_grad_()
    z = _raw(5, 6, 24).to(dtype).requires_grad_()
    byol_regression(p, z).backward()
    assert z.grad is None
    assert p.grad is not None and p.grad.abs().max() > 0


# ----------------------------------------------------------------------------- scale invariance


def _row_scales(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.empty(n, 1, dtype=torch.float64).uniform_(-2.5, 2.5, generator=g))


def test_losses_invariant_to_positive_row_rescaling():
    b, k, d = 6, 9, 8
    z1, z2, negs = _raw(b, d, 25), _raw(b, d, 26), _raw(k, d, 27)
    s1, s2, sn = _row_scales(b, 28), _row_scales(b, 29), _row_scales(k, 30)

    base = nt_xent(z1, z2, 0.2)
    assert torch.allclose(nt_xent(z1 * s1, z2 * s2, 0.2), base, rtol=1e-5, atol=1e-6)
    base = info_nce(z1, z2, negs, 0.2)
    assert torch.allclose(info_nce(z1 * s1, z2 * s2, negs * sn, 0.2), base, rtol=1e-5, atol=1e-6)
    base = byol_regression(z1, z2)
    assert torch.allclose(byol_regression(z1 * s1, z2 * s2), base, rtol=1e-5, atol=1e-6)
    # a sign flip is not a positive rescaling and does change the losses
    flip = torch.ones(b, 1, dtype=torch.float64)
    flip[0] = -1
    assert not torch.allclose(nt_xent(z1 * flip, z2, 0.2), nt_xent(z1, z2, 0.2), atol=1e-4)
    assert not torch.allclose(byol_regression(z1 * flip, z2), byol_regression(z1, z2), atol=1e-4)
