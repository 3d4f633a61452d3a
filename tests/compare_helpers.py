"""Shared helpers for the compare tests: small captured runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import ilstore
from ilstore.demo import DEMO_PROMPT, tiny_llama
from ilstore.errors import BackendError

BACKENDS = ["pt", "safetensors", "hdf5"]
PERTURBED = "model.layers.1.mlp.down_proj"


def need_backend(name: str) -> None:
    """Skip when a backend is not available (yet)."""
    try:
        ilstore.get_backend(name)
    except BackendError as exc:
        pytest.skip(f"backend {name!r} not available: {exc}")


def llama_run(out_dir: Path, run_id: str, *, backend: str = "pt", perturb: str | None = None,
              **config: Any) -> Path:
    """Capture two steps of the tiny Llama with fixed inputs; ``perturb`` adds 1e-3 to that module's output."""
    model = tiny_llama()
    if perturb is not None:  # registered before capture's hooks, so capture sees the perturbed output
        model.get_submodule(perturb).register_forward_hook(lambda m, a, out: out + 1e-3)
    ids = torch.tensor(DEMO_PROMPT)
    cfg = {"output_dir": str(out_dir), "run_id": run_id, "log_step_ids": [0, 1], "backend": backend, **config}
    with torch.no_grad(), ilstore.capture(model, cfg) as cap:
        model(input_ids=ids, use_cache=False)
        model(input_ids=torch.cat([ids, torch.tensor([[17]])], dim=1), use_cache=False)
    assert cap.run_dir is not None
    return cap.run_dir


def module_run(out_dir: Path, run_id: str, model: nn.Module, *inputs: Any, **config: Any) -> Path:
    """Capture one forward of ``model`` (every module) as one run."""
    cfg = {"output_dir": str(out_dir), "run_id": run_id, **config}
    with torch.no_grad(), ilstore.capture(model, cfg) as cap:
        model(*inputs)
    assert cap.run_dir is not None
    return cap.run_dir


class Passthrough(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Toy(nn.Module):
    """Three pass-through children fed by the root's three inputs (integer, float, float)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids = Passthrough()
        self.shaped = Passthrough()
        self.cast = Passthrough()

    def forward(self, ids: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.ids(ids), self.shaped(h), self.cast(w)


class Named(nn.Module):
    """A Linear under a configurable child name (for the name map)."""

    def __init__(self, child: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.add_module(child, nn.Linear(4, 4))
        self.child = child

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.child)(x)


def by_status(result: Any, status: str) -> list[Any]:
    return [t for t in result.tensors if t.status == status]


Factory = Callable[..., Path]
