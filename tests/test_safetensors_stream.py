"""The safetensors writer streams large shards: bodies go to the file as they arrive (snapshots
are freed right after), the header last, into room kept for it. Every shard stays a valid
safetensors file that the library reads, with each body aligned to its element size."""

from __future__ import annotations

import gc
import json
import os
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ilstore
from ilstore.errors import StoreError
from ilstore.keys import CallKey
from ilstore.manifest import new_manifest
from ilstore.records import Record, TensorPolicy, build_record, finalize_stats
from ilstore.store import safetensors as st
from ilstore.store.base import StepInfo
from ilstore.testing import assert_bits_equal

MIB = 2**20


def _record(step: int, module: str, value: Any) -> Record:
    rec = build_record(CallKey(0, step, module, 0), "outputs", value, TensorPolicy(pin_memory=False))
    finalize_stats(rec)
    return rec


def _writer(run_dir: Path, **options: Any) -> st.SafetensorsWriter:
    writer = st.SafetensorsWriter(run_dir, options)
    writer.open(new_manifest("safetensors", {}))
    return writer


def _end(writer: st.SafetensorsWriter, step: int, records: list[Record]) -> None:
    calls = list(dict.fromkeys(r.call for r in records))
    writer.end_step(StepInfo(step, calls, calls))


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return length, json.loads(raw[8:8 + length])


def _check_shards(step_dir: Path, unique: bool = True) -> dict[str, torch.Tensor]:
    """Every shard of the step as the library reads it (it checks that the bodies cover the data
    exactly, with no gap); every body aligned to its element size; with ``unique``, no name in
    two shards. All tensors, by name (the later shard's where a name is in two)."""
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(step_dir.glob("shard_*.safetensors")):
        tensors = load_file(str(shard))
        length, header = _header(shard)
        assert length % 8 == 0
        for name, info in header.items():
            if name != "__metadata__":
                assert (8 + length + info["data_offsets"][0]) % tensors[name].element_size() == 0, name
        assert not unique or not found.keys() & tensors.keys()
        found.update(tensors)
    return found


def _values(step: int) -> list[tuple[str, Any]]:
    """Bodies of every alignment class, about 10 MiB in all (the shard streams after 4 MiB)."""
    g = torch.Generator().manual_seed(step)
    return [
        ("small", torch.randn(3, 5, generator=g)),  # 60 bytes, held to the end
        ("big", torch.randn(1024, 1024, generator=g)),  # 4 MiB: streaming starts
        ("odd_i8", torch.arange(7, dtype=torch.int8)),
        ("odd_f16", torch.randn(5, generator=g).half()),
        ("bits", torch.randn(9, generator=g).to(torch.bfloat16)),
        ("flag", torch.tensor([True, False, True])),
        ("c128", torch.randn(4, dtype=torch.complex128, generator=g)),
        ("empty", torch.empty(0, 3)),
        ("scalar", torch.tensor(2.5, dtype=torch.float64)),
        ("more", (torch.randn(512, 1024, generator=g), torch.randn(777, generator=g))),
        ("last", torch.randn(2048, 1024, generator=g)),
    ]


def test_a_streamed_shard_is_a_valid_aligned_safetensors_file(tmp_path: Path) -> None:
    writer = _writer(tmp_path / "run")
    records = [_record(0, name, value) for name, value in _values(0)]
    for rec in records:
        writer.write(rec)
    _end(writer, 0, records)
    writer.close()
    step = tmp_path / "run" / "step_0"
    assert sorted(os.listdir(step)) == ["index.json", "shard_00000.safetensors"]
    length, _header_doc = _header(step / "shard_00000.safetensors")
    assert length >= st._MIN_RESERVE  # streamed: the header has the room kept for it
    stored = _check_shards(step)
    with ilstore.open_run(tmp_path / "run") as run:
        for rec in records:
            for path, tensor in rec.tensors.items():
                key = rec.key(path)
                assert_bits_equal(run.load(key), tensor)
                assert str(key) in stored or run.meta(key).get("encoding")
    assert_bits_equal(stored[str(records[6].key(()))], torch.view_as_real(records[6].tensors[()]))


def test_a_small_shard_is_written_whole_with_an_exact_header(tmp_path: Path) -> None:
    writer = _writer(tmp_path / "run")
    records = [_record(0, name, value) for name, value in _values(0) if name not in ("big", "more", "last")]
    for rec in records:
        writer.write(rec)
    _end(writer, 0, records)
    writer.close()
    shard = tmp_path / "run" / "step_0" / "shard_00000.safetensors"
    length, header = _header(shard)
    text = json.dumps(header, separators=(",", ":"))
    assert length == (len(text) + 7) // 8 * 8  # padded to a multiple of 8, as the library pads
    assert len(_check_shards(shard.parent)) == len(header) - 1


def test_snapshots_are_released_once_streamed(tmp_path: Path) -> None:
    writer = _writer(tmp_path / "run")
    first = _record(0, "first", torch.randn(st._STREAM_AT // 4))  # streaming starts here
    writer.write(first)
    rec = _record(0, "second", torch.randn(st._STREAM_AT // 4))  # written at once: as many bytes as a batch
    alive = weakref.ref(rec.tensors[()])
    writer.write(rec)
    keep = dict(rec.tensors)
    del rec
    gc.collect()
    assert alive() is not None  # the test's own reference
    keep.clear()
    gc.collect()
    assert alive() is None  # the writer holds no reference to a body it wrote
    held = _record(0, "third", torch.randn(3))  # 12 bytes: held until the shard ends
    writer.write(held)
    _end(writer, 0, [first, held])
    writer.close()
    assert len(_check_shards(tmp_path / "run" / "step_0")) == 3


def test_a_header_that_outgrows_its_room_starts_a_new_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(st, "_MIN_RESERVE", 1024)
    monkeypatch.setattr(st, "_STREAM_AT", 64)
    writer = _writer(tmp_path / "run")
    for step in (0, 1):
        records = [_record(step, f"m{i}", torch.full((16,), float(i))) for i in range(60)]
        for rec in records:
            writer.write(rec)
        _end(writer, step, records)
        stored = _check_shards(tmp_path / "run" / f"step_{step}")
        assert len(stored) == 60
        shards = json.loads((tmp_path / "run" / f"step_{step}" / "index.json").read_text())["shards"]
        if step == 0:
            assert len(shards) >= 2  # 60 entries of ~90 bytes do not fit 1 KiB
        else:
            assert len(shards) == 1  # the room kept grew with what the headers needed
    writer.close()
    with ilstore.open_run(tmp_path / "run") as run:
        for key in run.keys():
            assert run.load(key).eq(float(key.module[1:])).all()


def test_a_record_written_twice_keeps_the_later_bodies(tmp_path: Path) -> None:
    writer = _writer(tmp_path / "run")
    big = _record(0, "big", torch.randn(st._STREAM_AT // 4 + 1))
    old, new = _record(0, "m", torch.zeros(8)), _record(0, "m", torch.ones(8))
    for rec in (big, old, new):
        writer.write(rec)
    _end(writer, 0, [big, new])
    writer.close()
    stored = _check_shards(tmp_path / "run" / "step_0", unique=False)
    assert_bits_equal(stored[str(new.key(()))], torch.ones(8))
    index = json.loads((tmp_path / "run" / "step_0" / "index.json").read_text())
    assert index["shards"] == ["shard_00000.safetensors", "shard_00001.safetensors"]
    assert index["tensors"][str(new.key(()))]["shard"] == "shard_00001.safetensors"  # the earlier body stays behind
    with ilstore.open_run(tmp_path / "run") as run:
        assert_bits_equal(run.load(new.key(())), torch.ones(8))


def test_a_step_cut_mid_way_keeps_its_streamed_shard_readable(tmp_path: Path) -> None:
    writer = _writer(tmp_path / "run")
    records = [_record(0, name, value) for name, value in _values(0)[:5]]
    for rec in records:
        writer.write(rec)
    writer.close("failed", "the forward raised")  # no end_step: the step never finished
    step = tmp_path / "run" / "step_0"
    assert not (step / "index.json").exists()
    stored = _check_shards(step)  # the shards are self-describing: the cut step's tensors are rescued
    for rec in records:  # float32, int8, float16, bfloat16: all stored as they are
        for path, tensor in rec.tensors.items():
            assert_bits_equal(stored[str(rec.key(path))], tensor)


def test_a_failed_write_names_the_shard_and_leaves_the_step_without_index(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = _writer(tmp_path / "run")
    ok = _record(0, "ok", torch.randn(4))
    writer.write(ok)
    _end(writer, 0, [ok])
    real = os.pwritev

    def full(fd: int, buffers: list[Any], offset: int) -> int:
        if sum(memoryview(b).nbytes for b in buffers) > MIB:
            raise OSError(28, "No space left on device")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", full)
    big = _record(1, "big", torch.randn(st._STREAM_AT // 4 + 2))
    with pytest.raises(StoreError, match=r"step_1.shard_00000\.safetensors: cannot write the shard.*No space"):
        writer.write(big)
    small = _record(1, "small", torch.randn(4))
    writer.write(small)
    with pytest.raises(StoreError, match="step 1 is incomplete, its index is not written"):
        _end(writer, 1, [big, small])
    monkeypatch.setattr(os, "pwritev", real)
    writer.close()
    assert not (tmp_path / "run" / "step_1" / "index.json").exists()
    with ilstore.open_run(tmp_path / "run") as run:
        assert run.steps() == [0] and run.incomplete_steps() == [1]
        assert_bits_equal(run.load(ok.key(())), ok.tensors[()])
