"""What ``pip install .`` puts into site-packages: ilstore's packages only, with the JSON Schemas inside.

The wheel is built from a copy of the sources (no network: setuptools is already installed; a
copy, so no ``build/`` folder is left in the tree nor a stale one read from it) and installed
with ``--no-deps --target`` into a scratch directory, which the checks import from ahead of the
editable install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("ilstore", "ilstore_compare", "schemas"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(src)], check=True, capture_output=True, text=True)
    (found,) = out.glob("ilstore-*.whl")
    return found


def test_no_top_level_schemas_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"ilstore", "ilstore_compare"}, top
    assert "ilstore/schemas/config.schema.json" in names
    assert "ilstore/schemas/report.schema.json" in names


def test_installed_cli_finds_its_schema(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    assert not (target / "schemas").exists()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import sys, ilstore.schemas as s; from ilstore.cli import main; "
            "assert s.__file__.startswith(sys.argv[1]), s.__file__; "
            "sys.argv = ['ilstore', 'validate-config', '{\"module_call_match\": \"mlp\"}']; main()")
    done = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert '"module_call_match"' in done.stdout
    bad = subprocess.run([sys.executable, "-c", code.replace("mlp", "(unclosed"), str(target)], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "module_call_match" in bad.stderr + bad.stdout


def test_declared_torch_bound_is_the_tested_torch() -> None:
    """The torch that the test setup installs (scripts/setup.sh, what CI runs) is the lowest one
    pyproject.toml admits, so the bound we declare is the one we test; and this run's torch is
    within the declared range."""
    (spec,) = re.findall(r'^\s*"(torch\b[^"]*)",', (ROOT / "pyproject.toml").read_text(), re.M)
    bound = re.fullmatch(r"torch>=(\d+)\.(\d+)", spec)
    assert bound, f"torch requirement {spec!r} should be a lower bound"
    (pin,) = re.findall(r"torch==(\d+)\.(\d+)", (ROOT / "scripts" / "setup.sh").read_text())
    assert (int(pin[0]), int(pin[1])) == (int(bound[1]), int(bound[2])), (
        f"scripts/setup.sh installs torch {'.'.join(pin)} but pyproject declares {spec!r}: test the bound you declare")
    running = re.match(r"(\d+)\.(\d+)", torch.__version__)
    assert running and (int(running[1]), int(running[2])) >= (int(bound[1]), int(bound[2]))
