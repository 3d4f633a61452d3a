"""The import graph of ``ilstore`` and ``ilstore_compare`` has no cycles, and the core stands alone.

The graph is read from the source (every ``import`` statement, including those inside functions),
so a lazy import that closes a cycle counts as much as one at the top of a module. An edge goes
from a module to the module it names; ``from package import name`` goes to ``package.name`` when
that is a module of ours, else to ``package``. The implicit import of a parent package's
``__init__`` is not an edge (every submodule would otherwise "import" its package).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ilstore", "ilstore_compare")


def _modules() -> dict[str, Path]:
    """Module name -> source file, for every module of our packages (schemas mapped as installed)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    found["ilstore.schemas"] = ROOT / "schemas" / "__init__.py"
    return found


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _targets(name: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """Our modules that one import statement names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        package = name if _is_package(path) else name.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    if base not in modules:
        return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in modules else base)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name].update(t for t in _targets(name, path, node, modules) if t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of module names (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_checker_sees_a_cycle_and_lazy_imports() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    graph = import_graph()
    # an import inside a function body is an edge (the CLI loads the comparer only when its
    # command runs); relative imports resolve to our module names
    assert "ilstore_compare.cli" in graph["ilstore.cli"]
    assert "ilstore.config" in graph["ilstore.capture"]
    assert "ilstore.schemas" in graph["ilstore.config"]  # from .schemas import load


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_core_imports_without_the_comparer() -> None:
    code = ("import sys, ilstore, ilstore.cli, ilstore.store, ilstore.convert; "
            "bad = sorted(m for m in sys.modules if m.startswith('ilstore_compare')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_package_names_are_imported_on_first_use() -> None:
    """``import ilstore`` imports no torch (PEP 562); every public name, and the submodules the
    package used to import, resolve to the objects their modules define; the function
    ``ilstore.capture`` keeps its name when the submodule of that name is imported later."""
    code = ("import sys, importlib, ilstore\n"
            "assert 'torch' not in sys.modules, 'import ilstore imported torch'\n"
            "import ilstore.engine_capture  # imports the submodule ilstore.capture\n"
            "assert callable(ilstore.capture) and ilstore.capture is sys.modules['ilstore.capture'].capture\n"
            "for name in ilstore.__all__:\n"
            "    value = getattr(ilstore, name)\n"
            "    module = ilstore._LAZY.get(name)\n"
            "    assert module is None or value is getattr(importlib.import_module('ilstore.' + module), name), name\n"
            "for name in ('config', 'errors', 'keys', 'manifest', 'records', 'schemas', 'store', 'pipeline'):\n"
            "    assert getattr(ilstore, name) is sys.modules['ilstore.' + name], name\n"
            "from ilstore import *  # noqa\n"
            "assert open_run is ilstore.store.open_run and capture is ilstore.capture\n"
            "assert set(ilstore.__all__) <= set(dir(ilstore))\n"
            "try:\n"
            "    ilstore.no_such_name\n"
            "except AttributeError as exc:\n"
            "    assert 'no_such_name' in str(exc)\n"
            "else:\n"
            "    raise AssertionError('no AttributeError')\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_compare_help_and_option_errors_import_no_torch() -> None:
    """``ilstore-compare --help`` (issue 18: at most 0.3 s) and a bad option answer before torch is needed."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from ilstore_compare.cli import main\n"
            "sys.argv = ['ilstore-compare'] + sys.argv[1:]\n"
            "try:\n    main()\n"
            "except SystemExit as exc:\n    code = exc.code\n"
            "heavy = [m for m in ('torch', 'h5py', 'safetensors') if m in sys.modules]\n"
            "print('HEAVY', heavy, 'CODE', code)\n")
    for args, expect in ((["--help"], 0), (["--dir1", "a", "--dir2", "b", "--rtol", "-1"], 2)):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert f"HEAVY [] CODE {expect}" in proc.stdout, (args, proc.stdout, proc.stderr)
