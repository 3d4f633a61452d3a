"""Raw reads of tensor bodies (issue 18): the ``pt`` reader's legacy-layout fast path and the
``hdf5`` reader's ``pread`` of contiguous datasets give exactly what ``torch.load`` / h5py give,
and every file they do not recognise goes to ``torch.load`` / h5py, with the same result or error."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

import ilstore
import ilstore.store.pt as pt
from ilstore.errors import CorruptFileError
from ilstore.store.registry import open_run
from ilstore.testing import conformance_tensors

LEGACY = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128, torch.int8,
          torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool]
SHAPES = [(), (0,), (0, 3), (3, 4), (2, 1, 3), (1, 256, 40)]


def _values(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g)).to(dtype) * 50
    return (torch.randn(shape, generator=g) * 50).to(dtype)


def _storage_bytes(tensor: torch.Tensor) -> bytes:
    """Every byte of the tensor's storage (``bytes(storage)`` goes element by element)."""
    return torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage()).numpy().tobytes()


def _same(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Same dtype, shape, strides, storage size, and bytes."""
    assert type(got) is torch.Tensor
    assert (got.dtype, got.shape, got.stride(), got.storage_offset()) == (ref.dtype, ref.shape, ref.stride(),
                                                                          ref.storage_offset())
    assert got.untyped_storage().nbytes() == ref.untyped_storage().nbytes()
    assert _storage_bytes(got) == _storage_bytes(ref)
    assert not got.requires_grad


def _load(path: Path, tensor: torch.Tensor) -> torch.Tensor:
    return pt.load_pt_file(path, str(tensor.dtype), list(tensor.shape))


# -- pt --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LEGACY, ids=str)
def test_pt_raw_read_is_torch_load_bit_for_bit(tmp_path: Path, fresh: list[Path], dtype: torch.dtype) -> None:
    """Three files per shape: torch.load reads the first (and its header is learned), the fast
    path the other two; every tensor is torch.load's exactly (0-d and empty ones too)."""
    for shape in SHAPES:
        paths = []
        for i in range(3):
            tensor = _values(dtype, shape, i)
            path = tmp_path / f"{len(shape)}_{'x'.join(map(str, shape))}_{i}.pt"
            pt._save_tensor(tensor, str(path))
            paths.append(path)
            got = _load(path, tensor)
            _same(got, torch.load(path, weights_only=True))
            _same(got, tensor)
        assert fresh[-1] == paths[0], f"{shape}: the fast path was not taken"
    assert len(fresh) == len(SHAPES)


def test_pt_views_and_non_contiguous_tensors_go_to_torch_load(tmp_path: Path, fresh: list[Path]) -> None:
    """torch.save writes a view with its whole storage and its strides: such files are never
    learned, and torch.load reads every one of them, strides and storage offset included."""
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    views = [base.t(), base[2:4], base[:, 3], base[1:, ::2]]
    for round_ in range(2):
        for i, view in enumerate(views):
            path = tmp_path / f"{round_}_{i}.pt"
            pt._save_tensor(view, str(path))
            _same(_load(path, view), torch.load(path, weights_only=True))
    assert len(fresh) == 2 * len(views) and pt._KNOWN == {}


def test_pt_metadata_that_disagrees_with_the_file_is_not_trusted(tmp_path: Path, fresh: list[Path]) -> None:
    """The fast path never reinterprets bytes as the metadata's dtype or shape: a file whose
    body has the bytes of another dtype/shape goes to torch.load (and the reader's check)."""
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    for i in range(2):
        pt._save_tensor(tensor, str(tmp_path / f"{i}.pt"))
    _load(tmp_path / "0.pt", tensor)  # learns the header
    for dtype, shape in (("torch.int32", [3, 4]), ("torch.float32", [4, 3]), ("torch.float32", [12]),
                         ("torch.float64", [6]), ("torch.float16", [3, 8])):
        got = pt.load_pt_file(tmp_path / "1.pt", dtype, shape)
        _same(got, tensor)
    assert len(fresh) == 6


def _damaged(data: bytes, cut: int) -> dict[str, bytes]:
    """Damaged copies of a legacy file whose header ends at ``cut``."""
    count = cut  # the element count's 8 bytes start here
    return {
        "empty": b"",
        "truncated by one byte": data[:-1],
        "truncated in the body": data[:count + 8 + (len(data) - count - 8) // 2],
        "truncated in the count": data[:count + 4],
        "truncated in the header": data[:cut // 2],
        "one byte too many": data + b"\0",
        "count too large": data[:count] + (int.from_bytes(data[count:count + 8], "little") + 1).to_bytes(8, "little")
        + data[count + 8:],
        "magic number flipped": data[:3] + bytes([data[3] ^ 0xFF]) + data[4:],
        "storage key changed": data.replace(b"cpu", b"cpv"),
        "not a pickle": b"garbage" * 40 + data[280:],
        "zeros": bytes(len(data)),
    }


def _outcome(fn: Callable[[], torch.Tensor]) -> tuple[str, Any]:
    try:
        tensor = fn()
    except CorruptFileError as exc:
        return "error", str(exc)
    return "tensor", (tensor.dtype, tuple(tensor.shape), tensor.stride(), _storage_bytes(tensor))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.complex64], ids=str)
def test_pt_damaged_files_behave_as_with_torch_load(tmp_path: Path, fresh: list[Path], dtype: torch.dtype) -> None:
    """With the header learned, each damaged copy of a file gives what torch.load alone gives:
    the same tensor, or the same error naming the file."""
    tensor = _values(dtype, (64, 8), 0)
    good = tmp_path / "good.pt"
    pt._save_tensor(tensor, str(good))
    _load(good, tensor)
    data = good.read_bytes()
    assert pt._KNOWN, "the header was not learned"
    cut = len(data) - tensor.numel() * tensor.element_size() - 8
    for name, damaged in _damaged(data, cut).items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(damaged)
        expected = _outcome(lambda p=path: pt.load_pt_file(p))  # no metadata: torch.load, as before
        assert _outcome(lambda p=path: _load(p, tensor)) == expected, name
    missing = tmp_path / "missing.pt"
    assert _outcome(lambda: _load(missing, tensor)) == ("error", f"{missing}: tensor file is missing")


def test_pt_reader_reads_a_run_with_few_torch_loads(tmp_path: Path, fresh: list[Path]) -> None:
    """Through the reader: tensors of one signature in a captured run cost one torch.load, and
    every tensor (non-contiguous originals included: capture snapshots them) is torch.load's."""

    class Flip(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.t()  # a non-contiguous output

    class Many(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(12))
            self.flip = Flip()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return self.flip(x)

    model = Many()
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "r",
                                                 "log_inputs": False}) as cap:
        model(torch.randn(4, 16))
    assert cap.run_dir is not None
    with open_run(cap.run_dir) as run:
        keys = list(run.keys())
        for key in keys:
            node = run.meta(key)
            _same(run.load(key), torch.load(cap.run_dir / run._body_path(key, node), weights_only=True))
    assert len(keys) == 13 and len(fresh) == 2  # one per (dtype, shape): [4, 16] and the transposed [16, 4]


# -- hdf5 ------------------------------------------------------------------------------------------
def _hdf5_run(tmp_path: Path, tensors: dict[str, torch.Tensor], **options: Any) -> Path:
    class Emit(torch.nn.Module):
        def forward(self) -> dict[str, torch.Tensor]:
            return tensors

    class Root(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emit = Emit()

        def forward(self) -> None:
            self.emit()

    model = Root()
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "h", "backend": "hdf5",
                                                 "backend_options": options, "log_inputs": False,
                                                 "dedup": False}) as cap:
        model()
    assert cap.run_dir is not None and cap.error is None
    return cap.run_dir


def _load_all(run_dir: Path, raw: bool) -> dict[str, tuple[str, Any]]:
    from ilstore.store import hdf5

    with open_run(run_dir) as run:
        assert isinstance(run, hdf5.Hdf5Reader)
        if not raw:
            run._file(0)
            run._raw_fds.clear()  # what the reader did before raw reads: h5py reads every dataset
        return {str(k): _outcome(lambda k=k: run.load(k)) for k in run.keys()}


def _count_raw(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    from ilstore.store import hdf5

    used: list[bool] = []
    real = hdf5.Hdf5Reader._read_contiguous

    def counting(self: Any, step: int, ds: Any) -> torch.Tensor | None:
        out = real(self, step, ds)
        used.append(out is not None)
        return out

    monkeypatch.setattr(hdf5.Hdf5Reader, "_read_contiguous", counting)
    return used


def test_hdf5_raw_read_is_h5py_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every dtype (bfloat16 and float8 stored as bits, bool, complex), 0-d, empty and large
    tensors, read raw and through h5py, come back identical, and the raw path was used for
    every non-empty one. The run is written as version-2 files were before 2026-12-02 (no list of where each
    body lies: the reader finds each through HDF5); a run with that list reads the same."""
    from ilstore.store import hdf5

    tensors = conformance_tensors()
    tensors["big"] = torch.randn(300, 1000)
    tensors["noncontiguous"] = torch.randn(40, 30).t()
    listed_dir = _hdf5_run(tmp_path / "listed", tensors)
    with monkeypatch.context() as patch:
        patch.setattr(hdf5.Hdf5Writer, "_list_bodied", False)
        run_dir = _hdf5_run(tmp_path, tensors)
    used = _count_raw(monkeypatch)
    raw = _load_all(run_dir, raw=True)
    assert sum(used) == sum(1 for t in tensors.values() if t.numel()) and len(used) == len(tensors)
    assert raw == _load_all(run_dir, raw=False)
    used.clear()
    assert _load_all(listed_dir, raw=True) == raw and not used  # every load found in the list
    with open_run(run_dir) as run:
        for key in run.keys():
            _same(run.load(key), tensors[key.path[0]].contiguous())


def test_hdf5_compressed_datasets_go_to_h5py(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = {"a": torch.randn(50, 20), "b": torch.arange(100, dtype=torch.int64)}
    run_dir = _hdf5_run(tmp_path, tensors, compression="gzip")
    used = _count_raw(monkeypatch)
    assert _load_all(run_dir, raw=True) == _load_all(run_dir, raw=False)
    assert len(used) == 4 and not any(used)


def test_hdf5_other_layouts_are_not_read_raw(tmp_path: Path) -> None:
    """Chunked, big-endian, compact, empty and unallocated datasets: h5py's business."""
    from ilstore.store import hdf5

    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("chunked", data=np.arange(50, dtype="<f4"), chunks=(10,))
        f.create_dataset("big_endian", data=np.arange(5, dtype=">f4"))
        f.create_dataset("empty", data=np.zeros((0, 3), dtype="<f4"))
        f.create_dataset("unwritten", shape=(10,), dtype="<f4")
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.COMPACT)
        space = h5py.h5s.create_simple((4,))
        h5py.h5d.create(f.id, b"compact", h5py.h5t.IEEE_F32LE, space, dcpl=dcpl).write(
            h5py.h5s.ALL, h5py.h5s.ALL, np.arange(4, dtype="<f4"))
        f.create_dataset("plain", data=np.arange(6, dtype="<f4"))
    reader = hdf5.Hdf5Reader.__new__(hdf5.Hdf5Reader)
    reader._raw_fds = {0: os.open(path, os.O_RDONLY)}
    try:
        with h5py.File(path, "r") as f:
            for name in ("chunked", "big_endian", "empty", "unwritten", "compact"):
                assert reader._read_contiguous(0, f[name]) is None, name
            plain = reader._read_contiguous(0, f["plain"])
            assert plain is not None and torch.equal(plain, torch.arange(6, dtype=torch.float32))
    finally:
        os.close(reader._raw_fds[0])


def test_hdf5_damaged_files_behave_as_with_h5py(tmp_path: Path) -> None:
    """A step file cut short (inside the data of the last tensors) or with bytes overwritten in
    a tensor's data: raw reads give the same tensors and the same errors as h5py alone."""
    tensors = {f"t{i}": torch.randn(64, 64) * i for i in range(4)}
    run_dir = _hdf5_run(tmp_path / "src", tensors)
    step = run_dir / "step_0.h5"
    size = step.stat().st_size
    for name, change in (("cut in the data", lambda b: b[:size - 64 * 64 * 4 - 1000]),
                         ("cut by one byte", lambda b: b[:-1]),
                         ("data overwritten", lambda b: b[:size // 2] + b"\xff" * 512 + b[size // 2 + 512:])):
        copy = tmp_path / name.replace(" ", "_")
        shutil.copytree(run_dir, copy)
        (copy / "step_0.h5").write_bytes(change(step.read_bytes()))
        try:
            raw = _load_all(copy, raw=True)
        except CorruptFileError as exc:
            raw = {"open": ("error", str(exc))}
        try:
            plain = _load_all(copy, raw=False)
        except CorruptFileError as exc:
            plain = {"open": ("error", str(exc))}
        assert raw == plain, name


@pytest.mark.parametrize("field", [b"abcdefgh", b"0000644\0", b"\x80abc\0\0\0\0", b"\xff" * 8, b"  12  \0x",
                                   b"1_2\0\0\0\0\0", b"\0" * 8, b"9\0aaaaaa", b"\xe9\0\0\0\0\0\0\0", b"'cpu'q\x04"])
def test_pt_tar_check_parses_the_checksum_field_as_tarfile_does(field: bytes) -> None:
    """A header whose tar checksum field parses could make torch.load try the tar format: such a
    header is never learned (none that torch.save writes is one)."""
    import tarfile

    try:
        tarfile.nti(field)
        parses = True
    except tarfile.HeaderError:
        parses = False
    assert pt._maybe_tar(b"x" * 148 + field + b"y" * 200) is parses
