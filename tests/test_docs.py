"""The documentation: README.md and docs/ (a MkDocs site, mkdocs.yml).

- `mkdocs build --strict` passes: a broken link or anchor, a page missing from the nav or a
  warning from the API reference fails it (and the tests below check that these do fail);
- every ```python block of README.md and docs/**/*.md runs as written, unless the line just before
  its fence is `<!-- not-runnable: REASON -->` with a reason; snippets that load a checkpoint find
  the documented `runs/digits_moco_sec_s0/last.pt` (and `backbone.pt`) in their working directory;
- README.md stays short, keeps its two set-up commands first, and links only to files that exist;
  no page cites the team's internal notes;
- every table that a script renders from a committed record equals what it renders now.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import REPO

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?:python|py)[ \t]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
NOT_RUNNABLE = re.compile(r"^<!--\s*not-runnable:(?P<reason>.*?)-->$")
MARKER = re.compile(r"<!-- ([\w-]+):start -->")
SETUP = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 torchvision==0.29.1 && "
    "pip install -e . && python -m ssl_sphere.pretrain --method moco --sec",
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 torchvision==0.29.1 && "
    'pip install -e ".[dev]" && ruff check . && python -m pytest -q',
)


def load_script(path: Path):
    """A benchmark / eval script as a module (they import their siblings by plain name)."""
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"docs_test_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(path.parent))


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# ----------------------------------------------------------------------------- the site

def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    # `python -m`: the repository root (cwd) is on sys.path, so the config-reference hook imports this checkout
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))


def test_mkdocs_build_strict(tmp_path):
    """The site builds with --strict, and the generated pieces are in it: the configuration
    reference (from the config dataclasses, via the hook) and the API reference (mkdocstrings)."""
    out = mkdocs_build(REPO / "mkdocs.yml", tmp_path / "site")
    assert out.returncode == 0, f"mkdocs build --strict failed:\n{out.stdout}\n{out.stderr}"
    config_page = (tmp_path / "site" / "guide" / "configuration" / "index.html").read_text()
    assert "config-reference" not in config_page and "sec.weight" in config_page and "optim.base_lr" in config_page
    api_page = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "load_pretrained" in api_page and "spherical_kmeans" in api_page


@pytest.mark.parametrize("breakage", ["link", "anchor", "orphan"])
def test_mkdocs_build_strict_fails_on_a_broken_site(tmp_path, breakage):
    """The strict build is a real check: a link to a missing page, a link to a missing heading,
    and a page left out of the nav each fail it."""
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs, ignore=shutil.ignore_patterns("__pycache__"))
    index = docs / "index.md"
    if breakage == "link":
        index.write_text(index.read_text() + "\nSee [a page](no-such-page.md).\n")
    elif breakage == "anchor":
        index.write_text(index.read_text() + "\nSee [a section](getting-started.md#no-such-section).\n")
    else:
        (docs / "stray.md").write_text("# Not in the nav\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text(f"INHERIT: {REPO / 'mkdocs.yml'}\ndocs_dir: {docs}\n")
    out = mkdocs_build(config, tmp_path / "site")
    assert out.returncode != 0, f"a broken site ({breakage}) built:\n{out.stdout}\n{out.stderr}"


def load_hook():
    return load_script(DOCS / "hooks" / "config_reference.py")


def test_config_reference_has_every_key_with_its_default_and_comment():
    import dataclasses

    hook = load_hook()
    text = hook.reference()
    for name, cls in hook.sections():
        assert f"### `{name}`" in text
        for f in dataclasses.fields(cls):
            key = f"{name.split()[0]}.{f.name}"
            assert f"| `{key}` |" in text, f"{key} missing from the reference"
    row = next(line for line in text.splitlines() if line.startswith("| `sec.weight` |"))
    assert "`float`" in row and "`0.1`" in row and "eta" in row  # trailing comment of the field
    row = next(line for line in text.splitlines() if line.startswith("| `model.split_bn` |"))
    assert "BN statistics per group" in row  # comment lines above the field
    assert "Spherical embedding constraint" in text  # a class docstring as the section intro
    row = next(line for line in text.splitlines() if line.startswith("| `data.on_device` |"))
    assert row.count(" | ") == 3, "a '|' in a comment must not split the table cell"


# ----------------------------------------------------------------------------- snippets

def python_blocks(path: Path) -> list:
    """[(line, code, reason)] of the ```python blocks of a page; reason is None for a block that must
    run, else the text of the `<!-- not-runnable: REASON -->` comment on the line before the fence."""
    text = path.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip() if line > 1 else ""
        skip = NOT_RUNNABLE.match(before)
        reason = skip.group("reason").strip() if skip else None
        if skip and not reason:
            raise ValueError(f"{path}:{line}: a not-runnable marker needs a reason")
        blocks.append((line, textwrap.dedent(m.group("code")), reason))
    return blocks


def all_snippets() -> list:
    params = []
    for page in PAGES:
        for line, code, reason in python_blocks(page):
            marks = [pytest.mark.skip(reason=f"not runnable: {reason}")] if reason else []
            params.append(pytest.param(code, id=f"{rel(page)}:{line}", marks=marks))
    return params


SNIPPETS = all_snippets()

# what some snippets must produce beyond running: (a line the snippet holds, check of (namespace, stdout))
EXPECT = [
    ("print(p.arch, p.image_size, p.mean, p.std, features.shape)",
     lambda ns, out: "resnet18 32" in out and tuple(ns["features"].shape) == (8, ns["p"].feature_dim)),
    ('net.load_state_dict(torch.load("backbone.pt", weights_only=True), strict=True)',
     lambda ns, out: type(ns["net"]).__name__ == "ResNet"),
    ("features = p.module(p.preprocess(images))", lambda ns, out: ns["features"].shape[0] == 8),
]


@pytest.fixture(scope="module")
def documented_files(tmp_path_factory):
    """What the snippets expect in their working directory: a run at the documented path
    runs/digits_moco_sec_s0/ (1 step of MoCo + SEC with a ResNet-18, so that the torchvision snippet
    loads its export; kNN monitor on, on a small bank) and backbone.pt / backbone.json exported from
    it with the documented command."""
    import ssl_sphere

    root = tmp_path_factory.mktemp("documented")
    ssl_sphere.train(ssl_sphere.build_config([
        "--method", "moco", "--sec", "--backbone", "resnet18", "--batch-size", "16", "--max-steps", "1",
        "--output-dir", str(root / "runs"), "--run-name", "digits_moco_sec_s0", "run.progress=false",
        "eval.bank_size=64", "eval.test_size=32", "method.proj_hidden_dim=64"]))
    ckpt = root / "runs" / "digits_moco_sec_s0" / "last.pt"
    out = subprocess.run([sys.executable, "-m", "ssl_sphere.export", "--checkpoint", str(ckpt),
                          "--out", str(root / "backbone.pt")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return root


def run_snippet(code: str, name: str) -> dict:
    """Run a snippet as a script in the current directory, in a fresh namespace; returns it."""
    ns = {"__name__": "__main__"}
    exec(compile(code, name, "exec"), ns)
    return ns


@pytest.mark.parametrize("code", SNIPPETS)
def test_python_snippet_runs(code, documented_files, tmp_path, monkeypatch, capsys, request):
    (tmp_path / "runs").mkdir()  # a run a snippet starts goes here, next to the documented one
    (tmp_path / "runs" / "digits_moco_sec_s0").symlink_to(documented_files / "runs" / "digits_moco_sec_s0")
    for name in ("backbone.pt", "backbone.json"):
        (tmp_path / name).symlink_to(documented_files / name)
    monkeypatch.chdir(tmp_path)
    ns = run_snippet(code, request.node.callspec.id)
    out = capsys.readouterr().out
    for needle, check in EXPECT:
        if needle in code:
            assert check(ns, out), f"the snippet ran but did not give what the page says ({needle!r}):\n{out}"


def test_snippets_are_collected_and_checked():
    """The collection is not silently empty, and every expectation above still matches a snippet
    (a renamed snippet must not drop its check)."""
    ids = [p.id for p in SNIPPETS]
    assert any(i.startswith("README.md:") for i in ids) and sum(i.startswith("docs/") for i in ids) >= 5, ids
    codes = [p.values[0] for p in SNIPPETS]
    for needle, _ in EXPECT:
        assert any(needle in c for c in codes), f"no snippet contains {needle!r} any more"


def test_a_broken_snippet_fails_and_markers_need_a_reason(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n\n```python\nx = 1\n```\n\n<!-- not-runnable: needs a GPU -->\n```python\n"
                    "import cuda_only\n```\n\n<!-- not-runnable: -->\n```python\ny = 2\n```\n")
    with pytest.raises(ValueError, match="needs a reason"):
        python_blocks(page)
    page.write_text("<!-- not-runnable: needs a GPU -->\n```python\nimport cuda_only\n```\n\n"
                    "- in a list:\n\n  ```python\n  assert sum([1, 1]) == 3, 'broken'\n  ```\n")
    (_, _, reason), (_, code, none) = python_blocks(page)
    assert reason == "needs a GPU" and none is None
    with pytest.raises(AssertionError, match="broken"):
        run_snippet(code, "page.md:6")
    with pytest.raises(NameError):
        run_snippet("print(undefined_name)", "page.md")


# ----------------------------------------------------------------------------- README and pages

def test_readme_is_short_and_starts_with_the_two_setup_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    fences = re.findall(r"^```\w*\n(.*?)^```", text, re.S | re.M)
    assert [f.strip() for f in fences[:2]] == list(SETUP)
    # .ci/run runs the first line that matches this (its grep -E pattern): the test command
    assert re.search(r"^python3? -m venv .venv .*pytest.*$", text, re.M).group(0) == SETUP[1]


def test_no_page_cites_internal_notes():
    files = [p for p in DOCS.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    for path in [REPO / "README.md", *files, REPO / "mkdocs.yml", REPO / "benchmarks" / "README.md",
                 REPO / "eval" / "README.md"]:
        text = path.read_text()
        assert "DESIGN.md" not in text and "../shared" not in text, rel(path)


@pytest.mark.parametrize("page", ["README.md", "benchmarks/README.md", "eval/README.md"])
def test_readme_links_resolve(page):
    """Links of the READMEs (outside the MkDocs build) point at files that exist."""
    path = REPO / page
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        assert (path.parent / target.split("#", 1)[0]).resolve().exists(), f"{page}: broken link {target}"


# ----------------------------------------------------------------------------- tables from records

RESULTS = REPO / "benchmarks" / "results"


def block(text: str, tag: str) -> str:
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    assert start in text and end in text, f"markers of {tag} missing"
    return text[text.index(start) + len(start):text.index(end)].strip()


def marked_tables() -> dict:
    """{tag: [pages holding its markers]} over README.md and the docs."""
    found = {}
    for page in PAGES:
        for tag in MARKER.findall(page.read_text()):
            found.setdefault(tag, []).append(page)
    return found


CHECKED = {"performance-table", "performance-table-gpu", "default-run", "multicrop-table",  # tests/test_bench.py
           "quality-vs-lightly-cpu-more-methods",
           "quality-vs-lightly-cpu", "quality-vs-lightly-cpu-156", "sphere-study-cpu", "sphere-study-gpu",
           "data-scale", "sec-sweep", "split-bn"}  # below


def test_every_marked_table_has_a_check():
    assert set(marked_tables()) == CHECKED, "a new rendered table needs its check here or in test_bench.py"


@pytest.mark.parametrize("record", ["quality_vs_lightly_cpu.json", "quality_vs_lightly_cpu_156.json",
                                    "quality_vs_lightly_cpu_more_methods.json"])
def test_quality_tables_equal_their_records(record):
    q = load_script(REPO / "benchmarks" / "quality_vs_lightly.py")
    tag = re.fullmatch(r"<!-- (.+):start -->", q.block_markers(record)[0]).group(1)
    pages = marked_tables()[tag]
    want = q.block(str(RESULTS / record)).strip()
    for page in pages:
        assert block(page.read_text(), tag) == want, \
            f"{rel(page)}: run `python benchmarks/quality_vs_lightly.py --table-only benchmarks/results/{record} " \
            f"--write {' '.join(rel(p) for p in pages)}`"
    if record in ("quality_vs_lightly_cpu.json", "quality_vs_lightly_cpu_more_methods.json"):  # README's headline
        assert REPO / "README.md" in pages


@pytest.mark.parametrize("budget", ["cpu", "gpu"])
def test_sphere_study_tables_equal_their_records(budget):
    study = load_script(REPO / "eval" / "sphere_study.py")
    rows = json.loads((RESULTS / f"sphere_study_{budget}.json").read_text())
    page = DOCS / "benchmarks" / "hypersphere.md"
    assert block(page.read_text(), f"sphere-study-{budget}") == study.table(
        [r for r in rows if r["budget"] == budget]).strip()


def test_data_scale_tables_equal_their_record():
    ds = load_script(REPO / "benchmarks" / "data_scale.py")
    rec = json.loads((RESULTS / "cpu_data_scale.json").read_text())
    assert block((DOCS / "benchmarks" / "data-scale.md").read_text(), "data-scale") == ds.table(rec).strip()


def _sweep(name: str, key: str) -> dict:
    """{(setting, seed): knn} of a shell sweep's text output (lines `key=V seed=S knn_top1=X`)."""
    out = {}
    for line in (RESULTS / name).read_text().splitlines():
        m = re.fullmatch(rf"{key}=(\S+) seed=(\d+) knn_top1=(\S+)", line.strip())
        if m:
            out[(m.group(1), int(m.group(2)))] = m.group(3)
    return out


def test_sec_sweep_table_equals_its_output():
    runs = _sweep("sec_weight_digits.txt", "eta")
    etas = ["off", "0.01", "0.1", "1.0"]
    want = ["| eta | " + " | ".join(etas) + " |", "| --- |" + " --- |" * len(etas)]
    want += [f"| seed {s} | " + " | ".join(runs[(e, s)] for e in etas) + " |" for s in (0, 1)]
    assert block((DOCS / "benchmarks" / "hypersphere.md").read_text(), "sec-sweep") == "\n".join(want)


def test_split_bn_table_equals_its_output():
    runs = _sweep("split_bn_cifar.txt", "split_bn")
    want = ["| MoCo v2, tiny convnet, 156 steps | seed 0 | seed 1 | seed 2 | mean ± std |",
            "| --- | --- | --- | --- | --- |"]
    for splits, label in (("8", "split BN 8 + key shuffle (default)"), ("1", "plain BN (`model.split_bn=1`)")):
        xs = [float(runs[(splits, s)]) for s in (0, 1, 2)]
        want.append(f"| {label} | " + " | ".join(f"{x:.2f}" for x in xs)
                    + f" | {statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f} |")
    assert block((DOCS / "benchmarks" / "quality.md").read_text(), "split-bn") == "\n".join(want)
