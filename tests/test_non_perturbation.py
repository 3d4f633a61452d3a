"""Capture on vs off: bitwise identical model outputs, whatever is captured and wherever it goes."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ilstore
from ilstore.demo import DEMO_PROMPT, tiny_llama

BACKENDS = ["pt", "safetensors", "hdf5"]
VARIANTS: dict[str, dict[str, Any]] = {
    "all": {"log_post_fwd_inputs": True},
    "max_tensor_size": {"max_tensor_size": 500},
    "stats": {"mode": "stats"},
    "sync-no-dedup": {"async_writes": False, "dedup": False, "log_post_fwd_inputs": True},
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


class InPlaceBlock(nn.Module):
    """Mutates its input and a buffer in place, and returns a view."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.act = nn.ReLU(inplace=True)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += 1
        x.mul_(0.5)
        y = self.act(self.lin(x))
        y += x
        return y[:, :8]


# Every variant on pt; on the other backends the two that exercise their writers most (everything
# stored, nothing stored): the variants only change what reaches the writer.
_LLAMA_CASES = [(b, v) for b in BACKENDS for v in sorted(VARIANTS) if b == "pt" or v in ("all", "stats")]


@pytest.mark.parametrize("backend,variant", _LLAMA_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_logits_bitwise(out_dir: Path, backend: str, variant: str, dtype: torch.dtype) -> None:
    model = tiny_llama(dtype)
    ids = torch.tensor(DEMO_PROMPT)
    with torch.no_grad():
        ref = [model(input_ids=ids[:, : 12 - i], use_cache=False).logits for i in range(2)]
        cfg = {"output_dir": str(out_dir), "run_id": "r", "log_step_ids": [], "backend": backend, **VARIANTS[variant]}
        with ilstore.capture(model, cfg) as cap:
            got = [model(input_ids=ids[:, : 12 - i], use_cache=False).logits for i in range(2)]
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(_bits(a), _bits(b))
    assert cap.error is None and ilstore.open_run(cap.run_dir).steps() == [0, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_in_place_modules_bitwise(out_dir: Path, backend: str, variant: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(InPlaceBlock(), nn.Linear(8, 16), InPlaceBlock())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 16)
    ref = model(x.clone())
    ref_count = model[0].count.clone()
    model.load_state_dict(state)
    cfg = {"output_dir": str(out_dir), "run_id": "r", "backend": backend, **VARIANTS[variant]}
    with ilstore.capture(model, cfg):
        got = model(x.clone())
    assert torch.equal(_bits(ref), _bits(got)) and torch.equal(model[0].count, ref_count)
    assert ref.grad_fn is not None and got.grad_fn is not None  # autograd graph intact


def test_no_references_kept_after_a_step(out_dir: Path) -> None:
    refs: list[weakref.ref[torch.Tensor]] = []

    class Fresh(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * 2
            refs.append(weakref.ref(y))
            return y

    model = nn.Sequential(Fresh(), Fresh(), Fresh())
    with ilstore.capture(model, {"output_dir": str(out_dir), "run_id": "r", "log_step_ids": [],
                                 "log_post_fwd_inputs": True}) as cap:
        for _ in range(5):
            model(torch.randn(64, 64))
            cap.flush()
            gc.collect()
            assert all(r() is None for r in refs), "capture keeps activations alive after a step"
    assert len(refs) == 15
