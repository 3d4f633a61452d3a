"""The hdf5 writer's datasets created ahead (issue 13, the writer's CPU cost): a dataset created
between the model's operations costs several times what it costs in a row, so when a step takes
a dtype and shape again the writer creates more of them at once and hands them to the next
tensors of that dtype and shape (as many as the last step took, else 1, 1, 2, 4, 8..., at most
``_SPARE_BYTES`` of space ahead). Readers see the same files: every tensor under its name with its
values and attributes, no other dataset; the spares left at step end are deleted by HDF5; a
cut step keeps every record written before its last flush."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from ilstore.keys import CallKey
from ilstore.records import Record, TensorPolicy, build_record, finalize_stats
from ilstore.store import hdf5
from ilstore.store.base import StepInfo
from ilstore.store.registry import open_run
from ilstore.testing import assert_bits_equal
from tests.test_writer_cost_hdf5_attrs import _open

_SHAPES: list[tuple[tuple[int, ...], torch.dtype]] = [
    ((64, 32), torch.float32), ((64, 32), torch.int32), ((64, 32), torch.bfloat16), ((3,), torch.float32)]


def _records(step: int, layers: int) -> list[Record]:
    """``layers`` module calls, each with an input and a tuple output of the same four tensors'
    dtypes and shapes (float32, int32 and bfloat16 of one shape: three dtypes, one shape), every
    tensor distinct (no de-duplication), plus one call with a tensor of a shape of its own."""
    g = torch.Generator().manual_seed(step * 1000 + layers)
    policy = TensorPolicy(pin_memory=False)
    out: list[Record] = []

    def tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if dtype == torch.int32:
            return torch.randint(-1000, 1000, shape, generator=g, dtype=dtype)
        return torch.randn(shape, generator=g).to(dtype)

    for i in range(layers):
        call = CallKey(0, step, f"layers.{i}", 0)
        out.append(build_record(call, "inputs", (tensor(*_SHAPES[0]),), policy))
        out.append(build_record(call, "outputs", tuple(tensor(*s) for s in _SHAPES), policy))
    out.append(build_record(CallKey(0, step, "head", 0), "outputs", tensor((7, 5), torch.float32), policy))
    for rec in out:
        finalize_stats(rec)
    return out


class _Creates:
    """Counts the datasets HDF5 is asked to create."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = h5py.h5d.create

        def create(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(h5py.h5d, "create", create)


def _tensors(records: list[Record]) -> int:
    return sum(len(rec.tensors) for rec in records)


def _check(path: Path, records: list[Record]) -> None:
    """Exactly the records' datasets, each with its tensor's bytes and attributes."""
    with h5py.File(path, "r") as f:
        found: list[str] = []
        f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset)
                     and name != hdf5.STRUCTURES else None)
        want = [f"{hdf5.group_name(rec.call.module, rec.call.call)}/{hdf5.dataset_name(rec.kind, p)}"
                for rec in records for p in rec.tensors]
        assert sorted(found) == sorted(want)
        for rec in records:
            group = f[hdf5.group_name(rec.call.module, rec.call.call)]
            for p, t in rec.tensors.items():
                ds = group[hdf5.dataset_name(rec.kind, p)]
                assert ds.attrs["dtype"] == str(t.dtype)
                assert ("encoding" in ds.attrs) == (t.dtype == torch.bfloat16)
                stored = torch.from_numpy(ds[()])
                assert_bits_equal(stored.view(torch.bfloat16) if t.dtype == torch.bfloat16 else stored, t)


def _run(run: Path, steps: list[list[Record]], **options: Any) -> None:
    writer = _open(run, **options)
    for records in steps:
        for rec in records:
            writer.write(rec)
        calls = list(dict.fromkeys(rec.call for rec in records))
        writer.end_step(StepInfo(records[0].call.step, calls, calls))
    writer.close()


def test_datasets_of_a_repeated_dtype_and_shape_are_created_ahead(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    creates = _Creates(monkeypatch)
    run = tmp_path / "run"
    first, second = _records(0, 12), _records(1, 12)
    writer = _open(run, flush_interval=3600)
    calls = []
    for rec in first:
        writer.write(rec)
        calls.append(rec.call)
        for (dtype, shape), spare in writer._spare.items():
            assert len(spare) * dtype.itemsize * int(np.prod(shape)) < hdf5._SPARE_BYTES
    calls = list(dict.fromkeys(calls))
    assert creates.count >= _tensors(first)  # datasets only (every side has a body: no /structures)
    writer.end_step(StepInfo(0, calls, calls))
    assert writer._spare == {}
    before = creates.count
    for rec in second:  # the same dtypes and shapes as the step before: as many created as taken
        writer.write(rec)
    assert creates.count - before == _tensors(second)
    calls = list(dict.fromkeys(rec.call for rec in second))
    writer.end_step(StepInfo(1, calls, calls))
    writer.close()
    _check(run / "step_0.h5", first)
    _check(run / "step_1.h5", second)
    with open_run(run) as reader:
        assert reader.steps() == [0, 1]
        for rec in first + second:
            for p, t in rec.tensors.items():
                assert_bits_equal(reader.load(rec.call.tensor(rec.kind, p)), t)


def test_created_ahead_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some records make several datasets (one for themselves, the rest ahead), and more than
    half of the tensors take one made ahead."""
    runs: list[int] = []
    real = hdf5.Hdf5Writer._take

    def take(self: hdf5.Hdf5Writer, fid: Any, array: np.ndarray[Any, Any]) -> Any:
        spare = sum(len(s) for s in self._spare.values())
        out = real(self, fid, array)
        runs.append(sum(len(s) for s in self._spare.values()) - spare)
        return out

    monkeypatch.setattr(hdf5.Hdf5Writer, "_take", take)
    records = _records(0, 12)
    _run(tmp_path / "run", [records], flush_interval=3600)
    assert len(runs) == _tensors(records)
    assert max(runs) >= 3  # 1, 1, 2, 4, 8: some records found their datasets made
    assert runs.count(-1) >= _tensors(records) // 2


def test_spares_never_show_in_a_cut_step(tmp_path: Path) -> None:
    """flush_interval 0: a copy of the step file after each record (what a process killed then
    leaves) holds exactly the records written so far, whatever spares the writer holds."""
    run = tmp_path / "run"
    writer = _open(run, flush_interval=0)
    records = _records(0, 6)
    for i, rec in enumerate(records):
        writer.write(rec)
        copy = tmp_path / f"cut_{i}.h5"
        shutil.copyfile(run / "step_0.h5.partial", copy)
        _check(copy, records[:i + 1])
    assert writer._spare
    writer.close(status="error", error="stopped mid-step")
    _check(run / "step_0.h5.partial", records)
    with open_run(run) as reader:
        assert reader.steps() == [] and reader.incomplete_steps() == [0]


def test_spare_space_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spares deleted at step end leave at most _SPARE_BYTES of unused space per dtype and
    shape in the step file."""
    monkeypatch.setattr(hdf5, "_SPARE_BYTES", 64 * 32 * 4 * 5)  # up to 5 datasets ahead
    run = tmp_path / "run"
    records = _records(0, 13)
    _run(run, [records], flush_interval=3600)
    _check(run / "step_0.h5", records)
    size = os.stat(run / "step_0.h5").st_size
    data = sum(t.numel() * t.element_size() for rec in records for t in rec.tensors.values())
    assert size <= data + 3 * hdf5._SPARE_BYTES + (256 << 10)  # metadata: well under 256 KiB here
