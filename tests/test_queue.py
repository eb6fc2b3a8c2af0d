"""Tests for ssl_sphere/queue.py: the MoCo negatives ring buffer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_sphere.methods.losses import info_nce
from ssl_sphere.methods.queue import NegativeQueue


def _keys(n: int, d: int, seed: int) -> torch.Tensor:
    """Raw keys with varied norms (the queue must normalise them)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.exp(torch.empty(n, 1).uniform_(-2, 2, generator=g))


def test_initial_state():
    torch.manual_seed(0)
    q = NegativeQueue(10, 3)
    assert q.keys.shape == (10, 3) and q.ptr.item() == 0 and q.ptr.dtype == torch.long
    assert torch.allclose(q.keys.norm(dim=1), torch.ones(10), atol=1e-6)
    assert {"keys", "ptr"} <= set(q.state_dict())


def test_fifo_wrap_around_size_not_multiple_of_batch():
    torch.manual_seed(0)
    q = NegativeQueue(10, 3)
    k = _keys(12, 3, 1)
    unit = F.normalize(k, dim=1)
    q.enqueue(k[0:4])
    assert q.ptr.item() == 4
    assert torch.allclose(q.keys[0:4], unit[0:4], atol=1e-6)
    q.enqueue(k[4:8])
    assert q.ptr.item() == 8
    q.enqueue(k[8:12])  # 8, 9 fill the end, 10, 11 wrap to slots 0, 1
    assert q.ptr.item() == 2
    expected = torch.cat([unit[10:12], unit[2:10]])
    assert torch.allclose(q.keys, expected, atol=1e-6)
    # the buffer holds exactly the last 10 keys: none dropped, oldest two overwritten
    held = {tuple(r) for r in q.keys.round(decimals=5).tolist()}
    assert held == {tuple(r) for r in unit[2:12].round(decimals=5).tolist()}


def test_exact_fill_and_batch_equal_to_size():
    q = NegativeQueue(8, 2)
    k = _keys(8, 2, 2)
    q.enqueue(k)
    assert q.ptr.item() == 0
    assert torch.allclose(q.keys, F.normalize(k, dim=1), atol=1e-6)
    q.enqueue(k[:3] * -1)
    assert q.ptr.item() == 3
    assert torch.allclose(q.keys[:3], -F.normalize(k[:3], dim=1), atol=1e-6)
    assert torch.allclose(q.keys[3:], F.normalize(k[3:], dim=1), atol=1e-6)


def test_keys_stored_normalised():
    q = NegativeQueue(6, 5)
    k = _keys(6, 5, 3) * 40.0
    q.enqueue(k)
    assert torch.allclose(q.keys.norm(dim=1), torch.ones(6), atol=1e-6)
    assert torch.allclose(q.keys, k / k.norm(dim=1, keepdim=True), atol=1e-6)


def test_wrong_dim_raises_value_error_naming_dim():
    q = NegativeQueue(16, 7)
    with pytest.raises(ValueError, match=r"dim 7") as exc:
        q.enqueue(torch.randn(4, 5))
    assert "(4, 5)" in str(exc.value)
    with pytest.raises(ValueError, match=r"dim 7"):
        q.enqueue(torch.randn(7))  # 1-D input
    assert q.ptr.item() == 0  # nothing was written


def test_batch_larger_than_queue_raises():
    q = NegativeQueue(4, 3)
    before = q.keys.clone()
    with pytest.raises(ValueError, match=r"5 keys.*size 4"):
        q.enqueue(torch.randn(5, 3))
    assert torch.equal(q.keys, before) and q.ptr.item() == 0


@pytest.mark.parametrize("size,dim", [(0, 3), (4, 0)])
def test_bad_construction_raises(size, dim):
    with pytest.raises(ValueError):
        NegativeQueue(size, dim)


def test_state_dict_round_trip():
    torch.manual_seed(1)
    a = NegativeQueue(10, 4)
    a.enqueue(_keys(4, 4, 4))
    a.enqueue(_keys(3, 4, 5))
    torch.manual_seed(2)
    b = NegativeQueue(10, 4)
    assert not torch.allclose(a.keys, b.keys)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.keys, b.keys) and a.ptr.item() == b.ptr.item() == 7
    for seed in (6, 7, 8):  # subsequent enqueues (through a wrap) behave identically
        k = _keys(4, 4, seed)
        a.enqueue(k)
        b.enqueue(k)
        assert torch.equal(a.keys, b.keys) and a.ptr.item() == b.ptr.item()
    assert a.ptr.item() == (7 + 12) % 10


def test_negatives_is_a_copy():
    q = NegativeQueue(8, 3)
    negs = q.negatives()
    snap = negs.clone()
    assert torch.equal(negs, q.keys)
    q.enqueue(_keys(5, 3, 9))
    assert torch.equal(negs, snap)
    assert not torch.equal(negs, q.keys)


def test_enqueue_before_backward_does_not_break_autograd():
    torch.manual_seed(3)
    q = NegativeQueue(12, 6)
    query = _keys(4, 6, 10).requires_grad_()
    key = _keys(4, 6, 11)
    loss = info_nce(query, key, q.negatives(), 0.2)
    # a loss that keeps the negatives themselves for backward (matmul saves them)
    loss2 = (query @ q.negatives().T).pow(2).sum()
    q.enqueue(key)  # in-place write into the queue before backward
    (loss + loss2).backward()
    assert query.grad is not None and torch.isfinite(query.grad).all() and query.grad.abs().max() > 0
