"""Between the hooks and the store writer: statistics, de-duplication and the writer thread.

The hook only takes snapshots; everything else (statistics of stored tensors, serialization,
disk I/O) happens here, either inline (``async_writes: false``) or on one background thread
that consumes records in order -- except that, while nothing is queued and the writes are fast,
a record may be written by the producer from the model's own CPU tensors
(:meth:`ThreadedSink.write_lent`). Pending work is bounded three times: the memory held by
snapshots waiting to be written (``max_pending_mb``), the number of queued items (records and
step ends, :data:`MAX_PENDING_ITEMS`) and the completed steps not yet written
(:data:`MAX_PENDING_STEPS`). When a bound is reached the producer (the model) waits,
doing queued work itself meanwhile, so nothing is dropped, memory cannot grow without bound
(records without bodies, as in ``mode: "stats"``, weigh almost nothing in bytes) and ``close()``
never inherits more than a bounded backlog. A failure on the writer thread is kept and raised
to the producer at the next step end or at close, never lost.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
from abc import ABC, abstractmethod
from typing import Any

import torch

from .errors import StoreError
from .records import Record, finalize_stats
from .store.base import StepInfo, StoreWriter

__all__ = ["MAX_PENDING_ITEMS", "RecordSink", "SyncSink", "ThreadedSink", "WriterFailed"]

#: Default bound on the items (records and step ends) queued for the writer thread. Large
#: enough that the writer can lag the model by a few steps of a real model (a 110-call Llama
#: step is 221 items) and so use the time a GPU-bound model leaves idle; small enough that the
#: queue's own memory stays at a few MB (a record without a body is a few KB of Python objects)
#: and that ``close()`` never inherits more than ~1,000 items of work (measured ~0.1-0.3 ms
#: each for a bodiless record on the 2-core development machine: well under a second). Not a
#: config key: it trades nothing a user tunes (memory is ``max_pending_mb``'s job).
MAX_PENDING_ITEMS = 1024
#: Step ends queued or being written at most: the producer's step end waits (doing queued work
#: itself) until no more than this many completed steps are unwritten, so a process killed
#: (SIGKILL) loses at most the last completed step besides the one it was in. Without it a
#: writer thread starved on a busy machine (it runs at nice 19) left up to the item bound
#: queued: ~60 completed steps of 17 items were lost to a kill.
MAX_PENDING_STEPS = 1

#: The writer thread is woken once this many items wait, or this many bytes of snapshots, or at
#: once by a step end, a flush or close, not for every record: each wake-up of a thread costs a
#: futex call, a context switch and a GIL hand-over, on the order of the work of a record
#: without a body (measured ~30 us a record in CPU time on the 2-core development machine).
_WAKE_ITEMS = 64
_WAKE_BYTES = 16 * 2**20
#: Records without bodies (``mode: "stats"``) are handed to the writer thread this many at a time
#: (at most a quarter of the item bound), as one queued item: queueing one takes the queue's lock
#: and updates its counters, which costs, with the caches a model's forward leaves cold, about as
#: much as the writer's work on such a record. A batch is queued before anything else is (a
#: record with bodies, a step end, a flush, close), so the order is kept, and it counts as the
#: records it holds against the item bound.
_BATCH_RECORDS = 32
#: Once awake, the writer thread hands the GIL over (to the model's thread, if it waits for it)
#: after this many seconds of work, between two items: the model's hooks then wait at most
#: about this long for the GIL, instead of Python's switch interval (5 ms), while its OpenMP
#: threads spin.
_GIL_SLICE_S: float | None = 0.0002
#: Lent writes (:meth:`ThreadedSink.write_lent`) are budgeted this much each, plus their bytes at
#: :data:`_LEND_BUDGET_BPS`: writes into the page cache run at 2 GB/s and more on tmpfs, and on a
#: disk that keeps up (as fast as the snapshots they replace), several times slower when the
#: kernel throttles its writers for a slow disk or hands out fresh page-cache pages slowly.
#: What each write takes beyond its budget, less what the faster ones leave unused, accumulates;
#: past :data:`_LEND_SLACK_S` lending is off for the run (so the model waits at most that much
#: longer for the disk than with snapshots, plus one write). What counts is the time the write
#: was blocked in the kernel (a throttled disk, a page cache that sleeps to hand out pages): a
#: write that did not sleep (no voluntary context switch, ``getrusage(RUSAGE_THREAD)``) was not
#: blocked, whatever its clock says; one that did counts its wall clock less its CPU time (a
#: snapshot would copy the same bytes: a copy slowed by a busy machine's memory is no reason to
#: snapshot) and less the time its thread waited for a core (Linux's
#: ``/proc/thread-self/schedstat``: another process's time, not the disk's). Where neither is
#: known (not Linux), its wall clock less its CPU time counts. (On this project's VM, with 1.8 GB
#: in its tmpfs, single writes of 0.5-8 MB to tmpfs took 8-58 ms beyond their CPU time and their
#: waits for a core without ever sleeping -- steal time, the VM's host's -- and turned lending off
#: in 2-3 of 7 benchmark captures; snapshots pay such time too, and the capture took 1.14-1.15 x
#: longer with them than lent, pt and safetensors.)
_LEND_BUDGET_S = 0.0005
_LEND_BUDGET_BPS = 1e9
_LEND_SLACK_S = 0.02


def _voluntary_waits() -> int | None:
    """How many times the calling thread has slept in the kernel (``None`` where not known)."""
    return None if _RUSAGE_THREAD is None else resource.getrusage(_RUSAGE_THREAD).ru_nvcsw


try:
    import resource

    _RUSAGE_THREAD: int | None = resource.RUSAGE_THREAD
except (ImportError, AttributeError):  # not Linux
    _RUSAGE_THREAD = None


class _SchedStat:
    """The calling thread's ``/proc/thread-self/schedstat``, kept open per thread (a ``pread`` of
    it costs ~1 us here, as ``thread_time`` and ``getrusage`` together did)."""

    def __init__(self) -> None:
        self.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)

    def __del__(self, _close: Any = os.close) -> None:  # the thread ended (its locals dropped), or a fork's child
        _close(self.fd)  # (bound early: at interpreter exit the module's globals may be gone)


_schedstats = threading.local()
_SCHEDSTAT_KNOWN: bool | None = None  # whether the kernel has schedstat (None: not tried yet)


def _run_queue_wait() -> float | None:
    """Seconds the calling thread has waited in the run queue (runnable, another task on its
    core), or ``None`` where the kernel does not tell (not Linux, no ``CONFIG_SCHED_INFO``)."""
    global _SCHEDSTAT_KNOWN
    if _SCHEDSTAT_KNOWN is False:
        return None
    try:
        stat = getattr(_schedstats, "stat", None)
        if stat is None:
            _schedstats.stat = stat = _SchedStat()
        wait = int(os.pread(stat.fd, 64, 0).split()[1]) * 1e-9
    except (OSError, IndexError, ValueError):
        _SCHEDSTAT_KNOWN = False
        return None
    _SCHEDSTAT_KNOWN = True
    return wait


def _new_schedstats() -> None:
    """In a fork's child: the parent's descriptors name the parent's threads."""
    global _schedstats
    _schedstats = threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_schedstats)

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

    def lends(self) -> bool:
        """Whether the next record may be built from the model's own CPU tensors (no snapshot)
        and handed to :meth:`write_lent`, which writes it before returning. False here."""
        return False

    def write_lent(self, record: Record) -> None:
        """Write ``record`` before returning (its bodies may be the model's own tensors)."""
        raise NotImplementedError


class SyncSink(RecordSink):
    """Statistics and writes inline, in the hook."""

    def write(self, record: Record) -> None:
        record.wait_ready()  # a device tensor's copy to (pinned) host memory may still be running
        finalize_stats(record)
        self.writer.write(record)

    def end_step(self, info: StepInfo) -> None:
        self.writer.end_step(info)

    def close(self, status: str, error: str | None = None) -> None:
        self.writer.close(status, error)


def _quiet_writer_thread() -> bool:
    """Keep the calling (writer) thread from competing with the model for the CPU.

    * torch ops on this thread run on it alone. With the default OpenMP backend a second thread
      that runs parallel ops gets its own team of OpenMP workers, spinning on the same cores as
      the model's team (measured on 2 cores: capturing one module cost 14 % of the forward
      instead of 2 %; the statistics are a C kernel now, but a writer or a non-float tensor's
      statistics may still run torch ops here). The thread's own OpenMP thread count is set to
      1 (:func:`_thread_local_threads`: OpenMP keeps it per thread), which changes nothing for
      any other thread. Where that is not possible (another parallel backend, no OpenMP
      runtime found) the thread keeps torch's default: nothing process-wide is ever changed,
      since the thread starts while the model runs (its first wake-up), and a thread of the
      user's that started meanwhile would keep a changed count for good.
    * On Linux the thread runs at the lowest priority (nice 19; a per-thread setting there), so
      it uses the CPU the model leaves idle (a GPU-bound model leaves most of it). Whenever the
      model waits for the writer (the pending bound, a flush, close) it does the remaining work
      itself at its own priority (:meth:`ThreadedSink._help`), so a busy machine never starves
      the writes.

    Returns whether the thread's own count was set to 1 (or already was).
    """
    alone = torch.get_num_threads() == 1  # torch's per-thread set-up, at the process's thread count
    if not alone:
        alone = _thread_local_threads()
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _WRITER_NICE)
        except OSError:  # a sandbox that forbids it: run at normal priority
            pass
    return alone


_WRITER_NICE = 19

#: ``omp_set_num_threads`` of each OpenMP runtime loaded in this process (found once).
_omp_setters: list[Any] | None = None
_omp_lock = threading.Lock()
#: Whether :func:`_thread_local_threads` worked in this process: None until a writer thread tried.
_THREAD_LOCAL_OK: bool | None = None
_OMP_NAMES = ("libgomp", "libiomp5", "libomp")


def _new_omp_lock() -> None:
    """A fresh :data:`_omp_lock` (in a forked child: the parent's may have been held at the fork)."""
    global _omp_lock
    _omp_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_omp_lock)


def _find_omp_setters() -> list[Any]:
    """``omp_set_num_threads`` of the OpenMP runtimes already loaded (torch's among them), found
    through ``/proc/self/maps`` and opened without loading anything (``RTLD_NOLOAD``); [] elsewhere."""
    global _omp_setters
    with _omp_lock:
        if _omp_setters is None:
            found: list[Any] = []
            if sys.platform.startswith("linux") and torch._C.has_openmp:
                import ctypes

                paths: dict[str, None] = {}
                try:
                    with open("/proc/self/maps") as fh:
                        for line in fh:
                            if "omp" in line:
                                fields = line.split(None, 5)
                                if len(fields) == 6:
                                    paths[fields[5].strip()] = None
                except OSError:
                    pass
                for path in paths:
                    if path.rsplit("/", 1)[-1].startswith(_OMP_NAMES) and ".so" in path:
                        try:
                            fn = ctypes.CDLL(path, mode=os.RTLD_NOLOAD).omp_set_num_threads
                        except (OSError, AttributeError):
                            continue
                        fn.argtypes, fn.restype = [ctypes.c_int], None
                        found.append(fn)
            _omp_setters = found
        return _omp_setters


def _thread_local_threads() -> bool:
    """Make torch's parallel ops on the calling thread run on it alone, changing nothing for
    other threads: ``omp_set_num_threads(1)`` (an OpenMP setting of the calling thread) in the
    runtime torch uses; whether ``torch.get_num_threads()`` now says 1 on this thread decides
    (so it is never assumed). Call it after a first ``torch.get_num_threads()`` on the thread
    (torch's per-thread set-up would otherwise undo it at the thread's first parallel op)."""
    global _THREAD_LOCAL_OK
    ok = False
    for setter in _find_omp_setters():
        setter(1)
        if torch.get_num_threads() == 1:
            ok = True
            break
    _THREAD_LOCAL_OK = ok
    return ok


class ThreadedSink(RecordSink):
    """One writer thread; records are processed strictly in order; pending bytes and items are bounded.

    Work items (records, step ends, stop) wait in a deque. Whoever processes an item holds
    ``_work`` from taking it off the deque until it is done, so items are processed one at a
    time and in order, whether by the writer thread or by the producer: when the producer must
    wait (the pending bound, :meth:`flush`, :meth:`close`) it takes items itself instead of
    sleeping while a low-priority thread does them.

    The writer thread is woken in batches (:data:`_WAKE_ITEMS` items or :data:`_WAKE_BYTES`
    bytes queued since the last wake-up, or a step end, flush or close), and once awake it takes
    every item queued, one at a time, letting the model's thread have the GIL between items.
    """

    def __init__(self, writer: StoreWriter, max_pending_bytes: int, max_pending_items: int = MAX_PENDING_ITEMS) -> None:
        super().__init__(writer)
        self.max_pending_bytes = max(1, int(max_pending_bytes))
        self.max_pending_items = max(1, int(max_pending_items))
        self._items: collections.deque[tuple[str, Any, int]] = collections.deque()
        self._pending = 0
        self._pending_items = 0  # queued or being processed; the "stop" item is not counted
        self._pending_ends = 0  # step ends queued or being processed (MAX_PENDING_STEPS)
        self._cond = threading.Condition()  # guards _items, _pending and _pending_items
        self._work = threading.Lock()  # held while one item is taken and processed
        self._error: BaseException | None = None
        self._closed = False
        self._wake = False  # under _cond: the writer thread has been told to take the queued items
        self._unwoken = [0, 0]  # under _cond: items and bytes queued since the last wake-up
        self.peak_pending_bytes = 0
        self.peak_pending_items = 0
        self._batch: list[Record] = []  # producer side: bodiless records not queued yet
        self._batch_size = max(1, min(_BATCH_RECORDS, self.max_pending_items // 4))
        self._threadless = False  # no thread will be started (none could be, or closing): the producer writes
        # under _cond: close() does every queued item itself; the writer thread ends after the one it holds
        self._draining = False
        # Started at the first wake-up (_start_thread): a capture whose records all fit the first
        # batch (one forward of a few modules) is written by the producer at close, with no
        # thread to start, wait for and join (each ~0.1 ms on an idle 2-core machine, a few ms
        # on a busy one).
        self._thread: threading.Thread | None = None
        # Whether records with bodies may be written by the producer while nothing is queued
        # (lends, write_lent): set by a capture whose writer borrows bodies; turned off for the
        # run by lent writes blocked longer than their budget (_LEND_BUDGET_S), or by a record whose copy from a device
        # was still running (a model on an accelerator: writing there would wait for it).
        self.lending = False
        self.lent_records = 0  # records written by the producer from the model's own tensors
        self._lend_excess = 0.0  # what lent writes were blocked beyond their budgets, less what they left unused (>= 0)

    def _process(self, op: str, item: Any, nbytes: int, slices: bool = False) -> None:
        """Do one item; ``slices``: hand the GIL over between a batch's records (the writer thread)."""
        count = 1
        try:
            if op == "writes":  # a batch of records without bodies
                count = len(item)
                clock, held = time.perf_counter, time.perf_counter()
                for i, record in enumerate(item):
                    if self._error is not None:
                        break
                    if i and slices and _GIL_SLICE_S is not None and clock() - held >= _GIL_SLICE_S:
                        time.sleep(0)  # between two records as between two items (see _run)
                        held = clock()
                    self.writer.write(record)
            elif self._error is None:
                if op == "write":
                    item.wait_ready()
                    finalize_stats(item)
                    self.writer.write(item)
                elif op == "end":
                    self.writer.end_step(item)
        except BaseException as exc:  # kept and raised to the producer
            self._error = exc
            _log.error("ilstore writer thread failed: %s", exc)
            if not isinstance(exc, Exception):  # Ctrl-C (or an exit) on the thread doing this item: not swallowed
                raise
        finally:
            with self._cond:
                self._pending -= nbytes
                self._pending_items -= count
                if op == "end":
                    self._pending_ends -= 1
                self._cond.notify_all()

    def _take_one(self) -> str | None:
        """Process the oldest item on this thread; its op, or None if there was none.

        A "stop" item is left in place for the writer thread. The producer calls this: it hands the
        GIL to nobody meanwhile (the model's thread is the one the writer thread makes way for).
        """
        with self._work:
            with self._cond:
                if not self._items or self._items[0][0] == "stop":
                    return None
                op, item, nbytes = self._items.popleft()
            self._process(op, item, nbytes)
            return op

    def _start_thread(self) -> None:
        """Start the writer thread (under ``_cond``, which it does not need before it is set up).

        Nothing waits for it to be set up: it changes no process-wide setting
        (:func:`_quiet_writer_thread`). Where no thread can be started (Python 3.12+ refuses new
        threads at interpreter shutdown, e.g. a capture closed from ``atexit``; a resource
        limit), the producer does every item itself when it waits (the bounds, flush, close).
        """
        thread = threading.Thread(target=self._run, name="ilstore-writer", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:
            self._threadless = True
            _log.debug("ilstore: no writer thread (%s); the model's thread writes the run", exc)
            return
        self._thread = thread

    def _run(self) -> None:
        try:
            _quiet_writer_thread()
        except Exception as exc:  # a thread that cannot be made quiet still writes
            _log.debug("ilstore: the writer thread keeps its default thread count: %s", exc)
        cond, items, clock = self._cond, self._items, time.perf_counter
        while True:
            with cond:
                while not self._wake:
                    cond.wait()
                self._wake = False
            held = clock()
            while True:  # every queued item, including those queued meanwhile
                with self._work:
                    with cond:
                        if self._draining:
                            return  # close() does the rest on its own thread
                        if not items:
                            break  # the producer took the rest
                        op, item, nbytes = items.popleft()
                    if op == "stop":
                        return
                    self._process(op, item, nbytes, True)
                if _GIL_SLICE_S is not None and clock() - held >= _GIL_SLICE_S:
                    time.sleep(0)  # the GIL goes to the model's thread if it waits for it
                    held = clock()

    def _help(self) -> None:
        """Producer side: process queued items until none is left (the writer thread may
        still be finishing the one it holds)."""
        while self._take_one() is not None:
            pass

    def _raise_error(self) -> None:
        if self._error is not None:
            exc = self._error
            raise WriterFailed(f"{self.writer.run_dir}: writing the run failed: {exc}") from exc

    def _queue(self, op: str, item: Any, nbytes: int, wake: bool, count: int = 1) -> None:
        """Producer side: wait, doing the oldest queued items here, until one more item of
        ``nbytes`` (``count`` records: a batch) fits both bounds, then queue it as pending,
        waking the writer thread when ``wake`` or enough is queued.

        A single record larger than the byte bound is admitted alone, once everything before
        it is written. After a writer failure nothing waits (the items are dropped unprocessed).
        """
        cond = self._cond
        while True:
            with cond:
                if self._fits(nbytes, count):
                    self._pending += nbytes
                    self._pending_items += count
                    if self._pending > self.peak_pending_bytes:
                        self.peak_pending_bytes = self._pending
                    if self._pending_items > self.peak_pending_items:
                        self.peak_pending_items = self._pending_items
                    self._items.append((op, item, nbytes))
                    unwoken = self._unwoken
                    unwoken[0] += count
                    unwoken[1] += nbytes
                    if wake or unwoken[0] >= _WAKE_ITEMS or unwoken[1] >= _WAKE_BYTES:
                        self._wake_writer()
                    return
                self._wake_writer()  # full: the writer thread works too, while this thread helps
            if self._take_one() is None:
                with cond:  # the writer thread holds the last one: wait for it
                    if not self._fits(nbytes, count):
                        cond.wait(0.05)

    def _wake_writer(self) -> None:
        """Under ``_cond``: have the writer thread take every queued item (starting it if need be)."""
        self._unwoken[0] = self._unwoken[1] = 0
        if self._thread is None and not self._threadless and not self._closed:  # never started by close
            self._start_thread()
        if not self._wake:
            self._wake = True
            self._cond.notify_all()

    def closing(self) -> None:
        """The capture is closing: no writer thread is started from now on (what is queued, e.g.
        the step end that ``close`` makes, is written by :meth:`close` on the calling thread; an
        ``atexit`` close on Python 3.12+ could not start one anyway)."""
        with self._cond:
            self._threadless = True

    def _stop_thread(self) -> None:
        """Have the writer thread end, and wait until it has (it was never needed if it never
        started). It has nothing left to do but take "stop"; joining it matters: a daemon thread
        still running when the interpreter exits (at nice 19 on a busy machine it may take a
        while to get a core) aborted a torchrun worker at exit ("terminate called without an
        active exception") in CI."""
        thread = self._thread
        if thread is not None:
            with self._cond:
                self._items.append(("stop", None, 0))
                self._wake_writer()
            if thread is not threading.current_thread():
                thread.join()

    def _fits(self, nbytes: int, count: int = 1) -> bool:
        """Under ``_cond``: whether one more item of ``nbytes`` and ``count`` records may be queued now."""
        if self._error is not None:
            return True
        if self._pending_items + count > self.max_pending_items and self._pending_items > 0:
            return False
        return self._pending == 0 or self._pending + nbytes <= self.max_pending_bytes

    def write(self, record: Record) -> None:
        if self._error is not None:
            self._raise_error()
        if not record.tensors and record.ready is None:  # no body: batched (finalize_stats has nothing to do)
            batch = self._batch
            batch.append(record)
            if len(batch) >= self._batch_size:
                self._queue_batch()
            return
        self._queue_batch()
        self._queue("write", record, record.nbytes, False)

    def lends(self) -> bool:
        """Producer side: whether the next record may be lent (:meth:`write_lent`): writes so far
        were fast, the run is not closing, and nothing is queued or being written. What is
        queued (a full batch of bodiless records, a step end, records snapshotted while the
        writes were not known to be fast) is written here first, as the writes are fast; a
        stale "no" (the writer thread still finishing an item) costs one snapshot. A stale
        "yes" cannot be: only the producer queues items."""
        if not self.lending or self._error is not None or self._closed:
            return False
        if self._pending_items:
            self._help()
        return not self._pending_items

    def write_lent(self, record: Record) -> None:
        """Producer side: write ``record`` now, on this thread, its CPU bodies being the model's
        own tensors (the writer is :attr:`~ilstore.store.base.StoreWriter.lent` them for the
        call), as :class:`SyncSink` does, after the bodiless records held back. Only after
        :meth:`lends` said yes, so nothing queued comes before it.

        For a CPU tensor a snapshot costs what writing it into the page cache costs (a copy),
        plus fresh pages and a second pass once the writer thread writes it, so writing it here
        is cheaper; the promise of ``async_writes`` (the model does not wait for the disk) is
        kept by timing each such write: writes blocked longer than their budget (:data:`_LEND_BUDGET_S`:
        a disk throttling its writers, a page cache slow to hand out pages) turn lending off for the
        run, and records are snapshotted and queued as usual from then on. So does a record whose device copy is
        still running (it is waited for here, once).
        """
        if self._error is not None:
            self._raise_error()
        if record.ready is not None:  # a device tensor's copy: never wait for one again
            self.lending = False
        writer, clock = self.writer, time.perf_counter
        with self._work:
            self._write_batch_here()
            with self._cond:
                self._pending_items += 1
            queued, waits = _run_queue_wait(), _voluntary_waits()
            cpu, started = time.thread_time(), clock()
            writer.lent = True
            try:
                self._process("write", record, 0)
            finally:
                writer.lent = False
            budget = _LEND_BUDGET_S + record.nbytes / _LEND_BUDGET_BPS
            spent = clock() - started
            if not self.lent_records:  # the first pays for one-time set-up (an import, the first files)
                spent = 0.0
            elif spent > budget:  # it waited for the disk, or for a core, or it copied slowly?
                # What counts is the time it was blocked: a write that never slept was not (its time
                # went to its CPU, a core's other tasks, or the VM's host); else not its CPU time (a
                # snapshot copies the same bytes), nor its waits for a core (another process's time)
                if waits is not None and _voluntary_waits() == waits:
                    spent = 0.0
                else:
                    spent -= time.thread_time() - cpu
                    if queued is not None:
                        queued_after = _run_queue_wait()
                        if queued_after is not None:
                            spent -= queued_after - queued
                    spent = max(0.0, spent)
            self._lend_excess = excess = max(0.0, self._lend_excess + spent - budget)
            if excess > _LEND_SLACK_S:
                self.lending = False
                _log.debug("ilstore: lent writes were blocked %.1f ms beyond their budget, the last (%d bytes) "
                           "%.1f ms: snapshots from now on", 1e3 * excess, record.nbytes, 1e3 * spent)
        self.lent_records += 1

    def _write_batch_here(self) -> None:
        """Producer side, holding ``_work``: write the bodiless records held back, on this thread."""
        batch = self._batch
        if batch:
            self._batch = []
            with self._cond:
                self._pending_items += len(batch)
            self._process("writes", batch, 0)

    def _queue_batch(self) -> None:
        """Producer side: queue the bodiless records held back, as one item."""
        batch = self._batch
        if batch:
            self._batch = []
            self._queue("writes", batch, 0, False, len(batch))

    def end_step(self, info: StepInfo) -> None:
        self._raise_error()
        if self.lends():  # the step's records were lent: its end is written here too (no wake-up)
            with self._work:
                self._write_batch_here()
                with self._cond:
                    self._pending_items += 1
                    self._pending_ends += 1
                self._process("end", info, 0)
            return
        self._queue_batch()
        with self._cond:
            self._pending_ends += 1
        self._queue("end", info, 0, True)
        self._settle_ends()

    def _settle_ends(self) -> None:
        """Producer side, after queueing a step end: until at most :data:`MAX_PENDING_STEPS`
        step ends are unwritten, do queued items here (or wait for the one the writer thread
        holds). A writer failure ends the wait (it is raised at the next step end or close)."""
        cond = self._cond
        while True:
            with cond:
                if self._pending_ends <= MAX_PENDING_STEPS or self._error is not None:
                    return
            if self._take_one() is None:
                with cond:  # the writer thread holds the item: wait for it
                    if self._pending_ends > MAX_PENDING_STEPS and self._error is None:
                        cond.wait(0.05)

    def flush(self) -> None:
        """Write everything queued so far (on this thread too); raise a writer failure."""
        self._queue_batch()
        self._help()
        with self._cond:
            while self._pending_items > 0 and self._error is None:
                self._cond.wait(0.05)
        with self._work:  # the item the writer thread holds is finished
            pass
        self._raise_error()

    def close(self, status: str, error: str | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        with self._cond:
            # One thread writes what is left: two would only trade the GIL and the _work lock
            # back and forth (their work is Python), each hand-over a futex call and a context
            # switch, with the records' memory moving between cores.
            self._draining = True
        try:
            if self._error is None:
                self._queue_batch()
            self._help()  # returns once every item is processed: none is left to the writer thread
        except BaseException as exc:  # Ctrl-C while this thread did queued work: the run is closed as failed
            with self._work:  # the writer thread is between items: what is left is dropped
                with self._cond:
                    self._items.clear()
            try:
                self.writer.close("failed", error or f"{type(exc).__name__}: {exc}")
            finally:
                self._stop_thread()
            raise
        # From here the writer thread touches nothing (it ends at its next look at the queue), so
        # the run is closed before waiting for it: a Ctrl-C during that wait loses nothing.
        try:
            if self._error is not None:
                self.writer.close("failed", error or str(self._error))
                self._raise_error()
            self.writer.close(status, error)
        finally:
            self._stop_thread()
