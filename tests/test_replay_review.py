"""Replay review: in-place modules with autograd on, statistics of fed tensors modified in place,
and reference tensor inputs the live call lacks (each fails closed, never stops the model)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ilstore
from ilstore.keys import TensorKey
from ilstore.records import tensor_stats
from ilstore.replay import UNFED, ReplaySource

GRAD_MODES: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {
    "grad": contextlib.nullcontext, "no_grad": torch.no_grad, "inference": torch.inference_mode}


def _mlp(width: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(inplace=True), nn.Linear(width, 2))


def _replay_info(run_dir: Path) -> dict[tuple[int, str, int], dict[str, Any]]:
    with ilstore.open_run(run_dir) as run:
        return {(s, c.module, c.call): run.structure(c, "outputs")["replay"] for s in run.steps() for c in run.calls(s)}


def _node(run_dir: Path, module: str, kind: str, path: tuple[str, ...]) -> dict[str, Any]:
    with ilstore.open_run(run_dir) as run:
        return dict(run.meta(TensorKey(0, module, 0, kind, path)))


def _body(run_dir: Path, module: str, kind: str, path: tuple[str, ...]) -> torch.Tensor:
    with ilstore.open_run(run_dir) as run:
        return run.load(TensorKey(0, module, 0, kind, path))


# -- 1. a module that modifies its input in place, autograd on ------------------------------------

def test_an_in_place_module_runs_with_autograd_on_and_its_output_still_requires_grad(tmp_path: Path) -> None:
    """The fed copy of an input that requires grad is no leaf: ``ReLU(inplace=True)`` may modify it
    (on a leaf that requires grad it raised inside the user's forward), the output still requires
    grad and the backward runs, even through a last module without parameters."""
    x = torch.randn(3, 4)
    model = nn.Sequential(*list(_mlp())[:2])  # Linear, ReLU(inplace=True): the output is the ReLU's
    with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "ref"}) as ref:
        expected = model(x)
    with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "rep", "replay_from": str(ref.run_dir)}) as rep:
        got = model(x)
    assert rep.error is None
    assert torch.equal(got, expected) and got.requires_grad
    got.sum().backward()  # reaches the fed tensor, not a leaf of the user's
    info = _replay_info(rep.run_dir)
    assert info[(0, "1", 0)]["replayed"] and info[(0, "0", 0)]["replayed"]


class Bump(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.add_(1)


class Pair(nn.Module):
    """``x`` goes through a Linear, and its output to an in-place module, then to another one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.a, self.b = nn.Linear(3, 3), Bump(), nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.lin(x)
        return self.a(h), self.b(h)


@pytest.mark.parametrize("mode", list(GRAD_MODES))
def test_a_fed_tensor_modified_in_place_is_never_fed_again(tmp_path: Path, mode: str) -> None:
    """The reference passed one tensor to ``a`` (which modifies it now) and to ``b``: ``b`` is fed the
    reference's bits, not the ones ``a`` left, in every grad mode."""
    x = torch.randn(2, 3)
    reference = Pair()
    reference.a = nn.Identity()  # type: ignore[assignment]
    with torch.no_grad(), ilstore.capture(reference, {"output_dir": str(tmp_path), "run_id": "ref"}) as ref:
        _, h = reference(x)
    model = Pair()
    with GRAD_MODES[mode](), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "rep",
                                                       "replay_from": str(ref.run_dir)}) as rep:
        a_out, b_out = model(x + 5)
    assert rep.error is None
    assert torch.equal(a_out, h + 1) and torch.equal(b_out, h)
    assert (a_out.requires_grad, b_out.requires_grad) == ((True, True) if mode == "grad" else (False, False))
    info = _replay_info(rep.run_dir)
    assert info[(0, "a", 0)]["replayed"] and info[(0, "b", 0)]["replayed"]
    # b's inputs and outputs, in the run: the reference's bits and statistics
    assert torch.equal(_body(rep.run_dir, "b", "inputs", ("0",)), h)
    assert _node(rep.run_dir, "b", "outputs", ())["stats"] == tensor_stats(h)


# -- 2. statistics of a fed tensor modified in place ---------------------------------------------

@pytest.mark.parametrize("mode", list(GRAD_MODES))
@pytest.mark.parametrize("store", ["tensors", "stats"])
def test_statistics_of_a_fed_tensor_modified_in_place_are_its_own(tmp_path: Path, store: str, mode: str) -> None:
    """ReLU(inplace=True) fed the reference's input: its outputs and post-forward inputs (the same
    tensor, now modified) get the statistics of what it holds, not the reference's input's."""
    x = torch.randn(3, 4)
    cfg = {"output_dir": str(tmp_path), "log_post_fwd_inputs": True}
    model = _mlp()
    with torch.no_grad(), ilstore.capture(model, {**cfg, "run_id": "ref"}) as ref:
        model(x)
    model = _mlp()
    with GRAD_MODES[mode](), ilstore.capture(model, {**cfg, "run_id": "rep", "mode": store,
                                                       "replay_from": str(ref.run_dir)}) as rep:
        model(x)
    assert rep.error is None and _replay_info(rep.run_dir)[(0, "1", 0)]["replayed"]
    relu_in = _body(ref.run_dir, "1", "inputs", ("0",))
    relu_out = _body(ref.run_dir, "1", "outputs", ())
    assert relu_in.min() < 0  # the ReLU changes it
    checks = [("1", "inputs", ("0",), relu_in), ("1", "outputs", (), relu_out),
              ("1", "post_fwd_inputs", ("0",), relu_out), ("2", "inputs", ("0",), relu_out)]
    for module, kind, path, holds in checks:
        got = _node(rep.run_dir, module, kind, path)["stats"]
        assert got == _node(ref.run_dir, module, kind, path)["stats"], (module, kind)
        assert got["min"] == pytest.approx(float(holds.min())) and got["mean"] == pytest.approx(float(holds.mean()))


def test_known_statistics_hold_only_while_the_fed_tensor_is_unchanged(tmp_path: Path) -> None:
    x = torch.randn(2, 3)
    model = nn.Sequential(nn.Identity())
    with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "ref"}) as ref:
        model(x)
    assert ref.run_dir is not None
    key = TensorKey(0, "0", 0, "inputs", ("0",))
    with ilstore.open_run(ref.run_dir) as reader:
        node = dict(reader.meta(key))
    source = ReplaySource(ref.run_dir, ilstore.open_run(ref.run_dir))
    try:
        fed = source.load_fed(key, node, x)
        assert source.known_stats(fed) == node["stats"]
        assert source.known_stats(x) is None  # not fed
        fed.mul_(2)
        assert source.known_stats(fed) is None
        again = source.load_fed(key, node, x)  # a fresh copy, not the modified one
        assert again is not fed and torch.equal(again, x) and source.known_stats(again) == node["stats"]
        source.end_step()
        with torch.inference_mode():
            inference = source.load_fed(key, node, torch.zeros(2, 3))
        assert torch.equal(inference, x) and source.known_stats(inference) is None  # no version counter
    finally:
        source.close()


# -- 3. a reference tensor input the live call lacks ---------------------------------------------

class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, scale: Any = None) -> torch.Tensor:
        y = self.lin(x)
        return y if mask is None else y * mask


class Outer(nn.Module):
    def __init__(self, call: Callable[[Masked, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.block, self.call = Masked(), call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(self.block, x)


_Call = Callable[[Masked, torch.Tensor], torch.Tensor]
# the reference's call of the block, the live call lacking one of its tensors, that tensor's path
LIVE_CALLS: dict[str, tuple[_Call, _Call, str]] = {
    "keyword None": (lambda b, x: b(x, mask=(x > 0).float()), lambda b, x: b(x, mask=None), "mask"),
    "keyword omitted": (lambda b, x: b(x, mask=(x > 0).float()), lambda b, x: b(x), "mask"),
    "keyword not a tensor": (lambda b, x: b(x, scale=x * 2), lambda b, x: b(x, scale=2.0), "scale"),
    "positional omitted": (lambda b, x: b(x, (x > 0).float()), lambda b, x: b(x), "1"),
    "nested": (lambda b, x: b(x, scale=[x, x * 2]), lambda b, x: b(x, scale=[x]), "scale.1"),
}


@pytest.mark.parametrize("case", list(LIVE_CALLS))
def test_a_reference_tensor_input_the_live_call_lacks_fails_closed(tmp_path: Path, case: str) -> None:
    from ilstore_compare import compare

    ref_call, live_call, path = LIVE_CALLS[case]
    x = torch.randn(3, 4)
    model = Outer(ref_call)
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "ref"}) as ref:
        model(x)
    model = Outer(live_call)
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "rep",
                                                  "replay_from": str(ref.run_dir)}) as rep:
        model(x)
    assert rep.error is None
    info = _replay_info(rep.run_dir)
    block = info[(0, "block", 0)]
    assert block["replayed"] is False and block["replaced"] == (["0", "scale.0"] if case == "nested" else ["0"])
    assert block["kept"] == {path: UNFED}
    assert block["reason"] == f"input {path} kept live: {UNFED}"
    assert info[(0, "block.lin", 0)]["replayed"]  # its own inputs are all fed
    local = compare(rep.run_dir, ref.run_dir).local
    assert local is not None
    errors = {e.call.module: e for e in local.errors}
    assert not errors["block"].replayed and not errors["block"].compared and UNFED in (errors["block"].reason or "")
    assert errors["block.lin"].replayed and errors["block.lin"].compared and errors["block.lin"].rel_l2 == 0.0


def test_a_live_call_with_every_reference_tensor_is_still_replayed(tmp_path: Path) -> None:
    ref_call = LIVE_CALLS["keyword None"][0]
    x = torch.randn(3, 4)
    model = Outer(ref_call)
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "ref"}) as ref:
        expected = model(x)
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "rep",
                                                  "replay_from": str(ref.run_dir)}) as rep:
        got = model(x + 1)
    assert torch.equal(got, expected)
    block = _replay_info(rep.run_dir)[(0, "block", 0)]
    assert block["replayed"] and sorted(block["replaced"]) == ["0", "mask"] and block["kept"] == {}
