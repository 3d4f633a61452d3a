"""The ``hdf5`` writer over many steps (issue 13: a step costs the same at step 100,000 as at step 10).

A step's cost can only grow with the run if something outlives its step: an HDF5 identifier
left open (HDF5 and h5py walk their open identifiers at every file close), an h5py object
still referenced (h5py's registry of live identifiers is walked at every ``File.close``), or
Python objects kept per step (each full garbage collection walks them all). Each is counted
here after a few steps and again after many more; none may grow.
"""

from __future__ import annotations

import gc
from pathlib import Path

import h5py
import pytest
import torch
from h5py import h5f

import ilstore


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4)).eval()


def _h5py_ids() -> int:
    """h5py's live identifier objects (what ``nonlocal_close`` walks at every ``File.close``)."""
    return sum(issubclass(type(o), h5py._objects.ObjectID) for o in gc.get_objects())


def _hdf5_open() -> tuple[int, int]:
    """HDF5's open identifiers of every kind in every file, and its open files."""
    return h5f.get_obj_count(h5f.OBJ_ALL, h5f.OBJ_ALL), h5f.get_obj_count(h5f.OBJ_ALL, h5f.OBJ_FILE)


@pytest.mark.parametrize("mode", ["tensors", "stats"])
def test_no_hdf5_identifier_outlives_its_step(tmp_path: Path, mode: str) -> None:
    model, x = _model(), torch.randn(1, 4)
    config = {"output_dir": str(tmp_path), "run_id": "r", "backend": "hdf5", "mode": mode, "log_step_ids": [],
              "async_writes": False}  # each step is written and closed before the next forward returns
    seen = {}
    before = _hdf5_open()
    with torch.no_grad(), ilstore.capture(model, config):
        for step in range(60):
            model(x)
            if step in (9, 59):
                seen[step] = (_h5py_ids(), *_hdf5_open())
    assert seen[59] == seen[9], f"h5py ids, HDF5 open ids, open files after 10 / 60 steps: {seen[9]} / {seen[59]}"
    assert seen[59][2] == before[1], "a step file is still open between steps"
    # what stays open is the writer's process-wide cache of HDF5 types and dataspaces (a few ids)
    assert _hdf5_open() == seen[59][1:], "the capture's close left HDF5 identifiers open"
    assert len(list((tmp_path / "r").glob("step_*.h5"))) == 60


def test_python_objects_do_not_grow_with_steps(tmp_path: Path) -> None:
    model, x = _model(), torch.randn(1, 4)
    config = {"output_dir": str(tmp_path), "run_id": "r", "backend": "hdf5", "mode": "tensors", "log_step_ids": [],
              "async_writes": False}
    counts = {}
    with torch.no_grad(), ilstore.capture(model, config):
        for step in range(220):
            model(x)
            if step in (19, 219):
                gc.collect()
                counts[step] = len(gc.get_objects())
    # one object kept per step would add 200; caches filling up (interned strings, keys) add a few
    assert counts[219] - counts[19] < 50, f"gc-tracked objects after 20 / 220 steps: {counts[19]} / {counts[219]}"
