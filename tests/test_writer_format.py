"""The writer's cheaper paths write the same bytes: the safetensors index assembled from records
encoded once, the structure walked once per record, the statistics table's rows built in bulk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import ilstore
from ilstore.errors import StoreError
from ilstore.keys import CallKey
from ilstore.manifest import new_manifest
from ilstore.records import Record, TensorPolicy, build_record, iter_tensor_nodes
from ilstore.store.base import StepInfo
from ilstore.store.safetensors import SafetensorsWriter


class _Zoo(torch.nn.Module):
    """Odd names, odd dtypes, a tensor returned twice (de-duplicated), non-tensor values."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.add_module('ü"n\\i', torch.nn.Identity())

    def forward(self, x: torch.Tensor, label: str = 'é"\\\n\u2603') -> dict[str, Any]:
        y = getattr(self, 'ü"n\\i')(self.lin(x))
        return {"y": y, "again": y, "c": torch.complex(x, x).to(torch.complex128), "b": x.to(torch.bfloat16),
                "odd": torch.tensor([float("nan"), float("inf"), -0.0]), "v": (3, None, label, 1.5)}


@pytest.mark.parametrize("mode", ["stats", "tensors"])
@pytest.mark.parametrize("async_writes", [False, True])
def test_safetensors_index_is_json_dumps_of_itself(out_dir: Path, mode: str, async_writes: bool) -> None:
    """index.json is exactly the compact json.dumps of the object it holds, in the documented key order."""
    model = _Zoo()
    config = {"output_dir": str(out_dir), "run_id": "run", "backend": "safetensors", "mode": mode,
              "async_writes": async_writes, "log_step_ids": []}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        for seed in range(3):
            model(torch.randn(2, 4, generator=torch.Generator().manual_seed(seed)))
    assert cap.run_dir is not None
    for step in range(3):
        text = (cap.run_dir / f"step_{step}" / "index.json").read_text(encoding="utf-8")
        index = json.loads(text)
        assert text == json.dumps(index, allow_nan=False)
        assert list(index) == ["format", "format_version", "step", "rank", "shards", "calls", "call_ends", "records",
                               "tensors"]
        assert [list(r) for r in index["records"]] == [["module", "call", "rank", "step", "kind", "structure"]] * 4
        assert [(r["module"], r["kind"]) for r in index["records"]] == [
            ("lin", "inputs"), ("lin", "outputs"), ('ü"n\\i', "inputs"), ('ü"n\\i', "outputs")]
        assert index["step"] == step and all(r["step"] == step for r in index["records"])
    with ilstore.open_run(cap.run_dir) as run:
        assert len(run.steps()) == 3
        outputs = run.structure(CallKey(0, 2, 'ü"n\\i', 0), "outputs")
        assert outputs is not None and outputs["type"] == "tensor"


def _record(step: int = 0, value: Any = None) -> Record:
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3) if value is None else value
    return build_record(CallKey(0, step, "m", 0), "outputs", x, TensorPolicy(store_bodies=False))


def _writer(run_dir: Path) -> SafetensorsWriter:
    writer = SafetensorsWriter(run_dir)
    writer.open(new_manifest("safetensors", {}))
    return writer


def test_index_keeps_the_structure_as_written(tmp_path: Path) -> None:
    """A structure changed after write() does not reach the index (it is encoded at write time)."""
    writer = _writer(tmp_path / "run")
    record = _record()
    written = json.loads(json.dumps(record.structure))
    writer.write(record)
    record.structure["stats"]["min"] = 1234.5
    record.structure["extra"] = "late"
    call = CallKey(0, 0, "m", 0)
    writer.end_step(StepInfo(0, [call], [call]))
    writer.close()
    index = json.loads((tmp_path / "run" / "step_0" / "index.json").read_text())
    assert index["records"][0]["structure"] == written


def test_a_structure_that_is_not_json_fails_at_write(tmp_path: Path) -> None:
    writer = _writer(tmp_path / "run")
    record = _record()
    record.structure["stats"]["min"] = float("nan")  # allow_nan=False: not strict JSON
    with pytest.raises(StoreError, match="r0/s0/m/0/outputs: structure is not valid JSON"):
        writer.write(record)
    writer.write(_record())  # the writer goes on
    call = CallKey(0, 0, "m", 0)
    writer.end_step(StepInfo(0, [call], [call]))
    writer.close()
    index = json.loads((tmp_path / "run" / "step_0" / "index.json").read_text())
    assert len(index["records"]) == 1


def test_stored_bodies_outside_write_walks_the_record(tmp_path: Path) -> None:
    """_stored_bodies uses write()'s walk only for the record being written; asked for another
    record (or outside write) it walks that record, and a promised body that is missing raises."""
    writer = _writer(tmp_path / "run")
    x = torch.ones(3)
    record = build_record(CallKey(0, 0, "m", 0), "outputs", (x, x + 1), TensorPolicy())
    bodies = list(writer._stored_bodies(record))
    assert [path for path, _node, _t in bodies] == [path for path, _n in iter_tensor_nodes(record.structure)]
    broken = Record(record.call, record.kind, record.structure, {})
    with pytest.raises(StoreError, match="the structure says the body is stored"):
        list(writer._stored_bodies(broken))
    with pytest.raises(StoreError, match="the structure says the body is stored"):
        writer.write(broken)
    writer.close()


def test_statistics_rows_built_in_bulk_are_the_documented_rows(tmp_path: Path) -> None:
    """stats.f64 holds, per node in order, (step, layout, index, the statistics in STAT_COLUMNS
    order, NaN where a value is missing or not a number), as little-endian float64."""
    import struct

    from ilstore.store.stats_table import ROW_WIDTH, STAT_COLUMNS, StatsTableWriter

    odd: list[Any] = [None, True, "x", 2**40, -3, 0.5, float("inf"), -0.0]
    nodes: list[tuple[tuple[str, ...], dict[str, Any]]] = [
        ((str(i),), {"type": "tensor", "shape": [i, 2], "dtype": "torch.float32", "numel": 2 * i,
                     "stats": {c: odd[(i + j) % len(odd)] for j, c in enumerate(STAT_COLUMNS) if (i + j) % 5}})
        for i in range(9)]
    nodes.append((("nostats",), {"type": "tensor", "stats": "damaged"}))
    table = StatsTableWriter(tmp_path)
    table.add_nodes("m", 0, "outputs", nodes[:4])
    for path, node in nodes[4:]:
        table.add("m", 1, "inputs", path, node)
    table.end_step(7)
    table.end_step(8)  # an empty step: no rows, a layout of its own
    table.add_nodes("m", 0, "outputs", nodes[:4])
    table.add_nodes("m", 1, "inputs", nodes[4:])
    table.end_step(9)  # the first layout again
    table.close()

    def number(v: Any) -> float:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")

    expected = []
    for step in (7, 9):
        for i, (_path, node) in enumerate(nodes):
            stats = node["stats"] if isinstance(node["stats"], dict) else {}
            expected.append([float(step), 0.0, float(i)] + [number(stats.get(c)) for c in STAT_COLUMNS])
    data = (tmp_path / "stats.f64").read_bytes()
    got = [list(struct.unpack(f"<{ROW_WIDTH}d", data[k:k + 8 * ROW_WIDTH])) for k in range(0, len(data), 8 * ROW_WIDTH)]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):  # bit for bit (-0.0 too), any NaN for a NaN
        assert all((a != a and b != b) or struct.pack("<d", a) == struct.pack("<d", b)
                   for a, b in zip(g, e, strict=True)), (g, e)
    layouts = [json.loads(line) for line in (tmp_path / "stats_keys.jsonl").read_text().splitlines()]
    assert [lay["layout"] for lay in layouts] == [0, 1] and layouts[1]["keys"] == []
    assert [k[:4] for k in layouts[0]["keys"]] == [["m", 0 if i < 4 else 1, "outputs" if i < 4 else "inputs",
                                                    list(p)] for i, (p, _n) in enumerate(nodes)]
