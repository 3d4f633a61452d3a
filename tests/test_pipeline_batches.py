"""ThreadedSink hands records without bodies (mode: "stats") to the writer thread in batches.

The batches must change nothing a writer or a producer can see: records and step ends reach the
writer in the order they were made, interleaved with records that carry bodies; the item bound
counts records, not batches; flush and close write what is held back; a failure inside a batch
drops the rest and is raised to the producer.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import ilstore
from ilstore import pipeline
from ilstore.manifest import new_manifest
from ilstore.pipeline import ThreadedSink, WriterFailed
from ilstore.records import Record
from ilstore.store.base import StepInfo, StoreWriter


class _Log(StoreWriter):
    name = "log"

    def __init__(self, run_dir: Path, fail_on: str | None = None) -> None:
        super().__init__(run_dir)
        self.log: list[str] = []
        self.fail_on = fail_on
        self.threads: set[str] = set()
        self.sink: ThreadedSink | None = None
        self.most_pending = 0

    def _write(self, record: Record) -> None:
        if record.call.module == self.fail_on:
            raise OSError("disk full")
        self.threads.add(threading.current_thread().name)
        if self.sink is not None:
            self.most_pending = max(self.most_pending, self.sink._pending_items)
        self.log.append(record.call.module)

    def _end_step(self, info: StepInfo) -> None:
        self.log.append(f"end{info.step}")

    def end_step(self, info: StepInfo) -> None:
        self._end_step(info)


def _record(name: str, body: bool = False) -> Record:
    call = ilstore.CallKey(0, 0, name, 0)
    if body:
        return Record(call, "outputs", {"type": "tensor", "stored": True, "path": []}, {(): torch.ones(4)})
    return Record(call, "outputs", {"type": "tensor", "stored": False}, {})


def _open(tmp_path: Path, **kwargs: object) -> tuple[_Log, ThreadedSink]:
    writer = _Log(tmp_path / "run", **kwargs)  # type: ignore[arg-type]
    writer.open(new_manifest("log", {}))
    return writer, ThreadedSink(writer, max_pending_bytes=2**30)


def test_order_is_kept_across_batches_bodies_and_step_ends(tmp_path: Path) -> None:
    writer, sink = _open(tmp_path)
    expected = []
    for step in range(3):
        for i in range(75):  # more than a batch, not a whole number of them
            body = i % 31 == 7
            sink.write(_record(f"s{step}m{i}", body))
            expected.append(f"s{step}m{i}")
        sink.end_step(StepInfo(step, [], []))
        expected.append(f"end{step}")
    sink.close("complete")
    assert writer.log == expected


def test_flush_writes_what_is_held_back(tmp_path: Path) -> None:
    writer, sink = _open(tmp_path)
    for i in range(3):  # fewer than a batch
        sink.write(_record(f"m{i}"))
    sink.flush()
    assert writer.log == ["m0", "m1", "m2"]
    sink.write(_record("m3"))
    sink.close("complete")
    assert writer.log == ["m0", "m1", "m2", "m3"]


def test_the_item_bound_counts_records(tmp_path: Path) -> None:
    writer = _Log(tmp_path / "run")
    writer.open(new_manifest("log", {}))
    sink = ThreadedSink(writer, max_pending_bytes=2**30, max_pending_items=8)
    writer.sink = sink
    assert sink._batch_size == 2  # a quarter of the bound
    for i in range(200):
        sink.write(_record(f"m{i}"))
        assert sink._pending_items <= 8
    sink.close("complete")
    assert writer.log == [f"m{i}" for i in range(200)]
    assert sink.peak_pending_items <= 8 and writer.most_pending <= 8


def test_a_failure_inside_a_batch_drops_the_rest_and_is_raised(tmp_path: Path) -> None:
    writer, sink = _open(tmp_path, fail_on="m5")
    for i in range(10):
        sink.write(_record(f"m{i}"))
    with pytest.raises(WriterFailed, match="disk full"):
        sink.end_step(StepInfo(0, [], []))
        sink.flush()
    assert writer.log == [f"m{i}" for i in range(5)]
    with pytest.raises(WriterFailed):
        sink.close("complete")
    assert writer.manifest["status"] == "failed"


def test_records_are_queued_a_batch_at_a_time(tmp_path: Path) -> None:
    writer, sink = _open(tmp_path)
    size = sink._batch_size
    assert size == pipeline._BATCH_RECORDS
    for i in range(2 * size):
        sink.write(_record(f"m{i}"))
    assert sink._batch == []  # two batches queued
    sink.write(_record("last"))
    assert len(sink._batch) == 1  # held back until the batch is full or something else is queued
    sink.write(_record("body", body=True))
    assert sink._batch == []
    sink.close("complete")
    assert writer.log == [f"m{i}" for i in range(2 * size)] + ["last", "body"]
