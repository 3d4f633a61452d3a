"""The safetensors writer reads a body's bytes from the tensor's own memory through numpy where
numpy has the dtype (one torch call), and through a ``uint8`` view where it does not (bfloat16,
float8, complex32): every body in the shard is exactly its tensor's bytes, whichever way, for
slices that start inside a larger storage, 0-d and empty tensors, tensors that require grad and
conjugate or negative-bit views, in held and streamed shards, lent or not."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from ilstore.keys import CallKey, TensorKey
from ilstore.manifest import new_manifest
from ilstore.records import Record, TensorPolicy, build_record, finalize_stats
from ilstore.store import safetensors as st
from ilstore.store.base import StepInfo


def _raw(t: torch.Tensor) -> bytes:
    """The bytes of ``t``'s values, in order, as the format stores them (complex as real pairs)."""
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    if t.dtype == torch.complex32:
        t = torch.view_as_real(t)
    return bytes(t.reshape(-1).view(torch.uint8).tolist()) if t.numel() else b""


def _values() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 40, generator=g)
    z = torch.randn(24, generator=g, dtype=torch.complex64)
    out = [
        ("f32", torch.randn(7, 9, generator=g)),
        ("slice", base[5:9]),  # contiguous, starts 200 floats into its storage
        ("row", base[17]),
        ("scalar", torch.tensor(2.5, dtype=torch.float64)),
        ("empty", torch.empty(0, 3)),
        ("grad", torch.randn(6, generator=g, requires_grad=True)),
        ("conj", z.conj()),
        ("neg", z.conj().imag),
        ("c64", z[3:11]),
        ("bool", torch.rand(13, generator=g) > 0.5),
        ("i8", torch.arange(-5, 6, dtype=torch.int8)),
        ("u16", torch.arange(9, dtype=torch.int32).to(torch.uint16)),
        ("f16", torch.randn(11, generator=g).half()),
        ("bf16", base[2:4].to(torch.bfloat16)),
        ("bf16_slice", base.to(torch.bfloat16)[30:33]),
        ("f8", torch.randn(16, generator=g).to(torch.float8_e4m3fn)),
    ]
    with warnings.catch_warnings():  # torch's "ComplexHalf support is experimental"
        warnings.simplefilter("ignore")
        out.append(("c32", torch.randn(10, generator=g, dtype=torch.complex64).to(torch.complex32)))
    return out


def _record(step: int, name: str, value: torch.Tensor) -> Record:
    rec = build_record(CallKey(0, step, name, 0), "outputs", value, TensorPolicy(pin_memory=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finalize_stats(rec)
    return rec


def _write(run: Path, values: list[tuple[str, Any]], lent: bool) -> None:
    writer = st.SafetensorsWriter(run, {})
    writer.open(new_manifest("safetensors", {}))
    calls = []
    for name, value in values:
        rec = _record(0, name, value)
        writer.lent = lent
        writer.write(rec)
        writer.lent = False
        calls.append(rec.call)
    writer.end_step(StepInfo(0, calls, calls))
    writer.close()


def _stored(run: Path) -> dict[str, bytes]:
    """Each tensor's bytes as its shard holds them (read by hand: header, offsets, bytes)."""
    index = json.loads((run / "step_0" / "index.json").read_text())
    out = {}
    for shard in index["shards"]:
        data = (run / "step_0" / shard).read_bytes()
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + length])
        for name, entry in header.items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                out[name] = data[8 + length + begin:8 + length + end]
    return out


@pytest.mark.parametrize("streamed", [False, True], ids=["held", "streamed"])
@pytest.mark.parametrize("lent", [False, True], ids=["copies", "lent"])
def test_every_body_is_its_tensors_bytes(tmp_path: Path, streamed: bool, lent: bool) -> None:
    values = _values()
    if streamed:  # a 4 MiB body first: the shard streams, and the later bodies are written as they come
        values.insert(0, ("big", torch.randn(1024, 1024, generator=torch.Generator().manual_seed(1))))
    expected = {name: _raw(t) for name, t in values}
    _write(tmp_path / "run", values, lent)
    stored = _stored(tmp_path / "run")
    for name, raw in expected.items():
        assert stored[f"r0/s0/{name}/0/outputs"] == raw, name
    # both ways of reading a tensor's memory were taken
    assert st._numpy_has(torch.float32) and st._numpy_has(torch.complex64)
    assert not st._numpy_has(torch.bfloat16) and not st._numpy_has(torch.float8_e4m3fn)


def test_held_and_lent_files_are_the_same_bytes(tmp_path: Path) -> None:
    values = [("big", torch.randn(1024, 1024, generator=torch.Generator().manual_seed(2))), *_values()]
    _write(tmp_path / "held", values, False)
    _write(tmp_path / "lent", values, True)
    for shard in sorted((tmp_path / "held" / "step_0").iterdir()):
        assert shard.read_bytes() == (tmp_path / "lent" / "step_0" / shard.name).read_bytes(), shard.name


def test_the_library_reads_every_tensor_back(tmp_path: Path) -> None:
    from ilstore import open_run

    values = _values()
    _write(tmp_path / "run", values, True)
    with open_run(tmp_path / "run") as reader:
        for name, value in values:
            got = reader.load(TensorKey.parse(f"r0/s0/{name}/0/outputs"))
            want = value.detach().resolve_conj().resolve_neg()
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert _raw(got) == _raw(want), name


def test_a_circular_structure_fails_at_write_and_the_writer_goes_on(tmp_path: Path) -> None:
    """The structures' encoder does not look for circular references (a structure is a tree): one
    that is not fails at write with the same error as any structure that is not JSON."""
    from ilstore.errors import StoreError

    writer = st.SafetensorsWriter(tmp_path / "run", {})
    writer.open(new_manifest("safetensors", {}))
    record = _record(0, "m", torch.ones(3))
    record.structure["loop"] = record.structure
    with pytest.raises(StoreError, match="r0/s0/m/0/outputs: structure is not valid JSON"):
        writer.write(record)
    good = _record(0, "m", torch.ones(3))
    writer.write(good)
    writer.end_step(StepInfo(0, [good.call], [good.call]))
    writer.close()
    index = json.loads((tmp_path / "run" / "step_0" / "index.json").read_text())
    assert len(index["records"]) == 1 and "loop" not in index["records"][0]["structure"]
