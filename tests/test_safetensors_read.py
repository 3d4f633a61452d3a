"""The safetensors reader reads tensors with pread into memory of its own (no mapping of the
shard stays resident in the compare process) and still reports damage by tensor name."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import ilstore
from ilstore.errors import CorruptFileError
from ilstore.store.safetensors import SafetensorsReader
from ilstore.testing import assert_bits_equal
from support import native_safetensors


def _capture(out_dir: Path) -> Path:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    config = {"output_dir": str(out_dir), "run_id": "run", "backend": "safetensors", "dedup": False}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        model(torch.randn(16, 64))
    assert cap.run_dir is not None
    return cap.run_dir


def _mapped_shards() -> list[str]:
    with open("/proc/self/maps") as fh:
        return [line for line in fh if ".safetensors" in line]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_loading_maps_no_shard_and_gives_the_stored_bits(out_dir: Path) -> None:
    run_dir = _capture(out_dir)
    with ilstore.open_run(run_dir) as run:
        assert isinstance(run, SafetensorsReader)
        keys = [k for k in run.keys(0) if run.meta(k).get("stored", True) is not False]
        loaded = {k: run.load(k) for k in keys}
        assert len(loaded) >= 4 and not _mapped_shards()
        for key, tensor in loaded.items():
            assert_bits_equal(tensor, native_safetensors(run_dir, key))


def test_threads_share_one_reader(out_dir: Path) -> None:
    run_dir = _capture(out_dir)
    with ilstore.open_run(run_dir) as run:
        keys = run.keys(0)
        alone = [run.load(k) for k in keys]
    with ilstore.open_run(run_dir) as run:
        results: dict[int, list[torch.Tensor]] = {}

        def work(i: int) -> None:
            results[i] = [run.load(k) for k in keys]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for got in results.values():
        for a, b in zip(got, alone, strict=True):
            assert_bits_equal(a, b)


def test_a_shard_cut_short_names_the_tensor(out_dir: Path) -> None:
    run_dir = _capture(out_dir)
    shard = sorted(run_dir.rglob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])  # the header is intact, the last tensor's bytes are not
    with ilstore.open_run(run_dir) as run:
        errors = []
        for key in run.keys(0):
            try:
                run.load(key)
            except CorruptFileError as exc:
                errors.append(str(exc))
    assert len(errors) == 1 and str(shard) in errors[0] and "cannot read tensor" in errors[0]


def test_a_garbage_header_is_a_corrupt_file(out_dir: Path) -> None:
    run_dir = _capture(out_dir)
    shard = sorted(run_dir.rglob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{["
    shard.write_bytes(bytes(data))
    with ilstore.open_run(run_dir) as run, pytest.raises(CorruptFileError, match="truncated or corrupt"):
        run.load(run.keys(0)[0])
