"""Capture of compiled models that already ran, training through in-graph taps, post-forward inputs.

Review findings on torch.compile'd models: a capture attached after a compiled forward (torch's
``skip_nnmodule_hook_guards``), autograd through ``ilstore::tap``, and ``log_post_fwd_inputs``
with ``in_graph``. Backends ``eager``/``aot_eager`` only: inductor is slow on 2 cores.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ilstore
from ilstore import IlstoreWarning

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class _Net(nn.Module):
    """A Linear, an in-place ReLU applied to a tensor the forward keeps using, a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        self.act(h)  # in place: h is relu(h) from here on
        return self.fc2(h)


def _net() -> _Net:
    torch.manual_seed(0)
    return _Net()


def _x() -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(2))


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _capture(model: Any, out: Path, run_id: str, forwards: int = 2, **extra: Any) -> tuple[Path, list[str]]:
    """``forwards`` forwards of ``model`` under a capture: the run and ilstore's warnings."""
    cfg = {"output_dir": str(out), "run_id": run_id, "log_step_ids": [], **extra}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), ilstore.capture(model, cfg) as cap:
            for _ in range(forwards):
                model(_x())
    assert cap.run_dir is not None and cap.error is None
    return cap.run_dir, [str(w.message) for w in caught if issubclass(w.category, IlstoreWarning)]


def _tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    with ilstore.open_run(run_dir) as run:
        return {str(k): run.load(k) for k in run.keys()}


def _same_records(a: Path, b: Path) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return bool(ta) and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _wrapper(model: nn.Module) -> tuple[Any, Any]:
    compiled = torch.compile(model, backend="aot_eager")
    return compiled, compiled


def _inner(model: nn.Module) -> tuple[Any, Any]:
    return model, torch.compile(model, backend="aot_eager")


def _in_place(model: nn.Module) -> tuple[Any, Any]:
    model.compile(backend="aot_eager")
    return model, model


@pytest.mark.parametrize("in_graph", [False, True])
@pytest.mark.parametrize("how", [_wrapper, _inner, _in_place], ids=["wrapper", "model-in-wrapper", "module.compile"])
def test_a_capture_attached_after_a_compiled_forward_records_and_leaves_no_trace(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, in_graph: bool,
        how: Callable[[nn.Module], tuple[Any, Any]]) -> None:
    eager, _ = _capture(_net(), tmp_path, "eager", log_post_fwd_inputs=False)
    attach_to, call = how(_net())  # capture `attach_to`, run `call`
    with torch.no_grad():
        plain = call(_x())  # the warm-up: dynamo compiles without ilstore's hooks
    cfg = {"output_dir": str(tmp_path), "log_step_ids": [], "in_graph": in_graph}
    with caplog.at_level(logging.WARNING, logger="ilstore.capture"), warnings.catch_warnings():
        warnings.simplefilter("ignore", IlstoreWarning)  # the graph-break notice of the default hooks
        with torch.no_grad(), ilstore.capture(attach_to, {**cfg, "run_id": "warm"}) as cap:
            outs = [call(_x()) for _ in range(2)]
    assert "recompiled at its next forward" in caplog.text
    assert cap.run_dir is not None and all(torch.equal(o, plain) for o in outs)
    with ilstore.open_run(cap.run_dir) as run:
        assert run.steps() == [0, 1]
    assert _same_records(cap.run_dir, eager)
    with torch.no_grad():
        assert torch.equal(call(_x()), plain)  # closed: what the compiled model computes without capture
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IlstoreWarning)
        with torch.no_grad(), ilstore.capture(attach_to, {**cfg, "run_id": "again"}) as again:
            call(_x())
    assert again.run_dir is not None
    with ilstore.open_run(again.run_dir) as run:
        assert run.steps() == [0] and len(run.keys()) == len(ilstore.open_run(eager).keys(0))


def test_an_eager_capture_discards_no_compiled_code_and_a_guarding_dynamo_needs_no_reset(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    resets: list[int] = []
    real_reset = torch.compiler.reset
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1) or real_reset())
    _capture(_net(), tmp_path, "eager")  # dynamo loaded, nothing compiled since its reset
    assert resets == []
    # compiled code of the process that is not the model's is kept, before the capture and during it
    frames: list[str] = []

    def counting(gm: Any, example_inputs: Any) -> Any:
        frames.append(gm.code)
        return gm.forward

    before, during = torch.compile(lambda x: x.sin() + 1, backend=counting), torch.compile(
        lambda x: x.cos() * 2, backend=counting)
    cfg = {"output_dir": str(tmp_path), "run_id": "eager_beside", "log_step_ids": []}
    with torch.no_grad():  # (one grad mode: a change of it recompiles by itself)
        before(torch.ones(3))
        with ilstore.capture(_net(), cfg) as cap:
            cap.model(_x())
            during(torch.ones(3))
        before(torch.ones(3))
        during(torch.ones(3))
    assert len(frames) == 2 and resets == []  # each compiled once: neither discarded
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        cm = torch.compile(_net(), backend="aot_eager")
        with torch.no_grad():
            cm(_x())
        run, _ = _capture(cm, tmp_path, "guarded")  # dynamo recompiles for the new hooks by itself
    assert resets == [] and ilstore.open_run(run).steps() == [0, 1]


def test_a_compiled_model_whose_hooks_never_fire_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled code the capture could not discard (simulated): the run must not close silently empty."""
    monkeypatch.setattr(torch.compiler, "reset", lambda: None)
    monkeypatch.setattr(sys.modules["ilstore.capture"], "_discard", lambda codes: None)
    torch.manual_seed(0)
    # torch.nn containers are traced from the wrapper's call down: the root's hooks are compiled too
    cm = torch.compile(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), backend="aot_eager")
    with torch.no_grad():
        cm(_x())
    run, messages = _capture(cm, tmp_path, "silent", forwards=3)
    assert ilstore.open_run(run).steps() == []
    assert any("ran 3 forward(s) during the capture and none of the capture's hooks fired" in m
               for m in messages), messages
    said = ilstore.open_run(run).capture_warnings  # and the run says so itself
    assert len(said) == 1 and "ran 3 forward(s) during the capture and none of the capture's hooks fired" in said[0]
    # a model whose forward dynamo picks up below the root's hooks: each step says it recorded nothing
    cm = torch.compile(_net(), backend="aot_eager")
    with torch.no_grad():
        cm(_x())
    run, messages = _capture(cm, tmp_path, "empty_steps", forwards=2)
    assert [m for m in messages if "no hooked module ran" in m], messages
    said = ilstore.open_run(run).capture_warnings
    assert [w for w in said if w.startswith("no hooked module ran in 2 step(s) (0, 1)")], said


@pytest.mark.parametrize("in_graph", [False, True])
def test_training_through_a_compiled_model_with_capture(tmp_path: Path, in_graph: bool) -> None:
    """Autograd on: outputs and gradients are the compiled model's without capture."""

    def train(model: nn.Module, cfg: dict[str, Any] | None) -> tuple[torch.Tensor, list[torch.Tensor], Any]:
        cm = torch.compile(model, backend="aot_eager")
        cap = ilstore.capture(cm, cfg) if cfg else None
        try:
            out = cm(_x())
            out.square().sum().backward()
        finally:
            if cap is not None:
                cap.close()
        return out.detach(), [p.grad for p in model.parameters() if p.grad is not None], cap

    out0, grads0, _ = train(_net(), None)
    torch._dynamo.reset()
    eager, _ = _capture(_net(), tmp_path, "eager", forwards=1)
    with warnings.catch_warnings():
        # ilstore's graph-break notice, and torch's about .grad of non-leaf tensors (dynamo reads
        # it when it hands tensors to a graph break's eager hook)
        warnings.simplefilter("ignore", UserWarning)
        out, grads, cap = train(_net(), {"output_dir": str(tmp_path), "run_id": "train", "in_graph": in_graph})
    assert cap.error is None and torch.equal(out, out0)
    assert len(grads) == len(grads0) == 4 and all(torch.equal(a, b) for a, b in zip(grads, grads0, strict=True))
    assert _same_records(cap.run_dir, eager)


@pytest.mark.parametrize("in_graph", [False, True])
def test_post_forward_inputs_show_the_in_place_change_when_compiled(tmp_path: Path, in_graph: bool) -> None:
    eager, _ = _capture(_net(), tmp_path, "eager", log_post_fwd_inputs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IlstoreWarning)
        run, _ = _capture(torch.compile(_net(), backend="aot_eager"), tmp_path, "compiled",
                          log_post_fwd_inputs=True, in_graph=in_graph)
    got, want = _tensors(run), _tensors(eager)
    post = [k for k in want if "act" in k and "post_fwd_inputs" in k]
    assert post and all(want[k].min() >= 0 for k in post)  # relu applied in place
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


class _Broken(_Net):
    """``_Net`` with a graph break of its own between its layers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        torch._dynamo.graph_break()
        self.act(h)
        return self.fc2(h)


def test_code_resuming_after_a_graph_break_is_discarded_too(tmp_path: Path) -> None:
    """Dynamo reuses the code it compiled to resume a forward after a graph break when it
    compiles that forward again: discarding the forward's code alone left the modules after the
    break running without the capture's hooks."""
    torch.manual_seed(0)
    model = _Broken()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        compiled(_x())  # the warm-up, before the capture
    cfg = {"output_dir": str(tmp_path), "run_id": "broken", "log_step_ids": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IlstoreWarning)
        with torch.no_grad(), ilstore.capture(compiled, cfg) as cap:
            compiled(_x())
    assert cap.run_dir is not None
    with ilstore.open_run(cap.run_dir) as run:
        assert {c.module for c in run.calls(0)} >= {"fc1", "act", "fc2"}
