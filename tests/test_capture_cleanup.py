"""A capture that fails leaves nothing open behind it (ilstore/capture.py, ``_discard_setup``,
``_fail``): at set-up, and when a write fails while the model runs.

Before, a model with a submodule that takes no hooks (a ``torch.jit.script`` module:
"register_forward_pre_hook is not supported on ScriptModules") made ``ilstore.capture`` raise
with the run's step journal and statistics table (``stats.f64``) open until the process ended,
the hooks already attached to the modules before it still running on every forward, and the run
left ``running``; a run directory whose manifest could not be written (disk full) left the same
files open behind the ``on_error`` failure; and a replay's reference stayed open after a capture
stopped by a failed write (``close()`` then did nothing).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import NoReturn

import pytest
import torch
from torch import nn

import ilstore
from ilstore.replay import ReplaySource
from ilstore.store import base

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists open files through /proc")


def _open_files_under(directory: Path) -> list[str]:
    found = []
    root = os.path.realpath(directory)
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the descriptor listdir used, closed since
            continue
        if target.startswith(root + os.sep):
            found.append(target)
    return found


class _NoHooks(nn.Linear):
    """A module that refuses hooks, as a ``torch.jit.script`` module does."""

    def register_forward_pre_hook(self, *args: object, **kwargs: object) -> NoReturn:  # type: ignore[override]
        raise RuntimeError("register_forward_pre_hook is not supported on ScriptModules")


def _scripted_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), _NoHooks(4, 4), nn.ReLU())


def _hooks(module: nn.Module) -> int:
    return len(module._forward_pre_hooks) + len(module._forward_hooks)


@pytest.mark.parametrize("backend", ["pt", "safetensors", "hdf5"])
@pytest.mark.parametrize("async_writes", [True, False])
def test_a_module_that_takes_no_hooks_leaves_no_open_file_and_no_hook(tmp_path: Path, backend: str,
                                                                      async_writes: bool) -> None:
    model = _scripted_model()
    x = torch.ones(2, 4)
    expected = model(x)
    cfg = {"output_dir": str(tmp_path), "run_id": "r", "backend": backend, "async_writes": async_writes}
    with pytest.raises(RuntimeError, match="not supported on ScriptModules"):
        ilstore.capture(model, cfg)
    run_dir = tmp_path / "r"
    assert _open_files_under(run_dir) == []
    assert _hooks(model) == 0 and _hooks(model[0]) == 0  # hooked before the scripted module: removed
    assert torch.equal(model(x), expected)
    manifest = json.loads((run_dir / "ilstore.json").read_text())
    assert manifest["status"] == "failed" and "ScriptModules" in manifest["error"]
    with ilstore.open_run(run_dir) as run:
        assert run.status == "failed" and run.steps() == []


def test_a_torch_jit_script_submodule(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated, not gone
        scripted = torch.jit.script(nn.Linear(4, 4))
    model = nn.Sequential(nn.Linear(4, 4), scripted)
    with pytest.raises(RuntimeError, match="ScriptModule"):
        ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "r"})
    assert _open_files_under(tmp_path) == [] and _hooks(model[0]) == 0


def test_a_replay_reference_is_closed_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[object] = []
    real_close = ReplaySource.close

    def close(self: ReplaySource) -> None:
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(ReplaySource, "close", close)
    model = _scripted_model()
    with ilstore.capture(model[0], {"output_dir": str(tmp_path), "run_id": "ref"}) as ref:
        model[0](torch.ones(2, 4))
    assert ref.run_dir is not None
    cfg = {"output_dir": str(tmp_path), "run_id": "r", "replay_from": str(ref.run_dir)}
    with pytest.raises(RuntimeError, match="not supported on ScriptModules"):
        ilstore.capture(model, cfg)
    assert len(closed) == 1  # the reference's reader
    assert _open_files_under(tmp_path) == []


@pytest.mark.parametrize("on_error", ["warn", "raise"])
def test_a_manifest_that_cannot_be_written_leaves_no_open_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             on_error: str) -> None:
    def full(self: base.StoreWriter) -> NoReturn:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(base.StoreWriter, "_save_manifest", full)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    cfg = {"output_dir": str(tmp_path), "run_id": "r", "on_error": on_error}
    if on_error == "raise":
        with pytest.raises(ilstore.StoreError, match="No space left on device"):
            ilstore.capture(model, cfg)
    else:
        cap = ilstore.capture(model, cfg)
        assert isinstance(cap.error, ilstore.StoreError)
        model(torch.ones(1, 4))  # runs untouched, nothing recorded
        cap.close()
    assert (tmp_path / "r" / "stats.f64").exists()  # the table was created before the manifest failed
    assert _open_files_under(tmp_path) == []
    assert _hooks(model) == 0 and _hooks(model[0]) == 0


def test_a_failed_write_closes_the_replay_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "ref"}) as ref:
        model(torch.ones(2, 4))
    closed: list[object] = []
    real_close = ReplaySource.close

    def close(self: ReplaySource) -> None:
        closed.append(self)
        real_close(self)

    def full(self: object, record: object) -> NoReturn:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ReplaySource, "close", close)
    cfg = {"output_dir": str(tmp_path), "run_id": "r", "replay_from": str(ref.run_dir), "async_writes": False}
    with ilstore.capture(model, cfg) as cap:
        monkeypatch.setattr(type(cap._sink.writer), "_write", full)  # type: ignore[union-attr]
        model(torch.ones(2, 4))  # the first write fails: the capture stops, the model runs on
        assert isinstance(cap.error, OSError) and cap._closed
        assert len(closed) == 1
    assert len(closed) == 1
    assert _open_files_under(tmp_path) == []
    with ilstore.open_run(tmp_path / "r") as run:
        assert run.status == "failed"
