"""Imports between meshnet's modules point one way.

A circle of imports (services enqueueing tasks that call the services back) used to be held
together by imports inside functions, which hide it from a reader and from import-time errors.
The graph here counts every import, at any depth of a module (functions included), so a circle
is reported however it is spelled.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit]

ROOT = Path(__file__).resolve().parents[2]


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Each module of `package` (under `root`, migrations left out) and the modules of the same
    package it imports anywhere in its file."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if "migrations" in parts:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")
                    anchor = anchor if is_package else anchor[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets.add(base)
                # `from meshnet import peers` imports the module meshnet.peers.
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {
            target for target in targets if target in modules and target != name
        } - _ancestors(name)
    return graph


def _ancestors(name: str) -> set[str]:
    """A module's parent packages: importing one of them is not a circle of our making."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports in `graph`, as the list of modules around it, or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        path.append(name)
        for target in sorted(graph.get(name, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = visit(name)
        if cycle:
            return cycle
    return None


def test_no_meshnet_module_imports_another_in_a_circle():
    graph = import_graph(ROOT, "meshnet")
    assert "meshnet.peers" in graph and "meshnet.tasks" in graph["meshnet.peers"]
    assert find_cycle(graph) is None


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_circle_through_an_import_inside_a_function_is_found(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/services.py": "def push():\n    from pkg.tasks import push_task\n",
            "pkg/tasks.py": "from pkg import services\n",
        },
    )
    assert find_cycle(import_graph(tmp_path, "pkg")) == [
        "pkg.services",
        "pkg.tasks",
        "pkg.services",
    ]


def test_a_circle_through_relative_imports_is_found(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from .b import thing\n",
            "pkg/b.py": "from . import a\n",
            "pkg/models.py": "",
        },
    )
    assert find_cycle(import_graph(tmp_path, "pkg")) == ["pkg.a", "pkg.b", "pkg.a"]


def test_imports_that_point_one_way_are_no_circle(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/peers.py": "from pkg.tasks import push\n",
            "pkg/tasks.py": "from pkg.state import signed\n",
            "pkg/state.py": "import pkg.models\n",
            "pkg/models.py": "",
            "pkg/migrations/__init__.py": "",
            "pkg/migrations/0001.py": "from pkg import peers\n",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.peers"] == {"pkg.tasks"}
    assert graph["pkg.state"] == {"pkg.models"}
    assert find_cycle(graph) is None
