"""eval/sphere_study.py: cells run in order, --cells N runs only the next N missing ones and
appends them to the results file, --table-only prints every budget."""

import importlib.util
import json

from .conftest import REPO, make_image_folder


def load_study():
    spec = importlib.util.spec_from_file_location("ssl_sphere_sphere_study", REPO / "eval" / "sphere_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_todo_order_and_skips_done_cells():
    study = load_study()
    done = [{"seed": 0, "method": "simclr", "variant": "baseline", "budget": "gpu"},
            {"seed": 0, "method": "simclr", "variant": "+SEC", "budget": "cpu"}]
    cells = study.todo(done, "gpu", [0, 1], ["simclr", "moco"], ["baseline", "+SEC"])
    assert cells[:3] == [(0, "simclr", "+SEC"), (0, "moco", "baseline"), (0, "moco", "+SEC")]
    assert len(cells) == 7 and (0, "simclr", "baseline") not in cells


def test_cells_appends_the_next_missing_cells(tmp_path, monkeypatch, capsys):
    study = load_study()
    monkeypatch.setitem(study.BUDGETS, "tiny", [
        "--backbone", "tiny", "--batch-size", "16", "--epochs", "1", "--max-steps", "1", "method.queue_size=64",
        "method.proj_hidden_dim=32", "eval.test_size=8", "vmf.k=4"])
    make_image_folder(tmp_path / "data", n_train=24, n_test=8, hw=(16, 16))
    out = tmp_path / "study.json"
    common = ["--budget", "tiny", "--data-root", str(tmp_path / "data"), "--device", "cpu", "--out", str(out),
              "--runs-dir", str(tmp_path / "runs"), "--seeds", "0", "--variants", "baseline", "+SEC", "+vMF"]
    assert study.main([*common, "--cells", "2"]) == 0
    rows = json.loads(out.read_text())
    assert [(r["method"], r["variant"]) for r in rows] == [("simclr", "baseline"), ("simclr", "+SEC")]
    assert all(r["budget"] == "tiny" and r["seed"] == 0 and 0 <= r["knn_top1"] <= 100 for r in rows)
    assert "--sec" in rows[1]["command"] and rows[0]["device"] == "cpu"
    assert study.main([*common, "--cells", "1"]) == 0  # the next missing cell only
    rows = json.loads(out.read_text())
    assert [(r["method"], r["variant"]) for r in rows][2:] == [("simclr", "+vMF")]
    capsys.readouterr()
    assert study.main(["--out", str(out), "--table-only"]) == 0
    text = capsys.readouterr().out
    assert "budget tiny" in text and "| simclr |" in text and "(n=1)" in text
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- sphere-study-tiny:start -->\nold\n<!-- sphere-study-tiny:end -->\nrest\n")
    assert study.main(["--out", str(out), "--table-only", "--write", str(readme)]) == 0
    doc = readme.read_text()
    assert "old" not in doc and doc.startswith("intro\n") and doc.endswith("rest\n")
    assert study.table(json.loads(out.read_text())) in doc
