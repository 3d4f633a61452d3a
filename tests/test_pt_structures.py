"""The pt backend's per-step structure list (issue 13): a side with no stored body is one line of
``step_<N>/structures.jsonl`` instead of a ``<kind>.json`` in a call directory of its own.

The reader answers the same for a capture written either way (the directory layout is what
ilstore wrote before, and what ``PtWriter._list_sides = False`` still writes); the list is read
once per step; damaged, linked or torn lists are refused or ignored as the other files are; a
run killed mid-step keeps its completed steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import ilstore
import ilstore.store.pt as pt
from ilstore.cli import cli
from ilstore.errors import StoreError
from ilstore.keys import KINDS, TensorKey
from ilstore.summary import _summary_from_reader
from support import OsCalls, step_records


class Pair(torch.nn.Module):
    """Outputs a tuple with a tensor, a plain value and None; takes a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, scale: float = 1.0, mask: torch.Tensor | None = None) -> Any:
        y = self.lin(x) * scale
        return (y, 3, None) if mask is None else (y + mask, "tag", None)


class Nothing(torch.nn.Module):
    """A module whose output holds no tensor at all."""

    def forward(self, x: torch.Tensor) -> None:
        return None


class Big(torch.nn.Module):
    """A small input, a large output: with ``max_tensor_size`` the inputs are stored, the outputs not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, 20)


class Model(torch.nn.Module):
    """Calls ``fc`` twice and has a module named ``fc_1`` (call 1 of ``fc`` and call 0 of ``fc_1``
    would share a directory name: the second gets ``~2``), a module called without tensors and
    one whose sides differ in what is stored."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 6)
        self.fc_1 = torch.nn.Linear(6, 6)
        self.pair = Pair()
        self.nothing = Nothing()
        self.big = Big()
        self.act = torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.fc(x)
        b = self.fc_1(a)
        c = self.fc(self.act(b))
        y, _n, _none = self.pair(c, scale=0.5, mask=torch.ones_like(c))
        self.nothing(y)
        self.big(y[:, :2])
        return self.act(y)


def _capture(out_dir: Path, run_id: str, mode: str, steps: int = 3, old: bool = False, **config: Any) -> Path:
    torch.manual_seed(0)
    model = Model()
    inputs = [torch.randn(2, 6, generator=torch.Generator().manual_seed(i)) for i in range(steps)]
    cfg = {"output_dir": str(out_dir), "run_id": run_id, "mode": mode, "log_step_ids": [], **config}
    if old:  # the earlier layout, which backend_options.structure_list=false still writes
        cfg["backend_options"] = {"structure_list": False}
    with torch.no_grad(), ilstore.capture(model, cfg) as cap:
        for x in inputs:
            model(x)
    assert cap.run_dir is not None and cap.error is None
    return cap.run_dir


def _everything(run_dir: Path) -> dict[str, Any]:
    """Everything the public reader API says about a run (tensors as their bytes)."""
    with ilstore.open_run(run_dir) as run:
        out: dict[str, Any] = {"status": run.status, "steps": run.steps(), "incomplete": run.incomplete_steps(),
                               "keys": run.keys(), "totals": run.all_step_totals(),
                               "orders": run.call_orders()}
        for step in run.steps():
            calls = run.calls(step)
            out[f"calls {step}"] = calls
            out[f"ends {step}"] = run.call_ends(step)
            out[f"keys {step}"] = run.keys(step)
            out[f"totals {step}"] = run.step_totals(step)
            for call in calls:
                for kind in KINDS:
                    out[f"structure {call} {kind}"] = run.structure(call, kind)
                    out[f"nodes {call} {kind}"] = list(run.tensor_nodes(call, kind))
        for key in run.keys():
            meta = run.meta(key)
            out[f"meta {key}"] = meta
            if meta.get("stored"):
                tensor = run.load(key)
                out[f"load {key}"] = (tensor.dtype, tuple(tensor.shape), tensor.numpy().tobytes())
            else:
                with pytest.raises(KeyError, match="not stored"):
                    run.load(key)
        table = run.stats_table()
        out["table"] = None if table is None else (table.layouts(), table.rows())
    out["ls"] = _summary_from_reader(run_dir, calls=True)
    return out


def _same(new: dict[str, Any], old: dict[str, Any]) -> None:
    assert new.keys() == old.keys()
    for name in new:
        a, b = new[name], old[name]
        if name == "ls":  # the same but for the run directory
            a, b = dataclasses.replace(a, run_dir=None), dataclasses.replace(b, run_dir=None)
        assert a == b, name


def _layout(run_dir: Path, step: int) -> list[str]:
    root = run_dir / f"step_{step}"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("config", [{"mode": "stats"}, {"mode": "tensors"}, {"mode": "tensors", "max_tensor_size": 40},
                                    {"mode": "stats", "log_post_fwd_inputs": True},
                                    {"mode": "tensors", "log_post_fwd_inputs": True, "max_tensor_size": 40}],
                         ids=["stats", "tensors", "mixed", "stats-post", "mixed-post"])
def test_both_layouts_read_the_same(out_dir: Path, config: dict[str, Any]) -> None:
    """The same capture written in the directory layout and with the structure list: every
    answer of the reader is the same (calls, orders, structures, nodes, keys, meta, loads,
    totals, the statistics table, ``ilstore ls --calls``)."""
    config = dict(config)
    mode = config.pop("mode")
    new_dir = _capture(out_dir, "new", mode, **config)
    old_dir = _capture(out_dir, "old", mode, old=True, **config)
    new, old = _everything(new_dir), _everything(old_dir)
    assert len(new["keys"]) > 20
    _same(new, old)
    order = (new_dir / "step_1" / "module_calls.txt").read_text()
    assert order == (old_dir / "step_1" / "module_calls.txt").read_text()
    assert "fc_1~2\n" in (new_dir / "step_1" / "module_calls.txt").read_text()  # call 1 of fc, after module fc_1
    # the layouts differ as designed: a side without a stored body is a line, not a file
    with ilstore.open_run(old_dir) as run:
        names = {(c.module, c.call): path.name for c, path in run._dirs_of(1).items()}  # type: ignore[attr-defined]
    old_files, new_files = _layout(old_dir, 1), _layout(new_dir, 1)
    listing = new_dir / "step_1" / "structures.jsonl"
    lines = [json.loads(line) for line in listing.read_text().splitlines()] if listing.exists() else []
    listed = {(d["ilstore"]["module"], d["ilstore"]["call"], d["ilstore"]["kind"]) for d in lines}
    assert len(listed) == len(lines)
    assert not [f for f in old_files if f.endswith("structures.jsonl")]
    assert sorted([f for f in new_files if f.endswith(".json")]
                  + [f"{names[m, c]}/{k}.json" for m, c, k in listed]) == [f for f in old_files if f.endswith(".json")]
    for doc in lines:
        assert not any(node.get("stored") for _p, node in _nodes(doc))
        head = doc["ilstore"]
        assert json.loads((old_dir / "step_1" / names[head["module"], head["call"]] / f"{head['kind']}.json")
                          .read_text()) == doc
    # the tensor files are the same
    assert [f for f in new_files if f.endswith(".pt")] == [f for f in old_files if f.endswith(".pt")]
    if mode == "stats":
        assert sorted(os.listdir(new_dir / "step_1")) == ["module_calls.txt", "structures.jsonl"]
    else:
        assert ("fc", 1, "outputs") not in listed
    if "max_tensor_size" in config:  # big: inputs stored (a directory), outputs a line
        assert ("big", 0, "outputs") in listed and "big/inputs.json" in new_files
        assert "big/outputs.json" not in new_files
    assert ("nothing", 0, "outputs") in listed  # no tensor at all


def _nodes(doc: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
    from ilstore.records import iter_tensor_nodes

    return iter_tensor_nodes(doc)


def test_convert_writes_and_reads_the_list(out_dir: Path, tmp_path: Path) -> None:
    """A stats run converted pt → hdf5 → pt, and an old-layout run converted to pt, read the same."""
    from ilstore.convert import convert

    old_dir = _capture(out_dir, "old", "stats", old=True)
    new_dir = _capture(out_dir, "new", "stats")
    convert(old_dir, tmp_path / "from_old", "pt")
    assert (tmp_path / "from_old" / "step_0" / "structures.jsonl").is_file()
    assert sorted(os.listdir(tmp_path / "from_old" / "step_0")) == ["module_calls.txt", "structures.jsonl"]
    want = _everything(old_dir)
    for name in want:
        if name.startswith(("structure", "meta", "calls", "keys", "nodes")):
            assert _everything(tmp_path / "from_old")[name] == want[name] == _everything(new_dir)[name], name


def test_a_stats_step_is_three_inodes(out_dir: Path) -> None:
    """The long-run workload's files per step: the step directory, its list and its call order."""
    run_dir = _capture(out_dir, "r", "stats", steps=4)
    for step in range(4):
        assert sorted(os.listdir(run_dir / f"step_{step}")) == ["module_calls.txt", "structures.jsonl"]


# -- reading: one read per step ----------------------------------------------------------------------
def test_a_stats_step_is_read_with_one_open(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every structure of a statistics-only step (every call, every kind, absent ones too) costs one
    ``open``/``read``/``close`` of the list and one listing of the step, none per call."""
    run_dir = _capture(out_dir, "r", "stats", steps=2, log_post_fwd_inputs=False)
    with ilstore.open_run(run_dir) as run:
        run._dirs_of(1)  # type: ignore[attr-defined]  # the call directories are resolved (and checked) once per step
        counts = OsCalls(monkeypatch, ("open", "read", "close", "stat", "lstat", "fstat", "listdir", "scandir"))
        calls = run.calls(1)
        structures = [run.structure(call, kind) for call in calls for kind in KINDS]
        again = [run.structure(call, kind) for call in calls for kind in KINDS]
        monkeypatch.undo()
    assert len(calls) == 9 and sum(s is not None for s in structures) == 2 * len(calls) and structures == again
    assert counts.counts == {"open": 1, "read": 2, "close": 1, "stat": 0, "lstat": 0, "fstat": 0, "listdir": 1,
                             "scandir": 0}, counts.counts


def test_a_side_asked_again_after_the_cache_is_a_new_object(out_dir: Path) -> None:
    """The reader hands out a fresh document each time it reads a line (as it parses a file)."""
    run_dir = _capture(out_dir, "r", "stats", steps=1)
    with ilstore.open_run(run_dir) as run:
        call = run.calls(0)[1]
        first = run._read_structure(call, "outputs")  # type: ignore[attr-defined]
        first["changed"] = True
        second = run._read_structure(call, "outputs")  # type: ignore[attr-defined]
        assert "changed" not in second and second == run.structure(call, "outputs")


# -- damaged and hostile lists -------------------------------------------------------------------------
def _list_path(run_dir: Path, step: int = 0) -> Path:
    return run_dir / f"step_{step}" / "structures.jsonl"


def _read_all(run_dir: Path) -> dict[tuple[int, str, int, str], Any]:
    with ilstore.open_run(run_dir) as run:
        return {(step, call.module, call.call, kind): run.structure(call, kind) for step in run.steps()
                for call in run.calls(step) for kind in KINDS}


def test_a_torn_last_line_is_ignored(out_dir: Path) -> None:
    run_dir = _capture(out_dir, "r", "stats", steps=1)
    want = _read_all(run_dir)
    with _list_path(run_dir).open("ab") as fh:
        fh.write(b'{"type": "tensor", "ilstore": {"module": "fc", "call": 0, "st')
    assert _read_all(run_dir) == want
    lines = _list_path(run_dir).read_bytes().split(b"\n")
    _list_path(run_dir).write_bytes(b"\n".join(lines[:-2]) + b"\n" + lines[-2][:-5])  # the last side's line cut
    got = _read_all(run_dir)
    cut = json.loads(lines[-2])["ilstore"]
    changed = {name for name in want if got[name] != want[name]}
    assert len(changed) == 1
    name = changed.pop()
    assert got[name] is None and name == (0, cut["module"], cut["call"], cut["kind"]), name


@pytest.mark.parametrize(("line", "problem"), [
    (b"{not json", "line 2: not a JSON document"),
    (b"\xff\xfe{}", "line 2: not a JSON document"),
    (b"[1, 2]", "line 2: expected a JSON object"),
    (b'{"type": "tuple", "items": []}', 'line 2: no "ilstore" header'),
    (b'{"type": "tuple", "items": [], "ilstore": {"module": 3, "call": 0, "kind": "outputs", "step": 0}}',
     "line 2: bad \"ilstore\" header"),
    (b'{"type": "tuple", "items": [], "ilstore": {"module": "x", "call": 0, "kind": "sideways", "step": 0}}',
     "line 2: bad \"ilstore\" header"),
    (b'{"type": "tuple", "items": [], "ilstore": {"module": "x", "call": 0, "kind": "outputs", "step": 5}}',
     "line 2: the \"ilstore\" header names step 5"),
])
def test_a_damaged_line_is_a_corrupt_file_error_naming_the_file_and_line(out_dir: Path, line: bytes,
                                                                         problem: str) -> None:
    """The sides on good lines stay readable; asking for one that is not on a good line (it
    may be the damaged one) names the file and the line."""
    run_dir = _capture(out_dir, "r", "stats", steps=1)
    lines = _list_path(run_dir).read_bytes().split(b"\n")
    gone = json.loads(lines[1])["ilstore"]
    lines[1] = line
    _list_path(run_dir).write_bytes(b"\n".join(lines))
    with ilstore.open_run(run_dir) as run:
        first = run.calls(0)[0]
        assert run.structure(first, "inputs") is not None  # line 1
        victim = next(c for c in run.calls(0) if (c.module, c.call) == (gone["module"], gone["call"]))
        with pytest.raises(ilstore.CorruptFileError, match="structures.jsonl") as err:
            run.structure(victim, gone["kind"])
        assert problem in str(err.value)
    result = CliRunner().invoke(cli, ["ls", str(run_dir), "--calls"])
    assert result.exit_code != 0 and "structures.jsonl" in result.output


def test_a_side_on_two_lines_is_a_corrupt_file_error(out_dir: Path) -> None:
    run_dir = _capture(out_dir, "r", "stats", steps=1)
    lines = _list_path(run_dir).read_bytes().split(b"\n")
    twice = json.loads(lines[0])["ilstore"]
    _list_path(run_dir).write_bytes(b"\n".join([*lines[:-1], lines[0], b""]))
    with ilstore.open_run(run_dir) as run:
        call = run.calls(0)[0]
        assert (call.module, call.call) == (twice["module"], twice["call"])
        with pytest.raises(ilstore.CorruptFileError, match=r"structures.jsonl.*lines 1 and \d+ both hold inputs"):
            run.structure(call, "inputs")
        assert run.structure(call, "outputs") is not None


def test_a_linked_list_leading_outside_is_refused(out_dir: Path, tmp_path: Path) -> None:
    run_dir = _capture(out_dir, "r", "stats", steps=1)
    outside = tmp_path / "outside.jsonl"
    os.replace(_list_path(run_dir), outside)
    _list_path(run_dir).symlink_to(outside)
    with pytest.raises(ilstore.UnsafePathError, match="outside the run directory"), ilstore.open_run(run_dir) as run:
        run.structure(run.calls(0)[0], "inputs")


def test_a_linked_list_inside_the_run_reads(out_dir: Path) -> None:
    run_dir = _capture(out_dir, "r", "stats", steps=1)
    want = _read_all(run_dir)
    os.replace(_list_path(run_dir), run_dir / "moved.jsonl")
    _list_path(run_dir).symlink_to(run_dir / "moved.jsonl")
    assert _read_all(run_dir) == want


def test_a_directory_in_place_of_the_list_is_no_list(out_dir: Path) -> None:
    """As a directory named ``outputs.json`` is no captured side: the sides are absent."""
    run_dir = _capture(out_dir, "r", "stats", steps=1)
    _list_path(run_dir).unlink()
    _list_path(run_dir).mkdir()
    assert set(_read_all(run_dir).values()) == {None}


def test_a_linked_step_directory_leading_outside_is_refused(out_dir: Path, tmp_path: Path) -> None:
    run_dir = _capture(out_dir, "r", "stats", steps=1)
    os.replace(run_dir / "step_0", tmp_path / "step_0")
    (run_dir / "step_0").symlink_to(tmp_path / "step_0", target_is_directory=True)
    with pytest.raises(ilstore.UnsafePathError, match="outside the run directory"), ilstore.open_run(run_dir) as run:
        run.structure(run.calls(0)[0], "inputs")


# -- writing: a side written twice, a step written again, a failed write ------------------------------------
def test_a_side_written_twice_in_a_step_has_its_latest_line(out_dir: Path, tmp_path: Path) -> None:
    import dataclasses

    source = _capture(out_dir, "src", "stats", steps=1)
    records, info = step_records(source, 0)
    writer = pt.PtWriter(tmp_path / "copy")
    writer.open(json.loads((source / "ilstore.json").read_text()))
    for record in records:
        writer.write(record)
    again = dataclasses.replace(records[1], structure={"type": "value", "value": "again"})
    writer.write(again)
    writer.end_step(info)
    writer.close()
    lines = _list_path(tmp_path / "copy").read_text().splitlines()
    assert len(lines) == len(records)
    with ilstore.open_run(tmp_path / "copy") as run:
        assert run.structure(again.call, again.kind) == {"type": "value", "value": "again"}
        assert run.structure(records[0].call, records[0].kind) == records[0].structure


def test_a_step_written_again_has_only_its_latest_list(out_dir: Path, tmp_path: Path) -> None:
    """A hand-driven writer going back to a step: the step's earlier list is dropped, so sides
    written to files the second time are not shadowed by earlier lines."""
    source = _capture(out_dir, "src", "stats", steps=2)
    (records0, info0), (records1, info1) = step_records(source, 0), step_records(source, 1)
    writer = pt.PtWriter(tmp_path / "copy")
    writer.open(json.loads((source / "ilstore.json").read_text()))
    for records, info in ((records0, info0), (records1, info1)):
        for record in records:
            writer.write(record)
        writer.end_step(info)
    from ilstore.records import Record

    call = records0[0].call
    stored = Record(call, "inputs", {"type": "tensor", "shape": [2], "dtype": "torch.float32", "numel": 2,
                                     "device": "cpu", "path": [], "stored": True}, {(): torch.tensor([1.0, 2.0])})
    writer.write(stored)  # step 0 again: only this side
    writer.end_step(info0)
    writer.close()
    assert not _list_path(tmp_path / "copy").exists()
    with ilstore.open_run(tmp_path / "copy") as run:
        assert torch.equal(run.load(TensorKey(0, call.module, call.call, "inputs")), torch.tensor([1.0, 2.0]))
        assert run.structure(records0[1].call, records0[1].kind) is None


def test_a_failed_append_leaves_only_complete_lines(out_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails partway (a full disk) is cut back: the list holds only whole lines."""
    source = _capture(out_dir, "src", "stats", steps=1)
    records, _info = step_records(source, 0)
    monkeypatch.setattr(pt.PtWriter, "_lines_per_write", 1)  # each line its own write
    writer = pt.PtWriter(tmp_path / "copy")
    writer.open(json.loads((source / "ilstore.json").read_text()))
    writer.write(records[0])

    def full(fd: int, data: Any) -> int:
        os.write(fd, memoryview(data)[:7])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pt, "_os_write", full)
    with pytest.raises(OSError, match="No space"):
        writer.write(records[1])
    monkeypatch.setattr(pt, "_os_write", os.write)
    data = _list_path(tmp_path / "copy").read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    writer.write(records[1])
    assert _list_path(tmp_path / "copy").read_bytes().count(b"\n") == 2
    writer.close("failed", "disk full")


def test_a_failed_batch_append_drops_the_batch_whole(out_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines are appended ``_lines_per_write`` at a time: a batch whose write fails partway is cut
    back whole (the error is raised by the write of the batch), earlier batches stay, later
    lines are appended after them; the batch held a side whose write() had returned, so the
    step's end raises and the step stays incomplete (a hand-driven writer that went on after the
    error must not end it as complete without that side)."""
    source = _capture(out_dir, "src", "stats", steps=1)
    records, info = step_records(source, 0)
    monkeypatch.setattr(pt.PtWriter, "_lines_per_write", 2)
    writer = pt.PtWriter(tmp_path / "copy")
    writer.open(json.loads((source / "ilstore.json").read_text()))
    writer.write(records[0])
    writer.write(records[1])  # the first batch: appended
    writer.write(records[2])
    assert _list_path(tmp_path / "copy").read_bytes().count(b"\n") == 2

    def full(fd: int, data: Any) -> int:
        os.write(fd, memoryview(data)[:len(data) - 3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pt, "_os_write", full)
    with pytest.raises(OSError, match="No space"):
        writer.write(records[3])  # the second batch (records 2 and 3) fails
    monkeypatch.setattr(pt, "_os_write", os.write)
    lines = _list_path(tmp_path / "copy").read_bytes().split(b"\n")
    assert lines[-1] == b"" and [json.loads(line)["ilstore"]["kind"] for line in lines[:-1]] == [
        records[0].kind, records[1].kind]
    writer.write(records[4])
    # record 2's write() had returned, yet its line is gone: the step cannot end as complete
    with pytest.raises(StoreError, match=r"step 0 is incomplete, it is not ended: .*structures\.jsonl: 2 line"):
        writer.end_step(info)
    writer.close()
    with ilstore.open_run(tmp_path / "copy") as run:
        assert run.steps() == [] and run.incomplete_steps() == [0]


def test_short_writes_of_a_line_are_completed(out_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _capture(out_dir, "src", "stats", steps=1)
    records, info = step_records(source, 0)

    def short(fd: int, data: Any) -> int:
        return os.write(fd, memoryview(data)[:5])

    monkeypatch.setattr(pt, "_os_write", short)
    writer = pt.PtWriter(tmp_path / "copy")
    writer.open(json.loads((source / "ilstore.json").read_text()))
    for record in records:
        writer.write(record)
    writer.end_step(info)
    writer.close()
    monkeypatch.undo()
    lines = _list_path(tmp_path / "copy").read_bytes().split(b"\n")
    assert lines[-1] == b"" and sorted(lines) == sorted(_list_path(source).read_bytes().split(b"\n"))


# -- a run cut mid-step ---------------------------------------------------------------------------------
def test_a_step_cut_before_it_ended_is_incomplete(out_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A stats step whose records were written but that never ended (no call order, no journal
    line), as a killed process leaves it, with a torn last line: not a step; its calls are listed
    from the list's complete lines (the lines appended before the kill: the writer appends them
    ``_lines_per_write`` at a time); the completed steps read as before."""
    monkeypatch.setattr(pt.PtWriter, "_lines_per_write", 4)
    source = _capture(out_dir, "src", "stats", steps=2)
    (records0, info0), (records1, _info1) = step_records(source, 0), step_records(source, 1)
    run_dir = tmp_path / "cut"
    writer = pt.PtWriter(run_dir)
    writer.open({**json.loads((source / "ilstore.json").read_text()), "status": "running"})
    for record in records0:
        writer.write(record)
    writer.end_step(info0)
    for record in records1[:5]:
        writer.write(record)
    assert writer._list_fd is not None and len(writer._pending) == 1  # the process is "killed" here
    with _list_path(run_dir, 1).open("ab") as fh:
        fh.write(b'{"type": "tuple", "items": [')
    assert sorted(os.listdir(run_dir / "step_1")) == ["structures.jsonl"]
    with ilstore.open_run(run_dir) as run, ilstore.open_run(source) as src:
        assert run.status == "running" and run.steps() == [0] and run.incomplete_steps() == [1]
        assert [run.meta(k) for k in run.keys(0)] == [src.meta(k) for k in src.keys(0)]
        written = list(dict.fromkeys((r.call.module, r.call.call) for r in records1[:4]))
        assert sorted((c.module, c.call) for c in run.calls(1)) == sorted(written)
        for record in records1[:4]:
            assert run.structure(record.call, record.kind) == record.structure
        lost = records1[4]  # queued, not appended: the step has no trace of its call
        assert (lost.call.module, lost.call.call) not in written
        with pytest.raises(KeyError, match="no module call"):
            run.structure(lost.call, lost.kind)
    result = CliRunner().invoke(cli, ["ls", str(run_dir)])
    assert result.exit_code == 0 and "cut before they finished: [1]" in result.output
    writer.close()


_KILL = """
import os, signal, sys
import torch
import ilstore
out_dir, kill_step = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
cap = ilstore.capture(model, {"output_dir": out_dir, "run_id": "run", "mode": "stats", "log_step_ids": []})
def die(module, args, out):
    if cap.step_index == kill_step:
        cap.flush()
        os.kill(os.getpid(), signal.SIGKILL)
model[2].register_forward_hook(die)
with torch.no_grad():
    for i in range(kill_step + 2):
        model(torch.full((1, 8), float(i)))
raise SystemExit("not killed")
"""


def test_sigkill_mid_stats_step(out_dir: Path, tmp_path: Path) -> None:
    """A stats capture killed in step 300: steps 0-299 complete and readable, 300 incomplete."""
    script = tmp_path / "kill.py"
    script.write_text(_KILL)
    kill = 300
    proc = subprocess.run([sys.executable, str(script), str(out_dir), str(kill)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run_dir = out_dir / "run"
    with ilstore.open_run(run_dir) as run:
        assert run.status == "running" and run.steps() == list(range(kill)) and run.incomplete_steps() == [kill]
        for step in (0, kill // 2, kill - 1):
            keys = run.keys(step)
            assert len(keys) == 8 and all(run.meta(k)["stored"] is False for k in keys)
            assert run.meta(TensorKey(step, "0", 0, "inputs", ("0",)))["stats"]["max"] == float(step)
        assert {(c.module, c.call) for c in run.calls(kill)} <= {(str(i), 0) for i in range(4)}
    assert sorted(os.listdir(run_dir / f"step_{kill - 1}")) == ["module_calls.txt", "structures.jsonl"]


@pytest.mark.parametrize("mode", ["stats", "tensors"])
def test_a_step_without_its_journal_line_lists_the_same_calls_in_both_layouts(out_dir: Path, mode: str) -> None:
    """A step whose files are all written but whose journal line is missing (killed between the
    two): incomplete, and its calls, read from the files (``module_calls.txt``, the directories,
    the list; a ``~2`` name included), are the same in both layouts, in start order."""
    runs = {old: _capture(out_dir, f"old{old}", mode, old=old, max_tensor_size=40) for old in (False, True)}
    answers = []
    for run_dir in runs.values():
        with ilstore.open_run(run_dir) as run:
            want = run.calls(2), {(c, k): run.structure(c, k) for c in run.calls(2) for k in KINDS}
        journal = run_dir / "steps.jsonl"
        journal.write_bytes(b"".join(journal.read_bytes().splitlines(keepends=True)[:-1]))
        with ilstore.open_run(run_dir) as run:
            assert run.steps() == [0, 1] and run.incomplete_steps() == [2]
            got = run.calls(2), {(c, k): run.structure(c, k) for c in run.calls(2) for k in KINDS}
        assert got == want
        answers.append(got)
    assert answers[0] == answers[1]


def test_structure_list_option(tmp_path: Path) -> None:
    """``backend_options.structure_list``: false writes every side as ``<kind>.json`` (SPEC §4.2's
    tree) and no list; the default writes the list; anything but a bool is refused before the run."""
    old = _capture(tmp_path, "old", "stats", steps=1, old=True)
    new = _capture(tmp_path, "new", "stats", steps=1)
    assert not list(old.glob("step_0/structures.jsonl")) and list(old.glob("step_0/*/inputs.json"))
    assert list(new.glob("step_0/structures.jsonl")) and not list(new.glob("step_0/*/inputs.json"))
    for bad in ("no", 1, None):
        with pytest.raises(ilstore.ConfigError, match="backend_options.structure_list: must be true or false"):
            ilstore.capture(torch.nn.Linear(2, 2), {"output_dir": str(tmp_path), "run_id": "bad",
                                                    "backend_options": {"structure_list": bad}})
    with pytest.raises(ilstore.ConfigError, match=r"backend_options.other: unknown option .*structure_list"):
        ilstore.capture(torch.nn.Linear(2, 2), {"output_dir": str(tmp_path), "run_id": "bad",
                                                "backend_options": {"other": 1}})
    assert not (tmp_path / "bad").exists()


def test_reader_keeps_few_steps_of_call_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Streaming a run keeps the call directories of the last ``_CACHED_STEPS`` steps only (each
    step's were kept for good: a reader's memory grew with the run), and a step dropped from the
    cache reads the same when asked again."""
    run_dir = _capture(tmp_path, "r", "tensors", steps=10)
    with ilstore.open_run(run_dir) as run:
        want = {key: run.load(key).clone() for key in run.keys()}
    monkeypatch.setattr(pt, "_CACHED_STEPS", 3)
    with ilstore.open_run(run_dir) as run:
        assert isinstance(run, pt.PtReader)
        for _sweep in range(2):
            for step in run.steps():
                for key in run.keys(step):
                    if run.meta(key).get("stored", True):
                        assert torch.equal(run.load(key), want[key]) and run.load(key).dtype == want[key].dtype
                assert len(run._call_dirs) <= 3 and step in run._call_dirs
                assert {call.step for call in run._dir_strs} <= set(run._call_dirs)
