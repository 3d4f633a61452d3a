"""``async_writes: false`` with a writer that writes (or copies) every body before ``write``
returns (pt, hdf5, safetensors once lent: ``StoreWriter.borrows_bodies``): capture hands the
writer the module's own CPU tensors instead of copies (issue 13: the copy was a fifth of a
capture's cost). Where that memory is not exactly the tensor's (a view into a larger storage, a
lazy conjugate), for a writer that does not say it borrows (any plug-in that does not say
otherwise), and with asynchronous writes whenever something is queued for the writer thread or
the writes were slow (ilstore.pipeline.ThreadedSink.write_lent), a copy is made as before.
Either way what is stored is the tensor as the hook saw it, even when the model changes it in
place right after.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ilstore
from ilstore.store import hdf5 as hdf5_store
from ilstore.store import pt as pt_store
from ilstore.store import registry
from ilstore.store import safetensors as st_store
from ilstore.store.pt import PtReader, PtWriter

capture_mod = importlib.import_module("ilstore.capture")  # ilstore.capture is also the function


class _Model(nn.Module):
    """A Linear whose output the next module changes in place, a slice view, a conjugate view."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)  # overwrites lin's output (negatives -> 0)
        self.part = _Half()
        self.cj = _Conj()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.lin(x))
        return self.cj(self.part(y)).real


class _Half(nn.Module):
    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, :4]  # a view into y's larger storage


class _Conj(nn.Module):
    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return torch.complex(y, y + 1).conj()  # a lazy conjugate


def _seen(monkeypatch: pytest.MonkeyPatch, backend: str) -> list[tuple[str, int]]:
    """Where each tensor the backend's body writer is handed goes (the record key or the file), and
    its data pointer."""
    ptrs: list[tuple[str, int]] = []
    if backend == "hdf5":
        original = hdf5_store.Hdf5Writer._create_dataset

        def create(self: Any, group: Any, name: bytes, tensor: torch.Tensor, key: str) -> Any:
            ptrs.append((key, tensor.data_ptr()))
            return original(self, group, name, tensor, key)

        monkeypatch.setattr(hdf5_store.Hdf5Writer, "_create_dataset", create)
    elif backend == "safetensors":
        add = st_store.SafetensorsWriter._add

        def added(self: Any, key: str, tensor: torch.Tensor) -> Any:
            ptrs.append((key, tensor.data_ptr()))
            return add(self, key, tensor)

        monkeypatch.setattr(st_store.SafetensorsWriter, "_add", added)
    else:
        save = pt_store._save_tensor

        def saved(tensor: torch.Tensor, path: str) -> None:
            ptrs.append((path, tensor.data_ptr()))
            save(tensor, path)

        monkeypatch.setattr(pt_store, "_save_tensor", saved)
    return ptrs


def _run(tmp_path: Path, backend: str, async_writes: bool) -> tuple[Path, dict[str, Any], torch.Tensor]:
    model = _Model()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    outputs: dict[str, Any] = {}

    def keep(name: str) -> Any:
        def hook(_m: nn.Module, _args: Any, out: torch.Tensor) -> None:
            outputs[name] = (out.data_ptr(), out.detach().clone())
        return hook

    for name in ("lin", "part", "cj"):
        getattr(model, name).register_forward_hook(keep(name))
    with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "r", "backend": backend,
                                 "async_writes": async_writes, "module_call_match": ["^lin$", "^part$", "^cj$"],
                                 "dedup": False}):
        with torch.no_grad():
            y = model(x)
    return tmp_path / "r", outputs, y


def _handed(ptrs: list[tuple[str, int]], module: str) -> int:
    """The data pointer of the module's output body as the writer was handed it."""
    found = [ptr for where, ptr in ptrs if f"/{module}/" in where.replace("#", "/") and "outputs" in where]
    assert len(found) == 1, ptrs
    return found[0]


@pytest.mark.parametrize("backend", ["pt", "hdf5", "safetensors"])
def test_sync_writes_borrow_the_tensor_and_store_it_as_the_hook_saw_it(tmp_path: Path, backend: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ptrs = _seen(monkeypatch, backend)
    run, outputs, _ = _run(tmp_path, backend, async_writes=False)
    lin_ptr, lin_out = outputs["lin"]
    assert _handed(ptrs, "lin") == lin_ptr  # handed over without a copy
    assert _handed(ptrs, "part") != outputs["part"][0]  # a view into a larger storage: copied
    assert _handed(ptrs, "cj") != outputs["cj"][0]  # a lazy conjugate: resolved into a copy
    with ilstore.open_run(run) as r:
        stored = r.load(r.calls(0)[0].tensor("outputs"))  # lin's output, before ReLU changed it
        assert stored.min() < 0 and torch.equal(stored, lin_out)
        half = r.load(r.calls(0)[1].tensor("outputs"))
        assert half.untyped_storage().nbytes() == half.numel() * half.element_size()  # only its own elements
        assert torch.equal(half, outputs["part"][1])
        conj = r.load(r.calls(0)[2].tensor("outputs"))
        assert torch.equal(conj.resolve_conj(), outputs["cj"][1].resolve_conj())


@pytest.mark.parametrize("backend", ["pt", "hdf5", "safetensors"])
@pytest.mark.parametrize("lends", [True, False])
def test_async_writes_lend_while_the_writer_keeps_up_and_copy_otherwise(
        tmp_path: Path, backend: str, lends: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Asynchronous writes hand the writer the module's own tensor, written before the hook
    returns, while nothing is queued and the writes are fast (pipeline.ThreadedSink.write_lent);
    otherwise (here: lending switched off) a snapshot. Either way the stored tensor is what the
    hook saw, although ReLU(inplace=True) changes it next."""
    monkeypatch.setattr(capture_mod, "_ASYNC_LENDS", lends)
    ptrs = _seen(monkeypatch, backend)
    run, outputs, _ = _run(tmp_path, backend, async_writes=True)
    assert (_handed(ptrs, "lin") == outputs["lin"][0]) is lends
    assert _handed(ptrs, "part") != outputs["part"][0]  # a view into a larger storage: copied
    with ilstore.open_run(run) as r:
        stored = r.load(r.calls(0)[0].tensor("outputs"))
        assert stored.min() < 0 and torch.equal(stored, outputs["lin"][1])


@pytest.mark.parametrize("async_writes", [False, True])
def test_safetensors_settles_bodies_only_when_lent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   async_writes: bool) -> None:
    """safetensors keeps some bodies until its shard is finished: lent the model's tensors (a
    synchronous capture) it writes or copies them before ``write`` returns; handed copies (an
    asynchronous capture that does not lend, see the test above) it keeps them as they are, at
    no extra cost."""
    monkeypatch.setattr(capture_mod, "_ASYNC_LENDS", False)
    settled: list[bool] = []
    settle = st_store.SafetensorsWriter._settle

    def spy(self: Any, added: Any) -> None:
        settled.append(self.lent)
        settle(self, added)

    monkeypatch.setattr(st_store.SafetensorsWriter, "_settle", spy)
    run, outputs, _ = _run(tmp_path, "safetensors", async_writes=async_writes)
    if async_writes:
        assert settled == []
    else:
        assert settled and all(settled)  # every record with bodies settled, the writer lent
    with ilstore.open_run(run) as r:
        stored = r.load(r.calls(0)[0].tensor("outputs"))
        assert stored.min() < 0 and torch.equal(stored, outputs["lin"][1])


class _HoldingWriter(PtWriter):
    """A plug-in writer that says nothing about borrowing: it is handed copies."""

    name = "pt-holding"
    seen: list[int] = []

    def _write(self, record: Any) -> None:
        for _path, _node, tensor in self._stored_bodies(record):
            if tensor is not None:
                type(self).seen.append(tensor.data_ptr())
        super()._write(record)


def test_a_plug_in_writer_gets_copies_unless_it_says_otherwise(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_loaded", dict(registry._loaded))
    monkeypatch.setattr(_HoldingWriter, "borrows_bodies", False)
    ilstore.register_backend("pt-holding", _HoldingWriter, PtReader)
    _HoldingWriter.seen = []
    _, outputs, _ = _run(tmp_path, "pt-holding", async_writes=False)
    assert _HoldingWriter.seen and outputs["lin"][0] not in _HoldingWriter.seen


def test_sync_capture_leaves_the_model_output_unchanged(tmp_path: Path) -> None:
    model = _Model()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(x)
    for backend in ("pt", "hdf5", "safetensors"):
        _, _, y = _run(tmp_path / backend, backend, async_writes=False)
        assert torch.equal(y, plain)
