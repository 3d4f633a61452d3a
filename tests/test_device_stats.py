"""Statistics of device tensors read back once per step (``ilstore.device_stats``).

No GPU here: the same code runs on CPU tensors when ``"cpu"`` is among the device types that
take the path (the reductions are torch's, on whatever device the tensor is). What must hold:
the statistics equal the per-tensor path's bit for bit, whatever the model does to a tensor after
the hook (the second pass of NaN/Inf or mean-dominated tensors reads the stashed copy); one
read-back per step (more only when the stash is full); records reach the writer complete and in
their order. ``scripts/gpu_checks.sh`` runs the CUDA check (no synchronisation inside a forward).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ilstore
import ilstore.device_stats as device_stats
from ilstore.device_stats import DeferredStats, stash_limit
from ilstore.errors import ConfigError
from ilstore.records import _ACC, _device_float_stats, _other_stats
from test_stats_capture import _same


def _expected(t: torch.Tensor) -> dict[str, Any]:
    """The per-tensor path's statistics of ``t`` off the CPU (what a CUDA tensor gets in the hook)."""
    acc = _ACC.get(t.dtype)
    if acc is None:
        return _other_stats(t)
    return _device_float_stats(t, t.numel(), acc, gather=True)


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    out: dict[str, torch.Tensor] = {}
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        out[f"{name}_small"] = (torch.randn(700, generator=g) * 3 + 1).to(dtype)
        out[f"{name}_rows"] = torch.randn(16_384 * 3 + 5, generator=g).to(dtype)  # the fixed-order row sums
        out[f"{name}_whole_rows"] = torch.randn(16_384 * 4, generator=g).to(dtype)
        out[f"{name}_mean_dominates"] = (torch.randn(5000, generator=g) + 3000.0).to(dtype)  # a second pass
        nan = torch.randn(4000, generator=g).to(dtype)
        nan[::37] = float("nan")
        nan[5] = float("inf")
        out[f"{name}_nan_inf"] = nan
        out[f"{name}_all_nan"] = torch.full((9,), float("nan"), dtype=dtype)
        out[f"{name}_0d"] = torch.tensor(-2.5, dtype=dtype)
        out[f"{name}_transposed"] = torch.randn(30, 70, generator=g).to(dtype).t()
        out[f"{name}_strided"] = torch.randn(40, 90, generator=g).to(dtype)[3:40:2, ::3]
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        info = torch.iinfo(dtype)
        t = torch.randint(info.min, info.max, (500,), generator=g, dtype=torch.int64).to(dtype)
        t[3], t[7] = info.min, info.max
        out[str(dtype)] = t
    out["bool"] = torch.tensor([False, True, True])
    out["bool_all_true"] = torch.ones(4, dtype=torch.bool)
    for name in ("uint16", "uint32", "uint64"):
        dtype = getattr(torch, name)
        out[name] = torch.tensor([0, 5, 2**15], dtype=torch.int64).to(dtype)
    out["uint64_high"] = torch.tensor([2**63 + 5, 1], dtype=torch.uint64)
    return out


def _spoil(t: torch.Tensor) -> None:
    """What a model may do to a tensor after the hook saw it: change it in place."""
    if t.dtype == torch.bool:
        t.logical_not_()
    elif t.dtype.is_floating_point:
        t.fill_(float("nan"))
    else:
        t.zero_()


def test_deferred_statistics_equal_the_per_tensor_path_and_ignore_later_changes() -> None:
    cases = _cases()
    expected = {name: _expected(t) for name, t in cases.items()}
    deferred = DeferredStats(device_types=frozenset({"cpu"}))
    got = {}
    for name, t in cases.items():
        stats = deferred.add(t, t.numel(), t.dtype)
        assert stats == {}, name  # nothing read back in the hook
        got[name] = stats
        _spoil(t)
    assert deferred.unresolved == len(cases)
    assert deferred.reads == 0
    deferred.resolve()
    assert deferred.unresolved == 0
    assert deferred.reads == 1
    assert deferred.second_reads == 1  # the mean-dominated tensors' second passes, read back together
    assert deferred.early_reads == 0
    for name in cases:
        assert _same(got[name], expected[name]), (name, got[name], expected[name])
    deferred.resolve()  # nothing pending: no read-back
    assert deferred.reads == 1


def test_tensors_that_keep_the_per_tensor_path() -> None:
    deferred = DeferredStats(device_types=frozenset({"cpu"}))
    assert deferred.add(torch.zeros(0), 0, torch.float32) is None  # empty: nothing to read back
    assert deferred.add(torch.ones(3, dtype=torch.complex64), 3, torch.complex64) is None
    if hasattr(torch, "float8_e4m3fn"):
        assert deferred.add(torch.ones(3).to(torch.float8_e4m3fn), 3, torch.float8_e4m3fn) is None
    assert DeferredStats(device_types=frozenset({"cuda"})).add(torch.ones(3), 3, torch.float32) is None
    assert DeferredStats(limit=0, device_types=frozenset({"cpu"})).add(torch.ones(3), 3, torch.float32) is None
    assert deferred.unresolved == 0


def test_a_full_stash_reads_back_early_and_a_tensor_past_the_bound_alone() -> None:
    g = torch.Generator().manual_seed(5)
    deferred = DeferredStats(limit=64 * 1024, device_types=frozenset({"cpu"}))
    tensors = [torch.randn(5000, generator=g) + i for i in range(10)]  # 20 KB each: 3 fit in 64 KB
    expected = [_expected(t) for t in tensors]
    got = [deferred.add(t, t.numel(), t.dtype) for t in tensors]
    for t in tensors:
        _spoil(t)
    assert deferred.early_reads == 3 and deferred.reads == 3
    assert deferred.unresolved == 1
    done = [s for s in got if s]
    assert len(done) == 9  # the early read-backs filled the tensors before them
    big = torch.randn(20_000, generator=g)
    assert deferred.add(big, big.numel(), big.dtype) is None  # 80 KB > the bound: read back in the hook
    deferred.resolve()
    assert deferred.reads == 4
    for stats, want in zip(got, expected, strict=True):
        assert _same(stats, want)


def test_the_stash_starts_small_and_grows() -> None:
    deferred = DeferredStats(device_types=frozenset({"cpu"}))
    small = torch.randn(100)
    deferred.add(small, 100, small.dtype)
    stash = deferred._devices[torch.device("cpu")].stash
    assert stash is not None and stash.numel() == device_stats._FIRST_STASH_BYTES
    large = torch.randn(3 * 2**20)  # 12 MB: read back what is pending, then a stash of 16 MB
    deferred.add(large, large.numel(), large.dtype)
    assert deferred.early_reads == 1
    stash = deferred._devices[torch.device("cpu")].stash
    assert stash is not None and stash.numel() == 16 * 2**20
    deferred.resolve()
    deferred.release()
    assert deferred._devices[torch.device("cpu")].stash is None


def test_inference_mode_and_autograd_tensors() -> None:
    deferred = DeferredStats(device_types=frozenset({"cpu"}))
    with torch.inference_mode():
        t = torch.randn(300) * 2
        want = _expected(t)
        got = deferred.add(t, 300, t.dtype)
        deferred.resolve()
    assert got is not None and _same(got, want)
    w = torch.randn(50, requires_grad=True)
    got = deferred.add(w, 50, w.dtype)
    deferred.resolve()
    assert got is not None and _same(got, _expected(w.detach()))


def test_stash_limit_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ILSTORE_DEVICE_STATS_BYTES", raising=False)
    assert stash_limit() == device_stats.MAX_STASH_BYTES
    monkeypatch.setenv("ILSTORE_DEVICE_STATS_BYTES", "0")
    assert stash_limit() == 0
    monkeypatch.setenv("ILSTORE_DEVICE_STATS_BYTES", "12345")
    assert DeferredStats().limit == 12345
    for bad in ("lots", "-1", "1.5"):
        monkeypatch.setenv("ILSTORE_DEVICE_STATS_BYTES", bad)
        with pytest.raises(ConfigError, match="ILSTORE_DEVICE_STATS_BYTES"):
            stash_limit()


def test_a_bad_stash_bound_fails_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ILSTORE_DEVICE_STATS_BYTES", "lots")
    with pytest.raises(ConfigError, match="ILSTORE_DEVICE_STATS_BYTES"):
        ilstore.capture(nn.Linear(2, 2), {"output_dir": str(tmp_path), "run_id": "r", "mode": "stats"})
    assert list(tmp_path.iterdir()) == []
    ilstore.capture(nn.Linear(2, 2), {"output_dir": str(tmp_path), "run_id": "t"}).close()  # tensors mode: unused


def test_copies_start_where_the_tensor_does_within_the_alignment() -> None:
    deferred = DeferredStats(device_types=frozenset({"cpu"}))
    base = torch.randn(1001)
    for offset in (0, 1, 3, 17):
        t = base[offset:]  # contiguous, starting 4 * offset bytes past an aligned address
        deferred.add(t, t.numel(), t.dtype)
        copy = deferred._devices[torch.device("cpu")].pending[-1].copy
        assert copy is not None and copy.data_ptr() % device_stats._ALIGN == t.data_ptr() % device_stats._ALIGN
    strided = torch.randn(40, 30)[:, ::2]
    deferred.add(strided, strided.numel(), strided.dtype)
    copy = deferred._devices[torch.device("cpu")].pending[-1].copy
    assert copy is not None and copy.data_ptr() % device_stats._ALIGN == 0  # as a fresh contiguous copy
    deferred.resolve()


def _failing_read_backs(monkeypatch: pytest.MonkeyPatch, error: BaseException, times: int = 1) -> list[int]:
    """Make the next ``times`` read-backs raise ``error`` (a device error, Ctrl-C while waiting)."""
    calls = [0]
    read_back = DeferredStats._read_back

    def failing(self: DeferredStats, *args: Any) -> None:
        calls[0] += 1
        if calls[0] <= times:
            raise error
        read_back(self, *args)

    monkeypatch.setattr(DeferredStats, "_read_back", failing)
    return calls


def test_a_failed_read_back_keeps_the_statistics_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    deferred = DeferredStats(device_types=frozenset({"cpu"}))
    t = torch.randn(100)
    want = _expected(t)
    stats = deferred.add(t, 100, t.dtype)
    _failing_read_backs(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        deferred.resolve()
    assert deferred.unresolved == 1 and deferred.resolves == 0 and stats == {}
    _spoil(t)
    deferred.resolve()  # read back from the stash, which was kept
    assert deferred.unresolved == 0 and deferred.resolves == 1
    assert stats is not None and _same(stats, want)


def test_ctrl_c_while_a_step_is_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_stats, "DEVICE_TYPES", frozenset({"cpu"}))
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    cap = ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "r", "mode": "stats", "log_step_ids": []})
    _failing_read_backs(monkeypatch, KeyboardInterrupt())
    with torch.no_grad():
        with pytest.raises(KeyboardInterrupt):
            model(torch.ones(2, 4))
        assert cap.step_index == 1 and cap._held  # the step is over; its records wait for their statistics
        model(torch.ones(2, 4) * 2)
    cap.close()
    assert cap.error is None
    with ilstore.open_run(tmp_path / "r") as run:
        assert run.steps() == [1]  # the interrupted step never ended: not a completed step
        assert run.incomplete_steps() == [0]
        for step in (0, 1):
            calls = run.calls(step)
            assert len(calls) == 2
            for call in calls:
                for _, node in run.tensor_nodes(call, "outputs"):
                    assert "mean" in node["stats"], (step, call)


def test_a_failed_early_read_back_writes_no_empty_statistics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_stats, "DEVICE_TYPES", frozenset({"cpu"}))
    monkeypatch.setenv("ILSTORE_DEVICE_STATS_BYTES", "600")  # a stash of 600 bytes: reads back early
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "r", "mode": "stats",
                                 "log_step_ids": []}) as cap, torch.no_grad():
        calls = _failing_read_backs(monkeypatch, RuntimeError("device error (simulated)"))
        model(torch.ones(2, 16))
        model(torch.ones(2, 16))
        assert calls[0] > 2 and cap._deferred is not None and cap._deferred.early_reads >= 2
    assert cap.error is None
    with ilstore.open_run(tmp_path / "r") as run:
        assert run.steps() == [0, 1]
        for step in run.steps():
            for call in run.calls(step):
                for kind in ("inputs", "outputs"):
                    for _, node in run.tensor_nodes(call, kind):  # (the tensor whose add failed: in its hook)
                        assert "mean" in node["stats"], (step, call, kind, node)


def test_records_are_handed_on_once_an_early_read_back_completed_them(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_stats, "DEVICE_TYPES", frozenset({"cpu"}))
    monkeypatch.setenv("ILSTORE_DEVICE_STATS_BYTES", "2000")
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])
    cap = ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "r", "mode": "stats"}, manual_step=True)
    with torch.no_grad():
        model(torch.ones(2, 64))  # 512-byte tensors: the stash fills every few of them
    # 7 distinct tensors (a layer's input is the layer before's output), 3 to a stash
    assert cap._deferred is not None and cap._deferred.early_reads == 2
    assert 0 < len(cap._held) <= 3  # not the step's 12 records: what was complete went to the writer
    cap.close()
    with ilstore.open_run(tmp_path / "r") as run:
        assert len(run.calls(0)) == 6


class _Model(nn.Module):
    """Float and integer tensors, an in-place change after a hook saw a tensor, NaN, a second pass."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)
        self.act = nn.ReLU(inplace=True)  # changes fc's output after fc's hook recorded it
        self.out = nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(self.emb(ids))) + 1000.0  # out's inputs: a mean that dominates (a second pass)
        h = torch.where((ids == 3)[..., None], float("nan"), h)  # and NaN where the token is 3
        return self.out(h)


def _records(run_dir: Path) -> list[tuple[str, str, list[tuple[Any, dict[str, Any]]]]]:
    """``(call, kind, [(key, node), ...])`` of every record of a run, in the run's order."""
    with ilstore.open_run(run_dir) as run:
        return [(str(call), kind, list(run.tensor_nodes(call, kind)))
                for step in run.steps() for call in run.calls(step)
                for kind in ("inputs", "outputs", "post_fwd_inputs") if run.structure(call, kind) is not None]


@pytest.mark.parametrize("backend", ["pt", "safetensors", "hdf5"])
@pytest.mark.parametrize("async_writes", [False, True])
def test_a_capture_reads_back_once_per_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str,
                                            async_writes: bool) -> None:
    torch.manual_seed(0)
    model = _Model().eval()
    batches = [torch.tensor([[3, 4, 5, 6]]), torch.tensor([[1, 2, 7, 8]]), torch.tensor([[9, 3, 3, 1]])]
    config = {"output_dir": str(tmp_path), "backend": backend, "async_writes": async_writes, "log_step_ids": []}
    monkeypatch.setattr(device_stats, "DEVICE_TYPES", frozenset({"cpu"}))
    with torch.no_grad():
        plain = [model(b) for b in batches]
        # the reference: the tensors as the hooks saw them (snapshots), their statistics as a device computes them
        with ilstore.capture(model, {**config, "run_id": "tensors"}) as cap:
            assert cap._deferred is None
            for b in batches:
                model(b)
        with ilstore.capture(model, {**config, "run_id": "stats", "mode": "stats"}) as cap:
            deferred = cap._deferred
            assert deferred is not None and deferred.limit > 0
            outputs = []
            for i, b in enumerate(batches):
                outputs.append(model(b))
                assert deferred.reads == i + 1 and deferred.unresolved == 0 and not cap._held
            assert deferred.early_reads == 0
            assert 1 <= deferred.second_reads <= len(batches)
    for a, b in zip(outputs, plain, strict=True):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())  # changes nothing
    got, ref = _records(tmp_path / "stats"), _records(tmp_path / "tensors")
    assert [(c, k) for c, k, _ in got] == [(c, k) for c, k, _ in ref]  # the same records, in the same order
    assert len(got) >= 12
    seen = {"nan": 0, "int": 0, "float": 0}
    with ilstore.open_run(tmp_path / "tensors") as run:
        for (call, kind, nodes), (_, _, ref_nodes) in zip(got, ref, strict=True):
            assert [k for k, _ in nodes] == [k for k, _ in ref_nodes]
            for (key, node), (ref_key, _) in zip(nodes, ref_nodes, strict=True):
                want = _expected(run.load(ref_key))
                assert _same(node["stats"], want), (call, kind, key, node["stats"], want)
                seen["nan" if want.get("nan_count") else "float" if "mean" in want else "int"] += 1
    assert all(seen.values()), seen


def test_records_of_a_manual_step_left_open_are_written_at_close(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_stats, "DEVICE_TYPES", frozenset({"cpu"}))
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    config = {"output_dir": str(tmp_path), "run_id": "r", "mode": "stats", "log_step_ids": []}
    cap = ilstore.capture(model, config, manual_step=True)
    with torch.no_grad():
        model(torch.ones(2, 4))
        cap.step()
        model(torch.ones(2, 4) * 2)
        model(torch.ones(2, 4) * 3)
    assert cap._held  # the open step's records wait for their read-back
    cap.close()
    assert cap._deferred is not None and cap._deferred.reads == 2
    with ilstore.open_run(tmp_path / "r") as run:
        assert run.steps() == [0, 1]
        assert len(run.calls(1)) == 2 * len(run.calls(0))
    for _, _, nodes in _records(tmp_path / "r"):
        for _, node in nodes:
            assert node["stats"]["nan_count"] == 0 and "mean" in node["stats"]


def test_flush_hands_held_records_to_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_stats, "DEVICE_TYPES", frozenset({"cpu"}))
    model = nn.Sequential(nn.Linear(4, 4))
    cap = ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "r", "mode": "stats"}, manual_step=True)
    with torch.no_grad():
        model(torch.ones(1, 4))
    assert cap._held
    cap.flush()
    assert not cap._held and cap._deferred is not None and cap._deferred.reads == 1
    cap.close()


def _writes(cap: Any) -> list[tuple[str, str]]:
    """Record what reaches ``cap``'s writer, in order."""
    seen: list[tuple[str, str]] = []
    write = cap._sink.write

    def recording(record: Any) -> None:
        seen.append((str(record.call), record.kind))
        write(record)

    cap._sink.write = recording
    return seen


def test_records_reach_the_writer_in_their_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_stats, "DEVICE_TYPES", frozenset({"cpu"}))
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    config = {"output_dir": str(tmp_path), "mode": "stats", "log_step_ids": [], "log_post_fwd_inputs": True}
    orders = {}
    for name, stash in (("per_tensor", "0"), ("per_step", "1500")):  # 1500 bytes: early read-backs
        monkeypatch.setenv("ILSTORE_DEVICE_STATS_BYTES", stash)
        with torch.no_grad(), ilstore.capture(model, {**config, "run_id": name}) as cap:
            orders[name] = _writes(cap)
            for i in range(3):
                model(torch.ones(2, 64) * i)
        if name == "per_step":
            assert cap._deferred is not None and cap._deferred.early_reads >= 3 and cap._deferred.reads > 3
    assert len(orders["per_step"]) == 3 * 15
    assert orders["per_step"] == orders["per_tensor"]


def test_a_step_that_fills_the_stash_gets_a_larger_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_stats, "_FIRST_STASH_BYTES", 4096)
    deferred = DeferredStats(device_types=frozenset({"cpu"}))
    tensors = [torch.randn(1000) for _ in range(10)]  # 4,000 bytes each
    early = []
    for _ in range(3):  # three steps
        for t in tensors:
            deferred.add(t, t.numel(), t.dtype)
        deferred.resolve()
        early.append(deferred.early_reads)
    stash = deferred._devices[torch.device("cpu")].stash
    assert stash is not None and stash.numel() == 65536  # 4 KiB doubled until a step's 10 tensors fit
    assert early[0] >= 2 and early[2] == early[1]  # then a step reads back once
    assert deferred.reads == early[2] + 3


def test_without_room_for_a_stash_tensors_are_read_back_in_their_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    deferred = DeferredStats(device_types=frozenset({"cpu"}))
    monkeypatch.setattr(DeferredStats, "_free_bytes", staticmethod(lambda device: 1_000_000))
    big = torch.randn(100_000)  # 400 KB > a quarter of the 1 MB free
    assert deferred.add(big, big.numel(), big.dtype) is None
    small = torch.randn(1000)
    assert deferred.add(small, small.numel(), small.dtype) == {}  # still deferred: a 250 KB stash
    stash = deferred._devices[torch.device("cpu")].stash
    assert stash is not None and stash.numel() == 250_000
    deferred.resolve()

    def out_of_memory(size: int, device: torch.device) -> torch.Tensor:
        raise torch.OutOfMemoryError("no memory (simulated)")

    deferred = DeferredStats(device_types=frozenset({"cpu"}))
    monkeypatch.setattr(DeferredStats, "_allocate", staticmethod(out_of_memory))
    assert deferred.add(small, small.numel(), small.dtype) is None
    assert deferred._devices[torch.device("cpu")].failed is not None
    monkeypatch.undo()
    assert deferred.add(small, small.numel(), small.dtype) is None  # not tried again on that device
    ints = torch.arange(5)
    assert deferred.add(ints, 5, ints.dtype) == {}  # (integer extremes need no stash)
    deferred.resolve()


def test_a_tensor_whose_storage_is_not_aligned_to_its_elements() -> None:
    raw = bytearray(4 * 64 + 2)
    t = torch.frombuffer(raw, dtype=torch.float32, offset=2, count=64)
    assert t.data_ptr() % 4
    assert DeferredStats(device_types=frozenset({"cpu"})).add(t, 64, t.dtype) is None


def test_a_failing_add_leaves_the_stash_consistent(monkeypatch: pytest.MonkeyPatch) -> None:
    deferred = DeferredStats(device_types=frozenset({"cpu"}))
    first = torch.randn(100)
    deferred.add(first, 100, first.dtype)
    used = deferred._devices[torch.device("cpu")].used
    sums = device_stats.device_float_sums
    monkeypatch.setattr(device_stats, "device_float_sums", lambda *a: (_ for _ in ()).throw(RuntimeError("oom")))
    with pytest.raises(RuntimeError):
        deferred.add(torch.randn(300), 300, torch.float32)
    assert deferred._devices[torch.device("cpu")].used == used and deferred.unresolved == 1
    monkeypatch.setattr(device_stats, "device_float_sums", sums)
    t = torch.randn(2_000_000)  # does not fit: read back what is pending, then a larger stash
    want = _expected(t)
    got = deferred.add(t, t.numel(), t.dtype)
    deferred.resolve()
    assert got is not None and _same(got, want)


def test_a_tensor_whose_statistics_cannot_be_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_stats, "DEVICE_TYPES", frozenset({"cpu"}))
    finish = device_stats.finish_device_float_stats

    def failing(flat: torch.Tensor, n: int, *args: Any) -> dict[str, Any]:
        if n == 3 * 5:  # the second layer's outputs only
            raise torch.OutOfMemoryError("no memory for the temporaries (simulated)")
        return finish(flat, n, *args)

    monkeypatch.setattr(device_stats, "finish_device_float_stats", failing)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 5), nn.Linear(5, 6))
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "r", "mode": "stats",
                                                  "log_step_ids": []}) as cap:
        model(torch.ones(3, 4))
        model(torch.ones(3, 4))
    assert cap.error is None
    with ilstore.open_run(tmp_path / "r") as run:
        assert run.steps() == [0, 1]
        for step in (0, 1):
            nodes = {(call.module, kind): node for call in run.calls(step) for kind in ("inputs", "outputs")
                     for _, node in run.tensor_nodes(call, kind)}
            for (module, kind), node in nodes.items():
                if (module, kind) in (("1", "outputs"), ("2", "inputs")):  # the same tensor (de-duplicated)
                    assert "stats" not in node and node["reason"].startswith("cannot be captured: OutOfMemoryError")
                else:
                    assert "mean" in node["stats"], (module, kind)


def test_ctrl_c_while_a_manual_step_is_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_stats, "DEVICE_TYPES", frozenset({"cpu"}))
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    cap = ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "r", "mode": "stats", "log_step_ids": []},
                          manual_step=True)
    with torch.no_grad():
        model(torch.ones(2, 4))
        _failing_read_backs(monkeypatch, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            cap.step()
        assert cap.step_index == 1
        model(torch.ones(2, 4) * 2)
        cap.step()
    cap.close()
    with ilstore.open_run(tmp_path / "r") as run:
        assert run.steps() == [1] and run.incomplete_steps() == [0]
        assert len(run.calls(0)) == len(run.calls(1)) == 2
