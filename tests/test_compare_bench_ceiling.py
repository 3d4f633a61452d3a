"""``bench_compare.py``'s hardware ceiling: a floor run in forked processes (no shared GIL), its
row, and its paired rounds against the one-process floor."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tests.test_benchmarks_smoke import _load

# the benchmark script run in small: the slow tier (~30 s in all)
pytestmark = [pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork"), pytest.mark.slow]


def _bench() -> ModuleType:
    return _load("bench_compare")


def _pairs(tmp_path: Path, n: int = 7) -> list[tuple[Path, Path, tuple[int, ...]]]:
    """``n`` raw float32 pairs; pair i has i + 1 elements of b off by 1 % (mismatches)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        a = rng.standard_normal(1000 + 37 * i).astype(np.float32)
        b = a.copy()
        b[: i + 1] *= np.float32(1.01)
        pa, pb = tmp_path / f"a{i}.bin", tmp_path / f"b{i}.bin"
        a.tofile(pa)
        b.tofile(pb)
        out.append((pa, pb, a.shape))
    return out


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_forked_floor_counts_what_the_floor_counts(tmp_path: Path, processes: int) -> None:
    bench = _bench()
    pairs = _pairs(tmp_path)
    expected = bench.floor_minimal(pairs)
    assert expected == sum(range(1, 8))
    mismatched, seconds, grown = bench.floor_forked(bench.floor_minimal, pairs, processes)
    assert mismatched == expected and seconds > 0 and grown >= 0
    lib, _seconds, _grown = bench.floor_forked(bench.floor_lib, pairs, processes)
    assert lib == bench.floor_lib(pairs) == expected


def _no_children_left() -> bool:
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_floor_on_threads_counts_what_the_floor_counts(tmp_path: Path, threads: int) -> None:
    bench = _bench()
    pairs = _pairs(tmp_path)
    assert bench.floor_threads(bench.floor_lib, pairs, threads) == bench.floor_lib(pairs) == sum(range(1, 8))


def test_a_failing_thread_raises_its_error(tmp_path: Path) -> None:
    bench = _bench()
    pairs = _pairs(tmp_path, 4)
    pairs[3] = (tmp_path / "missing.bin", pairs[3][1], pairs[3][2])
    with pytest.raises(FileNotFoundError):
        bench.floor_threads(bench.floor_minimal, pairs, 2)


def test_a_failing_process_is_reported_and_reaped(tmp_path: Path) -> None:
    bench = _bench()
    pairs = _pairs(tmp_path, 4)
    pairs[1] = (tmp_path / "missing.bin", pairs[1][1], pairs[1][2])  # process 1 of 2 cannot read it
    with pytest.raises(RuntimeError, match=r"a process failed: FileNotFoundError"):
        bench.floor_forked(bench.floor_minimal, pairs, 2)
    assert _no_children_left()


def test_paired_floor_gives_a_ratio_per_round(tmp_path: Path) -> None:
    bench = _bench()
    for threads in (False, True):
        got = bench.paired_floor(bench.floor_minimal, _pairs(tmp_path), 2, 3, threads)
        assert got["workers"] == 2 and len(got["ratios"]) == 3 and len(got["loads"]) == 3
        assert all(r > 0 for r in got["ratios"])
    assert _no_children_left()


def test_the_ceiling_rows_and_paired_lines(tmp_path: Path, capsys: Any) -> None:
    work, out = tmp_path / "work", tmp_path / "compare.json"
    work.mkdir()
    assert _bench().main(["--size-mb", "2", "--rounds", "1", "--backends", "pt", "--workers", "1,2", "--no-f32",
                          "--paired", "2", "--tmp", str(work), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["rows"]}
    ceiling = rows["floor: minimal, 2 processes"]
    lib = rows["floor: compare_tensors, 2 processes"]
    minimal = rows["floor: minimal (numpy verdict+relL2)"]
    assert ceiling["check_mismatched"] == lib["check_mismatched"] == minimal["check_mismatched"] > 0
    assert ceiling["seconds"] > 0 and ceiling["ratio_to_floor"] > 0
    threads = rows["floor: compare_tensors, 2 threads"]
    assert threads["check_mismatched"] == minimal["check_mismatched"] and threads["seconds"] > 0
    assert set(data["paired"]) == {"floor", "floor: read + metrics.compare_tensors",
                                   "floor: compare_tensors, 2 threads", "pt"}
    text = capsys.readouterr().out
    assert "floor: paired w2/w1 throughput, 2 rounds: median " in text
    assert "pt: paired w2/w1 throughput, 2 rounds: median " in text
    assert list(work.iterdir()) == []
    assert _no_children_left()


def test_one_worker_count_has_no_ceiling_row(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "compare.json"
    work.mkdir()
    assert _bench().main(["--size-mb", "2", "--rounds", "1", "--backends", "pt", "--workers", "1", "--no-f32",
                          "--paired", "2", "--tmp", str(work), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert not any(word in r["name"] for r in data["rows"] for word in ("processes", "procs", "threads"))
    assert data["paired"] == {}


def test_breakdown_splits_planning_from_the_stream(tmp_path: Path, capsys: Any) -> None:
    from ilstore_compare import engine

    real = engine._stream
    work, out = tmp_path / "work", tmp_path / "compare.json"
    work.mkdir()
    assert _bench().main(["--size-mb", "2", "--rounds", "1", "--backends", "hdf5", "--workers", "1,2", "--no-f32",
                          "--breakdown", "2", "--tmp", str(work), "--json", str(out)]) == 0
    assert engine._stream is real  # put back
    parts = json.loads(out.read_text())["breakdown"]["hdf5"]
    assert set(parts) == {"1", "2"}
    for part in parts.values():
        assert part["plan"] > 0 and part["stream"] > 0 and part["cores"] > 0
        assert part["plan"] + part["stream"] == pytest.approx(part["wall"], rel=0.2)
        assert part["plan_cpu"] + part["stream_cpu"] == pytest.approx(part["cpu"], rel=0.2)
    assert "hdf5 w2 breakdown, 2 rounds (medians): wall " in capsys.readouterr().out
