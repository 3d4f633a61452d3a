"""The ``hdf5`` reader locates a comparison's tensors as it reads their structures (issue 18).

The comparer plans a window of steps (reading each call's structures) and then hands the reader
the keys it will load (``prepare_loads``). With at most ``_OPEN_FILES`` step files open, a window
that spans more steps had its files reopened by ``prepare_loads`` to find where each body lies,
and their metadata read again. Once a reader has been asked to prepare loads (a comparison), it
locates the stored tensors of each side it reads while the group is open, and ``prepare_loads``
takes them from there. These tests count the step files opened, check the results against loads
found the usual way, the bound on what is located ahead, and that errors still name the file.
Since 2026-12-02 a step file lists where each body lies (``locations`` in ``/structures``) and
the reader locates from there; locating ahead serves the files written before (the runs here
are written so) and files whose list the reader does not trust.
Also here: the step file is opened and its ``format``/``format_version`` read through h5py's
low-level API (``_open_read``, ``_attr_get``), pinned to h5py's ``File``/``attrs.get``.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import ilstore
from ilstore.errors import CorruptFileError
from ilstore.keys import KINDS
from ilstore.store import hdf5
from ilstore.store.hdf5 import Hdf5Reader
from ilstore_compare import compare, engine
from test_stats_compare_divergent import _same  # every field, count and report equal

STEPS = 30
#: 8 pairs a step: 6 steps a window, 5 windows; the readers keep 2 step files open.
WINDOW = 48
STEPS_A_WINDOW = WINDOW // 8


class _Root(nn.Module):
    """Linear, ReLU, a bfloat16 Linear (stored as its bits, with an ``encoding`` attribute),
    ReLU: each ReLU's input is the Linear's output before it (stored ``same_as``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4).to(torch.bfloat16), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m[3](self.m[2](self.m[1](self.m[0](x)).to(torch.bfloat16)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two runs, every step logged, that differ a little, in the layout written before 2026-12-02."""
    out = tmp_path_factory.mktemp("hdf5-prelocate")
    made = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hdf5.Hdf5Writer, "_list_bodied", False)
        for run_id, delta in (("a", 0.0), ("b", 1e-3)):
            root = _Root().eval()
            with torch.no_grad(), ilstore.capture(root, {"output_dir": str(out), "run_id": run_id, "backend": "hdf5",
                                                         "log_step_ids": []}) as cap:
                for step in range(STEPS):
                    root(torch.full((1, 4), step / 10 + delta))
            assert cap.run_dir is not None
            made.append(cap.run_dir)
    return made[0], made[1]


def _count_opens(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, int]]:
    opens: Counter[tuple[str, int]] = Counter()
    real = Hdf5Reader._file

    def counting(self: Hdf5Reader, step: int) -> Any:
        if step not in self._files:
            opens[(str(self.run_dir), step)] += 1
        return real(self, step)

    monkeypatch.setattr(Hdf5Reader, "_file", counting)
    monkeypatch.setattr(engine, "_WINDOW_PAIRS", WINDOW)
    monkeypatch.setattr(hdf5, "_OPEN_FILES", 2)
    return opens


def test_the_runs(runs: tuple[Path, Path]) -> None:
    with ilstore.open_run(runs[0]) as run:
        keys = run.keys(STEPS - 1)
        nodes = [run.meta(k) for k in keys]
    assert len(keys) == 8 and sum("same_as" in n for n in nodes) == 2  # m.1 and m.3 inputs
    assert {n["dtype"] for n in nodes} == {"torch.float32", "torch.bfloat16"}


def test_a_comparison_opens_each_step_file_once_after_its_first_window(
        runs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails on 69d72bc: every step file was opened twice (planning, then prepare_loads)."""
    opens = _count_opens(monkeypatch)
    result = compare(*runs)
    assert result.exit_code == 1 and len(result.tensors) == STEPS * 8
    for run in runs:
        mine = {step: n for (r, step), n in opens.items() if r == str(run)}
        assert set(mine) == set(range(STEPS))
        # the first window was planned before any prepare_loads: its files are opened again
        assert [s for s, n in mine.items() if n > 1] == list(range(STEPS_A_WINDOW)), mine
        assert max(mine.values()) == 2


def test_the_result_is_the_one_of_unplanned_loads(runs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins unchanged behaviour (passes on 69d72bc too)."""
    _count_opens(monkeypatch)
    planned = compare(*runs)
    with monkeypatch.context() as m:
        m.setattr(engine, "_prepare_loads", lambda *args: None)  # every load found by h5py
        unplanned = compare(*runs)
    _same(planned, unplanned)


def test_what_is_located_ahead_is_bounded(runs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """At most ``_PRELOCATED`` tensors are located ahead; the others are located by
    ``prepare_loads`` as before, and the result is the same."""
    _count_opens(monkeypatch)
    monkeypatch.setattr(hdf5, "_PRELOCATED", 3)
    held: list[int] = []
    prepare = Hdf5Reader.prepare_loads

    def watching(self: Hdf5Reader, keys: Any) -> None:
        held.append(len(self._prelocated))
        prepare(self, keys)

    monkeypatch.setattr(Hdf5Reader, "prepare_loads", watching)
    bounded = compare(*runs)
    assert held and max(held) == 3 and held[0] == held[1] == 0  # nothing located before the first window
    monkeypatch.setattr(engine, "_prepare_loads", lambda *args: None)
    _same(bounded, compare(*runs))


def _planned(run: Hdf5Reader, step: int) -> list[tuple[Any, dict[str, Any]]]:
    return [(k, n) for call in run.calls(step) for kind in KINDS for k, n in run.tensor_nodes(call, kind)]


def test_loads_located_ahead_are_the_usual_ones(runs: tuple[Path, Path]) -> None:
    """Every body, bfloat16 and ``same_as`` ones included, reads the same whether located ahead
    or by h5py (on 69d72bc the loads agree too; what is located ahead is new)."""
    with ilstore.open_run(runs[0]) as ahead, ilstore.open_run(runs[0]) as usual:
        assert isinstance(ahead, Hdf5Reader)
        ahead.prepare_loads([])  # as a comparer's first window: locating ahead is on from here
        for step in (3, STEPS - 1):
            keys = _planned(ahead, step)
            assert ahead._prelocated
            ahead.prepare_loads(keys)
            assert not ahead._prelocated
            for key, node in keys:
                got, want = ahead.load_node(key, node), usual.load(key)
                assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_a_dataset_missing_after_its_structure_was_read_names_the_file(runs: tuple[Path, Path],
                                                                        tmp_path: Path) -> None:
    """Pins unchanged behaviour (passes on 69d72bc too): a body its metadata says is stored but
    whose dataset is gone is reported naming the step file, located ahead or not."""
    run_dir = tmp_path / "cut"
    shutil.copytree(runs[0], run_dir)
    step_file = run_dir / "step_4.h5"
    with h5py.File(step_file, "r+") as f:
        del f["m.2#0/outputs"]
    with ilstore.open_run(run_dir) as run:
        assert isinstance(run, Hdf5Reader)
        run.prepare_loads([])
        keys = _planned(run, 4)
        run.prepare_loads(keys)
        gone = [(k, n) for k, n in keys if k.module == "m.2" and k.kind == "outputs"]
        assert len(gone) == 1
        with pytest.raises(CorruptFileError, match="no dataset") as info:
            run.load_node(*gone[0])
        assert str(step_file) in str(info.value)
        # the ReLU's input is the same tensor (same_as): reported the same way
        with pytest.raises(CorruptFileError, match="no dataset"):
            run.load_node(*[(k, n) for k, n in keys if k.module == "m.3" and k.kind == "inputs"][0])


def test_attr_get_reads_as_h5py(tmp_path: Path) -> None:
    """``_attr_get`` gives what ``attrs.get`` gives: value and type, for the attributes it reads
    itself and those it hands to h5py."""
    path = tmp_path / "attrs.h5"
    with h5py.File(path, "w") as f:
        a = f.attrs
        a["vlen"] = "ilstore-hdf5"
        a["utf8"] = "déjà \u00e9"
        a.create("ascii", "plain", dtype=h5py.string_dtype("ascii"))
        a["fixed"] = np.bytes_("ilstore-hdf5")
        a["i64"] = 2
        a["i32be"] = np.array(3, dtype=">i4")
        a["u8"] = np.uint8(7)
        a["f64"] = 1.5
        a["flag"] = True
        a["array"] = np.arange(3)
        a["strings"] = ["a", "b"]
        a["empty"] = h5py.Empty("f4")
    with h5py.File(path, "r") as f:
        for name in [*f.attrs.keys(), "missing"]:
            want, got = f.attrs.get(name, 1), hdf5._attr_get(f, name, 1)
            assert type(got) is type(want), name
            if isinstance(want, np.ndarray):
                assert got.dtype == want.dtype and np.array_equal(got, want), name
            elif isinstance(want, h5py.Empty):
                assert got == want, name
            else:
                assert got == want, name


@pytest.mark.parametrize("case", ["not ilstore", "newer", "garbage", "fixed-length format"])
def test_opening_a_step_file(runs: tuple[Path, Path], tmp_path: Path, case: str) -> None:
    """Pins unchanged behaviour (passes on 69d72bc too): what opening a step file refuses, and
    the message naming it."""
    run_dir = tmp_path / "run"
    shutil.copytree(runs[0], run_dir)
    step_file = run_dir / "step_0.h5"
    if case == "garbage":
        step_file.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    else:
        with h5py.File(step_file, "r+") as f:
            if case == "not ilstore":
                del f.attrs["format"]
            elif case == "newer":
                del f.attrs["format_version"]
                f.attrs["format_version"] = np.array(3, dtype=">i4")
            else:
                del f.attrs["format"]
                f.attrs["format"] = np.bytes_("ilstore-hdf5")
    with ilstore.open_run(run_dir) as run:
        if case == "fixed-length format":  # read through h5py's attributes, as before
            assert len(run.keys(0)) == 8
            return
        with pytest.raises(CorruptFileError) as info:
            run.keys(0)
        text = str(info.value)
        assert str(step_file) in text
        assert {"not ilstore": "not an ilstore HDF5 step file", "newer": "format_version 3",
                "garbage": "cannot open the HDF5 file"}[case] in text
