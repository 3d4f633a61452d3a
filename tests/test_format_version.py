"""A run written by a newer ilstore (a manifest ``format_version`` above the one this ilstore
writes) is refused with a message that says so, in every entry point, rather than read as a run
of the known layout: a newer layout can keep data where this reader does not look, and would
then read as a run with missing calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ilstore
from ilstore.cli import cli
from ilstore.errors import StoreError
from ilstore.manifest import FORMAT_VERSION, MANIFEST_NAME, read_manifest
from ilstore_compare.cli import compare_cmd
from support import Skipping


def _run(tmp_path: Path, backend: str, run_id: str) -> Path:
    model = Skipping((1,))
    config = {"output_dir": str(tmp_path), "run_id": run_id, "backend": backend, "mode": "stats", "log_step_ids": []}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        for _ in range(2):
            model(torch.randn(1, 4))
    assert cap.run_dir is not None
    return cap.run_dir


def _set_version(run_dir: Path, version: int) -> None:
    path = run_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["format_version"] = version
    path.write_text(json.dumps(manifest), encoding="utf-8")


@pytest.mark.parametrize("backend", ["pt", "safetensors", "hdf5"])
def test_newer_format_is_refused_everywhere(tmp_path: Path, backend: str) -> None:
    old = _run(tmp_path, backend, "old")
    new = _run(tmp_path, backend, "new")
    assert read_manifest(new)["format_version"] == FORMAT_VERSION  # what a run is written with today
    _set_version(new, FORMAT_VERSION + 1)

    with pytest.raises(StoreError, match=rf"newer ilstore .*format_version {FORMAT_VERSION + 1}.*upgrade"):
        ilstore.open_run(new)
    with ilstore.open_run(old) as reader:  # the same run at today's version opens
        assert reader.steps() == [0, 1]

    for args in (["ls", str(new)], ["ls", "--calls", str(new)], ["convert", str(new), str(tmp_path / "out"),
                                                                    "--to", "pt"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert "newer ilstore" in result.output and MANIFEST_NAME in result.output, (args, result.output)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    result = CliRunner().invoke(compare_cmd, ["--dir1", str(new), "--dir2", str(old)])
    assert result.exit_code == 2, result.output
    assert "newer ilstore" in result.output


def test_older_and_current_versions_read(tmp_path: Path) -> None:
    run = _run(tmp_path, "pt", "r")
    manifest = read_manifest(run)
    assert manifest is not None and manifest["format_version"] == FORMAT_VERSION
    # a bool is not a version number (True == 1 in Python): left to the readers' own checks
    _set_version(run, True)  # type: ignore[arg-type]
    assert read_manifest(run) is not None
