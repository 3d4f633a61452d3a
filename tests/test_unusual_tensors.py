"""Tensors ilstore cannot store as plain bodies: capture records what it can and goes on (issue 15)."""

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
