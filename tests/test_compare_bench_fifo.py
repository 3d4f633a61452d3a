"""``bench_compare.py --fifo``: the paired rounds at real-time priority, the usual policy after,
and a plain run where the process may not raise its priority."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setscheduler"), reason="no sched_setscheduler (not Linux)")


def _bench() -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("_bench_compare_fifo", BENCH / "bench_compare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fifo_not_wanted_changes_nothing() -> None:
    before = os.sched_getscheduler(0)
    with _bench().fifo(False) as realtime:
        assert realtime is False and os.sched_getscheduler(0) == before


def test_fifo_refused_runs_at_the_usual_priority(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    def refuse(*args: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    bench = _bench()
    before = os.sched_getscheduler(0)
    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    with bench.fifo(True) as realtime:
        assert realtime is False and os.sched_getscheduler(0) == before
    assert "cannot run at real-time priority" in capsys.readouterr().out


def test_fifo_is_undone_after_the_block_and_after_an_error() -> None:
    bench = _bench()
    before = os.sched_getscheduler(0), os.sched_getparam(0).sched_priority
    try:
        with bench.fifo(True) as realtime:
            if not realtime:
                pytest.skip("this process may not use SCHED_FIFO (not root, no CAP_SYS_NICE)")
            assert os.sched_getscheduler(0) == os.SCHED_FIFO
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority) == before
