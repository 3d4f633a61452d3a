"""The statistics table (issue 13): written by every backend, and compared vectorised with the
same verdicts as the general, structure-by-structure comparison."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import ilstore
import ilstore.store.stats_table
import ilstore_compare.engine
from ilstore.keys import CallKey
from ilstore.manifest import new_manifest
from ilstore.records import TensorPolicy, build_record, iter_tensor_nodes
from ilstore.store.base import StepInfo
from ilstore.store.registry import get_backend
from ilstore.store.stats_table import COLUMNS, KEYS_NAME, ROW_WIDTH, ROWS_NAME, STAT_COLUMNS
from ilstore_compare import columnar, compare
from ilstore_compare.entries import Entries
from ilstore_compare.report_html import render_html
from ilstore_compare.report_json import render_json
from ilstore_compare.report_md import render_markdown
from ilstore_compare.result import CompareResult

BACKENDS = ["pt", "safetensors", "hdf5"]


class _Mixed(torch.nn.Module):
    """Float layers, an integer output (argmax) and, at chosen steps, a NaN in one layer's output."""

    def __init__(self, nan_at: tuple[int, ...] = ()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)
        self.pick = _ArgMax()
        self.nan_at = nan_at
        self.step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.step in self.nan_at:
            h = h.clone()
            h[0, 0] = math.nan
        self.step += 1
        return self.pick(self.b(torch.relu(h)))


class _ArgMax(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x.argmax(dim=-1)


def _run(out_dir: Path, run_id: str, steps: int, backend: str, *, scale_at: dict[int, float] | None = None,
         nan_at: tuple[int, ...] = (), **cfg: object) -> Path:
    model = _Mixed(nan_at)
    gen = torch.Generator().manual_seed(1)
    config = {"output_dir": str(out_dir), "run_id": run_id, "backend": backend, "log_step_ids": [],
              "mode": "stats", **cfg}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        for step in range(steps):
            x = torch.randn(2, 8, generator=gen)
            model(x * (scale_at or {}).get(step, 1.0))
    assert cap.run_dir is not None
    return cap.run_dir


def _general(monkeypatch: pytest.MonkeyPatch, dir1: Path, dir2: Path, **options: object) -> CompareResult:
    """The comparison without the statistics tables (as for a run written before them)."""
    with monkeypatch.context() as m:
        m.setattr(ilstore_compare.engine.stats_table, "attach", lambda *a: None)
        return compare(dir1, dir2, **options)


def _same(fast: CompareResult, slow: CompareResult) -> None:
    assert fast.tensors == slow.tensors
    assert fast.calls == slow.calls
    assert fast.summary == slow.summary
    assert fast.first_divergence == slow.first_divergence
    assert fast.introduced == slow.introduced
    assert fast.notes == slow.notes
    assert fast.exit_code == slow.exit_code


@pytest.mark.parametrize("backend", BACKENDS)
def test_table_rows_are_the_structures_statistics(out_dir: Path, backend: str) -> None:
    run_dir = _run(out_dir, "r", 5, backend, nan_at=(3,))
    with ilstore.open_run(run_dir) as run:
        table = run.stats_table()
        assert table is not None and run.manifest["stats_table"] == {"keys": KEYS_NAME, "rows": ROWS_NAME}
        layouts = table.layouts()
        rows = np.frombuffer(table.rows(), dtype="<f8").reshape(-1, ROW_WIDTH)
        assert len(layouts) == 1 and len(rows) == 5 * len(layouts[0])
        for row in rows.tolist():
            step, layout, index = (int(v) for v in row[:3])
            module, call, kind, path, dtype, shape, numel, device, stored, reason = layouts[layout][index]
            node = dict(iter_tensor_nodes(run.structure(ilstore.keys.CallKey(0, step, module, call), kind)))[path]
            assert (dtype, shape, numel, device, stored, reason) == (
                node["dtype"], node["shape"], node["numel"], node["device"], False, "mode=stats")
            for name, value in zip(STAT_COLUMNS, row[COLUMNS.index(STAT_COLUMNS[0]):], strict=True):
                want = node["stats"].get(name)
                assert (math.isnan(value) and want is None) or value == want, (step, module, kind, name)


@pytest.mark.parametrize("backend", ["pt", "safetensors", pytest.param("hdf5", marks=pytest.mark.slow)])  # hdf5: ~16 s
def test_fast_comparison_equals_the_general_one(out_dir: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A few hundred steps; some steps differ (a scaled input), one has a NaN in each run, the
    integer output always goes the general way: every entry, call, verdict and note is equal."""
    steps = 300
    a = _run(out_dir, "a", steps, backend, nan_at=(7,))
    b = _run(out_dir, "b", steps, backend, scale_at={40: 1.001, 41: 1.5, 250: 1 + 1e-7}, nan_at=(7,))
    fast = compare(a, b)
    slow = _general(monkeypatch, a, b)
    _same(fast, slow)
    assert fast.summary.stats_only_mismatched > 0 and fast.summary.stats_only_matched > steps
    assert fast.first_divergence is not None and fast.first_divergence.step == 7  # the NaN (equal_nan off)
    for options in ({"equal_nan": True}, {"exact": True}, {"rtol": 0.5, "atol": 0.1, "steps": [40, 41, 250]},
                    {"modules": "^b$"}):
        _same(compare(a, b, **options), _general(monkeypatch, a, b, **options))


def test_passing_pairs_skip_the_general_path(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = _run(out_dir, "a", 20, "pt")
    b = _run(out_dir, "b", 20, "pt", scale_at={5: 2.0})
    seen = []
    real = ilstore_compare.engine._compare_pair

    def counting(pair, *args):  # type: ignore[no-untyped-def]
        seen.append(pair.key)
        return real(pair, *args)

    monkeypatch.setattr(ilstore_compare.engine, "_compare_pair", counting)
    result = compare(a, b)
    # the general path sees the side holding the integer output, and the failing pairs, only
    general = [k for k in seen if k.step != 5]
    assert general and all((k.module, k.kind) == ("pick", "outputs") for k in general)
    assert len(general) == 2 * 19 and len(seen) < result.summary.tensors
    assert {t.status for t in result.tensors if t.key.step != 5 and t.key.module != "pick"} == {"stats_only_match"}


def test_tensors_mode_and_old_runs_take_the_general_path(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stored bodies are compared elementwise as before; a run without a table compares as before."""
    a = _run(out_dir, "a", 4, "pt", mode="tensors")
    b = _run(out_dir, "b", 4, "pt", mode="tensors", scale_at={2: 1.5})
    _same(compare(a, b), _general(monkeypatch, a, b))
    assert {t.status for t in compare(a, b).tensors} == {"match", "mismatch"}
    c = _run(out_dir, "c", 4, "pt")
    d = _run(out_dir, "d", 4, "pt", scale_at={1: 3.0})
    manifest = json.loads((d / "ilstore.json").read_text())
    del manifest["stats_table"]
    (d / "ilstore.json").write_text(json.dumps(manifest))
    (d / ROWS_NAME).unlink()
    with ilstore.open_run(d) as run:
        assert run.stats_table() is None
    _same(compare(c, d), _general(monkeypatch, c, d))


def test_cut_rows_and_unfinished_steps_are_ignored(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash mid-append leaves a partial row, or rows of a step without its journal line: the
    step journal decides which steps exist, and the comparison is the general one's."""
    a = _run(out_dir, "a", 6, "hdf5")
    b = _run(out_dir, "b", 6, "hdf5", scale_at={2: 1.5})
    rows = b / ROWS_NAME
    data = rows.read_bytes()
    per_step = len(data) // 6
    journal = b / "steps.jsonl"
    journal.write_bytes(b"".join(journal.read_bytes().splitlines(keepends=True)[:5]))  # step 5 never ended
    rows.write_bytes(data[:5 * per_step + per_step // 2 + 3])  # and its rows were cut mid-row
    fast = compare(a, b)
    _same(fast, _general(monkeypatch, a, b))
    assert fast.summary.steps_only_in_dir1 == (5,) and fast.summary.stats_only_mismatched > 0


def test_failed_row_write_is_cut_back(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk half-way through a step's rows: the rows are cut back, the step does not
    complete, and the next step's rows stay aligned."""
    writer = get_backend("pt").writer(out_dir / "run")
    writer.open(new_manifest("pt", {}))
    real_write = ilstore.store.stats_table.os.write

    def flaky(fd: int, data: bytes) -> int:  # os.write is every module's: fail only the table's rows
        if not os.readlink(f"/proc/self/fd/{fd}").endswith("stats.f64"):
            return real_write(fd, data)
        real_write(fd, data[:13])
        raise OSError(28, "No space left on device")

    for step in range(3):
        call = CallKey(0, step, "m", 0)
        writer.write(build_record(call, "outputs", torch.full((2,), float(step)),
                                  TensorPolicy(pin_memory=False, store_bodies=False)))
        if step == 1:
            monkeypatch.setattr(ilstore.store.stats_table.os, "write", flaky)
            with pytest.raises(ilstore.StoreError, match="statistics table: .*No space left"):
                writer.end_step(StepInfo(step, [call], [call]))
            monkeypatch.setattr(ilstore.store.stats_table.os, "write", real_write)
        else:
            writer.end_step(StepInfo(step, [call], [call]))
    writer.close()
    with ilstore.open_run(out_dir / "run") as run:
        assert run.steps() == [0, 2]
        rows = np.frombuffer(run.stats_table().rows(), dtype="<f8").reshape(-1, ROW_WIDTH)
        assert rows[:, :3].tolist() == [[0, 0, 0], [2, 0, 0]]
        assert rows[:, COLUMNS.index("mean")].tolist() == [0.0, 2.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_small_tensor_statistics_are_the_fixed_order_reductions(dtype: torch.dtype) -> None:
    """The one-sync path for small tensors gives the bits of the general path (fixed-order sum
    and squared L2 norm in the accumulation dtype), overflow of the squared norm included. These
    are the statistics of tensors off the CPU (CPU tensors take ilstore's one-pass sums, checked
    in tests/test_stats_kernel.py); the torch path is run here on CPU tensors."""
    from ilstore.records import _device_float_stats, _fixed_order_sums, _slow_stats

    gen = torch.Generator().manual_seed(3)
    for n in (1, 5, 64, 4096, 32767):
        for scale in (1e-20, 1.0, 1e3, 1e19, 3e38):
            x = (torch.randn(n, generator=gen, dtype=torch.float64) * scale + scale / 3).to(dtype)
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            lo, hi = torch.aminmax(x)
            mn, mx, sm, sq = torch.cat([torch.stack([lo, hi]).to(acc), _fixed_order_sums(x, acc)]).tolist()
            stats = _device_float_stats(x, x.numel(), acc)
            if not all(map(math.isfinite, (mn, mx, sq))):
                assert stats == _slow_stats(x), (n, scale)  # the general path hands these on too
                continue
            assert (stats["min"], stats["max"], stats["l2_norm"]) == (mn, mx, math.sqrt(sq)), (n, scale)
            assert stats["mean"] == sm / n


def test_a_view_without_the_journal_has_no_table(out_dir: Path) -> None:
    """A reader that copies a run's manifest but not its steps (the unshard view) must not hand
    out the run's table: its rows count only for the steps of the run's own journal."""
    from ilstore.unshard import LogicalReader

    with ilstore.open_run(_run(out_dir, "a", 2, "pt")) as run:
        assert run.stats_table() is not None
        view = LogicalReader(run)
        assert "stats_table" in view.manifest and view.stats_table() is None


# -- whole steps from the tables (ilstore_compare.columnar) -----------------------------------------
class _Float(torch.nn.Module):
    """Float tensors only; at chosen steps a NaN, a third output (a tensor one run may lack) or a
    second call of ``b`` (a call one run may lack)."""

    def __init__(self, nan_at: tuple[int, ...] = (), extra_out_at: tuple[int, ...] = (),
                 extra_call_at: tuple[int, ...] = ()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)
        self.c = _Outputs()
        self.nan_at, self.extra_out_at, self.extra_call_at = nan_at, extra_out_at, extra_call_at
        self.step = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.a(x)
        if self.step in self.nan_at:
            h = h.clone()
            h[0, 0] = math.nan
        h = self.b(torch.relu(h))
        if self.step in self.extra_call_at:
            h = self.b(h)
        out = self.c(h, self.step in self.extra_out_at)
        self.step += 1
        return out


class _Outputs(torch.nn.Module):
    def forward(self, x: torch.Tensor, extra: bool) -> tuple[torch.Tensor, ...]:
        return (x, x * 2, x * 3) if extra else (x, x * 2)


def _float_run(out_dir: Path, run_id: str, steps: int, backend: str, *, scale_at: dict[int, float] | None = None,
               **shape: tuple[int, ...]) -> Path:
    model = _Float(**shape)
    gen = torch.Generator().manual_seed(1)
    config = {"output_dir": str(out_dir), "run_id": run_id, "backend": backend, "log_step_ids": [], "mode": "stats"}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        for step in range(steps):
            model(torch.randn(2, 8, generator=gen) * (scale_at or {}).get(step, 1.0))
    assert cap.run_dir is not None
    return cap.run_dir


def _blocks(result: CompareResult) -> int:
    """How many of the result's entries are made on demand (0 when the general path made them all)."""
    tensors = result.tensors
    return sum(len(b) for b in tensors.blocks()) if isinstance(tensors, Entries) else 0


def _same_reports(fast: CompareResult, slow: CompareResult) -> None:
    for verbose in (False, True):
        assert render_markdown(fast, verbose) == render_markdown(slow, verbose)
    assert render_json(fast) == render_json(slow)
    assert render_html(fast) == render_html(slow)


@pytest.fixture(scope="module", params=BACKENDS)
def shaped_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """dir1: 60 steps; dir2 (the reference): 50, with a NaN in both at step 7, a scaled input at
    step 20, a third output in both at steps 10-11 and 40 and in dir2 only at 30, and a second call
    of ``b`` in dir1 only at 35."""
    out = tmp_path_factory.mktemp(f"shaped-{request.param}")
    a = _float_run(out, "a", 60, request.param, nan_at=(7,), extra_out_at=(10, 11, 40), extra_call_at=(35,))
    b = _float_run(out, "b", 50, request.param, nan_at=(7,), extra_out_at=(10, 11, 30, 40), scale_at={20: 1.5})
    return a, b


@pytest.mark.parametrize("options", [{}, {"equal_nan": True}, {"exact": True}, {"rtol": 0.5, "atol": 0.1},
                                     {"steps": [3, 7, 20, 30, 55, 70]}, {"modules": "^(a|c)$"}, {"workers": 2},
                                     {"allow_stats_only": True, "equal_nan": True}],
                         ids=lambda o: ",".join(o) or "defaults")
def test_plain_steps_equal_the_general_path(shaped_runs: tuple[Path, Path], options: dict[str, object],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Mismatching steps, one-sided tensors and calls, NaN statistics and a divergence in the
    middle: every entry, call, count, verdict and report is the general path's, and most entries
    came from blocks."""
    a, b = shaped_runs
    fast = compare(a, b, **options)
    slow = _general(monkeypatch, a, b, **options)
    _same(fast, slow)
    assert fast == slow and hash(fast.tensors) == hash(slow.tensors)
    assert list(fast.tensors) == list(slow.tensors) and list(fast.calls) == list(slow.calls)
    _same_reports(fast, slow)
    assert _blocks(fast) > (0 if "steps" in options else fast.summary.tensors // 2)
    if not options:
        s = fast.summary
        assert s.steps_only_in_dir1 == tuple(range(50, 60)) and s.only_in_dir1 and s.only_in_dir2
        assert s.stats_only_mismatched and s.calls_only_in_dir1 == 10 * 3 + 1 and fast.exit_code == 1
        assert fast.first_divergence is not None and fast.first_divergence.step == 7  # the NaN, equal_nan off
    if options.get("equal_nan"):
        assert fast.first_divergence is not None and fast.first_divergence.step == 20


def test_entries_behave_like_the_tuple(shaped_runs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = shaped_runs
    fast, slow = compare(a, b), _general(monkeypatch, a, b)
    for lazy, held in ((fast.tensors, slow.tensors), (fast.calls, slow.calls)):
        assert isinstance(lazy, Entries) and isinstance(held, tuple)
        n = len(held)
        assert len(lazy) == n and lazy == held and held == lazy and not (lazy != held)
        assert lazy != held[:-1] and lazy != (*held[:-1], held[0]) and lazy != list(held)
        for i in (0, 1, n // 3, n // 2, n - 1, -1, -n):
            assert lazy[i] == held[i]
        assert lazy[5:40:3] == held[5:40:3] and lazy[::-1] == held[::-1] and lazy[n:] == ()
        assert lazy[n // 2] in lazy and lazy.index(held[n // 2]) == held.index(held[n // 2])
        assert lazy + () == held and () + lazy == held
        for bad in (n, -n - 1):
            with pytest.raises(IndexError):
                lazy[bad]
    assert [t.status for t in fast.tensors.with_status({"only_in_dir1", "only_in_dir2"})] == [
        t.status for t in slow.tensors if t.status in ("only_in_dir1", "only_in_dir2")]


def test_call_orders_read_in_one_pass(shaped_runs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that offers every step's call orders at once (``call_orders()``) is asked that
    instead of each step's calls; one that answers None is asked step by step."""
    from ilstore.store.base import StoreReader

    a, b = shaped_runs
    slow = _general(monkeypatch, a, b)
    asked = []

    def at_once(self: StoreReader) -> dict[int, object]:
        asked.append(self.run_dir)
        shared: dict[object, object] = {}
        out = {}
        for step in self.steps():
            order = (0, tuple((c.module, c.call) for c in self.calls(step)),
                     tuple((c.module, c.call) for c in self.call_ends(step)))
            out[step] = shared.setdefault(order, order)
        return out

    monkeypatch.setattr(StoreReader, "call_orders", at_once, raising=False)
    fast = compare(a, b)
    _same(fast, slow)
    assert {Path(p).name for p in asked} == {"a", "b"} and _blocks(fast) > 0
    monkeypatch.setattr(StoreReader, "call_orders", lambda self: None, raising=False)
    _same(compare(a, b), slow)


def test_progress_counts_every_pair(shaped_runs: tuple[Path, Path]) -> None:
    a, b = shaped_runs
    seen: list[tuple[int, int]] = []
    result = compare(a, b, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (result.summary.tensors, result.summary.tensors)
    assert all(x[0] < y[0] and x[1] == y[1] for x, y in zip(seen, seen[1:], strict=False))
    assert _blocks(result) > 0


def test_a_long_identical_pair_is_blocks_only(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two identical float runs: no entry object is made until one is read; the counts are right."""
    a = _float_run(out_dir, "a", 200, "safetensors")
    b = _float_run(out_dir, "b", 200, "safetensors")
    result = compare(a, b, allow_stats_only=True)
    assert isinstance(result.tensors, Entries) and isinstance(result.calls, Entries)
    assert not list(result.tensors.concrete()) and not list(result.calls.concrete())
    # per step: a and b one input and one output each, c one input tensor (and a bool) and two outputs
    assert result.exit_code == 0 and result.summary.stats_only_matched == result.summary.tensors == 200 * 7
    assert result.summary.calls == 200 * 3 and [c.order for c in result.calls] == list(range(600))
    assert result.tensors[-1].key == ilstore.keys.TensorKey(199, "c", 0, "outputs", ("1",))
    _same(result, _general(monkeypatch, a, b, allow_stats_only=True))


def test_steps_checked_a_chunk_at_a_time(shaped_runs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain steps' check runs over chunks of steps (bounded temporaries): chunks of one pair
    and of a few steps, whatever falls on their borders, give the general path's result."""
    a, b = shaped_runs
    slow = _general(monkeypatch, a, b)
    for pairs in (1, 7, 50):
        monkeypatch.setattr(ilstore_compare.stats_table, "_CHUNK_PAIRS", pairs)
        fast = compare(a, b)
        _same(fast, slow)
        assert _blocks(fast) > fast.summary.tensors // 2


@pytest.mark.parametrize("options", [{}, {"equal_nan": True}, {"exact": True}, {"steps": [3, 7, 20, 30, 55, 70]},
                                     {"modules": "^(a|c)$"}, {"workers": 2}],
                         ids=lambda o: ",".join(o) or "defaults")
def test_failing_steps_in_arrays_equal_the_general_path(shaped_runs: tuple[Path, Path], options: dict[str, object],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same runs with the steps whose pairs fail decided in arrays too: the mismatching step
    20 joins the blocks, the rest is as above."""
    a, b = shaped_runs
    slow = _general(monkeypatch, a, b, **options)
    seen: list[columnar.PlainSteps] = []
    planner = columnar.plain_steps
    monkeypatch.setattr(columnar, "plain_steps", lambda *a, **k: seen.append(planner(*a, **k)) or seen[-1])
    fast = compare(a, b, **options)
    _same(fast, slow)
    assert fast == slow and list(fast.tensors) == list(slow.tensors) and list(fast.calls) == list(slow.calls)
    _same_reports(fast, slow)
    assert len(seen) == 1
    if options.get("steps", [20]) and "modules" not in options:
        assert 20 in seen[0].at  # the failing step was decided in arrays
