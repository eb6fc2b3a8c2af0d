"""Evaluation protocols against lightly and brute-force references: weighted kNN,
Recall@K, the linear probe, alignment / uniformity, feature extraction."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_sphere.data.splits import Split, stratified_subset
from ssl_sphere.evaluation.features import extract_features
from ssl_sphere.evaluation.protocols import (
    alignment_uniformity,
    knn_accuracy,
    knn_classify,
    knn_scores,
    linear_probe,
    recall_at_k,
    train_linear,
)


def clustered(n, d=32, c=10, noise=1.0, seed=0):
    """n points around c fixed Gaussian centres (the same centres for every seed)."""
    centers = torch.randn(c, d, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    return centers[y] + noise * torch.randn(n, d, generator=g), y


# ----------------------------------------------------------------------------- kNN
def lightly_knn_predict():
    """lightly's knn_predict, loaded from its file: importing lightly.utils.benchmarking
    pulls in pytorch_lightning (10-20 s on a busy 2-core machine)."""
    import importlib.util
    from pathlib import Path

    import lightly.utils

    path = Path(lightly.utils.__file__).parent / "benchmarking" / "knn.py"
    if not path.is_file():  # another lightly layout
        from lightly.utils.benchmarking import knn_predict

        return knn_predict
    spec = importlib.util.spec_from_file_location("_lightly_knn", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.knn_predict


def test_knn_matches_lightly_knn_predict():
    knn_predict = lightly_knn_predict()
    xb, yb = clustered(2000, noise=1.5, seed=0)
    xq, _ = clustered(300, noise=1.5, seed=1)
    for k, t in ((200, 0.1), (20, 0.5), (1, 0.1)):
        ours = knn_classify(xb, yb, xq, k=k, temperature=t, num_classes=10, topk=3)
        ref = knn_predict(F.normalize(xq, dim=1), F.normalize(xb, dim=1).T, yb, num_classes=10, knn_k=k, knn_t=t)
        assert torch.equal(ours[:, 0], ref[:, 0]), (k, t)
        # the ranking agrees wherever it is defined (classes without votes tie at 0 in any order)
        voted = knn_scores(xb, yb, xq, k=k, temperature=t, num_classes=10).gather(1, ours) > 0
        assert torch.equal(ours[voted], ref[:, :3][voted]), (k, t)
    # chunking does not change the scores
    s1 = knn_scores(xb, yb, xq, num_classes=10, chunk_size=7)
    s2 = knn_scores(xb, yb, xq, num_classes=10, chunk_size=10_000)
    torch.testing.assert_close(s1, s2)


def test_knn_equals_brute_force_loop():
    xb, yb = clustered(150, d=8, c=7, noise=2.0, seed=2)
    xq, _ = clustered(40, d=8, c=7, noise=2.0, seed=3)
    k, t = 60, 0.2
    pred5 = knn_classify(xb, yb, xq, k=k, temperature=t, num_classes=7, topk=5)
    pred1 = knn_classify(xb, yb, xq, k=k, temperature=t, num_classes=7)
    for i in range(xq.shape[0]):
        sims = []
        for j in range(xb.shape[0]):
            a, b = xq[i].double(), xb[j].double()
            sims.append((float(a @ b / (a.norm() * b.norm())), j))
        sims.sort(reverse=True)
        votes = [0.0] * 7
        for s, j in sims[:k]:
            votes[int(yb[j])] += math.exp(s / t)
        ranking = sorted(range(7), key=lambda c: -votes[c])
        assert pred1[i].item() == ranking[0]
        m = min(5, sum(v > 0 for v in votes))  # classes without votes tie at 0 in any order
        assert m >= 3 and pred5[i].tolist()[:m] == ranking[:m], i


def test_knn_accuracy_separable_and_k_larger_than_bank():
    xb, yb = clustered(200, noise=0.1)
    xq, yq = clustered(50, noise=0.1, seed=5)
    res = knn_accuracy(xb, yb, xq, yq, k=500)  # k is clipped to the bank size
    assert res["knn_top1"] > 95 and res["knn_top5"] == 100.0


def test_knn_memory_is_chunked():
    # the (queries x bank) block never exceeds chunk_size x N: with a tiny chunk the
    # peak temporary is small even though the full matrix would be large
    xb, yb = clustered(4000, d=16)
    xq, _ = clustered(1000, d=16, seed=9)
    s = knn_scores(xb, yb, xq, k=10, chunk_size=64)
    assert s.shape == (1000, 10)


# ----------------------------------------------------------------------------- Recall@K
def test_recall_at_k_equals_brute_force():
    x, y = clustered(120, d=6, c=5, noise=2.5, seed=4)
    ks = (1, 2, 4, 8)
    ours = recall_at_k(x, y, ks, chunk_size=17)
    xn = F.normalize(x.double(), dim=1)
    hits = {k: 0 for k in ks}
    for i in range(len(x)):
        others = sorted(((float(xn[i] @ xn[j]), j) for j in range(len(x)) if j != i), reverse=True)
        for k in ks:
            hits[k] += any(int(y[j]) == int(y[i]) for _, j in others[:k])
    for k in ks:
        assert ours[f"recall@{k}"] == pytest.approx(100.0 * hits[k] / len(x)), k
    vals = [ours[f"recall@{k}"] for k in ks]
    assert vals == sorted(vals)


def test_recall_excludes_the_query_itself():
    # every sample has a unique label: no neighbour can match -> 0, although each is its own nearest point
    x = torch.randn(30, 4)
    assert recall_at_k(x, torch.arange(30), (1, 8)) == {"recall@1": 0.0, "recall@8": 0.0}
    # duplicated points with the same label -> 100
    assert recall_at_k(torch.cat([x, x]), torch.arange(30).repeat(2), (1,))["recall@1"] == 100.0


# ----------------------------------------------------------------------------- linear probe
def test_linear_probe_separable_and_random_labels():
    x, y = clustered(2000, d=32, c=10, noise=0.5, seed=6)
    xt, yt = clustered(500, d=32, c=10, noise=0.5, seed=7)
    # shift/scale the features: standardisation makes this irrelevant
    x, xt = 100 + 50 * x, 100 + 50 * xt
    res = linear_probe(x, y, xt, yt, epochs=20)
    assert res["linear_top1"] > 95 and res["linear_top5"] > 99
    # the probe can fail: labels independent of the features give chance accuracy
    g = torch.Generator().manual_seed(0)
    bad = linear_probe(x, torch.randint(0, 10, (2000,), generator=g), xt,
                       torch.randint(0, 10, (500,), generator=g), epochs=20)
    assert bad["linear_top1"] < 20


def test_linear_probe_is_deterministic_and_seeded():
    x, y = clustered(600, d=16, c=5, noise=3.0, seed=8)
    xt, yt = clustered(300, d=16, c=5, noise=3.0, seed=9)
    a = linear_probe(x, y, xt, yt, epochs=5, batch_size=64, seed=1)
    b = linear_probe(x, y, xt, yt, epochs=5, batch_size=64, seed=1)
    assert a == b
    w1 = train_linear(x, y, 5, epochs=3, batch_size=64, seed=1).weight
    w2 = train_linear(x, y, 5, epochs=3, batch_size=64, seed=2).weight
    assert not torch.equal(w1, w2)


def test_train_linear_equals_torch_sgd():
    """train_linear is torch.optim.SGD on a zero-initialised nn.Linear with the per-step half cosine
    lr_t = lr (1 + cos(pi t / T)) / 2, weight decay on the weight only, the seeded permutations."""
    x, y = clustered(300, d=12, c=4, noise=1.0, seed=10)
    epochs, lr, wd, bs, seed = 3, 0.05, 1e-3, 64, 3
    layer = train_linear(x, y, 4, epochs=epochs, lr=lr, weight_decay=wd, batch_size=bs, seed=seed)
    w, b = layer.weight, layer.bias

    head = nn.Linear(12, 4)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD([{"params": [head.weight], "weight_decay": wd}, {"params": [head.bias], "weight_decay": 0}],
                          lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    total, step = epochs * math.ceil(300 / bs), 0
    for _ in range(epochs):
        perm = torch.randperm(300, generator=gen)
        for i in range(0, 300, bs):
            idx = perm[i:i + bs]
            for grp in opt.param_groups:
                grp["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            opt.zero_grad()
            F.cross_entropy(head(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
    torch.testing.assert_close(w, head.weight.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b, head.bias.detach(), rtol=1e-4, atol=1e-5)


def test_linear_probe_constant_feature_is_harmless():
    x, y = clustered(400, d=8, c=4, noise=0.3, seed=11)
    xt, yt = clustered(100, d=8, c=4, noise=0.3, seed=12)
    ref = linear_probe(x, y, xt, yt, epochs=10)
    x, xt = torch.cat([torch.zeros(400, 1), x], 1), torch.cat([torch.full((100, 1), 5.0), xt], 1)
    res = linear_probe(x, y, xt, yt, epochs=10)  # feature 0: dead on train (std 0), 5 on test
    assert res == ref and res["linear_top1"] > 90


# ----------------------------------------------------------------------------- alignment / uniformity
def test_alignment_uniformity_against_loops():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)
    alpha, t = 2, 2
    a, b = F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)
    align = sum(float((a[i] - b[i]).norm()) ** alpha for i in range(12)) / 12

    def lunif(v):
        vals = [math.exp(-t * float((v[i] - v[j]).norm()) ** 2) for i in range(12) for j in range(i + 1, 12)]
        return math.log(sum(vals) / len(vals))

    res = alignment_uniformity(z1, z2, alpha=alpha, t=t)
    assert res["alignment"] == pytest.approx(align, rel=1e-5)
    assert res["uniformity"] == pytest.approx((lunif(a) + lunif(b)) / 2, rel=1e-5)
    res3 = alignment_uniformity(z1, z2, alpha=1, t=1)
    assert res3["alignment"] == pytest.approx(sum(float((a[i] - b[i]).norm()) for i in range(12)) / 12, rel=1e-5)


def test_alignment_uniformity_extremes():
    z = torch.randn(64, 16)
    same = alignment_uniformity(z, 3 * z)  # identical directions: perfectly aligned
    assert same["alignment"] == pytest.approx(0.0, abs=1e-6)
    collapsed = alignment_uniformity(torch.ones(10, 4), torch.ones(10, 4))
    assert collapsed["uniformity"] == pytest.approx(0.0, abs=1e-6)  # all points equal: log(1)
    spread = alignment_uniformity(torch.randn(500, 128), torch.randn(500, 128))
    assert -4.1 < spread["uniformity"] < -3.7  # ~ -2t on a high-dimensional sphere


# ----------------------------------------------------------------------------- features / subsets
def test_extract_features_accepts_split_and_restores_mode():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.train()
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    tf = lambda x: x.float() / 255  # noqa: E731
    f1 = extract_features(net, images, 3, "cpu", tf)
    f2 = extract_features(net, Split(images, torch.zeros(10, dtype=torch.long)), 4, "cpu", tf)
    assert f1.shape == (10, 4) and f1.dtype == torch.float32
    torch.testing.assert_close(f1, f2)
    assert net.training  # mode restored; eval-mode BN used the running stats (batch-size independent)
    with torch.no_grad():
        net.eval()
        torch.testing.assert_close(f1, net(tf(images)))


def test_stratified_subset_is_balanced_and_deterministic():
    y = torch.arange(10).repeat_interleave(torch.tensor([50, 40, 30, 60, 50, 50, 50, 50, 50, 20]))
    a = stratified_subset(y, 100, seed=3)
    assert torch.equal(a, stratified_subset(y, 100, seed=3)) and len(a) == 100 == len(set(a.tolist()))
    assert torch.bincount(y[a], minlength=10).tolist() == [10] * 10
    assert not torch.equal(a, stratified_subset(y, 100, seed=4))
    assert torch.equal(stratified_subset(y, 10_000), torch.arange(len(y)))


def test_recall_at_k_past_n_minus_1():
    """K > N - 1 looks at every other sample: a query without any same-label sample is a miss at
    every K (it counted as a hit when the "no match" marker was N - 1)."""
    from ssl_sphere.evaluation.protocols import recall_at_k

    x = torch.randn(5, 8)
    assert recall_at_k(x, torch.arange(5), (1, 2, 4, 8)) == {"recall@1": 0.0, "recall@2": 0.0, "recall@4": 0.0,
                                                              "recall@8": 0.0}
    y = torch.tensor([0, 0, 1, 2, 3])  # only the two 0s have a match: 2 of 5 queries once K covers everyone
    assert recall_at_k(x, y, (4, 8, 100))["recall@8"] == pytest.approx(40.0)
    assert recall_at_k(x, y, (4, 8, 100))["recall@100"] == recall_at_k(x, y, (4,))["recall@4"] == pytest.approx(40.0)


# ----------------------------------------------------------------------------- collapse
def test_collapse_statistics_and_warnings():
    """Spread embeddings: std ~1, rank near min(N, D), no warning; a collapse to one point warns on
    the std and the rank, once per run; low code entropy warns."""
    from ssl_sphere.evaluation.monitor import CollapseMonitor, feature_stats
    from ssl_sphere.methods.base import StepOutput
    from ssl_sphere.sphere.stats import code_entropy, effective_rank, normalised_std

    g = torch.Generator().manual_seed(0)
    spread = torch.randn(512, 64, generator=g)
    assert normalised_std(spread).item() == pytest.approx(1.0, abs=0.05)
    assert effective_rank(spread).item() > 0.9 * 64
    collapsed = torch.randn(1, 64, generator=g).repeat(512, 1) + 1e-4 * torch.randn(512, 64, generator=g)
    assert normalised_std(collapsed).item() < 0.01 and effective_rank(collapsed).item() < 2
    assert code_entropy(torch.full((8, 10), 0.1)).item() == pytest.approx(1.0)
    assert code_entropy(F.one_hot(torch.zeros(8, dtype=torch.long), 10).float()).item() == pytest.approx(0.0, abs=1e-6)

    mon = CollapseMonitor()
    stats, warnings = mon(StepOutput(torch.tensor(0.0), spread), features=feature_stats(spread))
    assert not warnings and {"embedding_std", "embedding_rank", "feature_rank"} <= set(stats)
    stats, warnings = mon(StepOutput(torch.tensor(0.0), collapsed))
    assert len(warnings) == 2 and any("embedding_std" in w for w in warnings)
    assert any("embedding_rank_share" in w for w in warnings)
    assert mon(StepOutput(torch.tensor(0.0), collapsed))[1] == []  # once per run
    low = StepOutput(torch.tensor(0.0), spread, {"code_entropy": torch.tensor(0.05)})
    stats, warnings = mon(low)
    assert stats["code_entropy"] == pytest.approx(0.05) and len(warnings) == 1 and "code_entropy" in warnings[0]
