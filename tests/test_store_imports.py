"""The multi-rank layout (``store.ranks``) does not depend on the registry that opens it, not
even through an import inside a function (tests/test_imports.py checks the whole graph)."""

from __future__ import annotations

import ast
from pathlib import Path

import ilstore.store.ranks


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {f"{'.' * node.level}{node.module or ''}:{a.name}" for a in node.names}
    return names


def test_ranks_does_not_import_the_registry() -> None:
    imported = _imported(Path(ilstore.store.ranks.__file__))
    assert any(name.startswith(".base:") for name in imported)  # the parse sees its imports at all
    assert not [name for name in imported if "registry" in name], imported
