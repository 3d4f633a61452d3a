"""The hdf5 reader's low-level attribute and layout reads (issue 13/18, the cost of many small
pairs): ``_vlen_text``, ``_group_texts``, ``_dataset_attrs`` and ``_raw_layout`` tell attributes
and datasets apart by their HDF5 types, not the numpy dtypes h5py builds, and must still give
exactly what h5py's high-level API gives (or None, where the caller then reads through h5py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from h5py import h5a

from ilstore.store import hdf5


def _attr_values() -> dict[str, Any]:
    return {
        "utf8": "h\u00e9llo {\"a\": 1}",
        "ascii": np.array(b"plain", dtype=h5py.string_dtype("ascii")),
        "fixed": np.bytes_(b"fixed length"),
        "int": 3,
        "float": 2.5,
        "strings": ["x", "y"],
        "empty": h5py.Empty("f4"),
        "not_utf8": np.array(b"\xff\xfe", dtype=h5py.string_dtype("ascii")),
    }


@pytest.fixture()
def step_file(tmp_path: Path) -> Path:
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        group = f.create_group("g")
        for name, value in _attr_values().items():
            group.attrs[name] = value
        texts = f.create_group("texts")
        texts.attrs["inputs"] = "{\"type\": \"tensor\"}"
        texts.attrs["outputs"] = "[1, 2]"
        arrays = {"f32": np.arange(6, dtype="<f4").reshape(2, 3), "big_endian": np.arange(6, dtype=">f4"),
                  "c64": np.arange(3, dtype="c8"), "bool": np.array([True, False]), "scalar": np.array(3.0),
                  "empty": np.zeros((0, 2)), "u16": np.arange(3, dtype="<u2"), "i8": np.arange(5, dtype="i1")}
        for name, array in arrays.items():
            ds = f.create_dataset(name, data=array)
            ds.attrs["dtype"] = "torch.float32"
        f["f32"].attrs["encoding"] = "bits"  # two attributes: read through h5py
        f.create_dataset("chunked", data=np.arange(100, dtype="f4"), chunks=(10,)).attrs["dtype"] = "x"
        f.create_dataset("gzip", data=np.arange(100, dtype="f4"), compression="gzip")
        f.create_dataset("unwritten", shape=(10,), dtype="f4")
        f.create_dataset("fixed_dtype", data=np.arange(3, dtype="f4")).attrs["dtype"] = np.bytes_(b"torch.float32")
    return path


def test_vlen_text_is_what_h5py_reads(step_file: Path) -> None:
    with h5py.File(step_file, "r") as f:
        group = f["g"]
        seen = {}
        for index in range(h5a.get_num_attrs(group.id)):
            attr = h5a.open(group.id, index=index)
            name = attr.name.decode()
            seen[name] = hdf5._vlen_text(attr)
    assert seen == {"utf8": "h\u00e9llo {\"a\": 1}", "ascii": "plain", "fixed": None, "int": None, "float": None,
                    "strings": None, "empty": None, "not_utf8": b"\xff\xfe".decode("utf-8", "surrogateescape")}
    with h5py.File(step_file, "r") as f:
        assert f["g"].attrs["utf8"] == seen["utf8"] and f["g"].attrs["ascii"] == seen["ascii"]


def test_group_texts(step_file: Path) -> None:
    with h5py.File(step_file, "r") as f:
        assert hdf5._group_texts(f["texts"].id) == {"inputs": "{\"type\": \"tensor\"}", "outputs": "[1, 2]"}
        assert hdf5._group_texts(f["g"].id) is None  # not all scalar variable-length strings


def test_dataset_attrs_and_raw_layout(step_file: Path) -> None:
    with h5py.File(step_file, "r") as f:
        for name, ds in f.items():
            if not isinstance(ds, h5py.Dataset):
                continue
            attrs = hdf5._dataset_attrs(ds.id)
            assert attrs == dict(ds.attrs), name
            assert all(type(attrs[k]) is type(v) for k, v in ds.attrs.items()), name
            layout = hdf5._raw_layout(ds.id)
            raw = name in ("f32", "c64", "bool", "scalar", "u16", "i8", "fixed_dtype")
            assert (layout is not None) == raw, name
            if layout is not None:
                offset, nbytes, tdtype, shape = layout
                values = ds[()]
                assert shape == values.shape and nbytes == values.nbytes and offset == ds.id.get_offset()
                assert tdtype == torch.from_numpy(np.asarray(values)).dtype, name
                with open(step_file, "rb") as fh:
                    fh.seek(offset)
                    assert fh.read(nbytes) == values.tobytes(), name
