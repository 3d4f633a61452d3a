"""Between the hooks and the store writer: statistics, de-duplication and the writer thread.

The hook only takes snapshots; everything else (statistics of stored tensors, serialization,
disk I/O) happens here, either inline (``async_writes: false``) or on one background thread
that consumes records in order. The memory held by snapshots waiting to be written is bounded
by ``max_pending_mb``: when a new record would exceed it, the producer (the model) waits, so
nothing is dropped and memory cannot grow without bound. A failure on the writer thread is
kept and raised to the producer at the next step end or at close, never lost.
"""

from __future__ import annotations

import logging
import queue
from abc import ABC, abstractmethod
import threading
from typing import Any

from .errors import StoreError
from .records import Record, finalize_stats
from .store.base import StepInfo, StoreWriter

__all__ = ["RecordSink", "SyncSink", "ThreadedSink", "WriterFailed"]

_log = logging.getLogger(__name__)


class WriterFailed(StoreError):
    """Writing failed (disk full, unwritable directory, ...); names the run and the cause."""


class RecordSink(ABC):
    """What capture talks to: ``write`` records, ``end_step``, ``close``, in that order."""

    def __init__(self, writer: StoreWriter) -> None:
        self.writer = writer

    @abstractmethod
    def write(self, record: Record) -> None:
        """See the class docstring."""

    @abstractmethod
    def end_step(self, info: StepInfo) -> None:
        """See the class docstring."""

    @abstractmethod
    def close(self, status: str, error: str | None = None) -> None:
        """See the class docstring."""


class SyncSink(RecordSink):
    """Statistics and writes inline, in the hook."""

    def write(self, record: Record) -> None:
        finalize_stats(record)
        self.writer.write(record)

    def end_step(self, info: StepInfo) -> None:
        self.writer.end_step(info)

    def close(self, status: str, error: str | None = None) -> None:
        self.writer.close(status, error)


class ThreadedSink(RecordSink):
    """One writer thread, records processed in order; pending snapshot bytes are bounded."""

    def __init__(self, writer: StoreWriter, max_pending_bytes: int) -> None:
        super().__init__(writer)
        self.max_pending_bytes = max(1, int(max_pending_bytes))
        self._queue: queue.Queue[tuple[str, Any, int]] = queue.Queue()
        self._pending = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._closed = False
        self.peak_pending_bytes = 0
        self._thread = threading.Thread(target=self._run, name="ilstore-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            op, item, nbytes = self._queue.get()
            try:
                if self._error is None:
                    if op == "write":
                        item.wait_ready()
                        finalize_stats(item)
                        self.writer.write(item)
                    elif op == "end":
                        self.writer.end_step(item)
            except BaseException as exc:  # kept and raised to the producer
                self._error = exc
                _log.error("ilstore writer thread failed: %s", exc)
            finally:
                with self._cond:
                    self._pending -= nbytes
                    self._cond.notify_all()
                self._queue.task_done()
            if op == "stop":
                return

    def _raise_error(self) -> None:
        if self._error is not None:
            exc = self._error
            raise WriterFailed(f"{self.writer.run_dir}: writing the run failed: {exc}") from exc

    def write(self, record: Record) -> None:
        self._raise_error()
        nbytes = record.nbytes
        with self._cond:
            # Wait while the bound would be exceeded; a single record larger than the bound is
            # admitted alone, once everything before it is written.
            while self._pending > 0 and self._pending + nbytes > self.max_pending_bytes and self._error is None:
                self._cond.wait()
            self._pending += nbytes
            self.peak_pending_bytes = max(self.peak_pending_bytes, self._pending)
        self._queue.put(("write", record, nbytes))

    def end_step(self, info: StepInfo) -> None:
        self._raise_error()
        self._queue.put(("end", info, 0))

    def flush(self) -> None:
        """Wait until every queued record and step end is on disk; raise a writer failure."""
        self._queue.join()
        self._raise_error()

    def close(self, status: str, error: str | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(("stop", None, 0))
        self._thread.join()
        if self._error is not None:
            self.writer.close("failed", error or str(self._error))
            self._raise_error()
        self.writer.close(status, error)
