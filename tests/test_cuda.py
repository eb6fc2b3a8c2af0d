"""The CUDA code paths: bf16 autocast steps, channels_last, data on the device vs pinned
host batches, augmentation on CUDA equal to the CPU under the same random draws,
torch.compile, kNN / linear probe / feature extraction on CUDA, and a 2-step run
with checkpoint and exact resume on CUDA.

Every test here carries the ``cuda`` marker and skips with a reason on machines
without CUDA; on a GPU machine: ``python -m pytest -m cuda``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssl_sphere.augment.views import Augmenter
from ssl_sphere.cli.pretrain import build_config
from ssl_sphere.core import checkpoint
from ssl_sphere.data.batches import epoch_batches
from ssl_sphere.data.datasets import load_digits
from ssl_sphere.engine.optim import build_optimizer
from ssl_sphere.engine.step import TrainStep, place_images
from ssl_sphere.engine.train import train
from ssl_sphere.evaluation.features import extract_features
from ssl_sphere.evaluation.protocols import knn_scores, linear_probe
from ssl_sphere.models.ssl_model import build_model

from .conftest import requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]

CUDA = torch.device("cuda", 0)
FAST = ["run.progress=false", "method.proj_hidden_dim=64", "eval.every_epochs=0"]


def head(method):
    """The small predictor of BYOL for these tests (the other methods have none)."""
    return ["method.pred_hidden_dim=64"] if method == "byol" else []


def _cfg(*argv):
    return build_config(["--device", "cuda", *FAST, *argv])


def _step(cfg, images, mean, std, on_device=None):
    """The training loop's own step object on CUDA for cfg (as train() builds it)."""
    if on_device is not None:
        cfg.data.on_device = "yes" if on_device else "no"
    placed, dev_flag = place_images(images, cfg, CUDA)
    aug = Augmenter(cfg.aug, cfg.data.image_size, mean, std).to(CUDA)
    model = build_model(cfg, images.shape[0], CUDA)
    opt = build_optimizer(model, cfg.optim)
    if cfg.model.compile:
        model.method.backbone.compile()
    model.train()
    return TrainStep(model, model.method, opt, aug, placed, dev_flag, cfg, 100, 5, CUDA, 10), model


@pytest.fixture(scope="module")
def digits():
    return load_digits(32)


@pytest.mark.parametrize("method", ["simclr", "moco", "byol"])
def test_bf16_channels_last_step_each_method(digits, method):
    torch.manual_seed(0)
    cfg = _cfg("--method", method, "--sec", "--batch-size", "64", "run.precision=bf16", "model.channels_last=true",
               *head(method))
    step, model = _step(cfg, digits.train.images, digits.mean, digits.std)
    assert step.use_bf16 and step.on_device and step.images.device.type == "cuda"
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, idx in zip(range(3), epoch_batches(len(digits.train), 64, 0, 0)):
        loss, method_loss, logs, out, lr = step(i, idx)
    assert out.embeddings.dtype == torch.bfloat16  # the heads ran under autocast
    assert loss.dtype == torch.float32 and torch.isfinite(loss)  # losses upcast before normalising
    assert int(step.first_bad) == -1
    after = model.state_dict()
    for k, v in after.items():
        if v.is_floating_point():
            assert v.dtype == torch.float32 and torch.isfinite(v).all(), k  # master weights stay fp32
    assert not torch.equal(before["method.backbone.0.0.weight"], after["method.backbone.0.0.weight"])
    if method != "simclr":
        moved = [k for k in after if "encoder.target" in k and not torch.equal(before[k], after[k])]
        assert moved, "EMA target did not move"
    conv = model.method.backbone[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_equals_contiguous_fp32(digits):
    cfgs = [_cfg("--method", "simclr", "--batch-size", "32", "run.precision=fp32", f"model.channels_last={cl}")
            for cl in ("false", "true")]
    idx = torch.arange(32)
    losses = []
    for cfg in cfgs:
        torch.manual_seed(0)
        step, _ = _step(cfg, digits.train.images, digits.mean, digits.std)
        torch.cuda.manual_seed(1)
        losses.append(step(0, idx)[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=2e-3)


def test_on_device_and_pinned_batches_are_equal(digits):
    cfg = _cfg("--method", "moco", "--batch-size", "64")
    dev_step, _ = _step(cfg, digits.train.images, digits.mean, digits.std, on_device=True)
    host_step, _ = _step(cfg, digits.train.images, digits.mean, digits.std, on_device=False)
    assert dev_step.on_device and not host_step.on_device and host_step.images.is_pinned()
    idx = torch.randperm(len(digits.train))[:64]
    a = dev_step.batch(idx, idx.to(CUDA))
    b = host_step.batch(idx, idx.to(CUDA))
    assert a.device.type == b.device.type == "cuda" and torch.equal(a, b)
    assert torch.equal(b.cpu(), digits.train.images[idx])
    # and a whole training step runs from pinned host memory
    loss = host_step(0, idx)[0]
    assert torch.isfinite(loss)


@pytest.fixture
def host_draws(monkeypatch):
    """Make every random draw of ssl_sphere.augment come from one seeded CPU generator, moved to
    the requested device: the CPU and the CUDA pipeline then see identical parameters."""
    real_rand, real_randn, real_randint = torch.rand, torch.randn, torch.randint
    state = {}

    def seed(s):
        state["g"] = torch.Generator().manual_seed(s)

    def on(t, device):
        return t if device is None else t.to(device)

    def rand(*size, device=None, dtype=None, **kw):
        return on(real_rand(*size, generator=state["g"], dtype=dtype), device)

    def randn(*size, device=None, dtype=None, **kw):
        return on(real_randn(*size, generator=state["g"], dtype=dtype), device)

    def randint(*args, device=None, dtype=None, **kw):
        kw.pop("generator", None)
        return on(real_randint(*args, generator=state["g"], dtype=dtype or torch.long, **kw), device)

    monkeypatch.setattr(torch, "rand", rand)
    monkeypatch.setattr(torch, "randn", randn)
    monkeypatch.setattr(torch, "randint", randint)
    return seed


@pytest.mark.parametrize("method,size", [("simclr", 32), ("byol", 32), ("simclr", 96)])
def test_augment_cuda_equals_cpu_under_the_same_draws(host_draws, method, size):
    cfg = build_config(["--method", method, f"data.image_size={size}", *FAST, *head(method)])
    host_draws(3)
    x = torch.randint(0, 256, (16, 3, size, size), dtype=torch.uint8)
    out = {}
    for dev in ("cpu", "cuda"):
        aug = Augmenter(cfg.aug, size, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)).to(dev)
        host_draws(7)
        out[dev] = torch.cat(aug.views(x.to(dev))).cpu()
    diff = (out["cpu"] - out["cuda"]).abs()
    # solarisation (BYOL) flips pixels sitting on its threshold: allow a handful of such pixels
    assert (diff > 1e-3).float().mean() < 1e-4, diff.max()
    assert diff.median() < 1e-5


def test_eval_transform_and_features_cuda_match_cpu(digits):
    cfg = _cfg("--method", "simclr")
    torch.manual_seed(0)
    model = build_model(cfg, 0, torch.device("cpu"))
    aug = Augmenter(cfg.aug, 32, digits.mean, digits.std)
    x = digits.test.images[:200]
    f_cpu = extract_features(model.method, x, 64, torch.device("cpu"), aug.eval_transform)
    model.to(CUDA)
    f_gpu = extract_features(model.method, x, 64, CUDA, aug.to(CUDA).eval_transform)  # bf16 autocast on CUDA
    assert f_gpu.device.type == "cuda" and f_gpu.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(f_cpu, f_gpu.cpu(), dim=1)
    assert cos.min() > 0.99


def test_knn_and_linear_probe_on_cuda_match_cpu():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=g)
    ytr, yte = torch.randint(0, 5, (2000,), generator=g), torch.randint(0, 5, (300,), generator=g)
    xtr = centres[ytr] + 0.8 * torch.randn(2000, 32, generator=g)
    xte = centres[yte] + 0.8 * torch.randn(300, 32, generator=g)
    s_cpu = knn_scores(xtr, ytr, xte, 50, 0.1, 5)
    s_gpu = knn_scores(xtr.to(CUDA), ytr.to(CUDA), xte.to(CUDA), 50, 0.1, 5, chunk_size=64)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-4, atol=1e-4)
    p_cpu = linear_probe(xtr, ytr, xte, yte, epochs=20, num_classes=5)
    p_gpu = linear_probe(xtr, ytr, xte, yte, epochs=20, num_classes=5, device=CUDA)
    assert p_gpu["linear_top1"] == pytest.approx(p_cpu["linear_top1"], abs=1.0)
    assert p_gpu["linear_top1"] > 60


def test_compiled_step_matches_eager(digits):
    """torch.compile of the backbone (model.compile=true) gives the eager loss and trains."""
    idx = torch.arange(64)
    losses = []
    for compiled in ("false", "true"):
        cfg = _cfg("--method", "moco", "--batch-size", "64", "run.precision=fp32", f"model.compile={compiled}")
        torch.manual_seed(0)
        step, model = _step(cfg, digits.train.images, digits.mean, digits.std)
        torch.cuda.manual_seed(1)
        losses.append([step(i, idx)[0].item() for i in range(3)])
    assert losses[1] == pytest.approx(losses[0], rel=2e-3)


def test_two_step_run_with_exact_resume_on_cuda(tmp_path, monkeypatch):
    """2 steps in one go == 1 step + checkpoint + resume + 1 step, on CUDA with bf16 autocast
    (CUDA RNG state restored: the second step's augmentation draws are the same)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    common = ["--method", "moco", "--sec", "--batch-size", "128", "--epochs", "2", "eval.every_epochs=1",
              "eval.bank_size=300", "eval.test_size=100", "run.log_every=1"]
    a = train(_cfg("--output-dir", str(tmp_path / "a"), "--max-steps", "2", *common))
    train(_cfg("--output-dir", str(tmp_path / "b"), "--max-steps", "1", *common))
    b_dir = tmp_path / "b" / "digits_moco_sec_s0"
    b = train(_cfg("--output-dir", str(tmp_path / "b"), "--max-steps", "2", "--resume", str(b_dir / "last.pt"),
                   *common))
    assert a["step"] == b["step"] == 2 and 0 <= a["knn_top1"] <= 100
    ca, cb = checkpoint.load(str(Path(a["run_dir"]) / "last.pt")), checkpoint.load(str(b_dir / "last.pt"))
    assert "cuda" in ca["rng"]
    for k in ca["model"]:
        torch.testing.assert_close(ca["model"][k], cb["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    rows = [json.loads(x) for x in (b_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
