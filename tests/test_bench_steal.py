"""``_bench_common.Steal``: the share of the CPUs' time the VM's host took (``/proc/stat``'s
steal column), added up over the ``with`` blocks measured, and NaN where the machine does not say."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _common() -> Any:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("_bench_common")


def test_steal_adds_up_the_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    common = _common()
    readings = iter([(10, 1000), (30, 1400), (30, 5000), (40, 5100)])  # (steal, all) in ticks
    monkeypatch.setattr(common, "_cpu_jiffies", lambda: next(readings))
    steal = common.Steal()
    with steal:
        pass
    with steal:  # the time between the blocks (3,600 ticks) does not count
        pass
    assert (steal.steal, steal.all) == (30, 500)
    assert steal.percent == pytest.approx(6.0)


def test_steal_is_nan_where_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    common = _common()
    monkeypatch.setattr(common, "_cpu_jiffies", lambda: None)
    with common.Steal() as steal:
        pass
    assert math.isnan(steal.percent)


def test_the_cpu_line_is_read_where_there_is_one() -> None:
    found = _common()._cpu_jiffies()
    if not Path("/proc/stat").exists():
        assert found is None
        return
    assert found is not None and 0 <= found[0] <= found[1] and found[1] > 0
