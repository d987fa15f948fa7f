"""The import graph of ``pretrain/``, ``launch/`` and ``shards/``: no circle, and every arrow
between packages points down the floors of ARCHITECTURE.md's map. Imports inside functions
count as much as those at the top (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Floors, lowest first. An arrow from one package to another must go to a lower floor; on the
# ground floor (0) the shared vocabularies may use each other, as long as no circle forms.
FLOORS: dict[str, int] = {
    "pretrain": 0, "pretrain.utils": 0, "pretrain.frames": 0, "pretrain.phones": 0, "pretrain.kaldi": 0,
    "pretrain.resources": 0, "pretrain.lifecycle": 0,
    "pretrain.config": 1,
    "pretrain.data": 2, "pretrain.corpus": 2, "pretrain.model": 2, "pretrain.distributed": 2,
    "pretrain.features": 3,
    "pretrain.cluster": 4,
    "pretrain.probe": 5,
    "pretrain.train": 6,
    "pretrain.report": 7, "pretrain.commands": 7,
    "pretrain.stages": 8,
    "pretrain.pipeline": 9,
    "pretrain.cli": 11, "launch.slurm": 11, "launch.elastic": 11,
    "launch.cli": 12, "launch": 12, "shards.build": 12, "shards.verify": 12, "shards": 12,
}

# Arrows the issue that set the floors named; kept explicit so a change of FLOORS cannot allow them.
NEVER = [("pretrain.model", "pretrain.features"), ("pretrain.data", "pretrain.corpus"),
         ("pretrain.cluster", "pretrain.corpus"), ("pretrain.probe", "pretrain.corpus"),
         ("pretrain.config", "pretrain.data"), ("pretrain.stages", "pretrain.pipeline"),
         ("pretrain.stages", "pretrain.commands")]


def modules() -> dict[str, Path]:
    found = {}
    for top in ("pretrain", "launch", "shards"):
        for path in (REPO / top).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(resolve(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pretrain.config import quote_override` names the package, `from pretrain
                # import iterate` a module: whichever exists.
                targets.update(resolve(f"{node.module}.{a.name}") or resolve(node.module) for a in node.names)
        graph[name] = {t for t in targets if t and t != name}
    return graph


def package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_circle():
    assert cycles(import_graph()) == []


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    upward = []
    for source, targets in graph.items():
        for target in targets:
            a, b = package(source), package(target)
            if a == b or (FLOORS[a] == FLOORS[b] == 0):
                continue
            if FLOORS[b] >= FLOORS[a]:
                upward.append(f"{source} -> {target} (floor {FLOORS[a]} -> {FLOORS[b]})")
    return sorted(upward)


def test_every_arrow_between_packages_points_down():
    graph = import_graph()
    unplaced = sorted({package(m) for m in graph} - set(FLOORS))
    assert not unplaced, f"packages without a floor (add them to FLOORS and ARCHITECTURE.md's map): {unplaced}"
    assert upward_arrows(graph) == []


@pytest.mark.parametrize("source, target", NEVER)
def test_the_arrows_that_must_never_exist(source, target):
    graph = import_graph()
    found = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                   if package(m) == source and package(t) == target)
    assert not found, found


def test_the_checker_sees_a_circle_and_an_upward_arrow():
    """The walk itself: a planted circle, an arrow up and one between siblings are found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    planted = {"pretrain.model.fbank": {"pretrain.features.mfcc", "pretrain.kaldi"},
               "pretrain.data.shards": {"pretrain.corpus.phones"}, "pretrain.kaldi": {"pretrain.frames"}}
    assert upward_arrows(planted) == ["pretrain.data.shards -> pretrain.corpus.phones (floor 2 -> 2)",
                                      "pretrain.model.fbank -> pretrain.features.mfcc (floor 2 -> 3)"]


def driver_problems(path: Path, drivers: set[str]) -> list[str]:
    """What keeps a benchmark or experiment file from being a thin driver over the library: an
    import of another driver, a private name of the library, a ``sys.path`` edit."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
            found.append("sys.path")
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
            if node.module.split(".")[0] in ("pretrain", "launch", "shards"):
                found += [f"private name {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        else:
            continue
        found += [f"imports the driver {n}" for n in names
                  if n.split(".")[0] in ("benchmarks", "experiments") or n.split(".")[0] in drivers]
    return sorted(found)


def drivers() -> list[Path]:
    return sorted([*(REPO / "benchmarks").glob("*.py"), *(REPO / "experiments").glob("*.py")])


def test_benchmarks_and_experiments_are_thin_drivers_over_the_library():
    names = {p.stem for p in drivers()}
    assert "iteration_gain" in names and "probe_cost" in names
    assert [f"{path.relative_to(REPO)}: {problem}" for path in drivers()
            for problem in driver_problems(path, names)] == []


def test_the_driver_check_sees_what_it_forbids(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import sys\nsys.path.insert(0, '.')\nfrom iteration_gain import run\n"
                       "from pretrain.pipeline.report import _plot\n")
    assert driver_problems(planted, {"iteration_gain"}) == [
        "imports the driver iteration_gain", "private name pretrain.pipeline.report._plot", "sys.path"]
