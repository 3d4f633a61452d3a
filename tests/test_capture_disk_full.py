"""A full disk, a failed write under ``on_error: "raise"`` and a run directory removed mid-run leave
the run honest: closed as ``failed`` with the error, never ``running`` or ``complete``.

The file-size limit of ``test_failures.py`` (EFBIG) fails the step's files but leaves room for the
final manifest; a real full disk (ENOSPC) does not: ``ilstore.json`` is rewritten through a
temporary file, which needs room while the cut step's files still hold it. A writer now keeps a
small reserve file (``.ilstore.reserve``) in the run directory and gives its room to that last
write.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import ilstore
from ilstore.store import base

WORKER = Path(__file__).parent / "workers" / "diskfull_worker.py"
BACKENDS = ["pt", "safetensors", "hdf5"]


def _full_disk_manifests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every manifest write fails with ENOSPC while the run's reserve file exists (a disk with no
    room left but the reserve's); the names of the files written are listed."""
    written: list[str] = []
    real = base.write_json_atomic

    def write(path: Path, data: Any) -> None:
        if data.get("status") != "running" and (path.parent / base.RESERVE_NAME).exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(data.get("status"))
        real(path, data)

    monkeypatch.setattr(base, "write_json_atomic", write)
    return written


def _no_room_after_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that fills up once the run is opened, with no room for a reserve either: every
    manifest write after the first fails with ENOSPC."""
    real = base.write_json_atomic

    def full(path: Path, data: Any) -> None:
        if data.get("status") != "running":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(base, "_reserve", lambda path: None)
    monkeypatch.setattr(base, "write_json_atomic", full)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("async_writes", [False, True])
def test_the_raise_mode_closes_the_run_as_failed(out_dir: Path, backend: str, async_writes: bool) -> None:
    """A caller that catches the error a forward raised and goes on, then closes: the run stays
    ``failed`` with the error (it was closed ``complete``, step 2 missing), and capture stops at
    the failure (safetensors' writer kept refusing every later step)."""
    proc = subprocess.run([sys.executable, str(WORKER), str(out_dir), "raise", backend, "1" if async_writes else "0",
                           "continue"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(summary["raised"]) == 1 and "File too large" in summary["raised"][0]
    assert summary["n_outputs"] == 3 and not summary["hooks_left"]
    assert summary["error"] is not None and "File too large" in summary["error"]
    with ilstore.open_run(out_dir / "run") as run:
        assert run.status == "failed"
        assert "File too large" in run.manifest["error"]
        assert run.steps() == [0, 1]
    assert not (out_dir / "run" / base.RESERVE_NAME).exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_final_manifest_takes_the_reserve(out_dir: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    written = _full_disk_manifests(monkeypatch)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    config = {"output_dir": str(out_dir), "run_id": "r", "backend": backend}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        model(torch.ones(2, 4))
    assert cap.error is None
    assert written == ["running", "complete"]
    with ilstore.open_run(out_dir / "r") as run:
        assert run.status == "complete" and run.steps() == [0]
    assert not (out_dir / "r" / base.RESERVE_NAME).exists()


def test_without_a_reserve_the_error_names_the_manifest(out_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    _no_room_after_open(monkeypatch)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with caplog.at_level(logging.ERROR), torch.no_grad():
        cap = ilstore.capture(model, {"output_dir": str(out_dir), "run_id": "r"})
        model(torch.ones(2, 4))
        cap.close()
    assert cap.error is not None
    assert f"{out_dir / 'r' / 'ilstore.json'}: cannot write the run's manifest" in str(cap.error)
    # with "raise", close raises it
    with torch.no_grad():
        cap = ilstore.capture(model, {"output_dir": str(out_dir), "run_id": "r2", "on_error": "raise"})
        model(torch.ones(2, 4))
    with pytest.raises(ilstore.StoreError, match="cannot write the run's manifest"):
        cap.close()


def test_a_block_that_raises_keeps_its_own_exception(out_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The with block's exception leaves it, not the error of closing the run after it (a full
    disk); the manifest records the block's exception."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(KeyError, match="the user's"), torch.no_grad():
        with ilstore.capture(model, {"output_dir": str(out_dir), "run_id": "r", "on_error": "raise"}):
            model(torch.ones(2, 4))
            raise KeyError("the user's")
    with ilstore.open_run(out_dir / "r") as run:
        assert run.status == "failed" and run.manifest["error"] == "KeyError: \"the user's\""
    _no_room_after_open(monkeypatch)
    with caplog.at_level(logging.ERROR), pytest.raises(KeyError, match="the user's"), torch.no_grad():
        with ilstore.capture(model, {"output_dir": str(out_dir), "run_id": "r2", "on_error": "raise"}):
            model(torch.ones(2, 4))
            raise KeyError("the user's")
    assert "could not close the run after the capture's block raised KeyError" in caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_run_directory_removed_mid_run_is_not_made_again(out_dir: Path, backend: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    with caplog.at_level(logging.ERROR), torch.no_grad():
        with ilstore.capture(model, {"output_dir": str(out_dir), "run_id": "r", "log_step_ids": [],
                                     "backend": backend, "async_writes": False}) as cap:
            for i in range(4):
                model(torch.randn(2, 8))
                if i == 1:
                    shutil.rmtree(out_dir / "r")
    assert cap.error is not None and "step_2" in str(cap.error)
    assert not (out_dir / "r" / "step_2").exists() and not (out_dir / "r" / "step_3").exists()
    assert "capture stopped at step 2" in caplog.text


def test_the_cli_reports_a_system_error_with_exit_2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ilstore import cli, convert

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "dst"))

    monkeypatch.setattr(convert, "convert", refuse)
    (tmp_path / "src").mkdir()
    res = CliRunner().invoke(cli.cli, ["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "hdf5"])
    assert res.exit_code == 2
    assert "error: [Errno 28] No space left on device" in res.output and "Traceback" not in res.output


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_real_full_disk(tmp_path: Path, backend: str) -> None:
    """On a 3 MB tmpfs (where the test may mount one: root): the run ends ``failed`` with the
    error, its steps before the failure readable; with ``on_error: "raise"`` the write's own
    error leaves the with block, naming the file."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "3m"):
        pytest.skip("cannot mount a tmpfs here (not root, or no mount)")
    try:
        from ilstore.demo import tiny_llama

        model = tiny_llama()
        torch.manual_seed(1)
        inputs = [torch.randint(0, 128, (1, 12 + 4 * i)) for i in range(12)]
        for on_error in ("warn", "raise"):
            raised: list[Exception] = []
            try:
                with torch.no_grad(), ilstore.capture(model, {
                        "output_dir": str(disk), "run_id": on_error, "log_step_ids": [], "backend": backend,
                        "async_writes": False, "on_error": on_error}) as cap:
                    for x in inputs:
                        model(x)
            except ilstore.IlstoreError as exc:
                raised.append(exc)
            assert cap.error is not None and "No space left on device" in str(cap.error)
            if on_error == "raise":
                assert raised and raised[0] is cap.error and str(disk / on_error / "step_") in str(raised[0])
            with ilstore.open_run(disk / on_error) as run:
                assert run.status == "failed" and run.manifest["error"] == str(cap.error)
                assert run.steps() and len(run.steps()) < len(inputs)
                for key in list(run.keys())[:5]:
                    run.load(key)
            for entry in disk.iterdir():
                shutil.rmtree(entry)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("on_error", ["warn", "raise"])
def test_an_engine_capture_records_nothing_after_a_failure(out_dir: Path, on_error: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The vLLM plug-in's capture records calls without hooks (``record_call``) and steps by hand:
    after a failed write it wrote more step directories into the run closed as ``failed`` (warn),
    or raised at every later step (raise)."""
    from ilstore.engine_capture import EngineCapture

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    cap = EngineCapture(model, {"output_dir": str(out_dir), "run_id": "r", "log_step_ids": [], "async_writes": False,
                                "on_error": on_error}, manual_step=True)
    writer = cap._sink.writer  # type: ignore[union-attr]
    real = writer._write

    def fail_once(record: Any) -> None:
        writer._write = real
        raise OSError(errno.ENOSPC, "No space left on device")

    raised = []
    for step in range(3):
        cap.begin_engine_step()
        if step == 1:
            writer._write = fail_once
        try:
            model(torch.ones(1, 4))
        except ilstore.IlstoreError as exc:
            raised.append(exc)
        assert cap.record_call("ilstore.batch", ids=torch.arange(3)) is (step == 0)
        cap.end_engine_step()
    cap.close()
    assert len(raised) == (1 if on_error == "raise" else 0) and cap.error is not None
    with ilstore.open_run(out_dir / "r") as run:
        assert run.status == "failed" and run.steps() == [0] and run.incomplete_steps() == []
    assert sorted(p.name for p in (out_dir / "r").iterdir() if p.name.startswith("step_")) == ["step_0"]
