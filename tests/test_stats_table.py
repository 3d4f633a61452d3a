"""The statistics table (issue 13): written by every backend, and compared vectorised with the
same verdicts as the general, structure-by-structure comparison."""

from __future__ import annotations

import json
import math
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
from ilstore_compare import compare
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


@pytest.mark.parametrize("backend", BACKENDS)
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

    def flaky(fd: int, data: bytes) -> int:
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
    and squared L2 norm in the accumulation dtype), overflow of the squared norm included."""
    from ilstore.records import _fixed_order_sums, _slow_stats, tensor_stats

    gen = torch.Generator().manual_seed(3)
    for n in (1, 5, 64, 4096, 32767):
        for scale in (1e-20, 1.0, 1e3, 1e19, 3e38):
            x = (torch.randn(n, generator=gen, dtype=torch.float64) * scale + scale / 3).to(dtype)
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            lo, hi = torch.aminmax(x)
            mn, mx, sm, sq = torch.cat([torch.stack([lo, hi]).to(acc), _fixed_order_sums(x, acc)]).tolist()
            stats = tensor_stats(x)
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
