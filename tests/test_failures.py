"""Capture keeps the model running when writing fails, and loses nothing already written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ilstore

WORKER = Path(__file__).parent / "workers" / "diskfull_worker.py"


def _run(out_dir: Path, on_error: str, backend: str = "pt", async_writes: bool = True) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, str(WORKER), str(out_dir), on_error, backend, "1" if async_writes else "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.parametrize("async_writes", [True, False])
def test_file_too_large_does_not_stop_the_model(out_dir: Path, async_writes: bool) -> None:
    summary, stderr = _run(out_dir, "warn", async_writes=async_writes)
    assert summary["same"] and summary["n_outputs"] == 4 and summary["raised"] is None
    assert "File too large" in summary["error"] and not summary["hooks_left"]
    # the message names the file (SPEC section 7), as the other backends' do
    assert f"{out_dir / 'run' / 'step_2'}" in summary["error"] and "cannot write the tensor file" in summary["error"]
    assert stderr.count("capture stopped") == 1 and "File too large" in stderr
    assert "could not finalise the run manifest" not in stderr  # it was: the manifest says failed
    with ilstore.open_run(out_dir / "run") as run:
        assert run.status == "failed"
        assert run.steps() == [0, 1]  # written before the failure, still readable
        assert run.manifest["error"]
        for key in run.keys():
            assert run.load(key).numel() > 0


@pytest.mark.parametrize("async_writes", [True, False])
def test_on_error_raise_propagates(out_dir: Path, async_writes: bool) -> None:
    summary, _ = _run(out_dir, "raise", async_writes=async_writes)
    if async_writes:  # the writer thread's failure surfaces at a later write, step end or close
        assert 2 <= summary["n_outputs"] <= 4
    else:
        assert summary["n_outputs"] == 2  # the forward of step 2 raised
    assert summary["raised"] and "File too large" in summary["raised"]
    with ilstore.open_run(out_dir / "run") as run:
        assert run.steps() == [0, 1]


def test_unwritable_output_dir(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    x = torch.randn(1, 2)
    with caplog.at_level("ERROR"):
        cap = ilstore.capture(model, {"output_dir": str(blocker / "sub")})
    assert cap.error is not None and "cannot create the run directory" in str(cap.error)
    assert not model[0]._forward_hooks
    assert torch.equal(model(x), model(x))
    cap.close()
    assert "capture stopped" in caplog.text
    with pytest.raises(ilstore.StoreError, match="cannot create the run directory"):
        ilstore.capture(model, {"output_dir": str(blocker / "sub"), "on_error": "raise"})
