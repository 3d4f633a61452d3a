"""The safetensors writer lent the model's own tensors (``borrows_bodies``; issue 13: a
synchronous capture lends them instead of copies): every body is written, or copied, before
``write`` returns, so what the model changes in place afterwards never reaches the shard; and the
files are the same bytes as when the writer holds its bodies until later (not lent: the copies
an asynchronous capture hands it), as long as the headers' room is not what ends a shard: lent,
a shard's header counts its bodies at their exact length earlier, so a shard of many small bodies
may take more of them (the tensors stored are the same)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ilstore
from ilstore.keys import CallKey
from ilstore.manifest import new_manifest
from ilstore.records import Record, TensorPolicy, build_record, finalize_stats
from ilstore.store import safetensors as st
from ilstore.store.base import StepInfo
from ilstore.testing import assert_bits_equal

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I16": 2, "I64": 8, "BOOL": 1}


class _Lending(st.SafetensorsWriter):
    """The writer as a synchronous capture uses it: lent the tensors it is handed."""

    lent = True


def _record(step: int, module: str, value: Any) -> Record:
    rec = build_record(CallKey(0, step, module, 0), "outputs", value, TensorPolicy(pin_memory=False))
    finalize_stats(rec)
    return rec


def _values(step: int) -> list[tuple[str, Any]]:
    """Bodies of every alignment class: held (a small shard, odd sizes), streamed (after 4 MiB)."""
    g = torch.Generator().manual_seed(step)
    return [
        ("small", torch.randn(3, 5, generator=g)),
        ("wide", torch.randn(33, generator=g, dtype=torch.float64)),
        ("big", torch.randn(1024, 1024, generator=g)),  # 4 MiB: the shard streams from here
        ("odd_i8", torch.arange(7, dtype=torch.int8)),
        ("odd_f16", torch.randn(5, generator=g).half()),
        ("bits", torch.randn(9, generator=g).to(torch.bfloat16)),
        ("c128", torch.randn(4, dtype=torch.complex128, generator=g)),
        ("empty", torch.empty(0, 3)),
        ("after", (torch.randn(64, 8, generator=g), torch.randn(777, generator=g))),
        ("more", torch.randn(512, 1024, generator=g)),
    ]


def _write_steps(writer_cls: type[st.SafetensorsWriter], run: Path, steps: dict[int, list[tuple[str, Any]]],
                 change: bool = False, **options: Any) -> dict[int, list[Record]]:
    """Write ``steps`` with a writer of ``writer_cls``; with ``change``, every tensor handed to the
    writer is overwritten (NaN, or its bits flipped) as soon as ``write`` returns, as a model
    changing its activations in place would."""
    writer = writer_cls(run, options)
    writer.open(new_manifest("safetensors", {}))
    written: dict[int, list[Record]] = {}
    for step, values in steps.items():
        records = []
        for name, value in values:
            rec = _record(step, name, value)
            kept = {path: t.clone() for path, t in rec.tensors.items()}
            writer.write(rec)
            if change:
                for t in rec.tensors.values():
                    if t.is_floating_point() or t.is_complex():
                        t.fill_(float("nan"))
                    else:
                        t.bitwise_not_()
            records.append(Record(rec.call, rec.kind, rec.structure, kept))
        calls = list(dict.fromkeys(r.call for r in records))
        writer.end_step(StepInfo(step, calls, calls))
        written[step] = records
    writer.close()
    return written


def _files(run: Path) -> dict[str, bytes]:
    """Every file of the steps' directories, by relative path."""
    out = {}
    for step_dir in sorted(run.glob("step_*")):
        for name in sorted(os.listdir(step_dir)):
            out[f"{step_dir.name}/{name}"] = (step_dir / name).read_bytes()
    return out


_STEPS = {
    0: _values(0),  # one streamed shard
    1: [(n, v) for n, v in _values(1) if n not in ("big", "more")],  # one small shard, held to its end
}
#: A streamed shard whose last bodies of sizes that are multiples of 8 have two element sizes:
#: held, they are written larger element sizes first; lent, as they came.
_MIXED_TAIL = {2: [*_values(2), ("last", torch.randn(34, dtype=torch.float64))]}


@pytest.mark.parametrize("shard_size_mb", [1024, 5])
def test_a_lending_writer_writes_the_same_bytes(tmp_path: Path, shard_size_mb: int) -> None:
    """The bytes do not depend on when the bodies were written (as they came, or 4 MiB at a time),
    nor on copies of held bodies; with 5 MiB shards a step spans several shards."""
    _write_steps(st.SafetensorsWriter, tmp_path / "held", _STEPS, shard_size_mb=shard_size_mb)
    _write_steps(_Lending, tmp_path / "lent", _STEPS, shard_size_mb=shard_size_mb)
    held, lent = _files(tmp_path / "held"), _files(tmp_path / "lent")
    assert sorted(held) == sorted(lent)
    assert any(name.endswith("shard_00001.safetensors") for name in held) == (shard_size_mb == 5)
    for name, data in held.items():
        assert lent[name] == data, name


@pytest.mark.parametrize("shard_size_mb", [1024, 5])
def test_a_lent_body_changed_after_write_is_stored_as_it_was(tmp_path: Path, shard_size_mb: int) -> None:
    """Bodies held for a small shard, odd sizes held to the shard's end, bodies of a streamed
    shard below the 4 MiB batch: each is out of the tensor's memory before ``write`` returns."""
    written = _write_steps(_Lending, tmp_path / "run", {**_STEPS, **_MIXED_TAIL}, change=True,
                           shard_size_mb=shard_size_mb)
    for shard in (tmp_path / "run").glob("step_*/shard_*.safetensors"):  # each body aligned to its element size
        raw = shard.read_bytes()
        length = int.from_bytes(raw[:8], "little")
        for name, info in json.loads(raw[8:8 + length]).items():
            if name != "__metadata__":
                assert (8 + length + info["data_offsets"][0]) % _ITEMSIZE[info["dtype"]] == 0, name
    with ilstore.open_run(tmp_path / "run") as run:
        for records in written.values():
            for rec in records:
                for path, tensor in rec.tensors.items():
                    assert_bits_equal(run.load(rec.key(path)), tensor)


class _Model(nn.Module):
    """A Linear whose output the next module overwrites in place."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(x))


def test_a_sync_capture_lends_and_stores_what_the_hook_saw(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    add = st.SafetensorsWriter._add

    def spy(self: st.SafetensorsWriter, key: str, tensor: torch.Tensor) -> Any:
        seen.append(tensor.data_ptr())
        return add(self, key, tensor)

    monkeypatch.setattr(st.SafetensorsWriter, "_add", spy)
    model = _Model()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    lin_out: list[torch.Tensor] = []
    model.lin.register_forward_hook(lambda m, a, o: lin_out.extend([o, o.clone()]))
    cap = ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "run", "backend": "safetensors",
                                  "async_writes": False})
    with torch.no_grad():
        model(x)
    cap.close()
    assert lin_out[0].data_ptr() in seen  # the model's own tensor was handed to the writer
    with ilstore.open_run(tmp_path / "run") as run:
        call = next(c for c in run.calls(0) if c.module == "lin")
        stored = run.load(call.tensor("outputs"))
    assert stored.min() < 0 and torch.equal(stored, lin_out[1])  # as the hook saw it, before ReLU


def test_many_small_lent_bodies_split_shards_as_held_ones_and_store_the_same_tensors(tmp_path: Path) -> None:
    """One streamed 4 MiB body, then 1,500 small ones: the header's room ends the shard. Lent, a
    body written early still counts in the header's room as when held (baae9dd; before, at its
    exact length, so the lent first shard took more bodies), so the shards split alike; every
    tensor loads bit for bit, and every shard is a valid safetensors file whose header fits its
    room."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(7)
    values = [("big", torch.randn(1024, 1024, generator=g))]
    values += [(f"s{i}", torch.randn(3, generator=g)) for i in range(1500)]
    held = _write_steps(st.SafetensorsWriter, tmp_path / "held", {0: values})
    _write_steps(_Lending, tmp_path / "lent", {0: values})
    counts = {}
    for run in ("held", "lent"):
        shards = sorted((tmp_path / run).glob("step_*/shard_*.safetensors"))
        assert len(shards) >= 2, run  # the header's room did end a shard
        counts[run] = []
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                counts[run].append(len(list(f.keys())))
        with ilstore.open_run(tmp_path / run) as reader:
            for rec in held[0]:
                for path, tensor in rec.tensors.items():
                    assert_bits_equal(reader.load(rec.key(path)), tensor)
    assert sum(counts["held"]) == sum(counts["lent"]) == 1501
    assert counts["lent"] == counts["held"]
