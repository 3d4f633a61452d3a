"""What the ``hdf5`` reader holds while a long comparison runs (issue 18, the memory bound).

The comparer plans a window of steps, hands each reader the keys it will load with the plan's
nodes for them (``prepare_loads``), then loads them. The reader used to keep the window's
structures (up to ``_CACHED_NODES`` tensor nodes, ~10 MB a reader on the long-run workload) to
look every key and every de-duplicated (``same_as``) tensor's original up again. Now it keeps
:data:`~ilstore.store.base._CACHED_STEPS` steps' structures, whatever the window, reads each
structure once, and looks no node up while it prepares or loads: what it keeps beyond that is
one window's locations and originals. These tests count what it holds at each window, the
structure reads and the lookups, and check that the result is the one of loads found the usual way.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ilstore
from compare_helpers import two_rank_run
from ilstore.keys import TensorKey
from ilstore.store import base
from ilstore.store.hdf5 import Hdf5Reader
from ilstore_compare import compare, engine
from test_stats_compare_divergent import _same  # every field, count and report equal

STEPS = 60
#: Pairs per window in these tests: 8 pairs a step, so 6 steps a window and 10 windows.
WINDOW = 48


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU()).eval()


def _run(out: Path, run_id: str, delta: float) -> Path:
    """Every step logged; each ReLU's input is the Linear's output before it (stored ``same_as``)."""
    model = _model()
    config = {"output_dir": str(out), "run_id": run_id, "backend": "hdf5", "log_step_ids": []}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        for step in range(STEPS):
            model(torch.full((1, 4), step / 10 + delta))
    assert cap.run_dir is not None
    return cap.run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("hdf5-compare-memory")
    return _run(out, "a", 0.0), _run(out, "b", 1e-3)


def test_the_runs_have_same_as_bodies(runs: tuple[Path, Path]) -> None:
    with ilstore.open_run(runs[0]) as run:
        keys = run.keys(STEPS - 1)
        originals = {run.meta(k)["same_as"] for k in keys if "same_as" in run.meta(k)}
        assert len(keys) == 8 and len(originals) == 3  # 0's, 1's and 2's outputs


def _watch(monkeypatch: pytest.MonkeyPatch) -> tuple[list[dict[str, int]], Counter[Any], Counter[Any]]:
    """What each reader holds after each ``prepare_loads`` and after each window's last load,
    the structure reads and the node lookups (``meta``) by ``(run, key)``."""
    held: list[dict[str, int]] = []
    reads: Counter[Any] = Counter()
    lookups: Counter[Any] = Counter()
    prepare, read, meta = Hdf5Reader.prepare_loads, Hdf5Reader._read_structure, base.StoreReader.meta

    def snapshot(run: Hdf5Reader, when: str, keys: int) -> None:
        held.append({"when": when, "keys": keys, "steps": len(run._structures), "weight": run._cached_weight,
                     "located": len(run._located), "originals": len(getattr(run, "_originals", ())),
                     "files": len(run._files)})

    def prepare_loads(self: Hdf5Reader, keys: Any) -> None:
        keys = list(keys)
        snapshot(self, "planned", len(keys))  # the window planned: the moment a comparison holds most
        prepare(self, keys)
        snapshot(self, "prepared", len(keys))

    def read_structure(self: Hdf5Reader, call: Any, kind: str) -> Any:
        reads[(str(self.run_dir), call, kind)] += 1
        return read(self, call, kind)

    def counted_meta(self: base.StoreReader, key: TensorKey) -> dict[str, Any]:
        if isinstance(self, Hdf5Reader):
            lookups[(str(self.run_dir), key)] += 1
        return meta(self, key)

    monkeypatch.setattr(engine, "_WINDOW_PAIRS", WINDOW)
    monkeypatch.setattr(Hdf5Reader, "prepare_loads", prepare_loads)
    monkeypatch.setattr(Hdf5Reader, "_read_structure", read_structure)
    # on the base class: the comparer loads by node only from readers whose meta is the base's
    monkeypatch.setattr(base.StoreReader, "meta", counted_meta)
    return held, reads, lookups


def test_a_long_comparison_keeps_a_few_steps_structures(runs: tuple[Path, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """At every window, each reader keeps the structures of ``_CACHED_STEPS`` steps (not the
    window's: here 6 steps of 16 nodes, well under ``_CACHED_NODES``), and the locations and
    originals of that window's keys only."""
    a, b = runs
    held, _reads, _lookups = _watch(monkeypatch)
    result = compare(a, b)
    assert result.exit_code == 1 and len(result.tensors) == STEPS * 8
    prepared = [h for h in held if h["when"] == "prepared"]
    assert len(prepared) == 2 * STEPS * 8 // WINDOW  # two readers, every window
    step_weight = 8  # 4 calls x 2 sides, each one tensor node
    for h in held:
        assert h["steps"] <= base._CACHED_STEPS, h
        assert h["weight"] <= base._CACHED_STEPS * step_weight, h
        assert h["located"] + h["originals"] <= h["keys"] == WINDOW, h
    # of a step's 8 keys, 3 are de-duplicated: 5 bodies located a step, 3 originals' nodes kept
    assert all(h["located"] == WINDOW // 8 * 5 and h["originals"] == WINDOW // 8 * 3 for h in prepared)


def test_nodes_are_not_looked_up_again(runs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each side is read from the files once, and neither planning the loads nor loading a
    ``same_as`` body (through its original) looks a node up: the plan gave them."""
    a, b = runs
    _held, reads, lookups = _watch(monkeypatch)
    compare(a, b)
    assert len({(run, call) for run, call, _kind in reads}) == 2 * STEPS * 4
    assert max(reads.values()) == 1
    assert not lookups, list(lookups)[:3]


def test_the_result_is_the_one_of_unplanned_loads(runs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = runs
    monkeypatch.setattr(engine, "_WINDOW_PAIRS", WINDOW)
    planned = compare(a, b)
    with monkeypatch.context() as m:
        m.setattr(engine, "_prepare_loads", lambda *args: None)  # every load found by h5py, nodes looked up
        unplanned = compare(a, b)
    _same(planned, unplanned)


def test_an_original_outside_the_plan_is_looked_up(runs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Comparing only the ReLUs: their inputs are ``same_as`` the Linears' outputs, which the
    plan does not hold; their nodes are looked up once each, and the bodies compare as usual."""
    a, b = runs
    _held, _reads, lookups = _watch(monkeypatch)
    planned = compare(a, b, modules=["^[13]$"])
    assert len(planned.tensors) == STEPS * 4
    assert {t.status for t in planned.tensors} == {"mismatch"}
    assert lookups and max(lookups.values()) == 1
    assert {key.module for _run, key in lookups} == {"0", "2"} and {key.kind for _run, key in lookups} == {"outputs"}
    monkeypatch.setattr(engine, "_prepare_loads", lambda *args: None)
    _same(planned, compare(a, b, modules=["^[13]$"]))


def test_multi_rank_hdf5_runs_read_each_structure_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A multi-rank run's reader hands each rank's hdf5 reader its planned keys and nodes and loads
    with them: no side is parsed twice although a window spans more steps than a reader keeps."""
    two_rank_run(tmp_path / "a", "hdf5", 0.0)
    two_rank_run(tmp_path / "b", "hdf5", 1.0)
    reads: Counter[tuple[str, Any, str]] = Counter()
    real = Hdf5Reader._read_structure

    def counting(self: Hdf5Reader, call: Any, kind: str) -> Any:
        reads[(str(self.run_dir), call, kind)] += 1
        return real(self, call, kind)

    monkeypatch.setattr(Hdf5Reader, "_read_structure", counting)
    result = compare(tmp_path / "a", tmp_path / "b")
    assert result.exit_code == 1 and len(result.tensors) == 2 * 12 * 3 * 2
    assert {call.step for _, call, _ in reads} == set(range(12))  # every step's sides, once each
    assert max(reads.values()) == 1, [k for k, n in reads.items() if n > 1][:3]
