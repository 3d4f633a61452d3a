"""``--workers N`` runs on N threads beside the caller's, and a large pair's pieces run on those
workers: no thread of its own helps with them (two workers on two cores otherwise made more
runnable threads than cores, and the large pair waited for its slowest piece). The results stay
those of one worker.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from compare_helpers import need_backend
from ilstore_compare import compare, engine
from test_compare_split import _big_runs


def _threads_seen(monkeypatch: pytest.MonkeyPatch) -> tuple[set[str], set[str]]:
    """Patch the engine to note the threads alive while pairs are compared (every thread the
    compare started is alive then) and the threads that load a side."""
    alive: set[str] = set()
    loading: set[str] = set()
    before = {t.name for t in threading.enumerate()}
    compare_pair, load = engine._compare_pair, engine._load

    def noting(*args: Any, **kwargs: Any) -> Any:
        alive.update(t.name for t in threading.enumerate() if t.name not in before)
        return compare_pair(*args, **kwargs)

    def loading_on(*args: Any, **kwargs: Any) -> Any:
        loading.add(threading.current_thread().name)
        return load(*args, **kwargs)

    monkeypatch.setattr(engine, "_compare_pair", noting)
    monkeypatch.setattr(engine, "_load", loading_on)
    return alive, loading


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_start_as_many_threads_as_workers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  workers: int) -> None:
    need_backend("pt")
    run1, run2 = _big_runs(tmp_path, "pt")
    one = compare(run1, run2, squeeze_shapes=True, workers=1)
    alive, loading = _threads_seen(monkeypatch)
    many = compare(run1, run2, squeeze_shapes=True, workers=workers)
    assert repr(many.tensors) == repr(one.tensors) and repr(many.summary) == repr(one.summary)
    assert alive and len(alive) <= workers, alive  # was workers + (workers - 1) assisting threads
    assert all(name.startswith("ilstore-compare_") for name in alive), alive
    assert loading <= alive | {threading.current_thread().name}, loading


def test_assist_runs_pieces_on_the_pool_it_is_given() -> None:
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="given") as pool:
        assist = engine._Assist(2, pool)
        together = threading.Barrier(2, timeout=10)  # broken unless both pieces run at once
        names: list[str] = []

        def piece(i: int) -> int:
            names.append(threading.current_thread().name)
            together.wait()
            return i + 1

        assert assist.run_all([partial(piece, i) for i in range(2)]) == [1, 2]
        assert sorted(names) == sorted([threading.current_thread().name, "given_0"])
        with assist:
            pass
        assert pool.submit(lambda: 7).result() == 7  # the pool it was given is not shut down by it


def test_pieces_left_to_a_busy_pool_are_run_by_the_pair_s_worker() -> None:
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="busy") as pool:
        release = threading.Event()
        blocker = pool.submit(release.wait, 10)  # the only worker is busy with another pair
        assist = engine._Assist(2, pool)
        here = threading.current_thread().name
        names: list[str] = []

        def piece(i: int) -> int:
            names.append(threading.current_thread().name)
            return i * 10

        assert assist.run_all([partial(piece, i) for i in range(4)]) == [0, 10, 20, 30]
        assert names == [here] * 4  # none waited for the busy worker
        release.set()
        assert blocker.result() is True
