"""The statistics table's layout lines (issue 13's per-capture cost): the key tuples are written
as they are, with the text the documented form (a list per key, its path and shape as lists)
gives, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ilstore.keys import CallKey
from ilstore.records import Deduper, TensorPolicy, build_record
from ilstore.store.stats_table import KEYS_NAME, StatsTableReader, StatsTableWriter


def _documented_line(layout: int, keys: list[tuple[Any, ...]]) -> bytes:
    """A layout line as format-stats-table documents it, each key a list built field by field."""
    line = {"layout": layout, "keys": [[m, c, k, list(p), dt, list(sh) if isinstance(sh, tuple) else sh, n, dev, st,
                                        why] for m, c, k, p, dt, sh, n, dev, st, why in keys]}
    return (json.dumps(line, allow_nan=False) + "\n").encode("utf-8")


def test_layout_lines_are_the_documented_text(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g)
    values: list[Any] = [
        (x, x.t(), torch.arange(6), torch.tensor(2.5), torch.empty(0, 3)),  # scalar and empty shapes
        {"a": x.half(), "b/c": [x[0], None, "text"], "é": x.bfloat16()},  # keys to escape
        torch.tensor([1.0, float("nan"), float("inf")]),
        torch.randn(2, 2).to_sparse(),  # an encoded tensor: its parts are nodes of their own
    ]
    policy = TensorPolicy(store_bodies=False, pin_memory=False)
    writer = StatsTableWriter(tmp_path)
    expected: list[bytes] = []
    for step in range(3):
        dedup = Deduper()
        written: list[tuple[Any, ...]] = []
        for number, value in enumerate(values[: 2 + step]):  # a new layout at every step
            record = build_record(CallKey(0, step, f"m.{number}", 0), "outputs", value, policy, {"mask": x}, dedup)
            writer.add_nodes(record.call.module, 0, record.kind, record.tensor_nodes())
            written.extend(writer._keys[len(written):])
        writer.end_step(step)
        expected.append(_documented_line(step, written))
    writer.close()
    assert (tmp_path / KEYS_NAME).read_bytes() == b"".join(expected)
    layouts = StatsTableReader(tmp_path, {"keys": KEYS_NAME, "rows": "stats.f64"}).layouts()
    assert sorted(layouts) == [0, 1, 2] and len(layouts[2]) == len(written)
