"""A safetensors writer lent the model's tensors (a synchronous capture: every body written, or
copied, before ``write`` returns) writes the same files, byte for byte, as one that holds the
copies an asynchronous capture hands it, and so does one lent only some records: shards end at
the same bodies (a body written early counts in its shard's header room at its longest until
holding it would have written it) and a streamed shard's bodies of sizes that are multiples of 8
lie in the order they came either way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ilstore.keys import CallKey
from ilstore.manifest import new_manifest
from ilstore.records import Record, TensorPolicy, build_record, finalize_stats
from ilstore.store import safetensors as st
from ilstore.store.base import StepInfo
from tests.test_writer_cost_safetensors import _files


def _record(step: int, module: str, value: Any) -> Record:
    rec = build_record(CallKey(0, step, module, 0), "outputs", value, TensorPolicy(pin_memory=False))
    finalize_stats(rec)
    return rec


def _write(run: Path, steps: dict[int, list[tuple[str, Any]]], lent: Any, **options: Any) -> None:
    """Write ``steps``; ``lent(i)`` says whether the ``i``-th record of a step is lent. A lent
    record's tensors are overwritten as soon as ``write`` returns, as a model changing its
    activations in place would (a writer that kept them would store the change)."""
    writer = st.SafetensorsWriter(run, options)
    writer.open(new_manifest("safetensors", {}))
    for step, values in steps.items():
        calls = []
        for i, (name, value) in enumerate(values):
            rec = _record(step, name, value)
            writer.lent = bool(lent(i))
            writer.write(rec)
            if writer.lent:
                for t in rec.tensors.values():
                    if t.is_floating_point() or t.is_complex():
                        t.fill_(float("nan"))
                    else:
                        t.bitwise_not_()
            writer.lent = False
            calls.append(rec.call)
        writer.end_step(StepInfo(step, calls, calls))
    writer.close()


def _many_small(seed: int) -> list[tuple[str, Any]]:
    """One 4 MiB body (the shard streams), then 1,500 small ones: the header's room ends the shard."""
    g = torch.Generator().manual_seed(seed)
    return [("big", torch.randn(1024, 1024, generator=g)),
            *((f"s{i}", torch.randn(3 + i % 5, generator=g)) for i in range(1500))]


def _mixed(seed: int) -> list[tuple[str, Any]]:
    """A streamed shard whose bodies of sizes that are multiples of 8 mix element sizes (float64,
    float32, int64, bfloat16) after the 4 MiB body, and bodies of other sizes (held to the end)."""
    g = torch.Generator().manual_seed(seed)
    return [
        ("small", torch.randn(3, 5, generator=g)),
        ("big", torch.randn(1024, 1024, generator=g)),
        ("wide", torch.randn(33, generator=g, dtype=torch.float64)),
        ("f32", torch.randn(64, 8, generator=g)),
        ("i64", torch.arange(10, dtype=torch.int64)),
        ("odd_i8", torch.arange(7, dtype=torch.int8)),
        ("bf16", torch.randn(12, generator=g).to(torch.bfloat16)),
        ("odd_f16", torch.randn(5, generator=g).half()),
        ("last", torch.randn(34, dtype=torch.float64, generator=g)),
        ("more", torch.randn(512, 1024, generator=g)),
        ("tail", (torch.randn(6, generator=g, dtype=torch.float64), torch.randn(8, generator=g))),
    ]


_LENDING = {"held": lambda i: False, "lent": lambda i: True, "every other": lambda i: i % 2,
            "every third": lambda i: i % 3 == 1}


@pytest.mark.parametrize("lending", ["lent", "every other", "every third"])
def test_many_small_bodies_split_shards_where_holding_them_does(tmp_path: Path, lending: str) -> None:
    steps = {0: _many_small(0), 1: _many_small(1)}
    _write(tmp_path / "held", steps, _LENDING["held"])
    _write(tmp_path / "other", steps, _LENDING[lending])
    held, other = _files(tmp_path / "held"), _files(tmp_path / "other")
    assert sum(name.endswith(".safetensors") for name in held) >= 4  # the header's room ended shards
    assert sorted(other) == sorted(held)
    for name, data in held.items():
        assert other[name] == data, name


@pytest.mark.parametrize("shard_size_mb", [1024, 5])
@pytest.mark.parametrize("lending", ["lent", "every other"])
def test_mixed_element_sizes_lie_in_the_same_order(tmp_path: Path, lending: str, shard_size_mb: int) -> None:
    steps = {0: _mixed(0), 1: _mixed(1)}
    _write(tmp_path / "held", steps, _LENDING["held"], shard_size_mb=shard_size_mb)
    _write(tmp_path / "other", steps, _LENDING[lending], shard_size_mb=shard_size_mb)
    held, other = _files(tmp_path / "held"), _files(tmp_path / "other")
    assert sorted(other) == sorted(held)
    for name, data in held.items():
        assert other[name] == data, name
