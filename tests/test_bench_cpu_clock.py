"""bench_capture's ``--threads``/``--clock cpu`` options (CPU-time rows for a shared machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_benchmarks_smoke import _load

pytestmark = pytest.mark.slow  # a benchmark run in small: ~6 s


def test_bench_capture_cpu_clock(tmp_path: Path, capsys) -> None:
    out = tmp_path / "capture.json"
    before = torch.get_num_threads()
    try:
        assert _load("bench_capture").main(["--rounds", "1", "--backends", "pt", "--rows", "pt stats", "--threads", "1",
                                            "--clock", "cpu", "--tokens", "32", "--tmp", str(tmp_path),
                                            "--json", str(out)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"baseline", "raw floor", "raw floor, 1 MiB writes", "ilstore pt stats"}
    assert all(r["forward"] > 0 and r["total"] >= r["forward"] for r in rows.values())
    (title,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("torch ")]
    assert "1 threads" in title and title.endswith("cpu clock")
    assert [p for p in tmp_path.iterdir() if p != out] == []
