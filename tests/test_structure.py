"""The package's structure: no import circles, the network from its model config's class, and a
run's model.bn parsed once."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
import torch

from bnrepro.config.schema import parse_config
from bnrepro.infra.distributed import DistEnv
from bnrepro.models.batchnorm import BNStats
from bnrepro.models.networks import NETWORKS, STACKED, build_network, network_arguments
from bnrepro.models.norms import Normalization
from bnrepro.training.run import train

SOURCE = Path(__file__).resolve().parents[1] / "src"


def package_modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Every module under `root` by dotted name: its file and whether it is a package."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in its file: at the top, inside
    functions (lazy imports) and under TYPE_CHECKING alike. `from a import b` names the
    module a.b when there is one, else a."""
    modules = package_modules(root)
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, `level - 1` packages up
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    child = f"{base}.{alias.name}"
                    imported.add(child if child in modules else base)
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles of `graph`, one per strongly connected component of two or more modules
    (Tarjan), each as a path that starts and ends at the same module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_circle(graph, component) for component in components]


def _circle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One circle through the first module of `component`, found breadth-first."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not strongly connected")


def test_the_cycle_finder_sees_a_lazy_import_circle(tmp_path):
    """The finder itself: the circle the norms had (a function-level import closing it)."""
    package = tmp_path / "pkg"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models" / "__init__.py").write_text("")
    (package / "models" / "mlp.py").write_text("from pkg.models.norms import Normalization\n")
    (package / "models" / "norms.py").write_text(
        "def stacked():\n    from .stacked_mlp import StackedBatchNorm\n"
    )
    (package / "models" / "stacked_mlp.py").write_text("from pkg.models import mlp\n")
    (package / "other.py").write_text("import pkg.models.mlp\n")
    assert import_cycles(import_graph(package)) == [
        ["pkg.models.mlp", "pkg.models.norms", "pkg.models.stacked_mlp", "pkg.models.mlp"]
    ]
    (package / "models" / "norms.py").write_text("import torch\n")
    assert import_cycles(import_graph(package)) == []


def test_no_import_circle_in_the_package():
    graph = import_graph(SOURCE / "bnrepro")
    assert len(graph) > 40  # the whole package was read
    assert import_cycles(graph) == []


def test_the_network_table_names_the_configs_target():
    """`_target_` stays in configs/model (the union's tag, part of every run's hash); the
    network comes from the table, which must name the same class."""
    for config, network in NETWORKS.items():
        (target,) = get_args(get_type_hints(config)["target"])
        assert target == f"{network.__module__}.{network.__qualname__}"
    assert set(STACKED) <= set(NETWORKS)


@pytest.mark.parametrize(
    ("experiment", "network"),
    [("mnist/bn", "MLP"), ("mnist/baseline", "MLP"), ("fig2_small/bn_x5", "BNInception")],
)
def test_the_network_comes_from_the_model_configs_class(compose_cfg, experiment, network):
    """Every setting of the model config but the tag and the norm's reaches the network as an
    argument (a missing one is a TypeError here), with the run's normalisation itself."""
    run = parse_config(compose_cfg(f"experiment={experiment}", "model.dropout=0.25"))
    norm = Normalization.from_model(run.model)
    carried = {"target", "norm", "bn", "renorm", "group_norm", "noise"}
    assert network_arguments(run.model).keys() == vars(run.model).keys() - carried
    built = build_network(run.model, norm)
    assert type(built).__name__ == network and built.normalization is norm
    dropouts = [m.p for m in built.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and set(dropouts) == {0.25}


@pytest.fixture
def bn_stats_made(monkeypatch) -> list[BNStats]:
    """Every BNStats constructed while the test runs, in order (BNStats itself still builds
    each one)."""
    made: list[BNStats] = []
    construct = BNStats.__init__

    def counted(self: BNStats, *args, **kwargs) -> None:
        made.append(self)
        construct(self, *args, **kwargs)

    monkeypatch.setattr(BNStats, "__init__", counted)
    return made


@pytest.mark.parametrize(
    ("experiment", "overrides"),
    [
        ("mnist/bn", ()),
        ("mnist/bn", ("seeds=[1,2]",)),  # a StackedMLP and two MLPs, one normalisation
        ("ics/noisy_bn", ("trainer.ics.every=1",)),
        pytest.param("fig2_small/bn_x5", (), marks=pytest.mark.slow),  # make test-full
    ],
)
def test_a_run_parses_model_bn_once(
    compose_cfg, mnist_root, fashion_root, tmp_path, bn_stats_made, experiment, overrides
):
    """A real (two-step) run of the trainer in this process makes exactly one BNStats: the
    run's, which the task, the loop and every network share."""
    cfg = compose_cfg(
        f"experiment={experiment}",
        *overrides,
        "trainer.steps=2",
        "trainer.eval_every=2",
        "trainer.progress=false",
        "logger=none",
        f"paths.data_dir={mnist_root}",
        f"paths.output_dir={tmp_path}",
    )
    run = parse_config(cfg)
    assert bn_stats_made == []  # the schema checks model.bn, as a BNSettings
    summaries = train(run, DistEnv())
    assert [s["status"] for s in summaries] == ["completed"] * len(run.seeds or [run.seed])
    assert len(bn_stats_made) == 1
