"""A capture's set-up: the config's fast checks agree with the schema, and the writer thread sets
its own OpenMP thread count alone, so the model need not wait for it to start."""

from __future__ import annotations

import itertools
import sys
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from ilstore import config as config_mod
from ilstore import pipeline
from ilstore.schemas import load as load_schema

# values of every kind, valid and invalid for some key
_VALUES: list[Any] = [None, True, False, 0, 1, -1, 7, 2**40, 0.0, 1.0, 1.5, -2.5, float("inf"), float("nan"), "",
                      "x", "stats", "tensors", "warn", "raise", "next_step", "ignore", "cpu", "a:1", [], [0], [0, 3],
                      [-1], [1.0], [True], ["a"], ["a", ""], [""], ["a", 1], {}, {"k": 1}, {"pattern": "a"}, ("a",)]


def test_the_fast_checks_cover_exactly_the_schema_keys() -> None:
    assert set(config_mod._FAST_CHECKS) == set(load_schema("config")["properties"])


def test_whatever_the_fast_checks_accept_the_schema_accepts() -> None:
    validator = jsonschema.Draft202012Validator(load_schema("config"))
    accepted = 0
    for key, value in itertools.product(config_mod._FAST_CHECKS, _VALUES):
        if config_mod._plainly_valid({key: value}):
            accepted += 1
            assert validator.is_valid({key: value}), (key, value)
    assert accepted > len(config_mod._FAST_CHECKS)  # every key accepts something


def test_configs_outside_the_fast_checks_get_the_schema_messages() -> None:
    from ilstore.errors import ConfigError

    assert not config_mod._plainly_valid({"mode": "stat"})
    with pytest.raises(ConfigError, match="mode"):
        config_mod.load_config({"mode": "stat"})
    with pytest.raises(ConfigError, match="did you mean 'mode'"):
        config_mod.load_config({"mdoe": "stats"})
    # accepted by the schema though not by the fast checks: still valid
    cfg = config_mod.load_config({"max_tensor_size": 10.0, "module_call_match": {"pattern": "a", "calls": [1]}})
    assert cfg.max_tensor_size == 10.0 and cfg.selectors is not None and cfg.selectors[0].calls == frozenset({1})


def test_module_may_match() -> None:
    cfg = config_mod.load_config({"module_call_match": ["^a\\.b$", "c:1"]})
    assert [cfg.module_may_match(n) for n in ("a.b", "a.bx", "xc", "d")] == [True, False, True, False]
    assert config_mod.load_config({}).module_may_match("anything")


_openmp = pytest.mark.skipif(not (sys.platform.startswith("linux") and torch._C.has_openmp),
                             reason="torch's OpenMP runtime found through /proc/self/maps")


def _in_thread(fn: Any) -> Any:
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(fn()))
    t.start()
    t.join()
    return box[0]


@_openmp
def test_the_writer_thread_sets_its_own_thread_count_alone() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        alone, threads = _in_thread(lambda: (pipeline._quiet_writer_thread(), torch.get_num_threads()))
        assert threads == 1 and alone is True
        assert pipeline._THREAD_LOCAL_OK is True
        assert torch.get_num_threads() == 2 and _in_thread(torch.get_num_threads) == 2
    finally:
        torch.set_num_threads(before)


def test_without_an_openmp_runtime_nothing_process_wide_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer thread starts while the model runs: where it cannot set its own count, it keeps
    torch's default rather than change the process's for a moment (a thread of the user's that
    started meanwhile would keep one thread for good)."""
    monkeypatch.setattr(pipeline, "_omp_setters", [])
    monkeypatch.setattr(pipeline, "_THREAD_LOCAL_OK", None)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    calls: list[int] = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n) or real(n))
    try:
        alone, threads = _in_thread(lambda: (pipeline._quiet_writer_thread(), torch.get_num_threads()))
        assert threads == 2 and alone is False and pipeline._THREAD_LOCAL_OK is False
        assert calls == [] and torch.get_num_threads() == 2 and _in_thread(torch.get_num_threads) == 2
    finally:
        real(before)


class _Writer:
    run_dir = Path("nowhere")

    def __init__(self) -> None:
        self.threads: list[int] = []

    def end_step(self, info: Any) -> None:
        self.threads.append(torch.get_num_threads())

    def close(self, status: str, error: str | None = None) -> None:
        pass


@pytest.mark.parametrize("known", [None, True, False])
def test_the_sink_never_waits_for_its_thread(monkeypatch: pytest.MonkeyPatch, known: bool | None) -> None:
    monkeypatch.setattr(pipeline, "_THREAD_LOCAL_OK", known)
    if known is False:
        monkeypatch.setattr(pipeline, "_omp_setters", [])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    started = threading.Event()
    real_run = pipeline.ThreadedSink._run

    def slow_run(self: pipeline.ThreadedSink) -> None:
        started.wait(10)  # the thread is not set up until the producer went on
        real_run(self)

    monkeypatch.setattr(pipeline.ThreadedSink, "_run", slow_run)
    try:
        writer = _Writer()
        sink = pipeline.ThreadedSink(writer, 2**20)  # type: ignore[arg-type]
        assert sink._thread is None  # started at the first wake-up
        sink.end_step(None)  # type: ignore[arg-type]
        assert sink._thread is not None and torch.get_num_threads() == 2  # returned before the thread ran
        started.set()
        sink.flush()
        sink.close("complete")
        assert writer.threads in ([1], [2])  # the writer thread (1 where OpenMP allows) or the producer (2)
        assert not sink._thread.is_alive()  # close() returns once it has ended
    finally:
        torch.set_num_threads(before)


def test_a_capture_written_at_close_starts_no_thread() -> None:
    from ilstore.records import Record

    class Log(_Writer):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def write(self, record: Record) -> None:
            self.seen.append(threading.current_thread().name)

    writer = Log()
    sink = pipeline.ThreadedSink(writer, 2**20)  # type: ignore[arg-type]
    import ilstore

    for i in range(3):
        sink.write(Record(ilstore.CallKey(0, 0, f"m{i}", 0), "outputs", {"type": "tuple", "items": []}, {}))
    sink.close("complete")
    assert sink._thread is None and writer.seen == [threading.current_thread().name] * 3
