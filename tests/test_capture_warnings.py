"""A run says what its capture warned about: the manifest's ``"warnings"``, shown by ``ilstore ls``
(both listings), kept by convert, and the first notes of a comparison."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import ilstore
from ilstore.capture import IlstoreWarning
from ilstore.convert import convert
from ilstore.engine_capture import EngineCapture
from ilstore.keys import CallKey
from ilstore.manifest import new_manifest
from ilstore.records import TensorPolicy, build_record, finalize_stats
from ilstore.store.base import StepInfo
from ilstore.store.ranks import rank_run_dir, write_ranks_manifest
from ilstore.store.registry import get_backend
from ilstore.summary import format_summary, summarize_run
from ilstore.unshard import open_logical
from ilstore_compare import compare
from ilstore_compare.cli import compare_cmd
from ilstore_compare.tokens_view import WithoutBatch
from ilstore_compare.unshard import compare_unsharded

BACKENDS = ["pt", "safetensors", "hdf5"]


class _Skips(nn.Module):
    """Calls ``inner`` only in the steps listed in ``calls_in`` (counted by forwards)."""

    def __init__(self, calls_in: set[int]) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.calls_in, self.forwards = calls_in, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, self.forwards = self.forwards, self.forwards + 1
        return self.inner(x) if n in self.calls_in else x * 2


def _run(tmp_path: Path, run_id: str, model: nn.Module, forwards: int, **cfg: Any) -> tuple[Path, list[str]]:
    config = {"output_dir": str(tmp_path), "run_id": run_id, "log_step_ids": [], **cfg}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), ilstore.capture(model, config) as cap:
            for _ in range(forwards):
                model(torch.ones(2, 4))
    assert cap.run_dir is not None
    return cap.run_dir, [str(w.message) for w in caught if issubclass(w.category, IlstoreWarning)]


def _manifest(run: Path) -> dict[str, Any]:
    return json.loads((run / "ilstore.json").read_text())


@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_without_a_hooked_call_are_one_line_naming_them(tmp_path: Path, backend: str) -> None:
    torch.manual_seed(0)
    run, said = _run(tmp_path, "skips", _Skips({0, 2}), 5, module_call_match=r"^inner$", backend=backend)
    assert sum("no hooked module ran" in m for m in said) == 3  # one Python warning per step, as before
    assert _manifest(run)["warnings"] == [
        "no hooked module ran in 3 step(s) (1, 3, 4): nothing of them was recorded; the model may run compiled "
        "or in CUDA graphs, where hooks do not fire"]
    with ilstore.open_run(run) as reader:
        assert reader.steps() == [0, 1, 2, 3, 4] and reader.capture_warnings == _manifest(run)["warnings"]


def test_many_hookless_steps_are_counted_and_ten_named(tmp_path: Path) -> None:
    run, _ = _run(tmp_path, "many", _Skips({0}), 30, module_call_match=r"^inner$")
    (line,) = _manifest(run)["warnings"]
    assert line.startswith("no hooked module ran in 29 step(s) (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ... (29 in all)): ")


def test_a_clean_run_has_no_warnings_field(tmp_path: Path) -> None:
    run, said = _run(tmp_path, "clean", _Skips({0, 1}), 2, module_call_match=r"^inner$")
    assert said == [] and "warnings" not in _manifest(run)
    assert summarize_run(run).warnings == () and summarize_run(run, calls=False).warnings == ()
    assert "warning" not in format_summary(summarize_run(run))


def test_a_match_of_nothing_is_kept_and_shown_by_both_listings_and_the_cli(tmp_path: Path) -> None:
    run, said = _run(tmp_path, "nothing", _Skips({0}), 1, module_call_match=r"^no_such_module$")
    assert len(said) == 1
    (line,) = _manifest(run)["warnings"]
    assert line == "module_call_match ['^no_such_module$'] matches no module of the model; nothing will be captured"
    for calls in (True, False):  # through the reader, and from the manifest and journal alone
        summary = summarize_run(run, calls=calls)
        assert summary.warnings == (line,) and summary.to_dict()["warnings"] == [line]
        assert f"warning (from the capture): {line}" in format_summary(summary).splitlines()[2]
    out = subprocess.run([sys.executable, "-m", "ilstore", "ls", str(run)], capture_output=True, text=True, check=True)
    assert f"warning (from the capture): {line}" in out.stdout
    out = subprocess.run([sys.executable, "-m", "ilstore", "ls", "--json", str(run)], capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout)["warnings"] == [line]


def test_a_stray_call_warning_is_kept_once(tmp_path: Path) -> None:
    model = _Skips({0, 1, 2})
    config = {"output_dir": str(tmp_path), "run_id": "stray", "module_call_match": r"^inner$",
              "calls_outside_forward": "ignore"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad(), ilstore.capture(model, config) as cap:
            model.inner(torch.ones(1, 4))
            model(torch.ones(1, 4))
            model.inner(torch.ones(1, 4))
    assert cap.run_dir is not None
    assert _manifest(cap.run_dir)["warnings"] == [
        "inner was called outside a forward of the root module; such calls are not logged (calls_outside_forward: "
        "ignore)"]


def test_warnings_are_capped(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cap = ilstore.capture(_Skips({0}), {"output_dir": str(tmp_path), "run_id": "capped"})
        for n in range(30):
            cap._warn(f"ilstore: warning {n}", stacklevel=1)
        cap._warn("ilstore: warning 0", stacklevel=1)  # the same message again: kept once
        cap.close()
    assert cap.run_dir is not None
    said = _manifest(cap.run_dir)["warnings"]
    assert said == [f"warning {n}" for n in range(19)] + [
        "... and 11 more warning(s), in the capturing process's output"]


def test_a_failed_capture_keeps_its_warnings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """on_error "warn": the writer fails, the run closes as failed with the error and the warnings."""
    model = _Skips({1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cap = ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "failed", "module_call_match": r"^inner$",
                                      "log_step_ids": []})
        with torch.no_grad():
            model(torch.ones(1, 4))  # step 0: inner not called
            assert cap._sink is not None

            def fail(record: Any) -> None:
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(cap._sink.writer, "_write", fail)
            model(torch.ones(1, 4))  # step 1: the write fails, the capture stops
        cap.close()
    assert cap.run_dir is not None and cap.error is not None
    manifest = _manifest(cap.run_dir)
    assert manifest["status"] == "failed" and "No space left" in manifest["error"]
    assert manifest["warnings"] == ["no hooked module ran in 1 step(s) (0): nothing of them was recorded; the model "
                                    "may run compiled or in CUDA graphs, where hooks do not fire"]


@pytest.mark.parametrize("target", BACKENDS)
def test_convert_keeps_the_warnings(tmp_path: Path, target: str) -> None:
    run, _ = _run(tmp_path, "src", _Skips({0}), 2, module_call_match=r"^inner$")
    out = tmp_path / f"to_{target}"
    convert(run, out, target)
    assert _manifest(out)["warnings"] == _manifest(run)["warnings"] != []


def test_a_comparison_opens_its_notes_with_each_runs_warnings(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a, _ = _run(tmp_path, "a", _Skips({0, 1}), 3, module_call_match=r"^inner$")
    torch.manual_seed(0)
    b, _ = _run(tmp_path, "b", _Skips({0, 1}), 3, module_call_match=r"^inner$")
    result = compare(a, b)
    line = ("no hooked module ran in 1 step(s) (2): nothing of them was recorded; the model may run compiled or in "
            "CUDA graphs, where hooks do not fire")
    assert list(result.notes[:2]) == [f"dir1's capture warned: {line}", f"dir2's capture warned: {line}"]
    assert result.exit_code == 0  # the steps both runs recorded match: a warning is not a difference
    res = CliRunner().invoke(compare_cmd, ["--dir1", str(a), "--dir2", str(b)], catch_exceptions=False)
    assert res.exit_code == 0 and f"dir1's capture warned: {line}" in res.output
    res = CliRunner().invoke(compare_cmd, ["--dir1", str(a), "--dir2", str(b), "--format", "json"],
                             catch_exceptions=False)
    assert json.loads(res.output)["notes"][:2] == list(result.notes[:2])


def _two_ranks(run_dir: Path, said: dict[int, list[Any]]) -> Path:
    """A two-rank pt run (one call, ``fc``, the same on both ranks) whose ranks' manifests hold ``said``."""
    write_ranks_manifest(run_dir, backend="pt", world_size=2, config={"run_id": run_dir.name})
    for rank in (0, 1):
        writer = get_backend("pt").writer(rank_run_dir(run_dir, rank, 2), {})
        writer.open(new_manifest("pt", {"run_id": run_dir.name}, rank=rank, world_size=2))
        call = CallKey(rank, 0, "fc", 0)
        record = build_record(call, "outputs", torch.ones(2), TensorPolicy(pin_memory=False))
        finalize_stats(record)
        writer.write(record)
        writer.end_step(StepInfo(0, [call], [call]))
        if said.get(rank):
            writer.manifest["warnings"] = said[rank]
        writer.close("complete")
    return run_dir


def test_a_multi_rank_run_lists_each_ranks_warnings(tmp_path: Path) -> None:
    run_dir = _two_ranks(tmp_path / "tp2", {1: ["something missed", 7]})  # a non-string entry is left out
    expected = ("rank 1: something missed",)
    assert summarize_run(run_dir).warnings == expected == summarize_run(run_dir, calls=False).warnings
    with ilstore.open_run(run_dir) as reader:
        assert tuple(reader.capture_warnings) == expected


def test_unsharded_views_keep_every_ranks_warnings(tmp_path: Path) -> None:
    a = _two_ranks(tmp_path / "a", {0: ["zero missed"], 1: ["one missed"]})
    b = _two_ranks(tmp_path / "b", {})
    expected = ["rank 0: zero missed", "rank 1: one missed"]
    with open_logical(a) as view:
        assert view.capture_warnings == expected  # not rank 0's alone, unprefixed
    result = compare_unsharded(a, b)
    assert list(result.notes[:2]) == [f"dir1's capture warned: {w}" for w in expected]
    assert result.notes[2].startswith("--unshard: compared the logical runs")
    out = convert(a, tmp_path / "logical", "pt", unshard=True)
    assert _manifest(out)["warnings"] == expected


def test_a_token_view_of_a_multi_rank_run_keeps_its_warnings(tmp_path: Path) -> None:
    a = _two_ranks(tmp_path / "a", {1: ["one missed"]})
    with ilstore.open_run(a) as ranked:
        assert WithoutBatch(ranked).capture_warnings == ["rank 1: one missed"]


def test_an_engine_step_without_a_hooked_call_is_counted_and_warned_once(tmp_path: Path) -> None:
    model = _Skips({0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cap = EngineCapture(model, {"output_dir": str(tmp_path), "run_id": "engine", "module_call_match": r"^inner$",
                                    "log_step_ids": []}, manual_step=True)
        with torch.no_grad():
            for _ in range(4):
                cap.begin_engine_step()
                model(torch.ones(1, 4))  # inner runs in the first engine step only
                cap.end_engine_step()
            model(torch.ones(1, 4))  # between engine steps: paused, neither recorded nor counted
        cap.close()
    said = [str(w.message) for w in caught if issubclass(w.category, IlstoreWarning)]
    assert len([m for m in said if "no hooked module ran" in m]) == 1
    assert cap.run_dir is not None
    assert _manifest(cap.run_dir)["warnings"] == [
        "no hooked module ran in 3 step(s) (1, 2, 3): nothing of them was recorded; the model may run compiled or in "
        "CUDA graphs, where hooks do not fire"]


def test_a_capture_whose_set_up_fails_keeps_the_warnings_it_gave(tmp_path: Path) -> None:
    with warnings.catch_warnings(), pytest.raises(RuntimeError):
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 2)))  # takes no hooks: the set-up fails
        ilstore.capture(scripted, {"output_dir": str(tmp_path), "run_id": "setup", "module_call_match": "^nope$"})
    manifest = _manifest(tmp_path / "setup")
    assert manifest["status"] == "failed"
    assert manifest["warnings"] == ["module_call_match ['^nope$'] matches no module of the model; nothing will be "
                                    "captured"]


@pytest.mark.parametrize("async_writes", [False, True])
@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_a_step_end_that_fails_in_close_closes_the_run_as_failed(tmp_path: Path, on_error: str, async_writes: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = _Skips({0, 1})
    cap = ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "close", "module_call_match": r"^inner$",
                                  "log_step_ids": [], "on_error": on_error, "async_writes": async_writes},
                          manual_step=True)
    with torch.no_grad():
        model(torch.ones(1, 4))
        cap.step()  # step 0 complete
        model(torch.ones(1, 4))  # step 1 open: close() ends it
    assert cap._sink is not None

    def full(info: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cap._sink.writer, "_end_step", full)
    if on_error == "raise":
        with pytest.raises(ilstore.StoreError, match="No space left"):
            cap.close()
    else:
        cap.close()
    assert cap.run_dir is not None
    manifest = _manifest(cap.run_dir)
    assert manifest["status"] == "failed" and "No space left" in manifest["error"]
    with ilstore.open_run(cap.run_dir) as run:
        assert run.steps() == [0]
