"""A full disk with the safetensors and hdf5 backends: the model runs on, finished steps stay readable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import ilstore

WORKER = Path(__file__).parent / "workers" / "diskfull_worker.py"


@pytest.mark.parametrize("backend", ["safetensors", "hdf5"])
@pytest.mark.parametrize("on_error,async_writes", [("warn", True), ("raise", False)])
def test_file_too_large(out_dir: Path, backend: str, on_error: str, async_writes: bool) -> None:
    proc = subprocess.run([sys.executable, str(WORKER), str(out_dir), on_error, backend, "1" if async_writes else "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr  # never a crash, whatever HDF5 thinks of a full disk
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    with ilstore.open_run(out_dir / "run") as run:
        if on_error == "warn":
            assert summary["same"] and summary["n_outputs"] == 4 and summary["raised"] is None
            assert "File too large" in summary["error"] and not summary["hooks_left"]
            assert run.status == "failed" and "File too large" in run.manifest["error"]
        else:  # the error reached the program, which never closed the capture: the failure closed the run
            assert summary["n_outputs"] == 2 and "File too large" in summary["raised"]
            assert run.status == "failed" and "File too large" in run.manifest["error"]
        assert run.steps() == [0, 1] and run.incomplete_steps() == [2]
        for key in run.keys():
            assert run.load(key).numel() > 0
