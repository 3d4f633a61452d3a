"""Asynchronous writes, bounded pending memory, de-duplication and deferred statistics."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ilstore
from ilstore.demo import DEMO_PROMPT, tiny_llama
from ilstore.pipeline import ThreadedSink, WriterFailed
from ilstore.records import Record
from ilstore.store.base import StepInfo, StoreWriter


def _capture(out_dir: Path, run_id: str, model: nn.Module, x: Any, **cfg: Any) -> Path:
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(out_dir), "run_id": run_id, **cfg}) as cap:
        model(x) if not isinstance(x, dict) else model(**x)
    assert cap.run_dir is not None
    return cap.run_dir


def _all(run_dir: Path) -> dict[str, tuple[dict[str, Any], torch.Tensor | None]]:
    with ilstore.open_run(run_dir) as run:
        out = {}
        for k in run.keys():
            meta = dict(run.meta(k))
            out[str(k)] = ({n: meta.get(n) for n in ("shape", "dtype", "stats", "stored")},
                           run.load(k) if meta.get("stored") else None)
        return out


@pytest.mark.parametrize("backend", ["pt", "safetensors", "hdf5"])
def test_sync_async_dedup_give_same_records(out_dir: Path, backend: str) -> None:
    x = {"input_ids": torch.tensor(DEMO_PROMPT), "use_cache": False}
    runs = {}
    for name, cfg in {"sync": {"async_writes": False, "dedup": False},
                      "async": {"async_writes": True, "dedup": False},
                      "dedup": {"async_writes": True, "dedup": True},
                      "sync-dedup": {"async_writes": False, "dedup": True}}.items():
        runs[name] = _all(_capture(out_dir, name, tiny_llama(), x, backend=backend, **cfg))
    base = runs["sync"]
    for name, run in runs.items():
        assert run.keys() == base.keys(), name
        for k, (meta, t) in run.items():
            assert meta == base[k][0], (name, k)
            assert t is not None and torch.equal(t, base[k][1]), (name, k)


def test_dedup_hard_links_and_loads(out_dir: Path) -> None:
    run_dir = _capture(out_dir, "d", tiny_llama(), {"input_ids": torch.tensor(DEMO_PROMPT), "use_cache": False})
    a = run_dir / "step_0" / "model.layers.0.mlp.act_fn" / "outputs_cpu.pt"
    b = run_dir / "step_0" / "model.layers.0.mlp.act_fn" / "inputs_0_cpu.pt"
    gate_out = run_dir / "step_0" / "model.layers.0.mlp.gate_proj" / "outputs_cpu.pt"
    assert os.stat(b).st_ino == os.stat(gate_out).st_ino  # gate_proj's output is act_fn's input
    assert os.stat(a).st_ino != os.stat(b).st_ino
    assert torch.equal(torch.load(b, weights_only=True), torch.load(gate_out, weights_only=True))
    inodes = {os.stat(Path(dp) / f).st_ino for dp, _, fs in os.walk(run_dir) for f in fs if f.endswith(".pt")}
    files = [f for _, _, fs in os.walk(run_dir) for f in fs if f.endswith(".pt")]
    assert len(inodes) < len(files) * 0.75  # most inputs are an earlier module's output
    with ilstore.open_run(run_dir) as run:
        meta = run.meta(ilstore.TensorKey(0, "model.layers.0.mlp.act_fn", 0, "inputs", ("0",)))
        assert meta["same_as"] == "r0/s0/model.layers.0.mlp.gate_proj/0/outputs"
        assert meta["stats"]["l2_norm"] > 0


class MutateThenReuse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Identity()
        self.b = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y.add_(1)  # changes the tensor a returned: b's input must not reuse a's snapshot
        return self.b(y)


def test_dedup_respects_in_place_changes(out_dir: Path) -> None:
    x = torch.zeros(3)
    run_dir = _capture(out_dir, "m", MutateThenReuse(), x)
    with ilstore.open_run(run_dir) as run:
        a_out = run.load(ilstore.TensorKey(0, "a", 0, "outputs"))
        b_in = run.load(ilstore.TensorKey(0, "b", 0, "inputs", ("0",)))
        assert torch.equal(a_out, torch.zeros(3)) and torch.equal(b_in, torch.ones(3))
        assert "same_as" not in run.meta(ilstore.TensorKey(0, "b", 0, "inputs", ("0",)))
        assert run.meta(ilstore.TensorKey(0, "b", 0, "outputs"))["same_as"] == "r0/s0/b/0/inputs/0"


class SlowWriter(StoreWriter):
    name = "slow"

    def __init__(self, run_dir: Path, fail_at: int | None = None) -> None:
        super().__init__(run_dir)
        self.written: list[Record] = []
        self.fail_at = fail_at
        self.gate = threading.Event()

    def _write(self, record: Record) -> None:
        self.gate.wait(5)
        if self.fail_at is not None and len(self.written) == self.fail_at:
            raise OSError(28, "No space left on device")
        self.written.append(record)

    def _end_step(self, info: StepInfo) -> None:
        pass


def _record(i: int, nbytes: int) -> Record:
    return Record(ilstore.CallKey(0, 0, f"m{i}", 0), "outputs", {"type": "tensor"}, {(): torch.zeros(nbytes // 4)})


def test_pending_memory_is_bounded(tmp_path: Path) -> None:
    writer = SlowWriter(tmp_path / "run")
    writer.open(ilstore.manifest.new_manifest("slow", {}))
    sink = ThreadedSink(writer, max_pending_bytes=3 * 4096)
    done = threading.Event()

    def produce() -> None:
        for i in range(10):
            sink.write(_record(i, 4096))
        done.set()

    t = threading.Thread(target=produce)
    t.start()
    time.sleep(0.3)
    assert not done.is_set()  # the producer waits: only 3 records fit
    assert sink.peak_pending_bytes <= 3 * 4096
    writer.gate.set()
    t.join(5)
    sink.close("complete")
    assert done.is_set() and len(writer.written) == 10 and sink.peak_pending_bytes <= 3 * 4096


def test_writer_failure_surfaces_at_step_end_and_close(tmp_path: Path) -> None:
    writer = SlowWriter(tmp_path / "run", fail_at=1)
    writer.open(ilstore.manifest.new_manifest("slow", {}))
    sink = ThreadedSink(writer, max_pending_bytes=2**20)
    writer.gate.clear()  # hold the thread so the three writes are queued before the failure
    for i in range(3):
        sink.write(_record(i, 64))
    writer.gate.set()
    with pytest.raises(WriterFailed, match="No space left on device"):
        sink.flush()
    with pytest.raises(WriterFailed, match="No space left on device"):
        sink.end_step(StepInfo(0, [], []))
    with pytest.raises(WriterFailed):
        sink.close("complete")
    assert writer.manifest["status"] == "failed"
    assert [r.call.module for r in writer.written] == ["m0"]  # nothing after the failure is written


class OrderWriter(StoreWriter):
    """Records which thread wrote each record, in order."""

    name = "order"

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        self.log: list[tuple[str, str]] = []

    def _write(self, record: Record) -> None:
        time.sleep(0.002)
        self.log.append((record.call.module, threading.current_thread().name))

    def _end_step(self, info: StepInfo) -> None:
        self.log.append((f"end{info.step}", threading.current_thread().name))


def test_producer_helps_in_order_when_it_waits(tmp_path: Path) -> None:
    """Over the bound, at flush and at close the producer writes queued records itself; the
    order of records and step ends is kept whoever writes them."""
    writer = OrderWriter(tmp_path / "run")
    writer.open(ilstore.manifest.new_manifest("order", {}))
    sink = ThreadedSink(writer, max_pending_bytes=2 * 4096)
    expected = []
    for step in range(3):
        for i in range(20):
            sink.write(_record(i, 4096))
            expected.append(f"m{i}")
            assert sink.peak_pending_bytes <= 2 * 4096
        sink.end_step(StepInfo(step, [], []))
        expected.append(f"end{step}")
    sink.flush()
    assert [m for m, _ in writer.log] == expected
    sink.write(_record(99, 4096))
    sink.close("complete")
    assert [m for m, _ in writer.log] == expected + ["m99"]
    threads = {t for _, t in writer.log}
    assert threading.current_thread().name in threads  # the producer took part


@pytest.mark.skipif(not (sys.platform.startswith("linux") and torch._C.has_openmp),
                    reason="the writer thread sets its own count in torch's OpenMP runtime; elsewhere it keeps "
                           "the default (tests/test_setup_fast.py)")
def test_writer_thread_is_quiet() -> None:
    """The writer thread runs torch single-threaded and (on Linux) at the lowest priority,
    without changing the thread count of the caller or of threads started later."""
    from ilstore.pipeline import _quiet_writer_thread

    seen: dict[str, int] = {}

    def writer() -> None:
        _quiet_writer_thread()
        seen["threads"] = torch.get_num_threads()
        if sys.platform.startswith("linux"):
            seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def later() -> None:
        seen["later"] = torch.get_num_threads()

    before = torch.get_num_threads()
    for target in (writer, later):
        t = threading.Thread(target=target)
        t.start()
        t.join()
    assert seen["threads"] == 1
    assert torch.get_num_threads() == before and seen["later"] == before
    if sys.platform.startswith("linux"):
        assert seen["nice"] == 19


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_fast_stats_match_exact_formulas(dtype: torch.dtype) -> None:
    from ilstore.records import _slow_stats, tensor_stats

    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(300, 17, generator=g), torch.randn(1000, generator=g) + 5000.0, torch.tensor([3.5]),
              torch.full((64,), -2.0), torch.randn(17, 300, generator=g).t(),  # not contiguous
              torch.randn(8, 16_384, generator=g) * 3 - 1, torch.randn(40_000, generator=g)):  # whole rows, rows + tail
        x = x.to(dtype)
        fast, exact = tensor_stats(x), _slow_stats(x)
        assert fast.keys() == exact.keys()
        for k in fast:
            assert fast[k] == pytest.approx(exact[k], rel=1e-5, abs=1e-6 * (1 + abs(exact["mean"]))), (k, dtype)


def test_stats_do_not_depend_on_the_thread_count() -> None:
    """The hook (the model's threads), the writer thread (one thread) or the producer may compute
    a tensor's statistics: the values must be bit-identical whichever did."""
    from ilstore.records import tensor_stats

    g = torch.Generator().manual_seed(1)
    nan = torch.randn(300_001, generator=g)
    nan[::97] = float("nan")
    nan[5] = float("inf")
    tensors = [torch.randn(n, generator=g) * 7 + 3 for n in (100, 16_384, 40_000, 131_072, 1_638_400, 2_000_003)]
    tensors += [(torch.randn(300_000, generator=g) * 1e4).half(), torch.randn(300_000, generator=g).bfloat16(),
                torch.randn(300_000, generator=g) + 5000.0, torch.randn(300_000, generator=g).double(), nan, nan.half(),
                torch.randn(100_000, dtype=torch.complex64, generator=g), torch.randn(700, 600, generator=g).t()]
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append([tensor_stats(t) for t in tensors])
    finally:
        torch.set_num_threads(before)
    assert results[0] == results[1] == results[2]


def test_stats_mode_computes_each_unchanged_tensor_once(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ilstore.records as records

    calls = {"n": 0}
    real = records.tensor_stats

    def counting(t: torch.Tensor) -> dict[str, Any]:
        calls["n"] += 1
        return real(t)

    monkeypatch.setattr(records, "tensor_stats", counting)
    counts = {}
    for dedup in (False, True):
        calls["n"] = 0
        run_dir = _capture(out_dir, f"s{dedup}", tiny_llama(),
                           {"input_ids": torch.tensor(DEMO_PROMPT), "use_cache": False}, mode="stats", dedup=dedup)
        counts[dedup] = calls["n"]
        with ilstore.open_run(run_dir) as run:
            a = run.meta(ilstore.TensorKey(0, "model.layers.0.mlp.act_fn", 0, "inputs", ("0",)))["stats"]
            b = run.meta(ilstore.TensorKey(0, "model.layers.0.mlp.gate_proj", 0, "outputs"))["stats"]
            assert a == b and a["l2_norm"] > 0
    assert counts[True] < 0.75 * counts[False]


class CountingSlowWriter(StoreWriter):
    """A writer made slow on purpose; records what it is handed, in order, and how much work
    was pending (queued or in progress) each time it was called."""

    name = "counting-slow"

    def __init__(self, run_dir: Path, delay: float = 0.0005) -> None:
        super().__init__(run_dir)
        self.delay = delay
        self.log: list[str] = []
        self.pending_seen: list[int] = []
        self.sink: ThreadedSink | None = None

    def _seen(self) -> None:
        assert self.sink is not None
        self.pending_seen.append(len(self.sink._items) + 1)  # queued, plus the one being processed

    def _write(self, record: Record) -> None:
        self._seen()
        time.sleep(self.delay)
        self.log.append(record.call.module)

    def _end_step(self, info: StepInfo) -> None:
        self._seen()
        self.log.append(f"end{info.step}")

    def end_step(self, info: StepInfo) -> None:  # no manifest kept: only the order matters here
        self._end_step(info)


def _bodiless(i: int) -> Record:
    """A record like ``mode: "stats"`` makes: metadata only, zero bytes of body."""
    return Record(ilstore.CallKey(0, 0, f"m{i}", 0), "outputs", {"type": "tensor", "stored": False}, {})


def test_pending_items_are_bounded_with_a_slow_writer(tmp_path: Path) -> None:
    """Records without bodies do not touch the byte bound; the item bound still holds: the
    pending work never exceeds it, the producer waits (doing work itself), nothing is lost and
    everything is written in order."""
    writer = CountingSlowWriter(tmp_path / "run")
    writer.open(ilstore.manifest.new_manifest("counting-slow", {}))
    sink = ThreadedSink(writer, max_pending_bytes=2**30, max_pending_items=8)
    writer.sink = sink
    expected = []
    for step in range(30):
        for i in range(10):
            sink.write(_bodiless(i))
            expected.append(f"m{i}")
            assert sink._pending_items <= 8
        sink.end_step(StepInfo(step, [], []))
        expected.append(f"end{step}")
    assert sink.peak_pending_items == 8  # the producer outran the writer and was held at the bound
    sink.close("complete")
    assert writer.log == expected
    assert max(writer.pending_seen) <= 8
    assert sink.peak_pending_bytes == 0


def test_default_item_bound_holds_over_a_long_run(tmp_path: Path) -> None:
    from ilstore.pipeline import MAX_PENDING_ITEMS

    writer = CountingSlowWriter(tmp_path / "run", delay=0.0)
    writer.open(ilstore.manifest.new_manifest("counting-slow", {}))
    sink = ThreadedSink(writer, max_pending_bytes=2**30)
    writer.sink = sink
    assert sink.max_pending_items == MAX_PENDING_ITEMS
    n = 3 * MAX_PENDING_ITEMS
    for i in range(n):
        sink.write(_bodiless(i))
    sink.close("complete")
    assert sink.peak_pending_items <= MAX_PENDING_ITEMS
    assert writer.log == [f"m{i}" for i in range(n)]


class _NullWriter(StoreWriter):
    """Counts records and steps and keeps nothing (no manifest growth: a capture's own memory
    is what is measured)."""

    name = "null-long-run"
    records = 0

    def _write(self, record: Record) -> None:
        type(self).records += 1

    def _end_step(self, info: StepInfo) -> None:
        pass

    def end_step(self, info: StepInfo) -> None:
        pass


@pytest.mark.slow
def test_memory_stays_flat_over_100k_steps(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """10^5 logged steps in ``mode: "stats"`` (records with no bytes): the number of live Python
    container objects at step 100,000 is what it was at step 10,000, and the writer's queue
    never exceeds its item bound."""
    import gc

    from ilstore.store import registry
    from ilstore.store.safetensors import SafetensorsReader

    # registered for this test only: left registered, its reader (safetensors') would claim
    # every later safetensors run without a manifest when backends are detected
    monkeypatch.setattr(registry, "_loaded", dict(registry._loaded))
    registry.register_backend("null-long-run", _NullWriter, SafetensorsReader, override=True)
    model = nn.Sequential(nn.ReLU())
    x = torch.randn(2, 8)
    counts = {}
    _NullWriter.records = 0
    cfg = {"output_dir": str(out_dir), "run_id": "long", "backend": "null-long-run", "mode": "stats",
           "log_step_ids": []}
    with torch.no_grad(), ilstore.capture(model, cfg) as cap:
        sink = cap._sink
        assert isinstance(sink, ThreadedSink)
        for step in range(100_000):
            model(x)
            if step + 1 in (10_000, 100_000):
                cap.flush()
                gc.collect()
                counts[step + 1] = len(gc.get_objects())
    assert _NullWriter.records == 100_000 * 2
    assert sink.peak_pending_items <= sink.max_pending_items
    assert counts[100_000] - counts[10_000] < 1000, counts
