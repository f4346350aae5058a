"""Imports point down: read from the source, so a violation fails here before it becomes a circular import.

- `difftpt_ops` never imports `cli` or `workers` (not even inside a function).
- `services.reading` never imports `services.running`: reading depends on what running wrote, not on how.
- The service modules' module-level imports form no cycle (each module can be imported on its own).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "difftpt_ops"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, module_level_only: bool) -> set[str]:
    """Modules `path` imports (`from a.b import c` counts as a.b and a.b.c: c may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes: list[ast.AST] = []
    if module_level_only:
        for node in tree.body:  # skip `if TYPE_CHECKING:` blocks and everything inside functions
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                nodes.append(node)
    else:
        nodes = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def test_the_library_never_imports_the_cli_or_the_workers() -> None:
    offenders = {name: sorted(i for i in _imports(path, module_level_only=False)
                              if i.split(".")[0] in {"cli", "workers"})
                 for name, path in _modules().items()}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_reading_never_imports_running() -> None:
    offenders = {name: sorted(i for i in _imports(path, module_level_only=False)
                              if i.startswith("difftpt_ops.services.running"))
                 for name, path in _modules().items() if name.startswith("difftpt_ops.services.reading")}
    assert {name: found for name, found in offenders.items() if found} == {}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_service_modules_import_each_other_without_cycles() -> None:
    modules = {name: path for name, path in _modules().items() if name.startswith("difftpt_ops.services.")}
    graph = {name: {i for i in _imports(path, module_level_only=True) if i in modules and i != name}
             for name, path in modules.items() if not path.name == "__init__.py"}
    assert _cycle(graph) is None


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: a two-module cycle is found, a chain is not."""
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
