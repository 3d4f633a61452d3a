"""The import graph of ``ilstore/`` has no cycle, counting imports inside functions; in particular
the multi-rank layout (``store.ranks``) does not depend on the registry that opens it."""

from __future__ import annotations

import ast
from pathlib import Path

import ilstore

ROOT = Path(ilstore.__file__).parent


def _module_names() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ["ilstore", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module → the ilstore modules it imports anywhere in its source (a package counts as itself)."""
    modules = _module_names()
    known = set(modules) | {"ilstore.schemas"}  # installed from the top-level schemas/ folder
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in known}
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in known:
                        graph[name].add(sub)
                    elif target in known:
                        graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_checker_sees_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_ilstore() -> None:
    graph = import_graph()
    assert "ilstore.store.ranks" in graph["ilstore.store.registry"]  # the checker sees imports at all
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_ranks_does_not_import_the_registry() -> None:
    assert "ilstore.store.registry" not in import_graph()["ilstore.store.ranks"]
