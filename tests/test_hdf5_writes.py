"""The ``hdf5`` writer's low-level path (issue 13): datasets created through h5py's low-level API,
their bytes ``pwrite``-n into the space HDF5 allocated. Each dataset must be what h5py's
``create_dataset(name, data=array)`` makes of the same array: the same HDF5 type, shape,
values and attributes, so any HDF5 reader sees no difference. (A failing raw write, a full disk:
tests/test_backend_failures.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

import ilstore
from ilstore.store import hdf5
from ilstore.store._encode import encode
from ilstore.testing import assert_bits_equal, conformance_tensors


def _values() -> dict[str, torch.Tensor]:
    values = dict(conformance_tensors())
    values["scalar"] = torch.tensor(2.5)
    values["empty"] = torch.zeros(0, 3)
    values["bool"] = torch.tensor([True, False, True])
    values["strided"] = torch.arange(24, dtype=torch.float32).reshape(4, 6)[:, ::2]
    values["big"] = torch.randn(300, 1000)  # 1.2 MB: several pages, one pwrite
    values["many_dims"] = torch.arange(2 ** 6, dtype=torch.int16).reshape((2,) * 6 + (1,) * 28)  # 34 dims
    return values


def _capture(out: Path, values: dict[str, torch.Tensor], **options: Any) -> Path:
    model = torch.nn.Sequential(torch.nn.Identity())
    config = {"output_dir": str(out), "run_id": "r", "backend": "hdf5", "backend_options": options}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        model(values)
    assert cap.run_dir is not None
    return cap.run_dir


def _attrs(obj: Any) -> dict[str, tuple[Any, Any]]:
    """Each attribute's value and HDF5 type."""
    return {name: (obj.attrs[name], obj.attrs.get_id(name).get_type()) for name in obj.attrs}


def test_datasets_equal_h5py_create_dataset(tmp_path: Path) -> None:
    values = _values()
    run_dir = _capture(tmp_path / "runs", values)
    with h5py.File(run_dir / "step_0.h5", "r") as f, h5py.File(tmp_path / "ref.h5", "w") as ref:
        group = f["0#0"]
        for name, tensor in values.items():
            ds = group[f"inputs:0:{name}"]
            data, encoding = encode(tensor.contiguous(), hdf5._NUMPY_DTYPES.__contains__)
            array = data.numpy()
            if array.ndim > 32:
                array = array.reshape(-1)
            expected = ref.create_dataset(name, data=array)
            expected.attrs["dtype"] = str(tensor.dtype)
            if encoding:
                expected.attrs["encoding"] = encoding
            if array.shape != tuple(data.shape):
                expected.attrs["shape"] = str(list(data.shape)).replace("'", "\"")
            assert ds.id.get_type().equal(expected.id.get_type()), name
            assert ds.shape == expected.shape and ds.dtype == expected.dtype, name
            assert ds.compression is None and ds.chunks is None, name  # contiguous, as h5py makes it
            got, want = np.asarray(ds[()]), np.asarray(expected[()])
            assert got.tobytes() == want.tobytes(), name
            got_attrs, want_attrs = _attrs(ds), _attrs(expected)
            assert sorted(got_attrs) == sorted(want_attrs), name
            for attr, (value, tid) in want_attrs.items():
                assert got_attrs[attr][0] == value and got_attrs[attr][1].equal(tid), (name, attr)
            if array.nbytes:  # the bytes lie where HDF5 says: a raw read of the file gives them
                with open(run_dir / "step_0.h5", "rb") as fh:
                    fh.seek(ds.id.get_offset())
                    assert fh.read(array.nbytes) == want.tobytes(), name
    with ilstore.open_run(run_dir) as run:
        for name, tensor in values.items():
            key = next(k for k in run.keys(0) if k.kind == "inputs" and k.path == ("0", name))
            assert_bits_equal(run.load(key), tensor.contiguous(), name)


def test_compressed_datasets_still_chunked(tmp_path: Path) -> None:
    values = {"a": torch.randn(64, 64), "scalar": torch.tensor(1.0), "empty": torch.zeros(0)}
    run_dir = _capture(tmp_path, values, compression="gzip", compression_opts=1, shuffle=True)
    with h5py.File(run_dir / "step_0.h5", "r") as f:
        ds = f["0#0"]["inputs:0:a"]
        assert ds.compression == "gzip" and ds.shuffle and ds.chunks is not None
        assert f["0#0"]["inputs:0:scalar"].compression is None and f["0#0"]["inputs:0:empty"].compression is None
        np.testing.assert_array_equal(ds[()], values["a"].numpy())
        assert ds.attrs["dtype"] == "torch.float32"


def test_links_groups_and_order(tmp_path: Path) -> None:
    """300 module calls: groups in call-start order for h5py (the root tracks creation order), a
    de-duplicated tensor is a hard link to the first dataset."""
    model = torch.nn.Sequential(*[torch.nn.Identity() for _ in range(300)])
    config = {"output_dir": str(tmp_path), "run_id": "r", "backend": "hdf5"}
    x = torch.randn(3, 3)
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        model(x)
    assert cap.run_dir is not None
    with h5py.File(cap.run_dir / "step_0.h5", "r") as f:
        assert list(f.keys()) == [f"{i}#0" for i in range(300)] + ["structures"]  # the sides, at step end
        first = f["0#0"]["inputs:0"]
        assert f["150#0"]["inputs:0"].id == first.id and f["299#0"]["outputs"].id == first.id
        np.testing.assert_array_equal(first[()], x.numpy())
