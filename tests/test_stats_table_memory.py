"""The statistics table is read a window of rows at a time by the comparer (issue 18): no read
covers more than ``BLOCK_ROWS`` rows, and every result is the one of the whole table."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ilstore.store.stats_table as store_table
import ilstore_compare.engine
from ilstore.errors import CorruptFileError
from ilstore.store.stats_table import COLUMNS, KEYS_NAME, ROW_WIDTH, ROWS_NAME, StatsTableReader
from ilstore_compare import compare
from ilstore_compare.report_json import render_json
from ilstore_compare.report_md import render_markdown
from ilstore_compare.result import CompareResult
from ilstore_compare.stats_table import StepIndex, StepMap, TableRun
from tests.test_stats_table import _float_run

_STEP, _LAYOUT, _INDEX = (COLUMNS.index(c) for c in ("step", "layout", "index"))
ROW_BYTES = 8 * ROW_WIDTH


@pytest.fixture(scope="module")
def long_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two runs of 1,500 steps (about 10,000 rows each): in both, NaNs (the general path) and a
    third output (another layout) every few dozen steps; in dir1 a scaled input (failing pairs)
    at every 13th step from step 700 on."""
    out = tmp_path_factory.mktemp("long")
    steps = 1500
    nan_at, extra_out_at = tuple(range(5, steps, 97)), tuple(range(3, steps, 41))
    return (_float_run(out, "a", steps, "pt", scale_at=dict.fromkeys(range(700, steps, 13), 1.5), nan_at=nan_at,
                       extra_out_at=extra_out_at),
            _float_run(out, "b", steps, "pt", nan_at=nan_at, extra_out_at=extra_out_at))


def _same(one: CompareResult, other: CompareResult) -> None:
    assert one == other
    assert list(one.tensors) == list(other.tensors) and list(one.calls) == list(other.calls)
    assert one.first_divergence == other.first_divergence and one.introduced == other.introduced
    for verbose in (False, True):
        assert render_markdown(one, verbose) == render_markdown(other, verbose)
    assert render_json(one) == render_json(other)


@pytest.mark.slow  # a long run written and compared: ~20 s
def test_the_comparer_reads_the_rows_a_window_at_a_time(long_runs: tuple[Path, Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With windows of 37 rows (a few steps; blocks straddle their borders), no read of a rows
    file covers more rows than that, none reads the file whole, and the comparison (its entries,
    calls, divergences and reports) is the one with the default windows and the general path's."""
    a, b = long_runs
    whole = compare(a, b)
    with monkeypatch.context() as m:
        m.setattr(ilstore_compare.engine.stats_table, "attach", lambda *args: None)
        general = compare(a, b)
    _same(whole, general)
    assert whole.summary.stats_only_mismatched > 0 and whole.summary.stats_only_matched > 0

    reads: list[tuple[str, int, int]] = []  # (file, first row, rows)
    rows_class = getattr(store_table, "StatsTableRows", None)  # (before issue 18: none, the table read whole)
    real_read = getattr(rows_class, "read", None)
    real_read_bytes = Path.read_bytes

    def read(self: Any, first: int, count: int) -> np.ndarray:
        reads.append((str(self.path), first, count))
        assert real_read is not None
        return real_read(self, first, count)

    def read_bytes(self: Path) -> bytes:
        data = real_read_bytes(self)
        if self.name == ROWS_NAME:
            reads.append((str(self), 0, len(data) // ROW_BYTES))
        return data

    monkeypatch.setattr(store_table, "BLOCK_ROWS", 37, raising=False)
    if rows_class is not None:
        monkeypatch.setattr(rows_class, "read", read)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    windowed = compare(a, b)
    _same(windowed, whole)
    # the result reads rows when its entries are made, and holds no file of these runs open meanwhile
    # (only these runs': another test's capture left open in the same process may hold its own)
    mine = {os.path.realpath(d / ROWS_NAME) for d in (a, b)}
    assert not [fd for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}") in mine]
    total = {str(d / ROWS_NAME): (d / ROWS_NAME).stat().st_size // ROW_BYTES for d in (a, b)}
    assert {path for path, _first, _count in reads} == set(total)
    assert max(count for _path, _first, count in reads) <= 37, "a read covers more than one window of rows"
    for path, rows in total.items():  # every row was read (the block index reads the whole table, in windows)
        seen = np.zeros(rows, dtype=bool)
        for _path, first, count in (r for r in reads if r[0] == path):
            seen[first:first + count] = True
        assert rows > 10 * 37 and seen.all()


# -- the block index, read in windows, against the whole table's ---------------------------------------------
def _whole_table_blocks(rows: np.ndarray, layouts: dict[int, list[Any]], steps: set[int]) -> dict[int, tuple[int, int]]:
    """The block index as the comparer found it from the whole table in memory (before issue 18)."""
    total = len(rows)
    index, step_col, layout_col = rows[:, _INDEX], rows[:, _STEP], rows[:, _LAYOUT]
    starts = np.flatnonzero(index == 0)
    if not len(starts):
        return {}
    at = np.searchsorted(starts, np.arange(total), side="right") - 1
    owner = np.where(at >= 0, starts[np.maximum(at, 0)], -1)
    safe = np.maximum(owner, 0)
    fits = (owner >= 0) & (index == np.arange(total) - owner) & (step_col == step_col[safe]) \
        & (layout_col == layout_col[safe])
    misfits = np.concatenate(([0], np.cumsum(~fits)))
    lengths = np.full(len(starts), -1, dtype=np.int64)
    layout_at, step_at = layout_col[starts], step_col[starts]
    whole = np.isfinite(layout_at) & np.isfinite(step_at) & (layout_at == np.round(layout_at)) \
        & (step_at == np.round(step_at))
    for number, keys in layouts.items():
        lengths[whole & (layout_at == number)] = len(keys)
    ends = starts + lengths
    good = (lengths > 0) & (ends <= total) & (np.searchsorted(starts, ends) - np.arange(len(starts)) == 1)
    good[good] &= misfits[ends[good]] == misfits[starts[good]]
    out: dict[int, tuple[int, int]] = {}
    for start, step, layout in zip(starts[good].tolist(), step_at[good].tolist(), layout_at[good].tolist(),
                                   strict=True):
        if int(step) in steps:
            out[int(step)] = (int(layout), start)
    return out


class _Steps:
    def __init__(self, steps: list[int]) -> None:
        self._steps = steps

    def steps(self) -> list[int]:
        return self._steps


def _damaged_table(rng: random.Random) -> tuple[list[list[float]], dict[int, int]]:
    """Rows of blocks of a few layouts, with blocks cut short, repeated, of unknown layouts, rows
    out of place, NaN/Inf/fractional steps and layouts, and stray rows."""
    lengths = {0: 3, 1: 1, 2: 5, 3: 0, 7: 2}
    rows: list[list[float]] = []
    for step in range(rng.randint(0, 60)):
        layout = rng.choice([0, 0, 0, 1, 2, 2, 3, 7, 9])
        count = lengths.get(layout, 2)
        block = [[float(step), float(layout), float(i)] + [rng.random() for _ in range(ROW_WIDTH - 3)]
                 for i in range(count)]
        damage = rng.random()
        if damage < 0.08 and block:
            del block[rng.randrange(len(block)):]  # cut short
        elif damage < 0.16 and block:
            block[rng.randrange(len(block))][_INDEX] = rng.choice([0.0, 1.0, 4.0, math.nan, -0.0])
        elif damage < 0.22 and block:
            block[rng.randrange(len(block))][_STEP] = rng.choice([step + 1.0, math.nan, step + 0.5])
        elif damage < 0.28 and block:
            block[rng.randrange(len(block))][_LAYOUT] = rng.choice([layout + 1.0, math.inf, layout + 0.25])
        elif damage < 0.32:
            block.insert(rng.randrange(len(block) + 1), [rng.choice([0.0, 1.0, 2.0, 5.0]) for _ in range(ROW_WIDTH)])
        rows += block
        if rng.random() < 0.1:  # the step written again (a later block of a step wins)
            rows += [list(r) for r in block]
    return rows, lengths


@pytest.mark.parametrize("seed", range(40))
def test_the_block_index_in_windows_is_the_whole_tables(seed: int, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    rows, lengths = _damaged_table(rng)
    keys = [json.dumps({"layout": n, "keys": [["m", 0, "outputs", [str(i)], "torch.float32", [2], 2, "cpu", False,
                                               "mode=stats"] for i in range(k)]}) for n, k in lengths.items()]
    (tmp_path / KEYS_NAME).write_text("".join(line + "\n" for line in keys))
    data = np.asarray(rows, dtype="<f8").reshape(-1, ROW_WIDTH)
    (tmp_path / ROWS_NAME).write_bytes(data.tobytes() + b"\x01" * rng.choice([0, 0, 5]))  # maybe a cut row
    steps = sorted(rng.sample(range(70), rng.randint(0, 70)))
    table = StatsTableReader(tmp_path, {"keys": KEYS_NAME, "rows": ROWS_NAME})
    want = _whole_table_blocks(data, table.layouts(), set(steps))
    for window in (1, 2, 3, 4, 7, 1 << 16):
        monkeypatch.setattr(store_table, "BLOCK_ROWS", window)
        run = TableRun(_Steps(steps), table)  # type: ignore[arg-type]
        assert dict(run.blocks) == want, window
        assert all(step in run.blocks for step in want) and not any(step in run.blocks for step in steps
                                                                     if step not in want)


# -- the rows file -----------------------------------------------------------------------------------------------
def _table_file(tmp_path: Path, rows: int, tail: bytes = b"") -> Path:
    path = tmp_path / ROWS_NAME
    values = np.arange(rows * ROW_WIDTH, dtype="<f8")
    path.write_bytes(values.tobytes() + tail)
    return path


def test_rows_are_read_by_window_and_a_cut_row_is_not_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _table_file(tmp_path, 10, b"\x00" * (ROW_BYTES - 1))
    monkeypatch.setattr(store_table, "BLOCK_ROWS", 4)
    rows = store_table.StatsTableRows(path)
    assert rows.count == 10
    got = list(rows.windows())
    assert [(first, len(w)) for first, w in got] == [(0, 4), (4, 4), (8, 2)]
    assert np.concatenate([w for _f, w in got]).ravel().tolist() == list(range(10 * ROW_WIDTH))
    assert rows.read(9, 1).ravel().tolist() == list(range(9 * ROW_WIDTH, 10 * ROW_WIDTH))
    assert rows.read(3, 0).shape == (0, ROW_WIDTH)
    for first, count in ((9, 2), (-1, 1), (10, 1)):
        with pytest.raises(IndexError, match=ROWS_NAME):
            rows.read(first, count)
    path.unlink()  # no file is kept open: a later read finds none, and says the run changed since
    with pytest.raises(CorruptFileError, match=f"{path}: cannot read the statistics table, which was there when it "
                                               "was first opened: .* was the run moved, removed or rewritten since"):
        rows.read(0, 1)


def test_a_table_shorter_than_when_opened_is_an_error_naming_it(tmp_path: Path) -> None:
    path = _table_file(tmp_path, 10)
    rows = store_table.StatsTableRows(path)
    os.truncate(path, 5 * ROW_BYTES + 3)
    assert rows.read(0, 5).shape == (5, ROW_WIDTH)
    with pytest.raises(CorruptFileError, match=f"{ROWS_NAME}: the statistics table is shorter than when it was "
                                               f"opened \\({5 * ROW_BYTES + 3} of {10 * ROW_BYTES} bytes\\)"):
        rows.read(4, 3)
    with pytest.raises(CorruptFileError, match=f"{tmp_path / 'missing'}: unreadable statistics table"):
        store_table.StatsTableRows(tmp_path / "missing")


@pytest.mark.parametrize("steps", [list(range(3, 40)) + [45], [0, 7, 10**12, 10**12 + 3], [-5, -2, 0], []],
                         ids=["dense", "sparse", "negative", "empty"])
def test_step_maps_find_every_step_and_no_other(steps: list[int]) -> None:
    index = StepIndex(np.asarray(steps, dtype=np.int64))
    values = StepMap(index, lambda i: ("value", i))
    assert [index.position(s) for s in steps] == list(range(len(steps)))
    others = {s + d for s in steps + [0] for d in (-1, 1, 4096, -10**6)} - set(steps)
    assert all(index.position(s) == -1 for s in others)
    assert dict(values) == {s: ("value", i) for i, s in enumerate(steps)} and len(values) == len(steps)
    assert list(values.values()) == [("value", i) for i in range(len(steps))]
    assert not any(s in values for s in others) and "3" not in values and 3.0 not in values
    assert values.get(min(others), "none") == "none"
    with pytest.raises(KeyError):
        values[min(others)]


def test_rows_read_the_same_without_preadv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the platform has no ``os.preadv`` the rows come from ``lseek`` and ``read``: the same
    rows, and the same error for a file shorter than when it was opened."""
    path = _table_file(tmp_path, 10)
    rows = store_table.StatsTableRows(path)
    expected = rows.read(2, 7).tolist()
    monkeypatch.setattr(store_table, "PREADV", False)
    assert rows.read(2, 7).tolist() == expected
    os.truncate(path, 5 * ROW_BYTES)
    with pytest.raises(CorruptFileError, match=f"shorter than when it was opened \\({5 * ROW_BYTES} of "):
        rows.read(4, 3)
