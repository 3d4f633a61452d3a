"""The hdf5 writer's groups and links (issue 13, the writer's CPU cost): a record's tensor bodies
are written into anonymous datasets before ``write`` returns, and the call's group and the links
that name the datasets are created with the held attributes, before the open step file is
flushed and when the step ends (or is abandoned), instead of one group and one named dataset
between the model's operations. The step files stay the same to every reader: groups in
call-start order, each dataset under its name with its values and attributes, a de-duplicated
tensor a hard link to the first dataset; after a flush the cut step holds every record written
before it, and the writer never holds more than a bounded number of links and attributes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from h5py import h5g, h5o

from ilstore.keys import CallKey
from ilstore.records import Deduper, Record, TensorPolicy, build_record, finalize_stats
from ilstore.store import hdf5
from ilstore.store.base import StepInfo
from ilstore.store.registry import open_run
from ilstore.testing import assert_bits_equal
from tests.test_writer_cost_hdf5_attrs import _open


def _records(step: int, n: int) -> list[Record]:
    """``n`` records of the module calls ``m0``...: inputs then outputs of each, the outputs of
    every call passed on as the next call's inputs (de-duplicated: a hard link), a bfloat16
    (stored as bits) in every third call's tuple output, a value without a tensor in a dict."""
    g = torch.Generator().manual_seed(n)
    policy = TensorPolicy(pin_memory=False)
    dedup = Deduper()
    out: list[Record] = []
    x = torch.randn(4, 3, generator=g)
    for i in range(n):
        call = CallKey(0, step, f"m{i}", 0)
        out.append(build_record(call, "inputs", (x,), policy, dedup=dedup))
        value: Any = torch.randn(4, 3, generator=g)
        if i % 3 == 1:
            value = (value, torch.randn(5, generator=g).to(torch.bfloat16))
        elif i % 3 == 2:
            value = {"a": value, "n": i}
        out.append(build_record(call, "outputs", value, policy, dedup=dedup))
        x = value if isinstance(value, torch.Tensor) else value[0] if isinstance(value, tuple) else value["a"]
    for rec in out:
        finalize_stats(rec)
    return out


class _Counting:
    """Counts the groups and links HDF5 is asked to create, and the datasets created under a name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.groups = self.links = self.named = 0
        real_group, real_link = h5g.create, h5o.link
        real_dataset = h5py.h5d.create

        def group(*args: Any, **kwargs: Any) -> Any:
            self.groups += 1
            return real_group(*args, **kwargs)

        def link(*args: Any, **kwargs: Any) -> Any:
            self.links += 1
            return real_link(*args, **kwargs)

        def dataset(loc: Any, name: Any, *args: Any, **kwargs: Any) -> Any:
            self.named += name is not None
            return real_dataset(loc, name, *args, **kwargs)

        monkeypatch.setattr(h5g, "create", group)
        monkeypatch.setattr(h5o, "link", link)
        monkeypatch.setattr(h5py.h5d, "create", dataset)

    def total(self) -> int:
        return self.groups + self.links + self.named


def _check(f: h5py.File, records: list[Record]) -> None:
    """Every record's group (in call-start order), its side's structure, each stored tensor's
    values and attributes under its name, each de-duplicated one the first dataset itself."""
    names = list(dict.fromkeys(hdf5.group_name(rec.call.module, rec.call.call) for rec in records))
    assert [k for k in f.keys() if k != hdf5.STRUCTURES] == names
    first: dict[str, Any] = {}
    for rec in records:
        group = f[hdf5.group_name(rec.call.module, rec.call.call)]
        assert rec.kind in group.attrs, (rec.call, sorted(group.attrs))
        for path, node in rec.tensor_nodes():
            ds = group[hdf5.dataset_name(rec.kind, path)]
            key = str(rec.key(path))
            if node.get("same_as") is not None:
                assert ds.id == first[node["same_as"]].id, key
                continue
            first[key] = ds
            tensor = rec.tensors[path]
            assert ds.attrs["dtype"] == str(tensor.dtype), key
            if tensor.dtype == torch.bfloat16:
                assert ds.attrs["encoding"] == "bits"
                assert_bits_equal(torch.from_numpy(ds[()]).view(torch.bfloat16), tensor, key)
            else:
                np.testing.assert_array_equal(ds[()], tensor.numpy(), err_msg=key)


def test_records_have_some_de_duplicated_tensors() -> None:
    records = _records(0, 6)
    assert sum(node.get("same_as") is not None for rec in records for _p, node in rec.tensor_nodes()) >= 5


def test_groups_and_links_are_created_together_not_per_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _Counting(monkeypatch)
    writer = _open(tmp_path / "run", flush_interval=3600)  # no flush within the step
    records = _records(0, 12)
    writer.write(records[0])  # creates the step file (its root attributes, then a flush)
    before = counting.total()
    for rec in records[1:]:
        writer.write(rec)
    assert counting.total() == before, "a group, a link or a named dataset was created between records"
    calls = list(dict.fromkeys(rec.call for rec in records))
    writer.end_step(StepInfo(0, calls, calls))
    tensors = sum(len(rec.tensor_nodes()) for rec in records)
    assert counting.groups == len(calls)
    # each stored tensor: its dataset, or a hard link to the first; and the step's /structures
    assert counting.links == tensors + 1
    assert counting.named == 0
    writer.close()
    with h5py.File(tmp_path / "run" / "step_0.h5", "r") as f:
        _check(f, records)
    with open_run(tmp_path / "run") as reader:
        for rec in records:
            for path, tensor in rec.tensors.items():
                assert_bits_equal(reader.load(rec.call.tensor(rec.kind, path)), tensor)


def test_a_flushed_cut_step_keeps_every_group_and_link(tmp_path: Path) -> None:
    """flush_interval 0: after each record the file holds it whole, its group, datasets and
    links included (a copy taken then is what a process killed then leaves)."""
    run = tmp_path / "run"
    writer = _open(run, flush_interval=0)
    records = _records(0, 5)
    for i, rec in enumerate(records):
        writer.write(rec)
        copy = tmp_path / f"cut_{i}.h5"
        shutil.copyfile(run / "step_0.h5.partial", copy)
        with h5py.File(copy, "r") as f:
            _check(f, records[:i + 1])
    writer.close()


def test_a_link_to_a_dataset_written_before_a_flush(tmp_path: Path) -> None:
    """A flush between a tensor's first record and the record that repeats it: the hard link
    made after the flush names the dataset linked before it."""
    run = tmp_path / "run"
    writer = _open(run, flush_interval=3600)
    records = _records(0, 6)
    for i, rec in enumerate(records):
        writer.write(rec)
        if i % 3 == 0:
            writer._set_attrs()
            writer._file.flush()
    calls = list(dict.fromkeys(rec.call for rec in records))
    writer.end_step(StepInfo(0, calls, calls))
    writer.close()
    with h5py.File(run / "step_0.h5", "r") as f:
        _check(f, records)


def test_pending_links_and_attributes_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hdf5, "_PENDING_ATTRS", 16)
    writer = _open(tmp_path / "run", flush_interval=3600)
    records = _records(0, 20)
    most = 0
    for rec in records:
        writer.write(rec)
        most = max(most, len(writer._attrs) + len(writer._links))
    assert 0 < most < 16 + 6  # at most one record's links and attributes over the bound
    calls = list(dict.fromkeys(rec.call for rec in records))
    writer.end_step(StepInfo(0, calls, calls))
    writer.close()
    with h5py.File(tmp_path / "run" / "step_0.h5", "r") as f:
        _check(f, records)


def test_an_abandoned_step_keeps_every_group_and_link(tmp_path: Path) -> None:
    run = tmp_path / "run"
    writer = _open(run, flush_interval=3600)
    step0 = _records(0, 3)
    for rec in step0:
        writer.write(rec)
    calls = list(dict.fromkeys(rec.call for rec in step0))
    writer.end_step(StepInfo(0, calls, calls))
    records = _records(1, 7)
    for rec in records:
        writer.write(rec)
    writer.close(status="error", error="stopped mid-step")  # the step never ends: it stays .partial
    assert not (run / "step_1.h5").exists()
    with h5py.File(run / "step_1.h5.partial", "r") as f:
        _check(f, records)
    with open_run(run) as reader:
        assert reader.steps() == [0] and reader.incomplete_steps() == [1]
        for rec in records:
            for path, tensor in rec.tensors.items():
                assert_bits_equal(reader.load(rec.call.tensor(rec.kind, path)), tensor)


def test_format_version_1_groups_keep_their_attributes_in_order(tmp_path: Path) -> None:
    """``structure_list: false`` (format version 1): each group's module, call, step and rank
    come first, then each side's structure, in the order the records came."""
    run = tmp_path / "run"
    writer = _open(run, flush_interval=3600, structure_list=False)
    records = _records(0, 4)
    for rec in records:
        writer.write(rec)
    calls = list(dict.fromkeys(rec.call for rec in records))
    writer.end_step(StepInfo(0, calls, calls))
    writer.close()
    with h5py.File(run / "step_0.h5", "r") as f:
        _check(f, records)
        for call in calls:
            group = f[hdf5.group_name(call.module, call.call)]
            assert _attribute_names(group) == ["module", "call", "step", "rank", "inputs", "outputs"]
            assert (group.attrs["module"], group.attrs["call"]) == (call.module, call.call)


def _attribute_names(obj: Any) -> list[str]:
    """The attributes of ``obj`` in its object header's order: the order they were created."""
    names: list[str] = []
    h5py.h5a.iterate(obj.id, lambda name, *_: names.append(name.decode()), index_type=h5py.h5.INDEX_NAME,
                     order=h5py.h5.ITER_NATIVE)
    return names
