"""The ``hdf5`` backend: the conformance suite plus its own layout, compression and crash safety."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ilstore
from ilstore.keys import KINDS, TensorKey
from ilstore.store.hdf5 import Hdf5Writer, dataset_name, group_name, parse_dataset_name, parse_group_name
from ilstore.testing import StoreConformance, assert_bits_equal, conformance_tensors
from support import native_hdf5


class TestHdf5Store(StoreConformance):
    backend = "hdf5"

    def native_load(self, run_dir: Path, key: TensorKey, meta: dict[str, Any]) -> torch.Tensor:
        return native_hdf5(run_dir, key)  # bypass: h5py alone


class TestHdf5Gzip(StoreConformance):
    backend = "hdf5"
    options = {"compression": "gzip", "compression_opts": 1, "shuffle": True}

    def native_load(self, run_dir: Path, key: TensorKey, meta: dict[str, Any]) -> torch.Tensor:
        return native_hdf5(run_dir, key)  # bypass: h5py alone


def _capture(out_dir: Path, run_id: str = "run", **options: Any) -> Path:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(out_dir), "run_id": run_id, "backend": "hdf5",
                                                  "backend_options": options, "log_step_ids": [0, 1]}) as cap:
        model(torch.randn(4, 8))
        model(torch.randn(4, 8))
    assert cap.run_dir is not None
    return cap.run_dir


def test_file_layout(out_dir: Path) -> None:
    run_dir = _capture(out_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["ilstore.json", "stats.f64", "stats_keys.jsonl", "step_0.h5",
                                                         "step_1.h5", "steps.jsonl"]
    with h5py.File(run_dir / "step_0.h5", "r") as f:
        assert f.attrs["format"] == "ilstore-hdf5" and f.attrs["step"] == 0 and f.attrs["rank"] == 0
        assert f.attrs["format_version"] == 2
        assert json.loads(f.attrs["calls"]) == [["0", 0], ["1", 0]]
        assert list(f.keys()) == ["0#0", "1#0", "structures"]  # every side is listed there too
        g = f["0#0"]
        assert sorted(g.attrs) == ["inputs", "outputs"]  # module, call: the name's; step, rank: the root's
        assert sorted(g.keys()) == ["inputs:0", "outputs"]
        inputs = json.loads(g.attrs["inputs"])
        assert inputs["type"] == "tuple" and inputs["items"][0]["shape"] == [4, 8]
        assert g["outputs"].attrs["dtype"] == "torch.float32" and g["outputs"].dtype == np.float32
        # the ReLU's input is the Linear's output: an HDF5 hard link, not a second copy
        assert f["1#0"]["inputs:0"].id == g["outputs"].id


def test_attributes_have_h5py_types(out_dir: Path, tmp_path: Path) -> None:
    """The writer creates attributes through h5py's low-level API: the same HDF5 types and
    shapes as ``attrs[name] = value`` (a scalar variable-length UTF-8 string, a scalar int64)."""
    run_dir = _capture(out_dir)
    with h5py.File(tmp_path / "ref.h5", "w") as ref:
        ref.attrs["s"], ref.attrs["i"] = "text", 3
        ref_types = {"s": ref.attrs.get_id("s").get_type(), "i": ref.attrs.get_id("i").get_type()}
        with h5py.File(run_dir / "step_0.h5", "r") as f:
            g = f["0#0"]
            for obj, name, kind in ((g, "inputs", "s"), (f, "format", "s"), (f, "calls", "s"), (f, "step", "i"),
                                    (f, "rank", "i"), (f, "format_version", "i")):
                aid = obj.attrs.get_id(name)
                assert aid.get_type().equal(ref_types[kind]) and aid.shape == (), name
            assert g["outputs"].attrs.get_id("dtype").get_type().equal(ref_types["s"])
            assert isinstance(g.attrs["inputs"], str) and type(f.attrs["step"]) is np.int64


def test_bfloat16_and_float8_stored_as_raw_bits(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Identity())
    values = {k: v for k, v in conformance_tensors().items() if k in ("bfloat16", "float8_e4m3fn", "float8_e5m2")}
    config = {"output_dir": str(tmp_path), "run_id": "r", "backend": "hdf5"}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        model(values)
    with h5py.File(cap.run_dir / "step_0.h5", "r") as f:
        for name, tensor in values.items():
            ds = f["0#0"][f"inputs:0:{name}"]
            assert ds.attrs["encoding"] == "bits" and ds.attrs["dtype"] == str(tensor.dtype)
            assert ds.dtype == (np.uint16 if tensor.element_size() == 2 else np.uint8)
            assert_bits_equal(torch.from_numpy(ds[()]).view(tensor.dtype), tensor, name)


@pytest.mark.parametrize("options,filter_name", [({"compression": "gzip", "compression_opts": 4}, "gzip"),
                                                 ({"compression": "lzf"}, "lzf")])
def test_compression(out_dir: Path, options: dict[str, Any], filter_name: str) -> None:
    run_dir = _capture(out_dir, **options)
    with h5py.File(run_dir / "step_0.h5", "r") as f:
        assert f["0#0"]["outputs"].compression == filter_name
    plain = _capture(out_dir, "plain")
    with ilstore.open_run(run_dir) as a, ilstore.open_run(plain) as b:
        assert a.keys() == b.keys()
        for key in a.keys():
            assert a.load(key).shape == b.load(key).shape


def test_options_are_validated() -> None:
    ok = [{}, {"compression": "gzip"}, {"compression": "gzip", "compression_opts": 9}, {"compression": "lzf"},
          {"compression": None}, {"shuffle": True}, {"flush_interval": 0}, {"flush_interval": 0.5},
          {"structure_list": False}]
    for options in ok:
        assert Hdf5Writer.validate_options(options) == [], options
    bad = {"compression": "zstd", "compression_opts": 10, "shuffle": "yes", "level": 3, "flush_interval": -1,
           "structure_list": "no"}
    problems = Hdf5Writer.validate_options(bad)
    assert len(problems) == 6 and all(p.startswith("backend_options.") for p in problems)
    assert Hdf5Writer.validate_options({"compression": "lzf", "compression_opts": 4}) == [
        "backend_options.compression_opts: only valid with \"compression\": \"gzip\""]
    with pytest.raises(ilstore.ConfigError, match="backend_options.compression"):
        ilstore.load_config({"backend": "hdf5", "backend_options": {"compression": "zip"}})


@given(st.text(), st.integers(0, 10**6), st.sampled_from(KINDS), st.lists(st.text(), max_size=4))
def test_names_round_trip_without_slashes(module: str, call: int, kind: str, path: list[str]) -> None:
    g, d = group_name(module, call), dataset_name(kind, tuple(path))
    assert "/" not in g and "/" not in d and g not in (".", "..")
    assert parse_group_name(g) == (module, call)
    assert parse_dataset_name(d) == (kind, tuple(path))


_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys, torch, ilstore
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    cfg = {"output_dir": sys.argv[1], "run_id": "run", "backend": sys.argv[2], "log_step_ids": [],
           "async_writes": False,
           # hdf5: flush the open step file after every record (the default flushes at most every
           # 0.1 s), so the cut step holds every record written before the kill
           "backend_options": {"flush_interval": 0} if sys.argv[2] == "hdf5" else {}}
    cap = ilstore.capture(model, cfg)
    with torch.no_grad():
        model(torch.ones(1, 4))
        model(torch.ones(1, 4) * 2)
        def die(module, args, output):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no close, no flush by Python
        model[2].register_forward_hook(die)
        model(torch.ones(1, 4) * 3)
""")


@pytest.mark.parametrize("backend", ["hdf5", "safetensors", "pt"])
def test_killed_process_keeps_completed_steps(tmp_path: Path, backend: str) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path), backend], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    run_dir = tmp_path / "run"
    with ilstore.open_run(run_dir) as run:
        assert run.status == "running" and run.steps() == [0, 1] and run.incomplete_steps() == [2]
        for step in (0, 1):
            x = run.load(TensorKey(step, "0", 0, "inputs", ("0",)))
            assert torch.equal(x, torch.ones(1, 4) * (step + 1))
            assert run.load(TensorKey(step, "2", 0, "outputs")).shape == (1, 4)
    if backend == "hdf5":
        # the cut step's file holds every record flushed before the kill, readable with h5py
        with h5py.File(run_dir / "step_2.h5.partial", "r") as f:
            assert list(f.keys())[:2] == ["0#0", "1#0"]
            np.testing.assert_array_equal(f["0#0"]["inputs:0"][()], np.full((1, 4), 3.0, np.float32))


def test_corrupt_file_names_the_file(out_dir: Path) -> None:
    run_dir = _capture(out_dir)
    (run_dir / "step_1.h5").write_bytes(b"not hdf5 at all")
    with ilstore.open_run(run_dir) as run:
        assert run.load(run.keys(0)[0]).shape == (4, 8)
        with pytest.raises(ilstore.CorruptFileError, match=r"step_1\.h5.*cannot open the HDF5 file"):
            run.keys(1)


def test_structure_list_option(tmp_path: Path) -> None:
    """``backend_options.structure_list``: false writes version-1 step files (every side a group
    attribute, no /structures); the default writes version 2; a stats run reads the same either way."""
    runs = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        config = {"output_dir": str(tmp_path), "run_id": f"r{flag}", "backend": "hdf5", "mode": "stats",
                  "backend_options": {"structure_list": flag}}
        with torch.no_grad(), ilstore.capture(model, config) as cap:
            model(torch.ones(2, 8))
        assert cap.run_dir is not None
        runs[flag] = cap.run_dir
        with h5py.File(cap.run_dir / "step_0.h5", "r") as f:
            assert f.attrs["format_version"] == (2 if flag else 1)
            assert ("structures" in f) is flag and (list(f.keys()) == ["0#0", "1#0"]) is not flag
    with ilstore.open_run(runs[False]) as old, ilstore.open_run(runs[True]) as new:
        assert old.keys() == new.keys()
        assert [old.meta(k) for k in old.keys()] == [new.meta(k) for k in new.keys()]
