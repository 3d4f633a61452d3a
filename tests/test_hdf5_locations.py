"""Where the ``hdf5`` writer put each body, listed in the step file (``locations`` in ``/structures``).

Planning a comparison of hdf5 runs opened one HDF5 dataset per stored tensor (its offset, type,
shape and attributes) and read each call group's attributes: on the benchmark's workload most
of the comparison's serial planning time. The writer knows where it wrote each body, so a step
file lists it; the reader uses that list only while the step file is the one the writer finished
(its size and modification time as the step journal recorded them), and asks HDF5 otherwise.
These tests check the list against HDF5, that planning a comparison then opens no dataset, and
that a file changed after it was written (an edit with h5py) is read through HDF5, correctly.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from h5py import h5d

import ilstore
from ilstore.manifest import JOURNAL_NAME
from ilstore.store import hdf5
from ilstore.store.hdf5 import Hdf5Reader
from ilstore.testing import assert_bits_equal, conformance_tensors
from ilstore_compare import compare
from test_stats_compare_divergent import _same  # every field, count and report equal


def _run(out: Path, run_id: str, scale: float = 1.0, steps: int = 2) -> Path:
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity())
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(out), "run_id": run_id, "backend": "hdf5",
                                                  "log_step_ids": []}) as cap:
        for step in range(steps):
            values = dict(conformance_tensors())  # every dtype, bfloat16 and float8 as their bits
            values["x"] = torch.arange(4000, dtype=torch.float32).reshape(40, 100) * scale + step
            values["wide"] = torch.ones([1] * 33, dtype=torch.float32) * scale  # past HDF5's rank limit
            model(values)
    assert cap.run_dir is not None
    return cap.run_dir


def _entries(path: Path) -> list[dict[str, Any]]:
    with h5py.File(path, "r") as f:
        return [json.loads(line) for line in bytes(f[hdf5.STRUCTURES][()]).decode().splitlines()]


def test_the_list_says_what_hdf5_says(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, "r")
    listed = 0
    with h5py.File(run_dir / "step_0.h5", "r") as f:
        for entry in _entries(run_dir / "step_0.h5"):
            group = f[hdf5.group_name(entry["module"], entry["call"])] if hdf5.LOCATIONS in entry else None
            for dname, (offset, nbytes, type_name, shape, attrs) in entry.get(hdf5.LOCATIONS, {}).items():
                ds = group[dname]
                # an empty tensor has no bytes, and HDF5 no offset for them
                assert (ds.id.get_offset() if nbytes else 0) == offset and ds.id.get_storage_size() == nbytes, dname
                assert ds.dtype == np.dtype(type_name) and list(ds.shape) == shape, dname
                assert dict(ds.attrs) == attrs, dname
                listed += 1
    assert listed >= 20  # every dtype of conformance_tensors, on both sides of a call
    # the journal line of each completed step records the file it finished
    lines = [json.loads(line) for line in (run_dir / JOURNAL_NAME).read_text().splitlines()]
    for line in lines:
        stat = os.stat(run_dir / f"step_{line['step']}.h5")
        assert line[hdf5.FILE_KEY] == [stat.st_size, stat.st_mtime_ns]
        assert list(line)[-1] == "totals"  # still the end of the line (the journal's fast scan reads it there)


def test_planning_a_comparison_opens_no_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _run(tmp_path, "a"), _run(tmp_path, "b", scale=1.5)
    slow = compare(a, b, workers=1)
    opened: list[bytes] = []
    real = h5d.open

    def counting(*args: Any, **kwargs: Any) -> Any:
        opened.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(h5d, "open", counting)
    monkeypatch.setattr(Hdf5Reader, "_group", lambda *a: pytest.fail("a group looked up through h5py"))
    fast = compare(a, b, workers=1)
    assert opened == []
    _same(fast, slow)
    assert fast.exit_code == 1 and sum(t.metrics.mismatched for t in fast.tensors if t.metrics) > 0


def test_a_file_edited_after_its_step_is_read_through_hdf5(tmp_path: Path) -> None:
    """h5py replaces a dataset (new space, new values): the list's offset now points at the old
    bytes, and the file's size and time differ from the journal's, so HDF5 is asked."""
    run_dir = _run(tmp_path, "r")
    with ilstore.open_run(run_dir) as run:
        key = next(k for k in run.keys(0) if k.path == ("0", "x") and k.kind == "inputs")
        before = run.load(key)
    where = f"{hdf5.group_name(key.module, key.call)}/{hdf5.dataset_name(key.kind, key.path)}"
    with h5py.File(run_dir / "step_0.h5", "r+") as f:
        old_offset = f[where].id.get_offset()
        attrs = dict(f[where].attrs)
        del f[where]
        f[where] = before.numpy() * 2
        f[where].attrs.update(attrs)
        assert f[where].id.get_offset() != old_offset
    for loads in ("planned", "one by one"):
        with ilstore.open_run(run_dir) as run:
            if loads == "planned":
                run.prepare_loads([key])
            assert_bits_equal(run.load(key), before * 2, loads)


def test_a_run_copied_with_its_times_uses_the_list_and_one_without_does_not(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, "r")
    kept, touched = tmp_path / "kept", tmp_path / "touched"
    shutil.copytree(run_dir, kept)  # copy2: data and modification times
    shutil.copytree(run_dir, touched, copy_function=shutil.copyfile)  # data only: new times
    with ilstore.open_run(run_dir) as run:
        keys = [k for k in run.keys(1) if run.meta(k).get("stored") and not run.meta(k).get("same_as")]
        want = {k: run.load(k) for k in keys}
    for copy, trusted in ((kept, True), (touched, False)):
        reader = Hdf5Reader(copy)
        try:
            reader.prepare_loads(keys)
            assert reader._trusts(1) is trusted, copy.name
            for k in keys:
                assert_bits_equal(reader.load(k), want[k], f"{copy.name} {k}")
        finally:
            reader.close()


def test_a_malformed_entry_is_asked_of_hdf5(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, "r", steps=1)
    reader = Hdf5Reader(run_dir)
    try:
        keys = [k for k in reader.keys(0) if reader.meta(k).get("stored") and not reader.meta(k).get("same_as")]
        want = {k: reader.load(k) for k in keys}
        sides = reader._step_sides(0)
        for table in sides.locations.values():
            for i, dname in enumerate(sorted(table)):  # a different damage for each entry
                offset, nbytes, type_name, shape, attrs = table[dname]
                table[dname] = ([offset + 8, nbytes + 8, type_name, shape, attrs],
                                [offset, nbytes, "<x9", shape, attrs], [-1, nbytes, type_name, shape, attrs],
                                [offset, nbytes, type_name, shape, 7], None, "text")[i % 6]
        reader.prepare_loads(keys)
        for k in keys:
            assert_bits_equal(reader.load(k), want[k], str(k))
    finally:
        reader.close()
