"""``bench_compare.py --nice-group``: the paired rounds with the process's scheduler autogroup at
nice -20 (the usual scheduler, other sessions given a small share), its value before put back
after the block and after an error, and a plain run where the autogroup cannot be changed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from test_compare_bench_fifo import _bench  # the benchmark loaded as a module


def _nice(path: Path) -> int:
    return int(path.read_text().split()[-1])


def test_nice_group_not_wanted_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench()
    fake = tmp_path / "autogroup"
    fake.write_text("/autogroup-7 nice 3\n")
    monkeypatch.setattr(bench, "AUTOGROUP", fake)
    with bench.nice_group(False) as niced:
        assert niced is False and _nice(fake) == 3
    assert fake.read_text() == "/autogroup-7 nice 3\n"


def test_nice_group_refused_runs_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    bench = _bench()
    monkeypatch.setattr(bench, "AUTOGROUP", tmp_path / "missing")  # no autogroups (or not Linux)
    with bench.nice_group(True) as niced:
        assert niced is False
    assert "cannot set the autogroup's nice value" in capsys.readouterr().out


def test_nice_group_is_set_inside_and_put_back_after_an_error(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench()
    fake = tmp_path / "autogroup"  # the kernel's file reads back "/autogroup-N nice K"; this one what was written
    fake.write_text("/autogroup-7 nice 3\n")
    monkeypatch.setattr(bench, "AUTOGROUP", fake)
    with pytest.raises(RuntimeError, match="inside"):
        with bench.nice_group(True) as niced:
            assert niced is True and _nice(fake) == -20
            raise RuntimeError("inside")
    assert _nice(fake) == 3


def test_nice_group_on_this_process_is_undone() -> None:
    bench = _bench()
    path = bench.AUTOGROUP
    if not path.exists() or not os.access(path, os.W_OK):
        pytest.skip("no writable autogroup here (not Linux, autogroups off, or not root)")
    try:
        before = _nice(path)
    except (OSError, ValueError, IndexError):  # some kernels/containers give an empty or odd file
        pytest.skip(f"{path} does not read back '/autogroup-N nice K' here")
    with bench.nice_group(True, nice=before) as niced:  # the same value: nothing else on the machine changes
        if not niced:
            pytest.skip("this process may not set its autogroup's nice value")
        assert _nice(path) == before
    assert _nice(path) == before


def test_nice_group_is_an_option(capsys: Any) -> None:
    with pytest.raises(SystemExit):
        _bench().main(["--help"])
    assert "--nice-group" in capsys.readouterr().out
