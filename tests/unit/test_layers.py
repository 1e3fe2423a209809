"""The package is a house of layers: every import (lazy ones included) points down or sideways
within its layer, and no modules import each other round in a circle.

A module's layer is named by its first dotted part below ``neuronserve`` (``serving.app`` is in
``serving``), ``backends.base`` apart. Lower layers come first in :data:`LAYERS`.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "neuronserve"

LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"neuronserve", "tasks", "positional", "extras"}),  # facts and pure helpers
    frozenset({"models"}),  # model directories: resolving, hashing, loading
    frozenset({"config"}),
    frozenset({"backends.base"}),
    frozenset({"backends"}),  # the kinds and the concrete backends
    frozenset({"artifacts"}),
    frozenset({"serving", "monitor"}),  # a server; the metrics exporter
    frozenset({"trace", "deploy", "containers", "generate"}),  # what prepares and launches them
    frozenset({"loadgen"}),
    frozenset({"doctor", "acceptance", "tune"}),
    frozenset({"cli", "__main__"}),
)


def _modules(root: Path, package: str) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        name = ".".join((package, *path.relative_to(root).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = path
    return found


def imports(root: Path, package: str = "neuronserve") -> Iterator[tuple[str, str, int]]:
    """(importer, imported module, line) for every import of the package's own modules,
    including those inside functions and under ``TYPE_CHECKING``."""
    modules = _modules(root, package)

    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
                targets = [resolve(f"{node.module}.{alias.name}") for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names if a.name.split(".")[0] == package]
            else:
                continue
            for target in targets:
                # A module importing its own package's __init__ (or itself) is not an edge.
                if target and target != module and not module.startswith(target + "."):
                    yield module, target, node.lineno


def layer_of(module: str, package: str = "neuronserve") -> int:
    parts = module.split(".")[1:]
    name = "backends.base" if parts[:2] == ["backends", "base"] else (parts[0] if parts else package)
    for index, layer in enumerate(LAYERS):
        if name in layer:
            return index
    raise AssertionError(f"{module} is in no layer: add {name!r} to LAYERS in {__file__}")


def upward(root: Path, package: str = "neuronserve") -> list[str]:
    return [
        f"{module} (line {line}) imports {target}, a layer above it"
        for module, target, line in imports(root, package)
        if layer_of(target, package) > layer_of(module, package)
    ]


def cycles(root: Path, package: str = "neuronserve") -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for module, target, _line in imports(root, package):
        graph[module].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(set(graph)):
        if node not in index:
            visit(node)
    return found


def test_no_import_runs_up_the_layers() -> None:
    assert upward(PACKAGE) == []


def test_no_modules_import_each_other_in_a_circle() -> None:
    assert cycles(PACKAGE) == []


def test_the_walk_finds_an_upward_import_and_a_circle(tmp_path: Path) -> None:
    """The checks above can fail: a lazy upward import and a loop through a package's
    ``__init__`` are both found in a package made for the purpose."""
    root = tmp_path / "neuronserve"
    (root / "serving").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "config.py").write_text("def f():\n    from neuronserve.serving.app import g\n")
    (root / "serving" / "__init__.py").write_text("from neuronserve.serving.app import g\n")
    (root / "serving" / "app.py").write_text("from neuronserve.serving.engine import h\n")
    (root / "serving" / "engine.py").write_text("import neuronserve.serving.app\n")
    assert upward(root) == ["neuronserve.config (line 2) imports neuronserve.serving.app, a layer above it"]
    assert cycles(root) == [["neuronserve.serving.app", "neuronserve.serving.engine"]]
