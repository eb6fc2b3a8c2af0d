"""The method contract: a method defined and registered in this test file alone trains, resumes
exactly and exports through the unchanged engine, CLI and export code; and the layers above the
methods name no method."""

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_sphere import config
from ssl_sphere.cli.pretrain import build_config, build_parser
from ssl_sphere.core import checkpoint, registry
from ssl_sphere.engine.train import train
from ssl_sphere.methods import EMAPair, MomentumMethod, StepOutput, register
from ssl_sphere.models.pretrained import export, load_pretrained

from .conftest import REPO


@dataclass
class ToyConfig:
    """A toy method: a linear projector, its EMA target, a cosine loss between the views."""

    name: str = "toy"  # --method toy
    proj_dim: int = 16  # projector output
    momentum: float = 0.9  # EMA start
    momentum_final: float = 1.0  # EMA end
    scale: float = 2.0  # loss = scale * (1 - cos)


class Toy(MomentumMethod):
    Config = ToyConfig
    weight_keys = ("proj_dim",)
    sec_target = "the online projector outputs of both views"
    see_unsupported = "a toy has no negatives"

    @classmethod
    def configure(cls, cfg, d):
        d.fill("aug.solarize_p", [0.0, 0.5], "the toy's asymmetric views")  # before the base's default
        super().configure(cfg, d)

    def __init__(self, backbone, feature_dim, cfg, see=None):
        super().__init__(backbone, feature_dim, cfg, see)
        self.encoder = EMAPair(nn.Sequential(backbone, nn.Linear(feature_dim, cfg.proj_dim)))

    def forward(self, views):
        x1, x2 = views
        z1, z2 = self.encoder.online(x1), self.encoder.online(x2)
        with torch.no_grad():
            t1, t2 = self.encoder.target(x1), self.encoder.target(x2)
        loss = self.cfg.scale * (2 - F.cosine_similarity(z1, t2).mean() - F.cosine_similarity(z2, t1).mean())
        return StepOutput(loss, torch.cat([z1, z2]))


@pytest.fixture(scope="module")
def toy():
    register(Toy)
    yield "toy"
    registry.METHODS.pop("toy")


FAST = ["--method", "toy", "--sec", "--batch-size", "256", "--epochs", "2", "run.progress=false", "run.log_every=1",
        "eval.bank_size=200", "eval.test_size=50"]


def test_a_method_from_this_file_trains_resumes_and_exports(toy, tmp_path):
    assert "toy" in build_parser().format_help()  # --method choices come from the registry
    cfg = build_config([*FAST, "--output-dir", str(tmp_path / "a")])
    assert cfg.method.name == "toy" and cfg.method.scale == 2.0 and cfg.aug.solarize_p == [0.0, 0.5]
    assert config.weight_keys(cfg)[-1] == "method.proj_dim"
    with pytest.raises(config.ConfigError, match="SEE does not apply to toy: a toy has no negatives"):
        build_config([*FAST, "--see"])
    with pytest.raises(config.ConfigError, match="method.queue_size.*valid keys here of method 'toy'"):
        build_config([*FAST, "method.queue_size=4"])

    a = train(cfg)  # 2 epochs of 5 steps, kNN at 0, 5, 10
    assert a["step"] == 10 and a["knn_top1"] > 0
    rows = [json.loads(x) for x in (Path(a["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    collapse = {r["step"]: r for r in rows if r["kind"] == "collapse"}  # the collapse monitor at every evaluation
    assert sorted(collapse) == [0, 5, 10] and "feature_rank" in collapse[0] and "embedding_std" not in collapse[0]
    assert all(0 < collapse[s]["embedding_std"] and 1 <= collapse[s]["embedding_rank"] for s in (5, 10))
    b_dir = tmp_path / "b"
    train(build_config([*FAST, "--output-dir", str(b_dir), "--max-steps", "3"]))
    b = train(build_config([*FAST, "--output-dir", str(b_dir), "--resume", "auto", "--max-steps", "10"]))
    pa = checkpoint.load(str(Path(a["run_dir"]) / "last.pt"))["model"]
    pb = checkpoint.load(str(Path(b["run_dir"]) / "last.pt"))["model"]
    assert pa.keys() == pb.keys() and any("encoder.target" in k for k in pa)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6, msg=k)
    assert b["knn_top1"] == pytest.approx(a["knn_top1"])

    # the EMA target moved (the shared momentum update ran) and differs from the online network
    assert not torch.equal(pa["method.encoder.target.1.weight"], pa["method.encoder.online.1.weight"])
    with pytest.raises(config.ConfigError, match="method.proj_dim changed"):
        build_config([*FAST, "--output-dir", str(b_dir), "--resume", "auto", "method.proj_dim=8"])

    meta = export(str(Path(a["run_dir"]) / "last.pt"), str(tmp_path / "backbone.pt"))
    assert meta["method"] == "toy"
    state = torch.load(tmp_path / "backbone.pt", weights_only=True)
    p = load_pretrained(str(Path(a["run_dir"]) / "last.pt"))
    assert state.keys() == p.module.state_dict().keys()
    ema = load_pretrained(str(Path(a["run_dir"]) / "last.pt"), part="momentum_backbone")
    torch.testing.assert_close(ema.module[0][0].weight, pa["method.encoder.target.0.0.0.weight"], rtol=0, atol=0)


def _string_constants(path: Path):
    """String constants of a module's code, docstrings left out."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]


def test_the_layers_above_the_methods_name_no_method():
    """config, engine, models, cli (and the layers below the methods) branch on no method name: what
    a method is, they learn from the registry."""
    from ssl_sphere import methods

    names = set(methods.names())
    pkg = REPO / "ssl_sphere"
    files = [pkg / "config.py", *[p for d in ("engine", "models", "cli", "core", "data", "augment", "sphere",
                                               "evaluation") for p in (pkg / d).rglob("*.py")]]
    named = {str(p.relative_to(REPO)): sorted(names & set(_string_constants(p))) for p in files}
    assert not {k: v for k, v in named.items() if v}


#: the layers of the package, bottom first: a module imports only from its own folder or lower layers
LAYERS = [("core",), ("augment", "data"), ("config",), ("sphere",), ("evaluation",), ("methods",), ("models",),
          ("engine",), ("cli",), ("__init__", "pretrain", "knn", "linear", "export")]


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if part in names)


def _exists(module: str) -> bool:
    path = REPO.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_imports_only_run_downward_and_resolve():
    """Every ssl_sphere import (module level or inside a function) names a module that exists, and
    runs to the importing module's own folder or a lower layer: no circle between layers, no arrow back
    up, none sideways between the two folders of one layer (augment, data)."""
    import importlib.util

    pkg = REPO / "ssl_sphere"
    problems = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = module if rel.name == "__init__" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                    else node.module
                # the module imported from must exist; its names are submodules or attributes
                targets = [(base, [f"{base}.{a.name}" if _exists(f"{base}.{a.name}") else base for a in node.names])]
            elif isinstance(node, ast.Import):
                targets = [(a.name, [a.name]) for a in node.names]
            else:
                continue
            for source, used in targets:
                if not (source == "ssl_sphere" or source.startswith("ssl_sphere.")):
                    continue
                if not _exists(source):
                    problems.append(f"{module} imports from {source}, which does not exist")
                for target in used:
                    if target != "ssl_sphere" and _layer(target) > _layer(module):
                        problems.append(f"{module} imports {target} from a higher layer")
                    elif (target != "ssl_sphere" and _layer(target) == _layer(module) < len(LAYERS) - 1
                          and target.split(".")[1] != module.split(".")[1]):
                        problems.append(f"{module} imports {target} sideways, from the other folder of its layer")
    assert not problems, problems
