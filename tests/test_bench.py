"""Smoke tests for the benchmark harness (benchmarks/bench.py): tiny settings, schema and
positive numbers only -- no timing assertions."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from .conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # bench.py imports its sibling reference_pipelines.py
import bench  # noqa: E402

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
    assert set(res["views_per_s"]) == {"ssl_sphere", "ssl_sphere_yiq", "kornia_stock", "torchvision_cpu"}
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


EMA_METHODS = {"moco", "byol", "mocov3", "dino"}  # an EMA copy of the backbone: the backbone + EMA forward floor


def test_step_accepts_every_registered_method():
    """`step --method` takes the registry's names, not a hand list; each has a lightly reference pipeline."""
    from reference_pipelines import LIGHTLY_METHODS

    from ssl_sphere.methods import names

    step = next(a for a in bench.build_parser()._subparsers._group_actions[0].choices["step"]._actions
                if a.dest == "method")
    assert list(step.choices) == names() and set(LIGHTLY_METHODS) == set(names())


@pytest.mark.parametrize("method", bench.method_names())
def test_step_every_method_against_lightly(capsys, method):
    """Every method's ssl_sphere step and lightly's reference pipeline run one step at toy size."""
    bench.main(["step", "--method", method, "--backbone", "tiny", "--batch", "8", "--steps", "1", "--json",
                "--data", "random", "--compare-lightly", "--workers", "0", *FAST]
               + (["method.queue_size=64"] if method in ("moco", "nnclr") else []))
    res = _last_json(capsys.readouterr().out)
    assert res["method"] == method and res["backbone"] == "tiny"
    assert set(res["views_per_s"]) == {"ssl_sphere", "backbone_only", "lightly"} | (
        {"backbone_plus_ema_fwd"} if method in EMA_METHODS else set())
    _positive(res["views_per_s"])
    assert res["speedup_vs_lightly"] > 0 and ("ratio_vs_ema_floor" in res) == (method in EMA_METHODS)


def test_lightly_dino_pipeline_takes_local_crops(capsys):
    """DINO with multi-crop: lightly's DINOTransform makes the local crops, its step takes them (the local
    crops through the student only), and the backbone-only baseline takes every view."""
    bench.main(["step", "--method", "dino", "--backbone", "tiny", "--batch", "4", "--steps", "1", "--json",
                "--data", "random", "--compare-lightly", "--workers", "0", *FAST, "aug.local_crops=2"])
    _positive(_last_json(capsys.readouterr().out)["views_per_s"])


@pytest.mark.parametrize("size", [32, 224])
def test_lightly_dino_transform_has_our_parameters(size):
    """lightly's DINOTransform with our DINO aug config: every view gets our jitter strengths (its second
    global view ignores cj_strength, so strength 0.5 with doubled strengths), our crop scales and sizes,
    and 2 global + 6 local views."""
    from reference_pipelines import lightly_view_transform, to_pil

    a = bench.dino_aug_cfg(size, 6)
    tf = lightly_view_transform("dino", a, size, bench.CIFAR_MEAN, bench.CIFAR_STD)
    assert len(tf.transforms) == 8
    for i, view in enumerate(tf.transforms):
        ops = view.transform.transforms
        crop = next(o for o in ops if type(o).__name__ == "RandomResizedCrop")
        assert crop.size == ((size, size) if i < 2 else (a.local_size, a.local_size))
        assert crop.scale == tuple(a.crop_scale if i < 2 else a.local_crop_scale)
        jitter = next(o for o in ops if type(o).__name__ == "RandomApply").transforms[0]
        assert jitter.brightness == pytest.approx((1 - a.brightness, 1 + a.brightness))
        assert jitter.saturation == pytest.approx((1 - a.saturation, 1 + a.saturation))
        assert jitter.hue == pytest.approx((-a.hue, a.hue))
    views = tf(to_pil(bench.random_images(1, size))[0])
    assert [v.shape[-1] for v in views] == [size] * 2 + [a.local_size] * 6
    assert a.local_size == round(size * 96 / 224)


def test_multicrop_json_schema(capsys, tmp_path):
    """`bench.py multicrop` at toy size: views/s of 2 global + N local crops for both pipelines, one JSON line
    per size, and a record of kind multicrop."""
    out_file = tmp_path / "mc.json"
    bench.main(["multicrop", "--sizes", "16,72", "--local-crops", "2", "--batch", "4", "--repeats", "1", "--json",
                "--data", "random", "--out", str(out_file), *FAST])
    lines = [json.loads(s) for s in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert [r["image_size"] for r in lines] == [16, 72] and [r["local_size"] for r in lines] == [7, 31]
    for r in lines:
        assert set(r) == {"device", "image_size", "local_size", "local_crops", "batch", "views_per_s"}
        assert r["local_crops"] == 2 and r["batch"] == 4
        assert set(r["views_per_s"]) == {"ssl_sphere", "lightly_dino_cpu"}
        _positive(r["views_per_s"])
    rec = json.loads(out_file.read_text())
    assert rec["kind"] == "multicrop" and rec["results"] == lines and rec["command"].startswith(
        "python benchmarks/bench.py multicrop")
    assert rec["details"][1]["blur_p"] == [1.0, 0.1, 0.5] and rec["details"][0]["solarize_p"] == [0.0, 0.2, 0.0]


def test_cli_entry_point_help():
    """`python benchmarks/bench.py` is runnable from anywhere; the sub-commands are listed."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--help"], capture_output=True,
                         text=True, timeout=60, cwd="/")
    assert out.returncode == 0 and "augment" in out.stdout and "step" in out.stdout


def load_make_table():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_table", REPO / "benchmarks" / "make_table.py")
    mt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mt)
    return mt


def test_make_table_renders_records_into_marked_pages(tmp_path, monkeypatch):
    """benchmarks/make_table.py: every number comes from a record; --write fills the marked block
    of each target page (cpu_ and gpu_ records into their own markers) and leaves the rest."""
    mt = load_make_table()
    assert mt.TARGETS == (REPO / "docs" / "benchmarks" / "performance.md",)  # the docs page, not a README
    results = tmp_path / "results"
    results.mkdir()
    rec = {"kind": "augment", "command": "python benchmarks/bench.py augment --sizes 32",
           "machine": {"cpu": "TestCPU", "cores": 2, "torch_threads": 2},
           "versions": {"torch": "t", "torchvision": "tv", "kornia": "k", "lightly": "l"},
           "env": {"MALLOC_TRIM_THRESHOLD_": "7"}, "load_avg_start": [0.1, 0, 0], "load_avg_end": [0.2, 0, 0],
           "results": [{"device": "cpu", "image_size": 32, "batch": 256,
                        "views_per_s": {"ssl_sphere": 123456.7, "kornia_stock": 1000.0, "torchvision_cpu": 500.0}}]}
    (results / "cpu_augment.json").write_text(json.dumps(rec))
    (results / "gpu_augment.json").write_text(json.dumps(dict(rec, machine=dict(rec["machine"], cpu="GPUBOX"))))
    a, b = tmp_path / "a.md", tmp_path / "b.md"
    start, end = mt.markers("cpu_")
    gstart, gend = mt.markers("gpu_")
    a.write_text(f"intro\n{start}\nold\n{end}\noutro\n{gstart}\nkeep\n{gend}\n")
    b.write_text("no markers here\n")
    monkeypatch.setattr(mt, "RESULTS", results)
    monkeypatch.setattr(mt, "TARGETS", (a, b))

    assert mt.main(["--write"]) == 0
    text = a.read_text()
    assert text.startswith("intro\n") and "outro" in text and "old" not in text and "keep" in text
    assert "123,456.7" in text and "123.5x" in text and "246.9x" in text and "TestCPU" in text
    assert "MALLOC_TRIM_THRESHOLD_=7 python benchmarks/bench.py augment --sizes 32" in text
    assert "GPUBOX" not in text and b.read_text() == "no markers here\n"
    assert mt.main(["--write", "--prefix", "gpu_"]) == 0
    assert "GPUBOX" in a.read_text() and "keep" not in a.read_text()
    monkeypatch.setattr(mt, "TARGETS", (b,))
    assert mt.main(["--write"]) == 1  # no target has the markers: an error, not silence


def test_make_table_renders_multicrop_records_between_their_own_markers(tmp_path, monkeypatch):
    """--multicrop: the multicrop records (and only they) become their own table between
    <!-- multicrop-table:start/end -->; the performance table leaves them out."""
    mt = load_make_table()
    results = tmp_path / "results"
    results.mkdir()
    base = {"machine": {"cpu": "TestCPU", "cores": 2, "torch_threads": 2},
            "versions": {"torch": "t", "torchvision": "tv", "kornia": "k", "lightly": "l"},
            "load_avg_start": [0.1, 0, 0], "load_avg_end": [0.3, 0, 0]}
    mc = dict(base, kind="multicrop", command="python benchmarks/bench.py multicrop --sizes 32,224",
              results=[{"device": "cpu", "image_size": 32, "local_size": 14, "local_crops": 6, "batch": 256,
                        "views_per_s": {"ssl_sphere": 43210.0, "lightly_dino_cpu": 1234.5}},
                       {"device": "cpu", "image_size": 224, "local_size": 96, "local_crops": 6, "batch": 256,
                        "views_per_s": {"ssl_sphere": 800.0, "lightly_dino_cpu": 400.0}}])
    aug = dict(base, kind="augment", command="python benchmarks/bench.py augment --sizes 32",
               machine=dict(base["machine"], cpu="AugCPU"),
               results=[{"device": "cpu", "image_size": 32, "batch": 256, "views_per_s": {"ssl_sphere": 1.0}}])
    (results / "cpu_multicrop.json").write_text(json.dumps(mc))
    (results / "cpu_augment.json").write_text(json.dumps(aug))
    page = tmp_path / "p.md"
    start, end = mt.multicrop_markers("cpu_")
    pstart, pend = mt.markers("cpu_")
    page.write_text(f"intro\n{start}\nold\n{end}\nmiddle\n{pstart}\nkeep\n{pend}\n")
    monkeypatch.setattr(mt, "RESULTS", results)
    monkeypatch.setattr(mt, "TARGETS", (page,))

    assert mt.main(["--multicrop", "--write"]) == 0
    text = page.read_text()
    assert "old" not in text and "keep" in text and "middle" in text
    block = text[text.index(start):text.index(end)]
    assert "| `cpu_multicrop.json` | 2 | 32 | 14 | 6 | 256 | 43,210.0 | 1,234.5 | 35.0x | 0.1 → 0.3 |" in block
    assert "| `cpu_multicrop.json` | 2 | 224 | 96 | 6 | 256 | 800.0 | 400.0 | 2.0x | 0.1 → 0.3 |" in block
    assert "python benchmarks/bench.py multicrop --sizes 32,224" in block and "TestCPU" in block
    assert "AugCPU" not in block and "augment --sizes" not in block
    assert mt.main(["--write"]) == 0  # the performance table: the augment record, not the multicrop one
    perf = page.read_text()
    perf = perf[perf.index(pstart):perf.index(pend)]
    assert "AugCPU" in perf and "multicrop" not in perf
    monkeypatch.setattr(mt, "TARGETS", (tmp_path / "none.md",))
    (tmp_path / "none.md").write_text("no markers\n")
    assert mt.main(["--multicrop", "--write"]) == 1  # no target has the markers: an error, not silence


def test_committed_multicrop_record_renders_and_matches():
    """benchmarks/results holds a multicrop record and docs/benchmarks/performance.md holds exactly what
    the multicrop records render to, between their own markers."""
    mt = load_make_table()
    assert mt.load("cpu_", kinds=("multicrop",)), "run `python benchmarks/bench.py multicrop ... --out " \
        "benchmarks/results/cpu_multicrop.json`"
    table = mt.render_multicrop("cpu_")
    assert "lightly DINOTransform views/s" in table
    start, end = mt.multicrop_markers("cpu_")
    page = (REPO / "docs" / "benchmarks" / "performance.md").read_text()
    block = page[page.index(start) + len(start):page.index(end)]
    assert block.strip() == table.strip(), "run `python benchmarks/make_table.py --multicrop --write`"


QUALITY_MORE = "quality_vs_lightly_cpu_more_methods.json"  # the five methods of issue 19


def test_committed_quality_record_of_the_new_methods_renders_and_matches():
    """The quality record of simsiam, mocov3, nnclr, dino and swav: both libraries, 3 seeds each, and
    docs/benchmarks/quality.md holds exactly the block quality_vs_lightly.py renders from it."""
    import quality_vs_lightly as q

    path = REPO / "benchmarks" / "results" / QUALITY_MORE
    rec = json.loads(path.read_text())
    for method in ("simsiam", "mocov3", "nnclr", "dino", "swav"):
        for library in ("ssl_sphere", "lightly"):
            seeds = sorted(r["seed"] for r in rec["rows"] if r["method"] == method and r["library"] == library)
            assert seeds == [0, 1, 2], (method, library, seeds)
    text = q.block(str(path))
    assert [line.split(" |")[0] for line in text.splitlines()[2:8]] == [
        "| random init", "| simsiam", "| mocov3", "| nnclr", "| dino", "| swav"]
    start, end = q.block_markers(str(path))
    page = (REPO / "docs" / "benchmarks" / "quality.md").read_text()
    assert page[page.index(start) + len(start):page.index(end)].strip() == text.strip(), \
        f"run `python benchmarks/quality_vs_lightly.py --table-only benchmarks/results/{QUALITY_MORE} " \
        "--write docs/benchmarks/quality.md`"


def test_quality_table_lists_the_methods_of_its_rows():
    """quality_vs_lightly.table: the random network, then every method present, in the registry's order."""
    import quality_vs_lightly as q

    rows = [{"library": lib, "method": m, "seed": s, "knn_top1": 30.0 + s}
            for lib in ("ssl_sphere", "lightly") for m in ("swav", "simsiam") for s in (0, 1)]
    lines = q.table(rows).splitlines()
    assert lines[2] == "| random init | – | – |"
    assert lines[3].startswith("| simsiam | 30.50 ± 0.71 (n=2)") and lines[4].startswith("| swav |")
    assert len(lines) == 5


def test_step_recipe_config_is_the_base(capsys):
    """--config: the recipe's batch / queue / heads are used unless a flag overrides them."""
    cfg = bench.step_config(bench.build_parser().parse_args(
        ["step", "--method", "moco", "--config", str(REPO / "configs/cifar10/moco_sec.yaml"), "--data", "random"]))
    assert cfg.optim.batch_size == 512 and cfg.model.backbone == "resnet18" and cfg.sec.enabled
    assert cfg.method.queue_size == 4096
    cfg = bench.step_config(bench.build_parser().parse_args(
        ["step", "--method", "moco", "--config", str(REPO / "configs/cifar10/moco.yaml"), "--batch", "8",
         "--backbone", "tiny", "method.queue_size=64"]))
    assert (cfg.optim.batch_size, cfg.model.backbone, cfg.method.queue_size) == (8, "tiny", 64)
    cfg = bench.step_config(bench.build_parser().parse_args(["step", "--method", "byol"]))
    assert (cfg.optim.batch_size, cfg.model.backbone) == (128, "resnet18")  # no recipe: the harness defaults


@pytest.mark.parametrize("prefix", ["cpu_", "gpu_"])
def test_committed_records_render_and_the_docs_tables_are_current(prefix):
    """The records in benchmarks/results render (other scripts' records sharing the prefix, such
    as cpu_data_scale.json, are skipped), and docs/benchmarks/performance.md holds exactly what they
    render to, so no table there is typed by hand or left behind by a newer record."""
    mt = load_make_table()
    table = mt.render(prefix)
    assert "views/s" in table
    start, end = mt.markers(prefix)
    page = (REPO / "docs" / "benchmarks" / "performance.md").read_text()
    block = page[page.index(start) + len(start):page.index(end)]
    assert block.strip() == table.strip(), f"run `python benchmarks/make_table.py --prefix {prefix} --write`"


def test_make_table_renders_the_default_run_into_marked_pages(tmp_path, monkeypatch):
    """--default-run: the default run at several seeds (results/default_run_seeds.json) becomes a
    seed | start | end | gain | wall table plus min / median gain, machine, load and command,
    written between the default-run markers of README.md and docs/getting-started.md only."""
    mt = load_make_table()
    assert mt.DEFAULT_RUN_TARGETS == (REPO / "README.md", REPO / "docs" / "getting-started.md")
    results = tmp_path / "results"
    results.mkdir()
    rec = {"command": "python benchmarks/default_run_seeds.py",
           "run_command": "python -m ssl_sphere.pretrain --method moco --sec --seed S",
           "machine": {"cpu": "TestCPU", "threads": 2, "torch": "9.9.9"},
           "load_avg_start": [1.25, 0, 0], "load_avg_end": [2.5, 0, 0], "recorded": "2026-12-08",
           "runs": [{"seed": 0, "start_knn_top1": 62.5, "knn_top1": 61.944, "gain": -0.556, "wall_s": 75.31},
                    {"seed": 1, "start_knn_top1": 60.0, "knn_top1": 76.389, "gain": 16.389, "wall_s": 74.0}],
           "min_gain": -0.556, "median_gain": 7.9165}
    (results / mt.DEFAULT_RUN).write_text(json.dumps(rec))
    a, b = tmp_path / "a.md", tmp_path / "b.md"
    start, end = mt.DEFAULT_RUN_MARKERS
    a.write_text(f"intro\n{start}\nold\n{end}\noutro\n")
    b.write_text("no markers here\n")
    monkeypatch.setattr(mt, "RESULTS", results)
    monkeypatch.setattr(mt, "DEFAULT_RUN_TARGETS", (a, b))

    assert mt.main(["--default-run", "--write"]) == 0
    text = a.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "| seed | kNN top-1 at step 0 (%) | at the end (%) | gain (points) | wall s |" in text
    assert "| 0 | 62.50 | 61.94 | -0.56 | 75.3 |" in text and "| 1 | 60.00 | 76.39 | +16.39 | 74.0 |" in text
    assert "min -0.56, median +7.92" in text and "TestCPU, 2 threads, torch 9.9.9" in text
    assert "1.2 → 2.5" in text and "recorded 2026-12-08" in text
    assert "`python benchmarks/default_run_seeds.py`" in text
    assert "`python -m ssl_sphere.pretrain --method moco --sec --seed S`" in text
    assert b.read_text() == "no markers here\n"
    monkeypatch.setattr(mt, "DEFAULT_RUN_TARGETS", (b,))
    assert mt.main(["--default-run", "--write"]) == 1  # no target has the markers: an error, not silence
    # the README holds no performance table: the default run is the only one make_table writes there
    readme = (REPO / "README.md").read_text()
    assert all(mt.markers(p)[0] not in readme for p in ("cpu_", "gpu_"))


def test_committed_default_run_record_renders_and_matches():
    """benchmarks/results/default_run_seeds.json exists and README.md and docs/getting-started.md
    hold exactly what it renders to."""
    mt = load_make_table()
    assert (mt.RESULTS / mt.DEFAULT_RUN).is_file(), \
        "record missing: run `python benchmarks/default_run_seeds.py`, then `make_table.py --default-run --write`"
    table = mt.render_default_run()
    start, end = mt.DEFAULT_RUN_MARKERS
    for page in mt.DEFAULT_RUN_TARGETS:
        text = page.read_text()
        block = text[text.index(start) + len(start):text.index(end)]
        assert block.strip() == table.strip(), f"{page}: run `python benchmarks/make_table.py --default-run --write`"


def test_quality_vs_lightly_runs_both_libraries_and_appends(tmp_path, monkeypatch):
    """benchmarks/quality_vs_lightly.py at toy size: both libraries train and are scored the same
    way, rows are appended across invocations (no rerun of a row already there), and the record
    keeps every command that added rows."""
    import quality_vs_lightly as q

    from .conftest import make_image_folder

    monkeypatch.setenv("SSL_SPHERE_CACHE", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "folder", n_train=12, n_test=6, hw=(32, 32))
    out = tmp_path / "q.json"
    common = ["--data-root", str(root), "--steps", "1", "--batch", "8", "--train-size", "16", "--test-size", "8",
              "--workers", "0", "--methods", "simclr", "--out", str(out), "--work", str(tmp_path / "work")]
    assert q.main(common + ["--seeds", "0"]) == 0
    assert q.main(common + ["--seeds", "0", "1"]) == 0
    rec = json.loads(out.read_text())
    keys = [(r["library"], r["method"], r["seed"]) for r in rec["rows"]]
    assert sorted(keys) == sorted([(lib, m, s) for lib in ("ssl_sphere", "lightly")
                                   for m, s in (("random_init", 0), ("simclr", 0), ("simclr", 1))])
    assert all(0 <= r["knn_top1"] <= 100 for r in rec["rows"])
    assert len(rec["command"]) == 2 and rec["command"][1].endswith("--seeds 0 1")
    assert "| simclr |" in q.table(rec["rows"]) and "(n=2)" in q.table(rec["rows"])
