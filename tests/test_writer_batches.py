"""The writer thread is woken in batches, not once per record, and yields the GIL between items."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

import ilstore
from ilstore import pipeline
from ilstore.manifest import new_manifest
from ilstore.pipeline import ThreadedSink
from ilstore.records import Record
from ilstore.store.base import StepInfo, StoreWriter


class _LogWriter(StoreWriter):
    """Logs (what, thread name) for every record and step end."""

    name = "log"

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        self.log: list[tuple[str, str]] = []
        self.done = threading.Event()

    def _write(self, record: Record) -> None:
        self.log.append((record.call.module, threading.current_thread().name))

    def _end_step(self, info: StepInfo) -> None:
        self.log.append((f"end{info.step}", threading.current_thread().name))
        self.done.set()


def _bodiless(i: int, step: int = 0) -> Record:
    return Record(ilstore.CallKey(0, step, f"m{i}", 0), "outputs", {"type": "tensor", "stored": False}, {})


def _sink(tmp_path: Path) -> tuple[_LogWriter, ThreadedSink]:
    writer = _LogWriter(tmp_path / "run")
    writer.open(new_manifest("log", {}))
    return writer, ThreadedSink(writer, max_pending_bytes=2**30)


def _wait_for(predicate: object, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(0.005)
    return False


def test_records_wait_for_a_batch_or_a_step_end(tmp_path: Path) -> None:
    """Fewer records than a batch do not wake the writer thread; the step end does, and the
    writer thread then writes them all, in order."""
    writer, sink = _sink(tmp_path)
    few = pipeline._WAKE_ITEMS // 2
    for i in range(few):
        sink.write(_bodiless(i))
    time.sleep(0.3)
    assert writer.log == []  # queued, nobody woken
    sink.end_step(StepInfo(0, [], []))
    assert writer.done.wait(10)
    assert [m for m, _ in writer.log] == [f"m{i}" for i in range(few)] + ["end0"]
    assert {t for _, t in writer.log} == {"ilstore-writer"}
    sink.close("complete")


def test_a_full_batch_wakes_the_writer(tmp_path: Path) -> None:
    writer, sink = _sink(tmp_path)
    n = pipeline._WAKE_ITEMS
    for i in range(n):
        sink.write(_bodiless(i))
    assert _wait_for(lambda: len(writer.log) == n)  # no step end, no flush
    assert [m for m, _ in writer.log] == [f"m{i}" for i in range(n)]
    assert {t for _, t in writer.log} == {"ilstore-writer"}
    sink.close("complete")


def test_a_batch_of_bytes_wakes_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "_WAKE_BYTES", 4096)
    writer, sink = _sink(tmp_path)
    body = torch.zeros(1024)  # 4 KiB
    record = Record(ilstore.CallKey(0, 0, "big", 0), "outputs", {"type": "tensor", "stored": True, "path": []},
                    {(): body})
    sink.write(_bodiless(0))
    time.sleep(0.2)
    assert writer.log == []
    sink.write(record)
    assert _wait_for(lambda: len(writer.log) == 2)
    assert [m for m, _ in writer.log] == ["m0", "big"]
    sink.close("complete")


def test_flush_and_close_write_a_partial_batch(tmp_path: Path) -> None:
    writer, sink = _sink(tmp_path)
    sink.write(_bodiless(0))
    sink.flush()
    assert [m for m, _ in writer.log] == ["m0"]
    sink.write(_bodiless(1))
    sink.close("complete")
    assert [m for m, _ in writer.log] == ["m0", "m1"]


def test_the_writer_hands_the_gil_over_between_items(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once it has worked for a GIL slice, the writer thread calls time.sleep(0) between two items
    (releasing the GIL); with no slice it never does."""
    for slice_s, expect_yields in ((0.0, True), (None, False)):
        monkeypatch.setattr(pipeline, "_GIL_SLICE_S", slice_s)
        yields: list[str] = []
        real_sleep = time.sleep

        def sleep(seconds: float, real_sleep: object = real_sleep, yields: list[str] = yields) -> None:
            if seconds == 0:
                yields.append(threading.current_thread().name)
            assert callable(real_sleep)
            real_sleep(seconds)

        monkeypatch.setattr(pipeline.time, "sleep", sleep)
        writer, sink = _sink(tmp_path / str(slice_s))
        for i in range(10):
            sink.write(_bodiless(i))
        sink.end_step(StepInfo(0, [], []))
        assert writer.done.wait(10)
        monkeypatch.setattr(pipeline.time, "sleep", real_sleep)
        sink.close("complete")
        assert [m for m, _ in writer.log] == [f"m{i}" for i in range(10)] + ["end0"]
        if expect_yields:
            assert yields.count("ilstore-writer") >= 10  # after every item, with a slice of 0
        else:
            assert "ilstore-writer" not in yields
