"""The hdf5 writer's per-dataset work (issue 13, the writer's CPU cost): a body's bytes are
``pwrite``-n straight from the array's buffer (no flattened byte view made first), and the
structures' JSON encoder does not look for circular references. Every dataset must still hold
exactly its tensor's values whatever the writer is handed (slices inside a larger storage,
non-contiguous views, tensors that require grad, conjugate and negative views, 0-d and empty
tensors, types numpy lacks), and a structure that is not a tree fails at ``write`` with the
usual error."""

from __future__ import annotations

import warnings
from pathlib import Path

import h5py
import pytest
import torch

from ilstore.errors import StoreError
from ilstore.keys import CallKey
from ilstore.records import Record, TensorPolicy, build_record, finalize_stats
from ilstore.store import hdf5
from ilstore.store.base import StepInfo
from ilstore.store.registry import open_run
from ilstore.testing import assert_bits_equal
from tests.test_writer_cost_hdf5_attrs import _open


def _values() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(64, 40, generator=g)
    z = torch.randn(24, generator=g, dtype=torch.complex64)
    out = [
        ("f32", torch.randn(7, 9, generator=g)),
        ("slice", base[5:9]),  # contiguous, starts 200 floats into its storage
        ("columns", base[:, 3:7]),  # not contiguous
        ("transposed", base.t()),
        ("scalar", torch.tensor(2.5, dtype=torch.float64)),
        ("empty", torch.empty(0, 3)),
        ("grad", torch.randn(6, generator=g, requires_grad=True)),
        ("conj", z.conj()),
        ("neg", z.conj().imag),
        ("bool", torch.rand(13, generator=g) > 0.5),
        ("i8", torch.arange(-5, 6, dtype=torch.int8)),
        ("f16", torch.randn(11, generator=g).half()),
        ("bf16_slice", base.to(torch.bfloat16)[30:33, ::2]),
        ("f8", torch.randn(16, generator=g).to(torch.float8_e4m3fn)),
        ("size_one_dims", torch.randn(1, 5, 1, generator=g).expand(1, 5, 1)),
    ]
    with warnings.catch_warnings():  # torch's "ComplexHalf support is experimental"
        warnings.simplefilter("ignore")
        out.append(("c32", torch.randn(10, generator=g, dtype=torch.complex64).to(torch.complex32)))
    return out


def _record(name: str, value: torch.Tensor) -> Record:
    """A record of ``value`` whose body is ``value`` itself (the view, not a copy), as a writer
    lent the model's tensors or handed another library's may get it."""
    rec = build_record(CallKey(0, 0, name, 0), "outputs", value.detach(), TensorPolicy(pin_memory=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finalize_stats(rec)
    assert list(rec.tensors) == [()]
    rec.tensors[()] = value
    return rec


def _resolved(t: torch.Tensor) -> torch.Tensor:
    return t.detach().resolve_conj().resolve_neg().contiguous()


def test_every_dataset_holds_its_tensor(tmp_path: Path) -> None:
    run = tmp_path / "run"
    writer = _open(run)
    values = _values()
    records = [_record(name, value) for name, value in values]
    for rec in records:
        writer.write(rec)
    calls = [rec.call for rec in records]
    writer.end_step(StepInfo(0, calls, calls))
    writer.close()
    with h5py.File(run / "step_0.h5", "r") as f:
        for name, value in values:
            ds = f[hdf5.group_name(name, 0)]["outputs"]
            assert ds.attrs["dtype"] == str(value.dtype), name
            assert tuple(ds.shape) == tuple(value.shape) or value.dtype == torch.complex32, name
    with open_run(run) as reader:
        for (name, value), rec in zip(values, records, strict=True):
            assert_bits_equal(reader.load(rec.call.tensor("outputs")), _resolved(value), name)


def test_a_circular_structure_fails_at_write_and_the_writer_goes_on(tmp_path: Path) -> None:
    writer = _open(tmp_path / "run")
    record = _record("m", torch.ones(3))
    record.structure["loop"] = record.structure
    with pytest.raises(StoreError, match="r0/s0/m/0/outputs: structure is not valid JSON"):
        writer.write(record)
    good = _record("m", torch.ones(3))
    writer.write(good)
    writer.end_step(StepInfo(0, [good.call], [good.call]))
    writer.close()
    with open_run(tmp_path / "run") as reader:
        assert_bits_equal(reader.load(good.call.tensor("outputs")), torch.ones(3))
        assert "loop" not in reader.structure(good.call, "outputs")
