"""Runs, converted runs and reports get the modes ``open`` and ``mkdir`` would give them (the
umask's), so a teammate can read them: files written under a temporary name and renamed kept
``tempfile``'s 0o600 (the manifest, a safetensors step index, a report) and a converted run's
directory ``mkdtemp``'s 0o700."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ilstore
from ilstore import manifest
from ilstore.convert import convert
from ilstore_compare.cli import compare_cmd

UMASK = 0o027


@pytest.fixture
def umask(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(manifest, "_UMASK", [], raising=False)  # read again under the test's umask
    old = os.umask(UMASK)
    try:
        yield UMASK
    finally:
        os.umask(old)


def _modes(root: Path) -> set[tuple[str, int]]:
    """(kind, mode) of ``root`` and everything under it."""
    found = {("dir", stat.S_IMODE(root.stat().st_mode))}
    for path in root.rglob("*"):
        found.add(("dir" if path.is_dir() else "file", stat.S_IMODE(path.stat().st_mode)))
    return found


@pytest.mark.parametrize("backend", ["pt", "safetensors", "hdf5"])
def test_runs_and_reports_follow_the_umask(tmp_path: Path, backend: str, umask: int) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "cap", "backend": backend,
                                                  "log_step_ids": [0, 1]}):
        model(torch.ones(1, 2))
        model(torch.ones(1, 2))
    expected = {("dir", 0o777 & ~umask), ("file", 0o666 & ~umask)}
    assert _modes(tmp_path / "cap") == expected
    other = "pt" if backend != "pt" else "safetensors"
    convert(tmp_path / "cap", tmp_path / "conv", to=other)
    assert _modes(tmp_path / "conv") == expected
    report = tmp_path / "report.md"
    res = CliRunner().invoke(compare_cmd, ["--dir1", str(tmp_path / "cap"), "--dir2", str(tmp_path / "conv"),
                                           "--output", str(report)])
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(report.stat().st_mode) == 0o666 & ~umask
