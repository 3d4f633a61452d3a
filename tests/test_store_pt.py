"""The ``pt`` backend against the shared conformance suite (ilstore.testing)."""

from __future__ import annotations

import io
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from ilstore.keys import TensorKey
from ilstore.testing import StoreConformance
from support import native_pt


class TestPtStore(StoreConformance):
    backend = "pt"

    def native_load(self, run_dir: Path, key: TensorKey, meta: dict[str, Any]) -> torch.Tensor:
        return native_pt(run_dir, key, meta)  # bypass: the JSON files and plain torch.load


def _legacy_bytes(tensor: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(tensor, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _normalise_keys(data: bytes) -> bytes:
    """Legacy torch.save names the storage by its memory address (a decimal string, in the
    tensor's pickle and in the key list): make both forms comparable."""
    keys = {m.group(2) for m in re.finditer(rb"X(.)\x00\x00\x00(\d+)q", data)
            if len(m.group(2)) == m.group(1)[0] and len(m.group(2)) > 6}
    for key in keys:
        data = data.replace(key, b"KEY")
    return data


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
                                   torch.complex128, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
                                   torch.bool])
def test_tensor_files_are_legacy_torch_save(tmp_path: Path, dtype: torch.dtype) -> None:
    """Each .pt is what legacy torch.save writes (but for the storage's arbitrary key), also
    for the second tensor of a (dtype, shape, strides) whose header bytes come from the cache,
    and for views and non-contiguous tensors, which go through torch.save itself."""
    from ilstore.store.pt import _save_tensor

    g = torch.Generator().manual_seed(0)
    # each shape twice (the second from the cached header: its bytes as a view of the tensor's
    # memory); the last: several write chunks
    shapes = [(3, 4), (3, 4), (), (), (0,), (0,), (2, 0, 3), (2, 0, 3), (1, 256, 40), (2, 1, 3), (1500, 1000),
              (1500, 1000)]
    tensors = [(torch.randn(s, generator=g) * 50).to(dtype) for s in shapes]
    tensors += [(torch.randn(7, 5, generator=g) * 50).to(dtype).t(), (torch.randn(9, generator=g) * 50).to(dtype)[2:6],
                (torch.randn(1000, 1500, generator=g) * 50).to(dtype).t()]  # torch.save itself, in chunks
    for i, tensor in enumerate(tensors):
        path = tmp_path / f"{i}.pt"
        _save_tensor(tensor, str(path))
        loaded = torch.load(path, weights_only=True)
        assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape and loaded.stride() == tensor.stride()
        assert torch.equal(loaded.reshape(-1).view(torch.uint8), tensor.contiguous().reshape(-1).view(torch.uint8))
        if tensor.is_contiguous() and tensor.storage_offset() == 0:
            assert _normalise_keys(path.read_bytes()) == _normalise_keys(_legacy_bytes(tensor)), i


def test_unconfirmed_header_falls_back_to_torch_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If torch.save's output does not have the expected layout, nothing is cached and every
    tensor of that signature is written by torch.save itself."""
    import ilstore.store.pt as pt

    monkeypatch.setattr(pt, "_HEADERS", {})
    monkeypatch.setattr(pt, "_SIZE", struct.Struct(">q"))  # a layout that will not match
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    pt._save_tensor(tensor, str(tmp_path / "a.pt"))
    assert list(pt._HEADERS.values()) == [None]
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True), tensor)


def test_a_nul_byte_in_the_call_order_is_an_ilstore_error(tmp_path: Path) -> None:
    import ilstore

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "r"}) as cap:
        model(torch.ones(1, 2))
    order = cap.run_dir / "step_0" / "module_calls.txt"
    order.write_bytes(order.read_bytes().replace(b"0", b"\x00"))
    with pytest.raises(ilstore.UnsafePathError, match="not a usable path"), ilstore.open_run(cap.run_dir) as run:
        run.keys()
