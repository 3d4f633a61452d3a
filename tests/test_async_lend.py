"""Asynchronous writes that lend the writer the model's own CPU tensors while nothing is queued
(``ThreadedSink.write_lent``; issue 13: a snapshot of a CPU tensor costs what writing it into
the page cache costs, plus fresh pages and a second pass over the bytes): such a record is
written before the hook returns, so what the model changes in place afterwards never reaches
the run; the files are those of a synchronous capture; writes slower than their budget (a disk
that throttles its writers) turn lending off for the run, and records are snapshotted and queued
from then on, stored the same."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ilstore
from ilstore import pipeline
from ilstore.store.base import StoreWriter
from ilstore.testing import assert_bits_equal

capture_mod = importlib.import_module("ilstore.capture")  # ilstore.capture is also the function

_BACKENDS = ["pt", "safetensors", "hdf5"]


class _Model(nn.Module):
    """A Linear whose output the next module overwrites in place, a slice view, a module whose
    output has no tensor, and a large output (a safetensors shard streams)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)
        self.part = _Half()
        self.none = _Nothing()
        self.big = nn.Linear(8, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.lin(x))
        self.none(y)
        return self.big(self.part(y).repeat(1, 2)) * 2


class _Half(nn.Module):
    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, :4]  # a view into y's larger storage: always copied


class _Nothing(nn.Module):
    def forward(self, y: torch.Tensor) -> int:
        return 3  # a side without a tensor


def _capture(tmp_path: Path, name: str, backend: str, steps: int, async_writes: bool = True,
             ) -> tuple[Path, list[dict[str, torch.Tensor]], Any]:
    """Run ``steps`` forwards under a capture; the outputs each hook saw (copied at once), by module."""
    model = _Model()
    seen: list[dict[str, torch.Tensor]] = []

    def keep(module: str) -> Any:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                seen[-1][module] = out.detach().clone()
        return hook

    for module in ("lin", "part", "big"):
        getattr(model, module).register_forward_hook(keep(module))
    cap = ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": name, "backend": backend,
                                  "async_writes": async_writes, "dedup": False, "log_step_ids": []})
    sink = cap._sink
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        seen.append({})
        with torch.no_grad():
            model(torch.randn(64, 8, generator=g))
    cap.close()
    return tmp_path / name, seen, sink


def _check_stored(run: Path, seen: list[dict[str, torch.Tensor]]) -> None:
    with ilstore.open_run(run) as r:
        assert r.steps() == list(range(len(seen)))
        for step, outputs in enumerate(seen):
            calls = {c.module: c for c in r.calls(step)}
            for module, expected in outputs.items():
                assert_bits_equal(r.load(calls[module].tensor("outputs")), expected)
            lin = r.load(calls["lin"].tensor("outputs"))
            assert lin.min() < 0  # as the hook saw it, before ReLU changed it in place


def _step_files(run: Path) -> dict[str, bytes]:
    out = {}
    for root, _dirs, files in os.walk(run):
        rel = os.path.relpath(root, run)
        if rel.startswith("step_"):
            for name in files:
                out[f"{rel}/{name}"] = Path(root, name).read_bytes()
    return out


def _delay_writes(monkeypatch: pytest.MonkeyPatch, delay: Callable[[], None]) -> None:
    """Every write of a record with stored bodies runs ``delay()`` first."""
    write = StoreWriter.write

    def delayed(self: StoreWriter, record: Any) -> None:
        if record.tensors:
            delay()
        write(self, record)

    monkeypatch.setattr(StoreWriter, "write", delayed)


def _every_record_lent(out: Path, backend: str) -> None:
    """A two-step capture into ``out`` lends every record with a body and keeps lending on."""
    run, seen, sink = _capture(out, "run", backend, steps=2)
    assert sink.lending and sink.lent_records == 2 * 10
    _check_stored(run, seen)


@pytest.fixture
def lending(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture_mod, "_ASYNC_LENDS", True)


@pytest.fixture
def quiet_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """For the tests that lending stays on: a directory on tmpfs where there is one, and 5 ms of
    budget a write. Their subject is what does *not* count as a slow disk (CPU time, waits for a
    core); a real disk can block a write for real (a fresh CI clone's tests start while the
    installed packages are still being written back, and one such run turned lending off, rightly),
    which is the other tests' subject. 5 ms is a sixth of the 30 ms each injected write takes, so
    counting those 30 ms would still turn lending off at the second write."""
    monkeypatch.setattr(pipeline, "_LEND_BUDGET_S", 0.005)
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="ilstore-lend-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("backend", _BACKENDS)
def test_lent_records_store_what_the_hook_saw(tmp_path: Path, backend: str, lending: None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    handed: list[int] = []
    write = StoreWriter.write

    def spy(self: StoreWriter, record: Any) -> None:
        handed.extend(t.data_ptr() for t in record.tensors.values())
        write(self, record)

    monkeypatch.setattr(StoreWriter, "write", spy)
    # every record lent, whatever the machine's load: the slack is the timing tests' business
    # (a CI run on a busy machine once saw lending switched off here)
    monkeypatch.setattr(pipeline, "_LEND_SLACK_S", 10.0)
    run, seen, sink = _capture(tmp_path, "run", backend, steps=3)
    assert sink.lending and sink.lent_records == 3 * 10  # every record with a stored body (10 a step), every step
    assert sink._thread is None  # nothing was ever queued: no writer thread
    _check_stored(run, seen)
    assert handed


@pytest.mark.parametrize("backend", ["pt", "safetensors"])
def test_lent_runs_are_the_files_of_a_sync_capture(tmp_path: Path, backend: str, lending: None) -> None:
    lent, _, sink = _capture(tmp_path, "lent", backend, steps=2)
    assert sink.lent_records > 0
    sync, _, _ = _capture(tmp_path, "sync", backend, steps=2, async_writes=False)
    held, _, held_sink = _capture(tmp_path, "held", backend, steps=2)
    held_sink_lent = held_sink.lent_records
    assert held_sink_lent > 0
    lent_files, sync_files = _step_files(lent), _step_files(sync)
    assert sorted(lent_files) == sorted(sync_files)
    for name, data in sync_files.items():
        assert lent_files[name] == data, name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="waits are told from context switches on Linux")
@pytest.mark.parametrize("backend", _BACKENDS)
def test_slow_lent_writes_turn_lending_off(tmp_path: Path, backend: str, lending: None,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that waits 30 ms in each write (as one throttled by a slow disk): after the second
    such write (the first of a run pays for one-time set-up and is not budgeted; the second takes
    more than the 20 ms of slack) records are snapshotted and queued, and stored the same."""
    _delay_writes(monkeypatch, lambda: time.sleep(0.03))
    run, seen, sink = _capture(tmp_path, "run", backend, steps=2)
    assert not sink.lending
    assert sink.lent_records == 2
    _check_stored(run, seen)


@pytest.mark.parametrize("backend", _BACKENDS)
def test_lent_writes_waiting_for_a_core_are_not_slow(quiet_dir: Path, backend: str, lending: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The same 30 ms writes, but spent waiting in the run queue (another process had the core, as
    on a busy machine; the thread's schedstat says so, faked here): not the disk's slowness, so
    lending stays on and every record is lent. (A helper saw one such 30 ms wait under load turn
    lending off for the rest of a benchmark run, and that forward take 1.6 s against 0.44 s.)"""
    waited = [0.0]

    def queued() -> None:
        t0 = time.perf_counter()
        time.sleep(0.03)
        waited[0] += time.perf_counter() - t0

    _delay_writes(monkeypatch, queued)
    monkeypatch.setattr(pipeline, "_run_queue_wait", lambda: waited[0])
    _every_record_lent(quiet_dir, backend)


@pytest.mark.skipif(pipeline._run_queue_wait() is None, reason="the kernel has no /proc/thread-self/schedstat")
@pytest.mark.parametrize("backend", _BACKENDS)
def test_lent_writes_that_copy_slowly_are_not_slow(quiet_dir: Path, backend: str, lending: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes that take 30 ms of CPU each (as copies do on a machine whose other processes take
    the memory's bandwidth: one measured 8-13 ms for 2 MB under load, ~1 ms quiet): a snapshot
    would copy the same bytes, so the write is not slow for the disk's sake and lending stays on.
    Each also sleeps 1 ms first (a page the kernel waited for): a write that slept is judged by
    its time less its CPU time (one that never slept is not blocked at all, whatever it took)."""
    def busy() -> None:
        time.sleep(0.001)
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.03:
            pass

    _delay_writes(monkeypatch, busy)
    _every_record_lent(quiet_dir, backend)


@pytest.mark.skipif(pipeline._voluntary_waits() is None, reason="no per-thread context-switch counts (not Linux)")
@pytest.mark.parametrize("backend", _BACKENDS)
def test_lent_writes_that_never_sleep_are_not_slow(quiet_dir: Path, backend: str, lending: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes that take 30 ms more than their CPU time and their waits for a core without ever
    sleeping (no voluntary context switch: faked here around a real sleep), as writes to tmpfs did
    on this project's VM (8-58 ms, the host's time: steal): nothing blocked them, a snapshot would pay
    the same, so lending stays on."""
    slept = [False]

    def unaccounted() -> None:
        slept[0] = True
        time.sleep(0.03)

    _delay_writes(monkeypatch, unaccounted)
    monkeypatch.setattr(pipeline, "_voluntary_waits", lambda: 7)  # the same count before and after
    if pipeline._run_queue_wait() is not None:
        monkeypatch.setattr(pipeline, "_run_queue_wait", lambda: 1.0)  # no wait for a core
    _every_record_lent(quiet_dir, backend)
    assert slept[0]


@pytest.mark.skipif(pipeline._run_queue_wait() is None, reason="the kernel has no /proc/thread-self/schedstat")
def test_the_run_queue_wait_is_the_threads_own() -> None:
    """``_run_queue_wait`` moves when the calling thread shares its core with a busy process, and
    each thread reads its own (a second thread starts near zero)."""
    import subprocess
    import threading

    cpu = min(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(hog.pid, {cpu})
        os.sched_setaffinity(0, {cpu})  # this thread only
        start, t0 = pipeline._run_queue_wait(), time.perf_counter()
        while time.perf_counter() - t0 < 0.5:
            pass
        waited = pipeline._run_queue_wait() - start  # type: ignore[operator]
    finally:
        os.sched_setaffinity(0, before)
        hog.kill()
        hog.wait()
    assert waited > 0.05, waited  # the scheduler shares the core: ~0.25 s of the 0.5 s
    other: list[float | None] = []
    thread = threading.Thread(target=lambda: other.append(pipeline._run_queue_wait()))
    thread.start()
    thread.join()
    assert other[0] is not None and other[0] < waited


@pytest.mark.parametrize("backend", _BACKENDS)
def test_lending_waits_for_what_is_queued(tmp_path: Path, backend: str, lending: None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """While anything is queued (here: every record of the first step, lending being off then),
    records are snapshotted and queued behind it; lent again once the queue is empty (the step's
    end written), the run is stored in order and as the hooks saw it."""
    lends = pipeline.ThreadedSink.lends
    calls = [0]

    def first_step_queued(self: pipeline.ThreadedSink) -> bool:
        calls[0] += 1
        return calls[0] > 12 and lends(self)

    monkeypatch.setattr(pipeline.ThreadedSink, "lends", first_step_queued)
    run, seen, sink = _capture(tmp_path, "run", backend, steps=3)
    assert 0 < sink.lent_records < 3 * 10
    _check_stored(run, seen)


def test_sync_captures_and_stats_mode_lend_nothing_asynchronously(tmp_path: Path, lending: None) -> None:
    _, _, sink = _capture(tmp_path, "sync", "pt", steps=1, async_writes=False)
    assert not isinstance(sink, pipeline.ThreadedSink)
    model = _Model()
    cap = ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "stats", "mode": "stats", "log_step_ids": []})
    with torch.no_grad():
        model(torch.randn(4, 8))
    stats_sink = cap._sink
    cap.close()
    assert not stats_sink.lending and stats_sink.lent_records == 0
