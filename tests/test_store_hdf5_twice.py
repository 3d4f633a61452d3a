"""A side written twice in one step to the hdf5 writer (review finding, 2026-12-01 second round).

No capture path does it, but the store interface allows the call. With the writer's groups,
links and attributes held until the next flush, the second write of a side with a stored body
returned and the step failed at its end with h5py's "Unable to create link (name already
exists)", losing the step; a side without a stored body (``mode: "stats"``) got a second
``/structures`` entry, and the completed step's file then failed to read. The second write now
fails at once with a StoreError naming the run, the step and the tensor, and the step keeps
everything written before it (the first write of that side included)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ilstore.errors import StoreError
from ilstore.keys import CallKey
from ilstore.records import Record, TensorPolicy, build_record, finalize_stats
from ilstore.store.base import StepInfo
from ilstore.store.registry import open_run
from ilstore.testing import assert_bits_equal
from tests.test_writer_cost_hdf5_attrs import _open


def _record(module: str, kind: str, value: Any, *, stored: bool = True, step: int = 0) -> Record:
    policy = TensorPolicy(store_bodies=stored, pin_memory=False)
    rec = build_record(CallKey(0, step, module, 0), kind, value, policy)
    finalize_stats(rec)
    return rec


def _values(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, generator=g), torch.randn(5, generator=g)


@pytest.mark.parametrize("first_stored,second_stored", [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize("flush_interval", [0, 3600])
def test_a_side_written_twice_fails_at_the_second_write(tmp_path: Path, first_stored: bool, second_stored: bool,
                                                        flush_interval: float) -> None:
    run = tmp_path / "run"
    writer = _open(run, flush_interval=flush_interval)
    a, b = _values(0)
    c, d = _values(1)
    records = [_record("m0", "inputs", (a,)), _record("m0", "outputs", (b, a), stored=first_stored),
               _record("m1", "inputs", (c,)), _record("m1", "outputs", d, stored=False)]
    for rec in records:
        writer.write(rec)
    again = _record("m0", "outputs", (d, c), stored=second_stored)
    with pytest.raises(StoreError) as info:
        writer.write(again)
    message = str(info.value)
    assert str(run) in message and "step 0" in message, message
    assert str(again.call.tensor("outputs")) in message, message
    writer.write(_record("m2", "outputs", c + 1))  # the step goes on
    records.append(_record("m2", "outputs", c + 1))
    calls = list(dict.fromkeys(rec.call for rec in records))
    writer.end_step(StepInfo(0, calls, calls))
    writer.close()
    with open_run(run) as reader:
        assert reader.steps() == [0] and reader.incomplete_steps() == []
        for rec in records:  # each side as its first write left it
            assert reader.structure(rec.call, rec.kind) == rec.structure, (rec.call, rec.kind)
            for path, tensor in rec.tensors.items():
                assert_bits_equal(reader.load(rec.call.tensor(rec.kind, path)), tensor)


def test_the_same_side_in_the_next_step_is_no_repeat(tmp_path: Path) -> None:
    run = tmp_path / "run"
    writer = _open(run, flush_interval=3600)
    a, b = _values(2)
    for step, value in ((0, a), (1, b)):
        rec = _record("m0", "outputs", value, step=step)
        writer.write(rec)
        writer.end_step(StepInfo(step, [rec.call], [rec.call]))
    writer.close()
    with open_run(run) as reader:
        assert reader.steps() == [0, 1]
        assert_bits_equal(reader.load(CallKey(0, 1, "m0", 0).tensor("outputs")), b)
