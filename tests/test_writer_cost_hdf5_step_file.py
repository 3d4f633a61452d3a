"""The hdf5 writer's step file set-up (issue 13, the writer's CPU cost per step): whether tensor
bytes may be pwritten at HDF5's addresses is known from the writer's own property lists (the
sec2 driver, no user block) instead of asked of each new file through h5py's ``File.driver``
and ``userblock_size`` (~40 us of a step file's ~360 us)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import pytest
import torch

from ilstore.keys import CallKey
from ilstore.records import TensorPolicy, build_record, finalize_stats
from ilstore.store import hdf5
from ilstore.store.base import StepInfo
from ilstore.testing import assert_bits_equal
from tests.test_writer_cost_hdf5_attrs import _open


@pytest.mark.skipif(not hdf5.pread_ok, reason="no pread/pwrite here")
def test_each_step_file_is_written_through_hdf5s_own_descriptor(tmp_path: Path) -> None:
    run = tmp_path / "run"
    writer = _open(run, flush_interval=3600)
    assert hdf5._api().offsets
    values = []
    for step in range(3):
        value = torch.randn(8, 5, generator=torch.Generator().manual_seed(step))
        rec = build_record(CallKey(0, step, "m", 0), "outputs", value, TensorPolicy(pin_memory=False))
        finalize_stats(rec)
        writer.write(rec)
        assert writer._fd is not None  # the bytes are pwritten, not handed to HDF5
        partial = os.fstat(writer._fd)
        assert (partial.st_dev, partial.st_ino) == (os.stat(run / f"step_{step}.h5.partial").st_dev,
                                                    os.stat(run / f"step_{step}.h5.partial").st_ino)
        writer.end_step(StepInfo(step, [rec.call], [rec.call]))
        values.append(value)
    writer.close()
    for step, value in enumerate(values):
        with h5py.File(run / f"step_{step}.h5", "r") as f:
            assert f.driver == "sec2" and f.userblock_size == 0
            assert_bits_equal(torch.from_numpy(f["m#0"]["outputs"][()]), value)
