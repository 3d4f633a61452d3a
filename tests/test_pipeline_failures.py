"""The record pipeline when its writer thread cannot start, when Ctrl-C lands in queued work,
and when a synchronous capture's record is still being copied from a device."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import ilstore
from ilstore import pipeline
from ilstore.demo import DEMO_PROMPT, tiny_llama
from ilstore.keys import CallKey
from ilstore.records import Record
from ilstore_compare import compare


class _NoWriterThread(threading.Thread):
    """As Python 3.12+ at interpreter shutdown (a capture closed from ``atexit``): no new thread."""

    def start(self) -> None:
        if self.name == "ilstore-writer":
            raise RuntimeError("can't create new thread at interpreter shutdown")
        super().start()


def _capture(out: Path, run_id: str, **config: Any) -> Path:
    model, ids = tiny_llama(), torch.tensor(DEMO_PROMPT)
    cfg = {"output_dir": str(out), "run_id": run_id, "log_step_ids": [0, 1], **config}
    with torch.no_grad(), ilstore.capture(model, cfg) as cap:
        model(input_ids=ids, use_cache=False)
        model(input_ids=ids, use_cache=False)
    assert cap.run_dir is not None
    return cap.run_dir


@pytest.mark.parametrize("backend", ["pt", "safetensors", "hdf5"])
def test_a_capture_whose_writer_thread_cannot_start_is_written_whole(out_dir: Path, backend: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    reference = _capture(out_dir, "ref", backend=backend)
    monkeypatch.setattr(pipeline.threading, "Thread", _NoWriterThread)
    run = _capture(out_dir, "threadless", backend=backend, max_pending_mb=1)  # the bounds make the model write
    monkeypatch.undo()
    with ilstore.open_run(run) as reader:
        assert reader.status == "complete" and reader.steps() == [0, 1]
    result = compare(run, reference)
    assert result.exit_code == 0 and result.summary.matched == result.summary.tensors > 0


def test_close_never_starts_the_writer_thread(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A manual-step capture closed at exit (the vLLM integration's ``atexit``) ends its open step
    in close(): no writer thread is started then, and the step is written."""
    started: list[str] = []

    class Watch(threading.Thread):
        def start(self) -> None:
            started.append(self.name)
            super().start()

    monkeypatch.setattr(pipeline.threading, "Thread", Watch)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    cfg = {"output_dir": str(out_dir), "run_id": "manual", "log_step_ids": []}
    cap = ilstore.capture(model, cfg, manual_step=True)
    with torch.no_grad():
        model(torch.ones(1, 4))
    cap.close()
    assert "ilstore-writer" not in started and cap.run_dir is not None
    with ilstore.open_run(cap.run_dir) as reader:
        assert reader.status == "complete" and reader.steps() == [0] and len(reader.calls(0)) == 2


class _Interrupting:
    run_dir = Path("nowhere")

    def __init__(self) -> None:
        self.written: list[str] = []
        self.closed: tuple[str, str | None] | None = None

    def write(self, record: Record) -> None:
        if record.call.module == "m2":
            raise KeyboardInterrupt
        self.written.append(record.call.module)

    def end_step(self, info: Any) -> None:
        pass

    def close(self, status: str, error: str | None = None) -> None:
        self.closed = (status, error)


def test_ctrl_c_in_queued_work_is_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the model's thread does the writer's work (here at close) reaches the caller;
    the run is closed as failed."""
    monkeypatch.setattr(pipeline.threading, "Thread", _NoWriterThread)  # the model's thread does every item
    writer = _Interrupting()
    sink = pipeline.ThreadedSink(writer, 2**20)  # type: ignore[arg-type]
    for i in range(4):
        sink.write(Record(CallKey(0, 0, f"m{i}", 0), "outputs", {"type": "tuple", "items": []}, {}))
    with pytest.raises(KeyboardInterrupt):
        sink.close("complete")
    assert writer.written == ["m0", "m1"]
    assert writer.closed is not None and writer.closed[0] == "failed" and "KeyboardInterrupt" in str(writer.closed[1])


def test_a_synchronous_capture_waits_for_the_device_copy() -> None:
    """``async_writes: false``: a record whose snapshot is still being copied from a device (its
    ``ready`` event) is written only after that copy ends."""
    events: list[str] = []

    class Ready:
        def synchronize(self) -> None:
            events.append("synchronized")

    class Writer:
        def write(self, record: Record) -> None:
            events.append("written")

    sink = pipeline.SyncSink(Writer())  # type: ignore[arg-type]
    t = torch.ones(3)
    node = {"type": "tensor", "shape": [3], "dtype": "torch.float32", "stats": {}}
    sink.write(Record(CallKey(0, 0, "m", 0), "outputs", node, {(): t}, ready=Ready()))
    assert events == ["synchronized", "written"] and node["stats"]["max"] == 1.0
