"""Hostile and corrupt pt runs: nothing executes, nothing outside the run is read or written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ilstore
from ilstore.cli import cli
from support import Thrice

MARKER = Path("/tmp/ilstore-pwned-marker")


class Evil:
    def __reduce__(self):  # noqa: D105 - runs on unpickling
        return (os.system, (f"touch {MARKER}",))


def _run(out_dir: Path, run_id: str = "run", backend: str = "pt") -> Path:
    model = Thrice()
    with ilstore.capture(model, {"output_dir": str(out_dir), "run_id": run_id, "async_writes": False,
                                 "backend": backend, "log_step_ids": [0, 1]}) as cap:
        model(torch.randn(1, 4))
        model(torch.ones(1, 4))
    assert cap.run_dir is not None
    return cap.run_dir


def _first_tensor_file(run_dir: Path) -> Path:
    return run_dir / "step_0" / "lin" / "outputs_cpu.pt"


def test_malicious_pickle_refused(out_dir: Path) -> None:
    MARKER.unlink(missing_ok=True)
    run_dir = _run(out_dir)
    target = _first_tensor_file(run_dir)
    torch.save({"x": Evil()}, target)
    with ilstore.open_run(run_dir) as run:
        with pytest.raises(ilstore.CorruptFileError, match="refused to load") as info:
            run.load(ilstore.TensorKey(0, "lin", 0, "outputs"))
    assert str(target) in str(info.value)
    assert not MARKER.exists()


class _Plain:
    """A class no allow-list holds: torch's refusal then prints a phrase in terminal bold."""


def test_a_refused_pickle_is_named_without_terminal_codes(out_dir: Path) -> None:
    run_dir = _run(out_dir)
    target = _first_tensor_file(run_dir)
    torch.save({"x": _Plain()}, target)
    with ilstore.open_run(run_dir) as run:
        with pytest.raises(ilstore.CorruptFileError, match="refused to load") as info:
            run.load(ilstore.TensorKey(0, "lin", 0, "outputs"))
    assert "do those steps only if you trust the source" in str(info.value) and "\x1b" not in str(info.value)


def test_legacy_format_malicious_pickle_refused(out_dir: Path) -> None:
    MARKER.unlink(missing_ok=True)
    run_dir = _run(out_dir)
    target = _first_tensor_file(run_dir)
    torch.save(Evil(), target, _use_new_zipfile_serialization=False)
    with ilstore.open_run(run_dir) as run, pytest.raises(ilstore.CorruptFileError):
        run.load(ilstore.TensorKey(0, "lin", 0, "outputs"))
    assert not MARKER.exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04garbage", os.urandom(300)])
def test_corrupt_tensor_file_named(out_dir: Path, content: bytes) -> None:
    run_dir = _run(out_dir)
    target = _first_tensor_file(run_dir)
    target.write_bytes(content)
    with ilstore.open_run(run_dir) as run:
        with pytest.raises(ilstore.CorruptFileError) as info:
            run.load(ilstore.TensorKey(0, "lin", 0, "outputs"))
    assert str(target) in str(info.value)


def test_truncated_tensor_file(out_dir: Path) -> None:
    run_dir = _run(out_dir)
    target = _first_tensor_file(run_dir)
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with ilstore.open_run(run_dir) as run, pytest.raises(ilstore.CorruptFileError, match="outputs_cpu.pt"):
        run.load(ilstore.TensorKey(0, "lin", 0, "outputs"))


def test_wrong_tensor_in_file(out_dir: Path) -> None:
    run_dir = _run(out_dir)
    torch.save(torch.zeros(3, dtype=torch.int8), _first_tensor_file(run_dir))
    with ilstore.open_run(run_dir) as run, pytest.raises(ilstore.CorruptFileError, match="metadata says"):
        run.load(ilstore.TensorKey(0, "lin", 0, "outputs"))


@pytest.mark.parametrize("ref", ["../../../etc/passwd", "/etc/passwd", "..", "a/../../b.pt"])
def test_file_reference_outside_run(out_dir: Path, ref: str) -> None:
    run_dir = _run(out_dir)
    meta = run_dir / "step_0" / "lin" / "outputs.json"
    doc = json.loads(meta.read_text())
    doc["file"] = ref
    meta.write_text(json.dumps(doc))
    with ilstore.open_run(run_dir) as run, pytest.raises(ilstore.StoreError):
        run.load(ilstore.TensorKey(0, "lin", 0, "outputs"))


def test_symlink_escaping_run_refused(out_dir: Path, tmp_path: Path) -> None:
    run_dir = _run(out_dir)
    outside = tmp_path / "outside.pt"
    torch.save(torch.zeros(1, 4), outside)
    target = _first_tensor_file(run_dir)
    target.unlink()
    target.symlink_to(outside)
    with ilstore.open_run(run_dir) as run, pytest.raises(ilstore.UnsafePathError, match="outside the run directory"):
        run.load(ilstore.TensorKey(0, "lin", 0, "outputs"))
    step_link = run_dir / "step_0" / "lin_evil"
    step_link.symlink_to(tmp_path, target_is_directory=True)
    (run_dir / "step_0" / "module_calls.txt").write_text("lin\nlin_evil\n")
    with pytest.raises(ilstore.StoreError):
        with ilstore.open_run(run_dir) as run:
            run.keys(0)


def test_module_calls_with_traversal(out_dir: Path) -> None:
    run_dir = _run(out_dir)
    (run_dir / "ilstore.json").unlink()  # without the manifest the order file is trusted less
    (run_dir / "step_0" / "module_calls.txt").write_text("../../../../etc\nlin\n")
    with ilstore.open_run(run_dir) as run:
        assert {c.module for c in run.calls(0)} <= {"lin", "lin_1", "lin_2", "other"}


@pytest.mark.parametrize("patch", [
    {"steps": "all"}, {"steps": [0, "x", 10**30]}, {"calls": {"0": "nope"}}, {"calls": {"0": [["lin", -1]]}},
    {"calls": {"0": [["lin", 10**40]]}}, {"format": "other"}, {"ranks": 5, "layout": "ranks"},
])
def test_crafted_manifest(out_dir: Path, patch: dict) -> None:
    run_dir = _run(out_dir)
    path = run_dir / "ilstore.json"
    doc = json.loads(path.read_text())
    doc.update(patch)
    path.write_text(json.dumps(doc))
    result = CliRunner().invoke(cli, ["ls", str(run_dir)])
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert "ilstore.json" in result.output or str(run_dir) in result.output


@pytest.mark.parametrize("backend", ["pt", "safetensors", "hdf5"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_bytes_never_crash_reader(tmp_path_factory: pytest.TempPathFactory, backend: str,
                                          data: st.DataObject) -> None:
    """Random byte flips and truncations in any file of a run: readers raise IlstoreError or work."""
    out_dir = tmp_path_factory.mktemp("mut")
    run_dir = _run(out_dir, backend=backend)
    files = sorted(p for p in run_dir.rglob("*") if p.is_file())
    # Draw run-independent numbers (paths, and so file sizes, differ between examples).
    victim = files[data.draw(st.integers(0, 10**6)) % len(files)]
    blob = bytearray(victim.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        if not blob:
            break
        i = data.draw(st.integers(0, 10**9)) % len(blob)
        blob[i] = data.draw(st.integers(0, 255))
    cut = len(blob) * data.draw(st.integers(0, 100)) // 100
    victim.write_bytes(bytes(blob[:cut]))
    try:
        with ilstore.open_run(run_dir) as run:
            for key in run.keys():
                try:
                    run.load(key)
                except KeyError:
                    pass
    except ilstore.IlstoreError:
        pass


def _plant_evil(run_dir: Path) -> Path:
    MARKER.unlink(missing_ok=True)
    target = _first_tensor_file(run_dir)
    torch.save({"x": Evil()}, target)
    return target


def test_hostile_file_refused_by_convert_and_compare(out_dir: Path, tmp_path: Path) -> None:
    good = _run(out_dir, "good")
    bad = _run(out_dir, "bad")
    target = _plant_evil(bad)
    for args in (["convert", str(bad), str(tmp_path / "conv"), "--to", "safetensors"],
                 ["compare", "--dir1", str(bad), "--dir2", str(good)],
                 ["compare", "--dir1", str(good), "--dir2", str(bad)]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert str(target) in result.output and "Traceback" not in result.output
    assert not MARKER.exists()
    assert not (tmp_path / "conv").exists()
