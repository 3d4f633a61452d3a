"""The ``hdf5`` reader's planned loads (issue 18): ``prepare_loads`` finds where each body lies
before the compare workers start, so a load is one ``pread`` and no h5py call; every tensor and
every error stays what the unplanned reader gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

import ilstore
import ilstore_compare
from ilstore.errors import CorruptFileError
from ilstore.store import hdf5 as hdf5_module
from ilstore.store.hdf5 import Hdf5Reader
from ilstore.testing import assert_bits_equal, conformance_tensors


def _run(out: Path, run_id: str = "r", scale: float = 1.0) -> Path:
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity())
    values = dict(conformance_tensors())  # every dtype
    values["x"] = torch.arange(4000, dtype=torch.float32).reshape(40, 100) * scale
    config = {"output_dir": str(out), "run_id": run_id, "backend": "hdf5"}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        model(values)
    assert cap.run_dir is not None
    return cap.run_dir


def _no_h5py_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any) -> Any:
        raise AssertionError("a planned load looked up its group through h5py")

    monkeypatch.setattr(Hdf5Reader, "_group", refuse)


def test_planned_loads_equal_unplanned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = _run(tmp_path)
    with ilstore.open_run(run_dir) as plain:
        expected = {key: plain.load(key) for key in plain.keys() if plain.meta(key).get("stored") is not False}
    with ilstore.open_run(run_dir) as run:
        assert isinstance(run, Hdf5Reader)
        run.prepare_loads(expected)
        located = [k for k, v in run._located.items() if v is not None]
        assert len(located) >= 5  # the raw-readable ones (not empty, native types)
        with monkeypatch.context() as m:
            _no_h5py_lookups(m)
            for key in located:
                assert_bits_equal(run.load(key), expected[key], str(key))
        for key, tensor in expected.items():  # the rest the usual way
            assert_bits_equal(run.load(key), tensor, str(key))


def test_missing_and_damaged_datasets_keep_their_errors(tmp_path: Path) -> None:
    run_dir = _run(tmp_path)
    with ilstore.open_run(run_dir) as run:
        keys = [k for k in run.keys(0) if run.meta(k).get("stored") is not False]
    victim, damaged = keys[0], keys[1]
    with h5py.File(run_dir / "step_0.h5", "r+") as f:
        group = f[f"{victim.module}#{victim.call}"]
        name = ":".join([victim.kind, *victim.path])
        del group[name]
        ds = f[f"{damaged.module}#{damaged.call}"][":".join([damaged.kind, *damaged.path])]
        ds.attrs["dtype"] = "torch.nonsense"
    for planned in (False, True):
        with ilstore.open_run(run_dir) as run:
            assert isinstance(run, Hdf5Reader)
            if planned:
                run.prepare_loads(keys + keys)  # repeated keys and unknown ones are fine
                run.prepare_loads([keys[0].call_key.tensor("outputs", ("no such path",))])
            with pytest.raises(CorruptFileError, match="there is no dataset"):
                run.load(victim)
            with pytest.raises(CorruptFileError, match="cannot decode dataset"):
                run.load(damaged)


def _outcome(run: Any, key: Any) -> Any:
    try:
        return run.load(key)
    except CorruptFileError as exc:
        return str(exc)


def test_file_cut_after_planning_reads_through_h5py(tmp_path: Path) -> None:
    """A file that ends inside a planned body (cut after planning, while open): the load falls
    back to h5py and gives what the unplanned load gives (HDF5 reads past the end as zeros)."""
    run_dir = _run(tmp_path)
    path = run_dir / "step_0.h5"
    with ilstore.open_run(run_dir) as run:
        assert isinstance(run, Hdf5Reader)
        keys = [k for k in run.keys(0) if run.meta(k).get("stored") is not False]
        run.prepare_loads(keys)
        last = max((v for v in run._located.values() if v is not None), key=lambda v: v.offset)
        key = next(k for k, v in run._located.items() if v is last)
        with open(path, "r+b") as fh:
            fh.truncate(last.offset + last.nbytes // 2)
        got = _outcome(run, key)
        run._located.clear()
        expected = _outcome(run, key)
    if isinstance(expected, str):
        assert got == expected
    else:
        assert isinstance(got, torch.Tensor)
        assert_bits_equal(got, expected, str(key))


def test_compare_workers_use_planned_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _run(tmp_path, "a"), _run(tmp_path, "b", scale=1.5)
    expected = ilstore_compare.compare(a, b, workers=1)
    calls: list[int] = []
    real = Hdf5Reader.prepare_loads

    def counting(self: Hdf5Reader, keys: Any) -> None:
        keys = list(keys)
        calls.append(len(keys))
        real(self, keys)

    monkeypatch.setattr(Hdf5Reader, "prepare_loads", counting)
    for workers in (1, 2):
        got = ilstore_compare.compare(a, b, workers=workers)
        assert [(t.key, t.status, t.metrics) for t in got.tensors] == \
            [(t.key, t.status, t.metrics) for t in expected.tensors]
    assert len(calls) == 4 and all(n > 0 for n in calls)
    assert np.isfinite(expected.summary.mismatched)


def _structures(run_dir: Path) -> dict[Any, Any]:
    """Every call's structure of each kind as the reader gives it (or the error's text)."""
    out: dict[Any, Any] = {}
    with ilstore.open_run(run_dir) as run:
        for call in run.calls(0):
            for kind in ("inputs", "outputs", "post_forward"):
                try:
                    out[call, kind] = run.structure(call, kind)
                except CorruptFileError as exc:
                    out[call, kind] = str(exc)
    return out


@pytest.mark.parametrize("damage", ["none", "extra int attribute", "fixed-length text", "bad JSON"])
def test_group_attributes_read_at_once_equal_h5py(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  damage: str) -> None:
    """A call group's attributes are read in one low-level pass (``_group_texts``); whatever the
    group holds, the structures and errors are those of h5py's attribute reads. The files are
    written as version-2 files were before 2026-12-02 (a side with a stored body is a group attribute only):
    a newer file lists it in ``/structures`` too, which readers read first."""
    monkeypatch.setattr(hdf5_module.Hdf5Writer, "_list_bodied", False)
    run_dir = _run(tmp_path)
    with ilstore.open_run(run_dir) as run:
        call = next(c for c in run.calls(0) if run.structure(c, "outputs"))
    with h5py.File(run_dir / "step_0.h5", "r+") as f:
        attrs = f[f"{call.module}#{call.call}"].attrs
        text = attrs["outputs"]
        if damage == "extra int attribute":
            attrs["extra"] = 5
        elif damage == "fixed-length text":
            attrs["outputs"] = np.bytes_(text.encode())
        elif damage == "bad JSON":
            attrs["outputs"] = "{not json"
    fast = _structures(run_dir)
    seen: list[Any] = []
    real = hdf5_module._group_texts
    monkeypatch.setattr(hdf5_module, "_group_texts", lambda oid: seen.append(real(oid)))  # -> None: through h5py
    slow = _structures(run_dir)
    assert fast == slow
    assert len(seen) >= 2 and any(isinstance(s, dict) for s in seen)  # the fast pass took most groups
    # the damaged group read at once: a dict only where every attribute is a variable-length string
    with h5py.File(run_dir / "step_0.h5", "r") as f:
        got = real(f[f"{call.module}#{call.call}"].id)
    assert (got is None) == (damage in ("extra int attribute", "fixed-length text"))
    if damage == "bad JSON":
        assert "attribute 'outputs' is not valid JSON" in fast[call, "outputs"]
    else:
        assert isinstance(fast[call, "outputs"], (dict, list))
