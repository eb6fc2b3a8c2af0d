"""Smoke tests for the benchmark harness (ssl_sphere/bench.py): tiny settings, schema and
positive numbers only -- no timing assertions."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from ssl_sphere import bench

FAST = ["--threads", "1", "--warmup", "0"]


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _positive(values: dict) -> None:
    for k, v in values.items():
        assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (k, v)


def test_augment_json_schema(capsys, tmp_path):
    out_file = tmp_path / "aug.json"
    bench.main(["augment", "--sizes", "32", "--batch", "16", "--repeats", "1", "--json", "--out", str(out_file), *FAST])
    res = _last_json(capsys.readouterr().out)
    assert set(res) == {"device", "image_size", "batch", "views_per_s"}
    assert res["device"] == "cpu" or res["device"] == "cuda"
    assert res["image_size"] == 32 and res["batch"] == 16
    assert set(res["views_per_s"]) == {"ssl_sphere", "kornia_stock", "torchvision_cpu"}
    _positive(res["views_per_s"])
    rec = json.loads(out_file.read_text())
    assert rec["kind"] == "augment" and rec["results"] == [res]
    assert {"torch", "kornia", "lightly"} <= set(rec["versions"]) and rec["machine"]["cores"] >= 1


def test_augment_one_line_per_size_with_blur(capsys):
    """Sizes > 64 switch blur on (kornia's RandomGaussianBlur branch); one JSON line per size, in order."""
    bench.main(["augment", "--sizes", "16,72", "--batch", "4", "--repeats", "1", "--json", "--data", "random", *FAST])
    lines = [json.loads(s) for s in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert [r["image_size"] for r in lines] == [16, 72]
    for r in lines:
        _positive(r["views_per_s"])


@pytest.mark.parametrize("method", ["simclr", "moco", "byol"])
def test_step_json_schema(capsys, method):
    bench.main(["step", "--method", method, "--backbone", "tiny", "--batch", "8", "--steps", "1", "--json",
                "--data", "random", *FAST] + (["--sec"] if method == "moco" else []))
    res = _last_json(capsys.readouterr().out)
    assert {"device", "method", "backbone", "batch", "image_size", "views_per_s", "ratio", "versions"} <= set(res)
    assert res["method"] == method and res["backbone"] == "tiny" and res["batch"] == 8 and res["image_size"] == 32
    assert {"ssl_sphere", "backbone_only"} <= set(res["views_per_s"])
    assert ("backbone_plus_ema_fwd" in res["views_per_s"]) == (method != "simclr")
    _positive(res["views_per_s"])
    assert res["ratio"] > 0
    assert {"torch", "kornia", "lightly"} <= set(res["versions"])


def test_step_compare_lightly(capsys):
    bench.main(["step", "--method", "moco", "--backbone", "tiny", "--batch", "8", "--steps", "1", "--json",
                "--data", "random", "--compare-lightly", "--workers", "1", *FAST, "method.queue_size=64"])
    res = _last_json(capsys.readouterr().out)
    assert "lightly" in res["views_per_s"] and res["speedup_vs_lightly"] > 0
    _positive(res["views_per_s"])


def test_cli_entry_point_help():
    """`python -m ssl_sphere.bench` is runnable; the sub-commands are listed."""
    out = subprocess.run([sys.executable, "-m", "ssl_sphere.bench", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "augment" in out.stdout and "step" in out.stdout
