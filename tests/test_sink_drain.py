"""ThreadedSink.close(): what is left is written by the closing thread alone (the writer thread
ends after the item it holds), in order, and nothing is lost or written twice; the producer that
writes queued items hands the GIL to nobody between records."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

import ilstore
from ilstore import pipeline
from ilstore.records import Record


class _Log:
    """A store writer that remembers which thread wrote each record; the first one waits for ``release``."""

    run_dir = Path("nowhere")

    def __init__(self) -> None:
        self.written: list[tuple[str, str]] = []  # (module, thread name)
        self.steps: list[Any] = []
        self.closed: list[str] = []
        self.holding = threading.Event()  # the first record is being written
        self.release = threading.Event()

    def write(self, record: Record) -> None:
        if not self.written and not self.holding.is_set():
            self.holding.set()
            assert self.release.wait(10)
        self.written.append((record.call.module, threading.current_thread().name))

    def end_step(self, info: Any) -> None:
        self.steps.append(info)

    def close(self, status: str, error: str | None = None) -> None:
        self.closed.append(status)


def _record(i: int) -> Record:
    return Record(ilstore.CallKey(0, 0, f"m{i}", 0), "outputs", {"type": "tuple", "items": []}, {})


def test_close_writes_what_is_left_on_its_own_thread() -> None:
    writer = _Log()
    sink = pipeline.ThreadedSink(writer, 2**20)  # type: ignore[arg-type]
    n = 4 * pipeline._WAKE_ITEMS
    for i in range(n):  # enough to wake (and start) the writer thread mid-way
        sink.write(_record(i))
    assert sink._thread is not None
    assert writer.holding.wait(10)  # the writer thread holds its first batch, blocked in its first record
    closer = threading.Thread(target=sink.close, args=("complete",), name="closer")
    closer.start()
    deadline = time.monotonic() + 10
    while not sink._draining and time.monotonic() < deadline:
        time.sleep(0.001)
    assert sink._draining
    writer.release.set()
    closer.join(10)
    assert not closer.is_alive() and not sink._thread.is_alive()
    assert [m for m, _ in writer.written] == [f"m{i}" for i in range(n)]  # each once, in order
    first_batch = sink._batch_size
    by_thread = [t for _, t in writer.written]
    assert set(by_thread[:first_batch]) == {"ilstore-writer"}  # the batch it held
    assert set(by_thread[first_batch:]) == {"closer"}  # everything after it: the closing thread alone
    assert writer.closed == ["complete"]


def test_the_producer_hands_the_gil_to_nobody(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing a batch on the producer's thread (close, flush, a full queue) never calls
    ``time.sleep(0)``; the writer thread does, between records, every ``_GIL_SLICE_S``."""
    monkeypatch.setattr(pipeline, "_GIL_SLICE_S", 0.0)  # a hand-over between any two records
    sleeps: list[str] = []
    real_sleep = time.sleep

    def spy(seconds: float) -> None:
        if seconds == 0:
            sleeps.append(threading.current_thread().name)
        real_sleep(seconds)

    monkeypatch.setattr(pipeline.time, "sleep", spy)
    writer = _Log()
    writer.holding.set()  # no record waits
    sink = pipeline.ThreadedSink(writer, 2**20)  # type: ignore[arg-type]
    sink.closing()  # no writer thread: the producer writes every record at close
    for i in range(3 * sink._batch_size):
        sink.write(_record(i))
    sink.close("complete")
    assert sink._thread is None and len(writer.written) == 3 * sink._batch_size and sleeps == []

    writer = _Log()
    writer.holding.set()
    sink = pipeline.ThreadedSink(writer, 2**20)  # type: ignore[arg-type]
    for i in range(3 * sink._batch_size):
        sink.write(_record(i))
    sink.flush()  # wakes the writer thread; the producer helps
    sink.close("complete")
    assert len(writer.written) == 3 * sink._batch_size
    assert set(sleeps) <= {"ilstore-writer"}


def test_ctrl_c_while_close_waits_for_the_writer_thread_still_closes_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything is written before close() waits for the writer thread to end; a Ctrl-C during
    that wait must not leave the run unclosed (before, the writer was closed after the wait)."""
    writer = _Log()
    writer.release.set()
    sink = pipeline.ThreadedSink(writer, 2**20)  # type: ignore[arg-type]
    for i in range(2 * pipeline._WAKE_ITEMS):
        sink.write(_record(i))
    thread = sink._thread
    assert thread is not None
    calls = []

    def interrupted_join(timeout: float | None = None) -> None:
        calls.append(timeout)
        raise KeyboardInterrupt

    monkeypatch.setattr(thread, "join", interrupted_join)
    with pytest.raises(KeyboardInterrupt):
        sink.close("complete")
    assert calls and writer.closed == ["complete"]
    assert len(writer.written) == 2 * pipeline._WAKE_ITEMS
    monkeypatch.undo()
    thread.join(10)
    assert not thread.is_alive()
