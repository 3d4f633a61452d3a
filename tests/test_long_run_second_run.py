"""``bench_capture.py --steps N --no-compare --second-run``: run b (a second sample) without the
compare, for runs too large to compare in the time at hand; ``--no-compare`` alone makes run a only."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _bench_capture() -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("bench_capture")


@pytest.mark.parametrize("second", [True, False])
def test_second_run_without_the_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str], second: bool) -> None:
    out = tmp_path / "long.json"
    work = tmp_path / "work"
    work.mkdir()
    args = ["--steps", "10", "--backends", "pt", "--modes", "stats", "--tmp", str(work), "--no-compare", "--keep",
            "--json", str(out)] + (["--second-run"] if second else [])
    assert _bench_capture().main(args) == 0
    (row,) = json.loads(out.read_text())
    assert row["first_ms"] > 0 and row["ls_s"] > 0
    assert not any(k.startswith(("compare_", "cli")) for k in row), sorted(row)  # no compare
    (kept,) = work.iterdir()
    runs = sorted(p.name for p in kept.iterdir())
    printed = capsys.readouterr().out
    if second:
        assert runs == ["pt-stats-a", "pt-stats-b"]
        assert row["b_first_ms"] > 0 and len(row["b_tenths_ms"]) == 10 and row["b_close_s"] >= 0
        assert "stats(b)" in printed
    else:
        assert runs == ["pt-stats-a"]
        assert not any(k.startswith("b_") for k in row) and "stats(b)" not in printed
