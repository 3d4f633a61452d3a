"""The hdf5 writer's attributes (issue 13, the writer's CPU cost): the ``dtype`` attribute of each
dataset and the structure attribute of each side with a stored body are created together, before
the open step file is flushed and when the step ends (or is abandoned), instead of one or two
between each dataset's creation and the next record's. The step files stay the same to every
reader: after a flush the cut step holds each record written before it with its attributes, a
completed or abandoned step every attribute, and the writer never holds more than a bounded
number of them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import h5py
import pytest
import torch

from ilstore.keys import CallKey
from ilstore.manifest import new_manifest
from ilstore.records import Record, TensorPolicy, build_record, finalize_stats
from ilstore.store import hdf5
from ilstore.store.base import StepInfo
from ilstore.store.registry import open_run
from ilstore.testing import assert_bits_equal


def _records(step: int, n: int) -> list[Record]:
    """``n`` records of module calls ``m0``... of ``step``: one tensor, a tuple of a bfloat16
    (stored as bits, with an ``encoding`` attribute) and an int64, a dict with a non-tensor."""
    g = torch.Generator().manual_seed(n)
    policy = TensorPolicy(pin_memory=False)
    out: list[Record] = []
    for i in range(n):
        value: Any = torch.randn(4, 3, generator=g)
        if i % 3 == 1:
            value = (torch.randn(5, generator=g).to(torch.bfloat16), torch.arange(i, dtype=torch.int64))
        elif i % 3 == 2:
            value = {"a": torch.randn(2, 2, generator=g, dtype=torch.float64), "n": i}
        out.append(build_record(CallKey(0, step, f"m{i}", 0), "outputs", value, policy))
        finalize_stats(out[-1])
    return out


def _open(run: Path, **options: Any) -> hdf5.Hdf5Writer:
    writer = hdf5.Hdf5Writer(run, options)
    writer.open(new_manifest("hdf5", {}))
    return writer


class _Counting:
    """Counts the attributes HDF5 is asked to create (``h5a.create`` through the writer's API)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        api = hdf5._api()
        real = api.h5a

        counter = self

        class _H5a:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def create(self, *args: Any, **kwargs: Any) -> Any:
                counter.count += 1
                return real.create(*args, **kwargs)

        monkeypatch.setattr(api, "h5a", _H5a())


def _expected_attrs(f: h5py.File, records: list[Record]) -> None:
    """Every record's group has its side's structure, every dataset its dtype (and encoding)."""
    for rec in records:
        group = f[hdf5.group_name(rec.call.module, rec.call.call)]
        assert rec.kind in group.attrs, (rec.call, sorted(group.attrs))
        for path, tensor in rec.tensors.items():
            ds = group[hdf5.dataset_name(rec.kind, path)]
            assert ds.attrs["dtype"] == str(tensor.dtype)
            if tensor.dtype == torch.bfloat16:
                assert ds.attrs["encoding"] == "bits"


def test_attributes_are_created_together_not_per_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _Counting(monkeypatch)
    writer = _open(tmp_path / "run", flush_interval=3600)  # no flush within the step
    records = _records(0, 30)
    writer.write(records[0])  # creates the step file (its root attributes, then a flush)
    before = counting.count
    for rec in records[1:]:
        writer.write(rec)
    assert counting.count == before, "an attribute was created between records"
    calls = [rec.call for rec in records]
    writer.end_step(StepInfo(0, calls, calls))
    datasets = sum(len(rec.tensors) for rec in records)
    bf16 = sum(t.dtype == torch.bfloat16 for rec in records for t in rec.tensors.values())
    # each side's structure, each dataset's dtype (and encoding), and the root's calls and call_ends
    assert counting.count - before == len(records) + datasets + bf16 + 2
    writer.close()
    with h5py.File(tmp_path / "run" / "step_0.h5", "r") as f:
        _expected_attrs(f, records)


def test_pending_attributes_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hdf5, "_PENDING_ATTRS", 16)
    writer = _open(tmp_path / "run", flush_interval=3600)
    records = _records(0, 40)
    most = 0
    for rec in records:
        writer.write(rec)
        most = max(most, len(writer._attrs))
    assert 0 < most < 16 + 4  # at most one record's attributes over the bound
    calls = [rec.call for rec in records]
    writer.end_step(StepInfo(0, calls, calls))
    writer.close()
    with h5py.File(tmp_path / "run" / "step_0.h5", "r") as f:
        _expected_attrs(f, records)


def test_a_flushed_cut_step_keeps_every_attribute(tmp_path: Path) -> None:
    """flush_interval 0: after each record the file holds it whole, attributes included (a copy
    taken then is what a process killed then leaves)."""
    run = tmp_path / "run"
    writer = _open(run, flush_interval=0)
    records = _records(0, 7)
    for i, rec in enumerate(records):
        writer.write(rec)
        copy = tmp_path / f"cut_{i}.h5"
        shutil.copyfile(run / "step_0.h5.partial", copy)
        with h5py.File(copy, "r") as f:
            _expected_attrs(f, records[:i + 1])
    writer.close()


def test_an_abandoned_step_keeps_every_attribute(tmp_path: Path) -> None:
    run = tmp_path / "run"
    writer = _open(run, flush_interval=3600)
    step0 = _records(0, 5)
    for rec in step0:
        writer.write(rec)
    calls = [rec.call for rec in step0]
    writer.end_step(StepInfo(0, calls, calls))
    records = _records(1, 9)
    for rec in records:
        writer.write(rec)
    writer.close(status="error", error="stopped mid-step")  # the step never ends: it stays .partial
    assert not (run / "step_1.h5").exists()
    with h5py.File(run / "step_1.h5.partial", "r") as f:
        _expected_attrs(f, records)
    with open_run(run) as reader:
        assert reader.steps() == [0] and reader.incomplete_steps() == [1]
        for rec in records:
            for path, tensor in rec.tensors.items():
                assert_bits_equal(reader.load(rec.call.tensor(rec.kind, path)), tensor)
