"""Values that are not tensors and cannot be printed do not stop a capture (a review finding, the
2026-12-01 third round): a module called with (or returning) an object whose ``__repr__`` raises,
or a list nested deeper than Python can print, had stopped the capture at step 0 with the run
marked failed; each such value is now recorded with the failure, and every tensor is kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ilstore
from ilstore.store.registry import open_run


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("repr not available before init")


class Passes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, odd: Any) -> tuple[torch.Tensor, Any]:
        return self.lin(x), odd


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Passes()

    def forward(self, x: torch.Tensor, odd: Any) -> tuple[torch.Tensor, Any]:
        return self.inner(x, odd)


def _deep(levels: int) -> Any:
    value: Any = [torch.ones(2)]
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize("backend", ["pt", "safetensors", "hdf5"])
@pytest.mark.parametrize("async_writes", [False, True])
@pytest.mark.parametrize("odd", ["unprintable", "deep"])
def test_a_value_that_cannot_be_printed_is_recorded_as_such(tmp_path: Path, backend: str, async_writes: bool,
                                                            odd: str) -> None:
    value = Unprintable() if odd == "unprintable" else _deep(5000)
    model = Outer()
    x = torch.randn(3, 4)
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "backend": backend,
                                                  "async_writes": async_writes, "log_step_ids": []}) as cap:
        for _ in range(2):
            model(x, value)
    reader = open_run(cap.run_dir)
    assert reader.manifest["status"] == "complete" and list(reader.steps()) == [0, 1]
    calls = {c.module: c for c in reader.calls(1)}
    assert set(calls) == {"inner", "inner.lin"}
    odd_node = reader.structure(calls["inner"], "outputs")["items"][1]
    text = str(odd_node)
    if odd == "unprintable":
        assert odd_node["type"] == "value" and "repr failed: RuntimeError: repr not available before init" in text
    else:
        assert "repr failed: RecursionError" in text
    (key, _), = reader.tensor_nodes(calls["inner.lin"], "inputs")
    assert torch.equal(reader.load(key), x)
