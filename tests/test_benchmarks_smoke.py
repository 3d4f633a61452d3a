"""The benchmark scripts run end to end at a tiny size and clean up after themselves."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

# the benchmark scripts run in small (~30 s in all): the slow tier
pytestmark = pytest.mark.slow


def _load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_compare_smoke(tmp_path: Path, capsys) -> None:
    work, out = tmp_path / "work", tmp_path / "compare.json"
    work.mkdir()
    assert _load("bench_compare").main(["--size-mb", "4", "--rounds", "1", "--backends", "safetensors",
                                        "--workers", "1", "--tmp", str(work), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    names = [r["name"] for r in data["rows"]]
    assert "floor: read + f32 metrics" in names and "safetensors compare w1" in names
    # the library and both arithmetic floors agree on the number of mismatched elements
    assert len({r["check_mismatched"] for r in data["rows"] if r["name"] != "floor: read only"}) == 1
    assert all(r["seconds"] > 0 for r in data["rows"])
    assert list(work.iterdir()) == []  # everything it wrote is gone
    assert "x floor" in capsys.readouterr().out


def test_bench_convert_smoke(tmp_path: Path, capsys) -> None:
    work, out = tmp_path / "work", tmp_path / "convert.json"
    work.mkdir()
    assert _load("bench_convert").main(["--size-mb", "4", "--rounds", "1", "--pairs", "pt:safetensors",
                                        "--tmp", str(work), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert set(rows) == {"copy floor pt", "read+write floor pt", "pt -> safetensors"}
    assert rows["pt -> safetensors"]["out_bytes"] >= data["run_bytes"]
    assert list(work.iterdir()) == []
    assert "x copy" in capsys.readouterr().out


def test_peak_rss_sees_a_short_peak() -> None:
    """bench_capture's RSS column: a buffer allocated, touched and freed inside the block counts
    (the kernel's high-water mark, or the sampler where it cannot be reset)."""
    import numpy as np

    _load("bench_compare")  # puts benchmarks/ on sys.path
    from _bench_common import PeakRss

    with PeakRss() as peak:
        buf = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, every page touched
        del buf
    assert peak.growth >= 48 * 2**20
    with PeakRss() as quiet:
        pass
    assert quiet.growth < 16 * 2**20


def test_bench_write_size_smoke(tmp_path: Path, capsys) -> None:
    assert _load("bench_write_size").main(["--dir", str(tmp_path), "--size-mb", "3", "--rounds", "1",
                                           "--pause", "0"]) == 0
    out = capsys.readouterr().out
    assert "one file, one call" in out and "2048 KiB files, 1 MiB calls" in out
    assert list(tmp_path.iterdir()) == []


def test_bench_capture_smoke(tmp_path: Path, capsys) -> None:
    out = tmp_path / "capture.json"
    assert _load("bench_capture").main(["--rounds", "1", "--backends", "pt", "--rows", "pt sync,pt async,replay",
                                        "--tokens", "32", "--tmp", str(tmp_path), "--json", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"baseline", "raw floor", "raw floor, 1 MiB writes", "ilstore pt sync", "ilstore pt async",
                         "ilstore pt replay"}
    # the async capture wrote on the model's thread (its first record at least is always lent)
    assert rows["ilstore pt async"]["lent_rounds"] == 1 and rows["ilstore pt async"]["lending_off_rounds"] in (0, 1)
    assert rows["ilstore pt sync"]["lent_rounds"] == 0
    assert rows["raw floor"]["bytes"] > rows["ilstore pt sync"]["bytes"] > 0  # de-duplication
    assert rows["ilstore pt replay"]["bytes"] > 0
    assert [p for p in tmp_path.iterdir() if p != out] == []  # every run deleted at the end
    printed = capsys.readouterr().out
    assert "tot/floor" in printed and "ilstore pt replay" in printed and "lending switched off: pt async 1/" in printed


def test_bench_capture_long_run_smoke(tmp_path: Path, capsys) -> None:
    out = tmp_path / "long.json"
    work = tmp_path / "work"
    work.mkdir()
    assert _load("bench_capture").main(["--steps", "20", "--backends", "pt", "--modes", "tensors",
                                        "--tmp", str(work), "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert (row["backend"], row["mode"], row["steps"]) == ("pt", "tensors", 20)
    assert row["first_ms"] > 0 and row["last_ms"] > 0 and row["close_s"] >= 0 and row["manifest_mb"] > 0
    assert row["compare_exit"] == 0 and row["compare_steps_per_s"] > 0  # two identical runs compare equal
    assert len(row["tenths_ms"]) == 10 and min(row["tenths_ms"]) > 0
    assert row["tenths_ms"][0] == pytest.approx(row["first_ms"])
    assert row["tenths_ms"][-1] == pytest.approx(row["last_ms"])
    assert len(row["tenths_cpu_ms"]) == 10 and min(row["tenths_cpu_ms"]) > 0
    assert len(row["slowest_ms"]) == 5 and row["slowest_ms"] == sorted(row["slowest_ms"], reverse=True)
    assert row["b_first_ms"] > 0 and len(row["b_tenths_ms"]) == 10  # run b's capture, a second sample
    for fmt in ("", "_json"):  # both CLI reports were written, then deleted
        assert row[f"cli{fmt}_s"] > 0 and row[f"cli{fmt}_rss_mb"] > 10 and row[f"cli{fmt}_report_mb"] > 0
        assert row[f"cli{fmt}_exit"] == row["compare_exit"]
    assert list(work.iterdir()) == []
    printed = capsys.readouterr().out
    assert "last/1st" in printed and "by tenth" in printed and "tensors(b)" in printed
    assert "ilstore-compare md:" in printed and "ilstore-compare json:" in printed


def test_bench_capture_long_run_keep(tmp_path: Path, capsys) -> None:
    assert _load("bench_capture").main(["--steps", "3", "--backends", "safetensors", "--modes", "stats",
                                        "--tmp", str(tmp_path), "--no-compare", "--keep"]) == 0
    (kept,) = tmp_path.iterdir()
    assert sorted(p.name for p in kept.iterdir()) == ["safetensors-stats-a"]
    assert f"runs kept in {kept}" in capsys.readouterr().out


def test_bench_stats_compare_smoke(tmp_path: Path, capsys) -> None:
    work = tmp_path / "work"
    work.mkdir()
    assert _load("bench_stats_compare").main(["--steps", "20", "--backends", "safetensors", "--rounds", "1",
                                              "--general-steps", "4", "--tmp", str(work)]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("safetensors")]
    # backend, case, steps/s cpu, wall, x ident, general/s, exit, mismatched, first, load
    rows = {row[1]: row for row in lines}
    assert set(rows) == {"identical", "divergent", "from-middle"}
    # a statistics-only match is "incomplete" (exit 1), as for every stats run
    assert [rows[c][6] for c in ("identical", "divergent", "from-middle")] == ["1", "1", "1"]
    mismatched = [int(rows[c][7]) for c in ("identical", "divergent", "from-middle")]
    assert mismatched[0] == 0 and mismatched[1] > 0 and mismatched[2] == mismatched[1] // 2
    assert [rows[c][8] for c in ("identical", "divergent", "from-middle")] == ["-", "0", "10"]
    assert all(float(row[2]) > 0 and float(row[5]) > 0 for row in lines)
    assert list(work.iterdir()) == []


def test_long_run_cli_peak_is_the_childs_own_and_capped() -> None:
    """The CLI's peak RSS is the child's, not this process's at the fork (which rusage would report),
    and a child past the cap is killed."""
    run_cli = _load("_long_run").run_cli
    held = bytearray(400 * 2**20)  # this process's resident set grows by 400 MB
    held[:: 4096] = b"x" * len(held[:: 4096])
    child = [sys.executable, "-c", "import time; x = bytearray(150 * 2**20); x[::4096] = b'y' * len(x[::4096]); "
             "time.sleep(0.5)"]
    code, wall, peak = run_cli(child)
    assert code == 0 and wall > 0.5 and 150 < peak < 350
    code, _, peak = run_cli(child, max_rss_mb=100)
    assert code == -9 and peak > 100


def test_bench_device_stats_smoke(tmp_path: Path, capsys) -> None:
    import ilstore.device_stats as device_stats

    out = tmp_path / "devstats.json"
    work = tmp_path / "work"
    work.mkdir()
    types = device_stats.DEVICE_TYPES
    try:
        assert _load("bench_device_stats").main(["--device", "cpu", "--layers", "1", "--hidden", "64", "--tokens", "16",
                                                 "--rounds", "1", "--dtype", "float32", "--tmp", str(work),
                                                 "--json", str(out)]) == 0
    finally:
        device_stats.DEVICE_TYPES = types
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["row"]) for r in rows] == [(s, n) for s in ("prefill", "one token")
                                                       for n in ("plain", "per tensor", "per step")]
    assert all(r["seconds"] > 0 for r in rows)
    assert list(work.iterdir()) == []
