"""The ``hdf5`` backend's step-file format 2 (issue 13): a captured side whose structure has no
stored body (``mode: "stats"``, bodies over ``max_tensor_size``, sides without tensors) is one
line of the step file's root dataset ``structures`` instead of an attribute of its call's group,
and a call all of whose sides are such lines has no group. Sides with a stored body keep the
version-1 layout. Readers read both: the same capture written either way gives the same answers
to every reader query, with or without the manifest and step journal, and through ``ilstore ls``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import ilstore
from ilstore.cli import cli
from ilstore.errors import CorruptFileError
from ilstore.keys import KINDS
from ilstore.store import hdf5
from ilstore.store.hdf5 import STRUCTURES, Hdf5Writer, parse_structures
from ilstore.testing import assert_bits_equal


class _Nothing(torch.nn.Module):
    """Returns None (an outputs side without tensors)."""

    def forward(self, x: torch.Tensor) -> None:
        return None


class _Count(torch.nn.Module):
    """Takes no tensor and returns a plain int: neither side has a tensor."""

    def forward(self, n: int, label: str = "x") -> int:
        return n + len(label)


class _Model(torch.nn.Module):
    """Every kind of side: tensors, kwargs, repeated calls, None and plain-value sides, a module
    name that needs %-encoding in an HDF5 name, an in-place input (post-forward inputs differ)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(6, 6)
        self.big = torch.nn.Linear(6, 60)  # outputs over max_tensor_size in the tensors mode
        self.nothing = _Nothing()
        self.count = _Count()
        self.add_module("odd/name#1:%", torch.nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        self.nothing(y)
        self.count(3, label="abc")
        y = self.lin(y)  # call 1 of lin
        z = self.big(y)
        getattr(self, "odd/name#1:%")(z)  # in place: its post-forward input is its output
        return self.lin(y) + z[:, :6]


def _capture(out: Path, run_id: str, mode: str, list_sides: bool, monkeypatch: pytest.MonkeyPatch,
             steps: int = 3, **extra: Any) -> Path:
    model = _Model()
    config = {"output_dir": str(out), "run_id": run_id, "backend": "hdf5", "mode": mode, "log_step_ids": [],
              "log_post_fwd_inputs": True, "max_tensor_size": 100, **extra}
    with monkeypatch.context() as m:
        m.setattr(Hdf5Writer, "_list_sides", list_sides)
        with torch.no_grad(), ilstore.capture(model, config) as cap:
            for step in range(steps):
                model(torch.arange(12, dtype=torch.float32).reshape(2, 6) * (step + 1))
    assert cap.run_dir is not None
    return cap.run_dir


def _view(run_dir: Path, with_meta: bool = True) -> dict[str, Any]:
    """Everything the public reader API answers about a run (tensors as their bytes)."""
    out: dict[str, Any] = {}
    with ilstore.open_run(run_dir) as run:
        out["steps"], out["incomplete"], out["status"] = run.steps(), run.incomplete_steps(), run.status
        out["keys"] = [str(k) for k in run.keys()]
        for step in run.steps() + run.incomplete_steps():
            calls = run.calls(step)
            out[f"calls {step}"] = [str(c) for c in calls]
            out[f"call_ends {step}"] = [str(c) for c in run.call_ends(step)]
            out[f"totals {step}"] = run.step_totals(step)
            out[f"keys {step}"] = [str(k) for k in run.keys(step)]
            for call in calls:
                for kind in KINDS:
                    out[f"structure {call} {kind}"] = run.structure(call, kind)
                    for key, node in run.tensor_nodes(call, kind):
                        assert run.meta(key) == node
                        out[f"node {key}"] = node
                        if node.get("stored") is not False:
                            tensor = run.load(key)
                            out[f"load {key}"] = (str(tensor.dtype), list(tensor.shape),
                                                  tensor.contiguous().view(torch.uint8).numpy().tobytes())
                        else:
                            with pytest.raises(KeyError, match="not stored"):
                                run.load(key)
        if with_meta:
            table = run.stats_table()
            out["has table"] = table is not None
    return out


def _layout(run_dir: Path, step: int) -> tuple[list[str], list[dict[str, Any]], int]:
    """The root's members, the /structures entries and the file's format_version."""
    with h5py.File(run_dir / f"step_{step}.h5", "r") as f:
        entries = []
        if STRUCTURES in f:
            entries = [json.loads(line) for line in bytes(f[STRUCTURES][()]).decode().splitlines()]
        return list(f.keys()), entries, int(f.attrs["format_version"])


@pytest.mark.parametrize("mode", ["stats", "tensors"])
def test_old_and_new_layouts_read_the_same(out_dir: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _capture(out_dir, "old", mode, False, monkeypatch)
    new = _capture(out_dir, "new", mode, True, monkeypatch)
    # the layouts do differ
    old_names, old_entries, old_version = _layout(old, 0)
    new_names, new_entries, version = _layout(new, 0)
    assert version == hdf5.FILE_VERSION == 2 and old_version == 1
    assert not old_entries and STRUCTURES not in old_names
    assert new_entries and new_names[-1] == STRUCTURES
    listed = {(e["module"], e["call"], e["kind"]) for e in new_entries}
    with ilstore.open_run(new) as run:
        for call in run.calls(0):
            for kind in KINDS:
                captured = run.structure(call, kind) is not None
                in_list = (call.module, call.call, kind) in listed
                # every captured side is in the list (since 2026-12-02; before, only those without
                # a stored body were), a side with one with the locations of its bodies
                assert in_list == captured, (call, kind)
                entry = next((e for e in new_entries if (e["module"], e["call"], e["kind"]) ==
                              (call.module, call.call, kind)), {})
                bodies = [hdf5.dataset_name(kind, k.path) for k, n in run.tensor_nodes(call, kind)
                          if n.get("stored") and n.get("same_as") is None]
                assert sorted(entry.get(hdf5.LOCATIONS, {})) == sorted(bodies), (call, kind)
    if mode == "stats":  # no body at all: no group at all, and nothing flushed per record
        assert new_names == [STRUCTURES] and len(new_entries) == len(listed) > 10
    else:
        assert set(new_names) - {STRUCTURES} < set(old_names)  # some calls kept only their group
        assert {("nothing", 0, "outputs"), ("count", 0, "inputs"), ("count", 0, "outputs"),
                ("big", 0, "outputs")} <= listed
        assert hdf5.group_name("count", 0) not in new_names
    # every answer the reader gives is the same
    assert _view(new) == _view(old)
    # ... and without the manifest and step journal (a dump: the files alone)
    for run_dir in (old, new):
        for name in ("ilstore.json", "steps.jsonl"):
            (run_dir / name).unlink()
    assert _view(new, with_meta=False) == _view(old, with_meta=False)


def test_ls_and_convert_of_the_new_layout(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _capture(out_dir, "old", "stats", False, monkeypatch)
    new = _capture(out_dir, "new", "stats", True, monkeypatch)
    for args in ([], ["--calls"], ["--json"], ["--calls", "--json"]):
        outputs = []
        for run_dir in (old, new):
            result = CliRunner().invoke(cli, ["ls", str(run_dir), *args])
            assert result.exit_code == 0, result.output
            outputs.append(result.output.replace(str(run_dir), "RUN").replace("old", "RUN_ID").replace("new", "RUN_ID"))
        assert outputs[0] == outputs[1], args
    from ilstore.convert import convert

    want = _view(new)
    for backend in ("pt", "hdf5"):
        dst = out_dir / f"converted_{backend}"
        convert(new, dst, to=backend)
        got = _view(dst)
        assert {k: v for k, v in got.items() if not k.startswith("node ")} == \
            {k: v for k, v in want.items() if not k.startswith("node ")}
    _names, entries, _v = _layout(out_dir / "converted_hdf5", 1)
    assert entries  # written back in the new layout


def test_flush_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The open step file is flushed after a record once ``flush_interval`` seconds passed since
    its last flush (0: after every record); closing it at the step end writes everything."""
    flushes: list[int] = []
    real = h5py.File.flush
    monkeypatch.setattr(h5py.File, "flush", lambda self: (flushes.append(1), real(self))[1])
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(10)])
    clock = [0.0]
    monkeypatch.setattr(hdf5.time, "monotonic", lambda: clock[0])
    for module in model:  # the clock advances 1 s per module call
        module.register_forward_pre_hook(lambda m, a: clock.__setitem__(0, clock[0] + 1.0))
    counts = {}
    for interval in (0, 2, 1000):
        flushes.clear()
        config = {"output_dir": str(tmp_path), "run_id": f"r{interval}", "backend": "hdf5", "async_writes": False,
                  "backend_options": {"flush_interval": interval}}
        with torch.no_grad(), ilstore.capture(model, config):
            model(torch.ones(1, 4))
        counts[interval] = len(flushes)
    # 20 records (inputs and outputs of 10 Linear calls at 1, 2, ... 10 s); the new file is flushed at 1 s,
    # then after the records of the calls at 3, 5, 7 and 9 s
    assert counts == {0: 21, 2: 1 + 4, 1000: 1}
    assert Hdf5Writer.validate_options({"flush_interval": 0.5}) == []
    for bad in (-1, "1", True, float("inf"), float("nan")):
        assert Hdf5Writer.validate_options({"flush_interval": bad}) == [
            f"backend_options.flush_interval: must be a number of seconds >= 0, got {bad!r}"]


def test_stats_mode_writes_no_group_and_flushes_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stats-mode step touches HDF5 only at its start and its end."""
    flushes: list[int] = []
    real = h5py.File.flush
    monkeypatch.setattr(h5py.File, "flush", lambda self: (flushes.append(1), real(self))[1])
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(10)])
    config = {"output_dir": str(tmp_path), "run_id": "r", "backend": "hdf5", "mode": "stats",
              "async_writes": False}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        model(torch.ones(1, 4))
    assert cap.run_dir is not None
    assert len(flushes) == 1  # the new file's header; 20 records wrote nothing into it
    names, entries, _v = _layout(cap.run_dir, 0)
    assert names == [STRUCTURES] and len(entries) == 20
    assert [(e["module"], e["call"], e["kind"]) for e in entries[:3]] == [("0", 0, "inputs"), ("0", 0, "outputs"),
                                                                         ("1", 0, "inputs")]


_KILLED = textwrap.dedent("""
    import os, signal, sys, torch, ilstore
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    cfg = {"output_dir": sys.argv[1], "run_id": "run", "backend": "hdf5", "log_step_ids": [],
           "async_writes": False, "mode": sys.argv[2], "backend_options": eval(sys.argv[3])}
    cap = ilstore.capture(model, cfg)
    with torch.no_grad():
        model(torch.ones(1, 4))
        model(torch.ones(1, 4) * 2)
        def die(module, args, output):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no close, no flush by Python
        model[2].register_forward_hook(die)
        model(torch.ones(1, 4) * 3)
""")


@pytest.mark.parametrize("mode,options", [("stats", {}), ("tensors", {}), ("tensors", {"flush_interval": 0})])
def test_killed_mid_step(tmp_path: Path, mode: str, options: dict[str, Any]) -> None:
    """Completed steps stay readable; the cut step is reported incomplete. Its file has only what
    was flushed: groups of sides with a stored body, the records written before the last flush
    (after every record with ``flush_interval: 0``); the list's entries are written at step end."""
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(tmp_path), mode, repr(options)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    run_dir = tmp_path / "run"
    with ilstore.open_run(run_dir) as run:
        assert run.status == "running" and run.steps() == [0, 1] and run.incomplete_steps() == [2]
        for step in (0, 1):
            assert [c.module for c in run.calls(step)] == ["0", "1", "2"]
            node = run.meta(next(k for k in run.keys(step) if k.module == "0" and k.kind == "inputs"))
            assert node["stats"]["max"] == step + 1
        cut = [c.module for c in run.calls(2)]
        if mode == "stats":
            assert cut == []
        elif options:
            assert cut == ["0", "1", "2"]
            x = run.load(next(k for k in run.keys(2) if k.module == "0" and k.kind == "inputs"))
            assert torch.equal(x, torch.ones(1, 4) * 3)
        else:  # killed within 0.1 s of the step file's creation: flushed, if at all, before some record
            assert cut == ["0", "1", "2"][:len(cut)]
    with h5py.File(run_dir / "step_2.h5.partial", "r") as f:
        assert STRUCTURES not in f and f.attrs["step"] == 2 and f.attrs["format"] == "ilstore-hdf5"


def _rewrite_structures(path: Path, data: bytes) -> None:
    with h5py.File(path, "r+") as f:
        del f[STRUCTURES]
        f.create_dataset(STRUCTURES, data=np.frombuffer(data, dtype=np.uint8))


def test_damaged_and_torn_entries(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = _capture(out_dir, "r", "stats", True, monkeypatch, steps=2)
    path = run_dir / "step_1.h5"
    with h5py.File(path, "r") as f:
        data = bytes(f[STRUCTURES][()])
    lines = data.splitlines(keepends=True)
    with ilstore.open_run(run_dir) as run:
        want = {(str(c), k): run.structure(c, k) for c in run.calls(1) for k in KINDS}
    # a torn final line (no newline) is ignored: the side reads as not captured
    _rewrite_structures(path, b"".join(lines[:-1]) + lines[-1][:-1])
    last = json.loads(lines[-1])
    with ilstore.open_run(run_dir) as run:
        got = {(str(c), k): run.structure(c, k) for c in run.calls(1) for k in KINDS}
        call = next(c for c in run.calls(1) if (c.module, c.call) == (last["module"], last["call"]))
    assert want[(str(call), last["kind"])] == last["structure"]
    assert [key for key in want if got[key] != want[key]] == [(str(call), last["kind"])]
    assert got[(str(call), last["kind"])] is None
    # a damaged line in a completed step's file names the file and the line
    for bad, why in ((b"{not json\n", "2: Expecting property name"),
                     (b'{"module": 1, "call": 0, "kind": "inputs", "structure": {}}\n', "bad module call"),
                     (b'{"module": "x", "call": 0, "kind": "weights", "structure": {}}\n', "bad kind"),
                     (lines[0], "a second entry")):
        _rewrite_structures(path, lines[0] + bad + b"".join(lines[1:]))
        with ilstore.open_run(run_dir) as run:
            with pytest.raises(CorruptFileError, match=rf"step_1\.h5: /structures line .*{why}"):
                run.structure(run.calls(1)[0], "inputs")
    with pytest.raises(CorruptFileError, match="is not a byte string"), h5py.File(path, "r+") as f:
        del f[STRUCTURES]
        f.create_dataset(STRUCTURES, data=np.zeros(3, dtype=np.float32))
        f.flush()
        with ilstore.open_run(run_dir) as run:
            run.structure(run.calls(1)[0], "inputs")


def test_parse_structures_of_a_cut_step() -> None:
    """In a ``.partial`` file (killed while its step ended) entries stop at the first damaged line."""
    good = b'{"module": "a", "call": 0, "kind": "outputs", "structure": {"type": "value", "value": 1}}\n'
    zeros = b"\0" * 40
    sides = parse_structures(good + zeros + b"\n" + good.replace(b'"a"', b'"b"'), Path("s.h5.partial"), cut=True)
    assert sides.structures == {("a", 0, "outputs"): {"type": "value", "value": 1}} and list(sides.calls) == [("a", 0)]
    with pytest.raises(CorruptFileError, match="line 2"):
        parse_structures(good + zeros + b"\n", Path("s.h5"))
    assert parse_structures(good + zeros, Path("s.h5")).calls == {("a", 0): None}  # torn tail: ignored
    assert parse_structures(b"", Path("s.h5")).structures == {}


def test_newer_step_file_is_refused(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = _capture(out_dir, "r", "stats", True, monkeypatch, steps=1)
    with h5py.File(run_dir / "step_0.h5", "r+") as f:
        f.attrs["format_version"] = hdf5.FILE_VERSION + 1
    with ilstore.open_run(run_dir) as run:
        first = run.calls(0)[0]  # from the step journal
        with pytest.raises(CorruptFileError, match=r"step_0\.h5: format_version 3: written by a newer ilstore"):
            run.structure(first, "inputs")


def test_version_1_files_still_read(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose step files say format_version 1 (what the old layout wrote) reads as before."""
    run_dir = _capture(out_dir, "v1", "tensors", False, monkeypatch, steps=2)
    copy = out_dir / "v1_copy"
    shutil.copytree(run_dir, copy)
    for step in (0, 1):
        with h5py.File(copy / f"step_{step}.h5", "r+") as f:
            f.attrs["format_version"] = 1
    assert _view(copy) == _view(run_dir)


def test_plain_h5py_reads_the_list(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What docs/format-hdf5.md shows: the entries are UTF-8 JSON lines, one per side."""
    run_dir = _capture(out_dir, "r", "stats", True, monkeypatch, steps=1)
    with h5py.File(run_dir / "step_0.h5", "r") as f:
        ds = f["structures"]
        assert ds.dtype == np.uint8 and ds.ndim == 1 and ds.chunks is None
        text = ds[()].tobytes().decode("utf-8")
    assert text.endswith("\n")
    entries = [json.loads(line) for line in text.splitlines()]
    with ilstore.open_run(run_dir) as run:
        for entry in entries:
            call = next(c for c in run.calls(0) if (c.module, c.call) == (entry["module"], entry["call"]))
            assert run.structure(call, entry["kind"]) == entry["structure"]
        assert len(entries) == sum(run.structure(c, k) is not None for c in run.calls(0) for k in KINDS)
        y = run.meta(next(k for k in run.keys(0) if k.module == "lin" and k.kind == "outputs"))
        assert y["stored"] is False and "stats" in y


def test_tensors_mode_bodies_round_trip(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixed calls (one side in the list, one in the group) load bit-exact."""
    run_dir = _capture(out_dir, "r", "tensors", True, monkeypatch, steps=1)
    model = _Model()
    x = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    with torch.no_grad():
        y = model.lin(x)
    with ilstore.open_run(run_dir) as run:
        key = next(k for k in run.keys(0) if (k.module, k.call, k.kind) == ("lin", 0, "outputs"))
        assert_bits_equal(run.load(key), y, str(key))
        big = [k for k in run.keys(0) if k.module == "big"]
        assert {k.kind: run.meta(k).get("stored") for k in big} == {"inputs": True, "outputs": False,
                                                                     "post_fwd_inputs": True}
    names, entries, _v = _layout(run_dir, 0)
    assert hdf5.group_name("big", 0) in names  # its inputs' link; its outputs are an entry
    # every side is an entry (since 2026-12-02); those with a stored body say where it lies
    assert [e["kind"] for e in entries if e["module"] == "big"] == ["inputs", "outputs", "post_fwd_inputs"]
    assert [hdf5.LOCATIONS in e for e in entries if e["module"] == "big"] == [True, False, True]
