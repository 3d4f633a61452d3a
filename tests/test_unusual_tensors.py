"""Tensors that are not plain dense bodies (issue 15): nested tensors and unknown subclasses become metadata with a
reason and capture goes on; sparse and quantized tensors are stored as dense parts and rebuilt bit-exactly."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ilstore
from ilstore.convert import convert
from ilstore_compare import compare

BACKENDS = ["pt", "safetensors", "hdf5"]

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),  # deprecated, still what users have
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning"),
    pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled:UserWarning"),
]


class Passes(nn.Module):
    def forward(self, x: torch.Tensor, extra: Any) -> tuple[torch.Tensor, Any]:
        return x * 2, extra


class Root(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.m = Passes()

    def forward(self, x: torch.Tensor, extra: Any) -> tuple[torch.Tensor, Any]:
        return self.m(x, extra)


class Odd(torch.Tensor):
    """A tensor subclass ilstore does not know."""


def _nested(layout: torch.layout) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the strided layout warns that it is a prototype
        return torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(4, 3)], layout=layout)


def _capture(out: Path, run_id: str, extra: Any, backend: str) -> Path:
    model = Root()
    with ilstore.capture(model, {"output_dir": str(out), "run_id": run_id, "backend": backend}) as cap:
        y, e = model(torch.arange(3.0), extra)
    assert cap.error is None
    assert e is extra and torch.equal(y, torch.arange(3.0) * 2)
    assert cap.run_dir is not None
    return cap.run_dir


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["nested strided", "nested jagged", "subclass"])
def test_an_unstorable_tensor_is_metadata_with_a_reason_and_capture_goes_on(tmp_path: Path, backend: str,
                                                                            kind: str) -> None:
    extra = {"nested strided": lambda: _nested(torch.strided), "nested jagged": lambda: _nested(torch.jagged),
             "subclass": lambda: torch.ones(2).as_subclass(Odd)}[kind]()
    run = _capture(tmp_path, "a", extra, backend)
    key = ilstore.TensorKey(0, "m", 0, "inputs", ("1",))
    with ilstore.open_run(run) as reader:
        assert reader.status == "complete"
        node = reader.meta(key)
        assert node["stored"] is False
        if kind == "subclass":
            assert node["reason"] == "tensor subclass Odd is not supported" and node["shape"] == [2]
        else:
            assert node["reason"] == "nested tensors (torch.nested) are not supported"
            assert node["shape"] is None and node["dtype"] == "torch.float32"
        if kind == "nested jagged":
            assert node["size"].startswith("(2, j") and node["size"].endswith(", 3)")
        assert torch.equal(reader.load(ilstore.TensorKey(0, "m", 0, "inputs", ("0",))), torch.arange(3.0))
        with pytest.raises(KeyError, match="body not stored"):
            reader.load(key)
    # convert keeps the metadata; compare fails closed on it and compares everything else
    converted = tmp_path / "converted"
    convert(run, converted, to="pt" if backend != "pt" else "hdf5")
    with ilstore.open_run(converted) as reader:
        assert reader.meta(key)["reason"] == node["reason"]
    other = _capture(tmp_path, "b", extra, backend)
    result = compare(run, other)
    by_key = {str(t.key): t for t in result.tensors}
    assert by_key[str(key)].status == "not_compared" and node["reason"] in (by_key[str(key)].note or "")
    assert by_key["r0/s0/m/0/inputs/0"].status == "match" and by_key["r0/s0/m/0/outputs/0"].status == "match"
    assert result.exit_code == 1


# -- sparse and quantized tensors: stored as containers of dense parts, rebuilt bit-exactly ------------------------

PARTS = {"coo": ("indices", "values"), "coo_hybrid": ("indices", "values"),
         "csr": ("crow_indices", "col_indices", "values"), "csc": ("ccol_indices", "row_indices", "values"),
         "bsr": ("crow_indices", "col_indices", "values"), "bsc": ("ccol_indices", "row_indices", "values"),
         "q_tensor": ("int_repr", "scale", "zero_point"), "q_channel": ("int_repr", "scales", "zero_points"),
         "q_float_qparams": ("int_repr", "scales", "zero_points")}


def _examples(shift: float = 0.0) -> dict[str, torch.Tensor]:
    """One tensor of each encoding; ``shift`` is added to every float before it is encoded."""
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(4, 6, generator=g, dtype=torch.float64) + shift
    dense[dense.abs() < 0.5] = 0
    # uncoalesced: index (0, 1) twice; -0.0 must come back as -0.0
    coo = torch.sparse_coo_tensor(torch.tensor([[0, 0, 1, 3], [1, 1, 2, 0]]),
                                  torch.tensor([1.5 + shift, -0.0, 3.25, 7.0]), (4, 3))
    hybrid = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), (torch.randn(2, 3, generator=g) + shift).bfloat16(),
                                     (3, 3)).coalesce()
    x = torch.randn(3, 4, generator=g) + shift
    return {
        "coo": coo, "coo_hybrid": hybrid,
        "csr": dense.to_sparse_csr(), "csc": dense.float().to_sparse_csc(),
        "bsr": dense.to_sparse_bsr((2, 3)), "bsc": dense.half().to_sparse_bsc((2, 2)),
        "q_tensor": torch.quantize_per_tensor(x, 0.05, 3, torch.qint8),
        "q_channel": torch.quantize_per_channel(x, torch.tensor([0.1, 0.02, 0.3, 0.04], dtype=torch.float64),
                                                torch.tensor([0, 1, 2, 3]), 1, torch.quint8),
        "q_float_qparams": torch.quantize_per_channel(x, torch.tensor([0.1, 0.2, 0.3]),
                                                      torch.tensor([0.5, 1.0, -2.0]), 0, torch.quint8),
    }


def _bits(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous().reshape(-1)
    return x.view(torch.uint8) if x.is_floating_point() else x


def _representation(t: torch.Tensor) -> list[Any]:
    """Everything that makes up a sparse or quantized tensor, with floats as their bits."""
    if t.layout == torch.sparse_coo:
        parts: list[Any] = [t.is_coalesced(), t._indices(), t._values()]
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = [t.crow_indices(), t.col_indices(), t.values()]
    elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
        parts = [t.ccol_indices(), t.row_indices(), t.values()]
    elif t.qscheme() == torch.per_tensor_affine:
        parts = [t.int_repr(), t.q_scale(), t.q_zero_point()]
    else:
        parts = [t.int_repr(), t.q_per_channel_scales(), t.q_per_channel_zero_points(), t.q_per_channel_axis()]
    return [t.layout, t.dtype, list(t.shape)] + [_bits(p).tolist() if isinstance(p, torch.Tensor) else p
                                                 for p in parts] + [str(t.qscheme()) if t.is_quantized else None]


def _assert_holds_examples(run: Path, examples: dict[str, torch.Tensor]) -> None:
    with ilstore.open_run(run) as reader:
        keys = set(reader.keys(0))
        for kind, path in (("inputs", ("1",)), ("outputs", ("1",))):
            call = ilstore.TensorKey(0, "m", 0, kind, ()).call_key
            structure = reader.structure(call, kind)
            for name, original in examples.items():
                key = ilstore.TensorKey(0, "m", 0, kind, path + (name,))
                node = ilstore.records.node_at(structure, key.path)
                assert node["type"] == "dict" and node["class"] == "torch.Tensor"
                assert node["shape"] == list(original.shape) and node["dtype"] == str(original.dtype)
                assert node["encoding"] == ("sparse_coo" if name.startswith("coo") else "sparse_compressed"
                                            if not name.startswith("q_") else "quantized_per_tensor"
                                            if name == "q_tensor" else "quantized_per_channel")
                assert list(node["items"]) == list(PARTS[name])
                for part in PARTS[name]:
                    part_key = ilstore.TensorKey(0, "m", 0, kind, key.path + (part,))
                    assert part_key in keys
                    meta = reader.meta(part_key)
                    # stored in full, never de-duplicated (inputs and outputs are the same objects)
                    assert meta["stored"] is True and "same_as" not in meta and "max" in meta["stats"]
                    assert str(reader.load(part_key).dtype) == meta["dtype"]
                rebuilt = ilstore.records.load_tensor(reader, key)
                assert _representation(rebuilt) == _representation(original), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_and_quantized_tensors_round_trip_bit_exactly_and_convert(tmp_path: Path, backend: str) -> None:
    examples = _examples()
    run = _capture(tmp_path, "a", examples, backend)
    _assert_holds_examples(run, examples)
    with ilstore.open_run(run) as reader:
        call = ilstore.TensorKey(0, "m", 0, "inputs", ()).call_key
        values = reader.meta(call.tensor("inputs", ("1", "coo", "values")))
        assert values["shape"] == [4] and values["stats"]["min"] == 0.0 and values["stats"]["max"] == 7.0
        assert ilstore.records.node_at(reader.structure(call, "inputs"), ("1", "coo"))["coalesced"] is False
        with pytest.raises(KeyError, match="no tensor"):
            reader.load(call.tensor("inputs", ("1", "coo")))  # a container: load_tensor rebuilds it
        with pytest.raises(KeyError, match="no tensor"):
            ilstore.records.load_tensor(reader, call.tensor("inputs", ("1", "nope")))
    for target in BACKENDS:
        if target == backend:
            continue
        converted = tmp_path / f"to_{target}"
        convert(run, converted, to=target)
        _assert_holds_examples(converted, examples)
        result = compare(run, converted, exact=True)
        assert result.exit_code == 0
        assert {str(t.key) for t in result.tensors if t.status == "match"} >= {
            f"r0/s0/m/0/{kind}/1/{name}/{part}" for kind in ("inputs", "outputs")
            for name, parts in PARTS.items() for part in parts}


def test_compare_finds_a_changed_sparse_or_quantized_part(tmp_path: Path) -> None:
    a = _capture(tmp_path, "a", _examples(), "pt")
    assert compare(a, _capture(tmp_path, "same", _examples(), "pt")).exit_code == 0
    changed = _examples()
    changed["coo"] = torch.sparse_coo_tensor(changed["coo"]._indices(), changed["coo"]._values() * (1 + 1e-9), (4, 3))
    changed["coo_hybrid"] = torch.sparse_coo_tensor(torch.tensor([[0, 1]]), changed["coo_hybrid"]._values(),
                                                    (3, 3)).coalesce()  # one index moved
    values = changed["csr"].values().clone()
    values[2] += 0.25
    changed["csr"] = torch.sparse_csr_tensor(changed["csr"].crow_indices(), changed["csr"].col_indices(), values,
                                             changed["csr"].shape)
    q = changed["q_tensor"]
    changed["q_tensor"] = torch._make_per_tensor_quantized_tensor(q.int_repr(), q.q_scale() * 1.01, q.q_zero_point())
    by_key = {str(t.key): t.status for t in compare(a, _capture(tmp_path, "b", changed, "pt")).tensors}
    status = {k.removeprefix("r0/s0/m/0/inputs/1/"): v for k, v in by_key.items() if "/inputs/1/" in k}
    assert status["coo/indices"] == "match" and status["coo/values"] == "match"  # within rtol
    assert status["coo_hybrid/indices"] == "mismatch" and status["coo_hybrid/values"] == "match"
    assert status["csr/values"] == "mismatch" and status["csr/crow_indices"] == "match"
    assert status["q_tensor/scale"] == "mismatch" and status["q_tensor/int_repr"] == "match"
    assert {k for k, v in status.items() if v != "match"} == {"coo_hybrid/indices", "csr/values", "q_tensor/scale"}


def test_max_tensor_size_applies_to_the_parts_together(tmp_path: Path) -> None:
    big = torch.sparse_coo_tensor(torch.tensor([[0, 1, 2], [2, 1, 0]]), torch.tensor([1.0, 2.0, 3.0]), (3, 3))
    small = torch.sparse_coo_tensor(torch.tensor([[1], [1]]), torch.tensor([5.0]), (3, 3))
    model = Root()
    with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "r", "max_tensor_size": 5}) as cap:
        model(torch.arange(3.0), {"big": big, "small": small})
    assert cap.error is None and cap.run_dir is not None
    with ilstore.open_run(cap.run_dir) as reader:
        for part in ("indices", "values"):  # 6 + 3 elements: neither is stored, though 3 <= 5
            meta = reader.meta(ilstore.TensorKey(0, "m", 0, "inputs", ("1", "big", part)))
            assert meta["stored"] is False and meta["reason"] == "numel 9 of the sparse_coo parts > max_tensor_size 5"
            assert "max" in meta["stats"]
        with pytest.raises(KeyError, match="body not stored"):
            ilstore.records.load_tensor(reader, ilstore.TensorKey(0, "m", 0, "inputs", ("1", "big")))
        rebuilt = ilstore.records.load_tensor(reader, ilstore.TensorKey(0, "m", 0, "inputs", ("1", "small")))
        assert _representation(rebuilt) == _representation(small)


def test_sparse_and_quantized_tensors_torch_cannot_rebuild_stay_metadata(tmp_path: Path) -> None:
    packed = torch.quantize_per_tensor(torch.randn(4, 4), 0.1, 3, torch.quint4x2)
    meta_sparse = torch.empty((3, 3), layout=torch.sparse_coo, device="meta")
    run = _capture(tmp_path, "a", [packed, meta_sparse], "pt")
    with ilstore.open_run(run) as reader:
        assert reader.meta(ilstore.TensorKey(0, "m", 0, "inputs", ("1", "0")))["reason"] == \
            "quantized dtype torch.quint4x2 is not supported (its integer representation is packed)"
        assert reader.meta(ilstore.TensorKey(0, "m", 0, "inputs", ("1", "1")))["reason"] == "meta tensors have no data"


def test_rebuild_tensor_names_the_problem() -> None:
    from ilstore.errors import StoreError
    from ilstore.records import TensorPolicy, build_record, node_at, rebuild_tensor

    examples = _examples()
    record = build_record(ilstore.TensorKey(0, "m", 0, "outputs", ()).call_key, "outputs", examples,
                          TensorPolicy(pin_memory=False))
    for name, original in examples.items():
        node = node_at(record.structure, (name,))
        assert _representation(rebuild_tensor(node, record.tensors.__getitem__, (name,))) == \
            _representation(original)
    csr = node_at(record.structure, ("csr",))
    with pytest.raises(StoreError, match=r"^csr: the parts make a torch.float64 \[4, 6\] tensor but the metadata "
                                         r"says torch.float32 \[4, 6\]"):
        rebuild_tensor({**csr, "dtype": "torch.float32"}, record.tensors.__getitem__, ("csr",))
    with pytest.raises(StoreError, match="the sparse_compressed tensor has no 'values' part"):
        items = {k: v for k, v in csr["items"].items() if k != "values"}
        rebuild_tensor({**csr, "items": items}, record.tensors.__getitem__, ("csr",))
    bad = dict(record.tensors)
    bad[("coo", "indices")] = torch.tensor([[0, 9], [0, 0]])  # out of bounds: refused, not a crash later
    with pytest.raises(StoreError, match="coo: the parts of the sparse_coo tensor do not make one"):
        rebuild_tensor(node_at(record.structure, ("coo",)), bad.__getitem__, ("coo",), name="coo")
    with pytest.raises(StoreError, match=r"x: not a tensor but a 'dict' node"):
        rebuild_tensor(record.structure, record.tensors.__getitem__, name="x")
    with pytest.raises(KeyError, match="no node at path coo/nope"):
        node_at(record.structure, ("coo", "nope"))
