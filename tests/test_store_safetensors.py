"""The ``safetensors`` backend: the conformance suite plus its own layout, sharding and laziness."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import ilstore
from ilstore.keys import CallKey, TensorKey
from ilstore.manifest import new_manifest
from ilstore.records import TensorPolicy, build_record, finalize_stats
from ilstore.store.base import StepInfo
from ilstore.store.safetensors import SafetensorsReader, SafetensorsWriter
from ilstore.testing import StoreConformance, assert_bits_equal
from support import native_safetensors


class TestSafetensorsStore(StoreConformance):
    backend = "safetensors"

    def native_load(self, run_dir: Path, key: TensorKey, meta: dict[str, Any]) -> torch.Tensor:
        return native_safetensors(run_dir, key)  # bypass: json + safe_open


class TestSmallShards(StoreConformance):
    """The whole suite again with shards so small that most tensors get their own."""

    backend = "safetensors"
    options = {"shard_size_mb": 0.002}

    def native_load(self, run_dir: Path, key: TensorKey, meta: dict[str, Any]) -> torch.Tensor:
        return native_safetensors(run_dir, key)  # bypass: json + safe_open


def _capture(out_dir: Path, shard_mb: float, run_id: str = "run") -> Path:
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
    x = torch.randn(64, 256)
    config = {"output_dir": str(out_dir), "run_id": run_id, "backend": "safetensors",
              "backend_options": {"shard_size_mb": shard_mb}}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        model(x)
    assert cap.run_dir is not None
    return cap.run_dir


def test_layout_index_and_shard_sizes(out_dir: Path) -> None:
    run_dir = _capture(out_dir, 0.1)  # each 64x256 float32 tensor is 64 KiB: one or two per shard
    step = run_dir / "step_0"
    names = sorted(os.listdir(step))
    shards = [n for n in names if n != "index.json"]
    assert "index.json" in names and all(n.startswith("shard_") and n.endswith(".safetensors") for n in shards)
    index = json.loads((step / "index.json").read_text())
    assert index["format"] == "ilstore-safetensors" and index["format_version"] == 1 and index["step"] == 0
    assert index["shards"] == shards and len(shards) >= 3
    assert index["calls"] == [["0", 0], ["1", 0], ["2", 0]] and index["call_ends"] == index["calls"]
    assert [(r["module"], r["kind"]) for r in index["records"]] == [
        ("0", "inputs"), ("0", "outputs"), ("1", "inputs"), ("1", "outputs"), ("2", "inputs"), ("2", "outputs")]
    assert index["records"][0]["structure"]["items"][0]["dtype"] == "torch.float32"
    for shard in index["shards"]:
        data_bytes = 0
        with safe_open(str(step / shard), framework="pt") as f:
            assert f.metadata()["ilstore"] == "ilstore-safetensors"
            for name in f.keys():
                assert index["tensors"][name]["shard"] == shard and TensorKey.parse(name).step == 0
                t = f.get_tensor(name)
                data_bytes += t.numel() * t.element_size()
        assert data_bytes <= 0.1 * 2**20
    # every stored, non-deduplicated tensor is in exactly one shard
    with ilstore.open_run(run_dir) as run:
        stored = {str(k) for k in run.keys() if run.meta(k)["stored"] and "same_as" not in run.meta(k)}
    assert stored == set(index["tensors"])


def test_no_pickle_anywhere(out_dir: Path) -> None:
    run_dir = _capture(out_dir, 1024)
    for dirpath, _dirs, files in os.walk(run_dir):
        for name in files:
            assert not name.endswith((".pt", ".pkl", ".bin")), name
            assert b"\x80\x02" not in (Path(dirpath) / name).read_bytes()[:2]  # no pickle protocol header


def test_one_tensor_larger_than_a_shard_gets_its_own(tmp_path: Path) -> None:
    writer = SafetensorsWriter(tmp_path / "run", {"shard_size_mb": 0.001})
    writer.open(new_manifest("safetensors", {}))
    big, small = torch.arange(4096.0), torch.arange(3.0)
    rec = build_record(CallKey(0, 0, "m", 0), "outputs", (small, big, small + 1), TensorPolicy(pin_memory=False))
    finalize_stats(rec)
    writer.write(rec)
    writer.end_step(StepInfo(0, [rec.call], [rec.call]))
    writer.close()
    index = json.loads((tmp_path / "run" / "step_0" / "index.json").read_text())
    assert [index["tensors"][str(rec.key((p,)))]["shard"] for p in "012"] == [
        "shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    with ilstore.open_run(tmp_path / "run") as run:
        assert_bits_equal(run.load(rec.key(("1",))), big)


def test_reader_opens_shards_lazily(out_dir: Path) -> None:
    run_dir = _capture(out_dir, 0.1)
    with ilstore.open_run(run_dir) as run:
        assert isinstance(run, SafetensorsReader)
        keys = run.keys(0)
        assert not run._handles  # listing keys and metadata opens no shard
        run.meta(keys[-1])
        assert not run._handles
        run.load(keys[-1])
        assert len(run._handles) == 1
        run.load(keys[-1])
        assert len(run._handles) == 1  # the handle (and its parsed header) is reused


def test_options_are_validated() -> None:
    assert SafetensorsWriter.validate_options({"shard_size_mb": 64}) == []
    for bad in (0, -1, "big", True, float("inf")):
        problems = SafetensorsWriter.validate_options({"shard_size_mb": bad})
        assert len(problems) == 1 and problems[0].startswith("backend_options.shard_size_mb"), bad
    with pytest.raises(ilstore.ConfigError, match="shard_size_mb"):
        ilstore.load_config({"backend": "safetensors", "backend_options": {"shard_size_mb": 0}})
    with pytest.raises(ilstore.BackendError, match="shard_size_mb"):
        SafetensorsWriter("/nonexistent", {"shard_size_mb": "x"})


def test_corrupt_index_and_missing_shard_name_the_file(out_dir: Path) -> None:
    run_dir = _capture(out_dir, 0.1, "a")
    index = run_dir / "step_0" / "index.json"
    index.write_text('{"format": "ilstore-safetensors", "records": 3}')
    with ilstore.open_run(run_dir) as run, pytest.raises(ilstore.CorruptFileError, match="index.json.*records"):
        run.keys(0)
    run_dir = _capture(out_dir, 0.1, "b")
    (run_dir / "step_0" / "shard_00000.safetensors").unlink()
    with ilstore.open_run(run_dir) as run, pytest.raises(ilstore.CorruptFileError, match="shard_00000.*missing"):
        run.load(run.keys(0)[0])
    run_dir = _capture(out_dir, 0.1, "c")
    doc = json.loads((run_dir / "step_0" / "index.json").read_text())
    first = next(iter(doc["tensors"]))
    doc["tensors"][first]["shard"] = "../../escape.safetensors"
    (run_dir / "step_0" / "index.json").write_text(json.dumps(doc))
    with ilstore.open_run(run_dir) as run, pytest.raises(ilstore.CorruptFileError, match="plain file name"):
        run.keys(0)


def test_cut_step_is_not_listed_without_a_manifest(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    cap = ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "r", "backend": "safetensors",
                                  "log_step_ids": [], "async_writes": False})
    try:
        model(torch.randn(1, 2))
        cap._begin_step()  # a step that starts and never ends, as in a killed process
        cap._pre("0", None, model[0], (torch.randn(1, 2),), {})
        (cap.run_dir / "ilstore.json").unlink()
        with ilstore.open_run(cap.run_dir) as run:
            assert run.name == "safetensors" and run.steps() == [0] and run.incomplete_steps() == [1]
    finally:  # this process lives on: the run's open files (stats.f64...) are closed here
        cap.close("failed")


def test_dtypes_stored_as_is_are_the_ones_safetensors_reads_back() -> None:
    from ilstore.store.safetensors import _supported

    stored_as_is = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn,
                    torch.float8_e5m2}
    for dtype in stored_as_is:
        assert _supported(dtype), dtype
    for dtype in (torch.complex128, torch.complex32):  # encoded ("real" / "bits"), the true dtype in the index
        assert not _supported(dtype), dtype
    if hasattr(torch, "float8_e8m0fnu"):  # safetensors 0.8 writes it but cannot read it back
        assert not _supported(torch.float8_e8m0fnu)
