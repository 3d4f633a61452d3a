"""Pause and resume around single module calls, and the steps around a paused forward.

* A call that began before ``pause()`` and ends paused keeps its inputs and gets no outputs; a
  call that began paused records nothing, even when ``resume()`` comes inside it. Each call's
  post-hook takes its own call's place, so no call's output is saved under another call
  (before, a paused pre-hook pushed nothing and the next unpaused post-hook took an open
  call's place: call 1's output was written as call 0's).
* A forward that begins paused is no step also when calls made outside a forward opened one
  (before, it ended that step and advanced ``step_index``).
* A step whose hooks ran paused, or that ends paused, gets no "no hooked module ran" warning
  (hooks do fire; the capture was told not to record).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import ilstore


def _cfg(out: Path) -> dict[str, object]:
    return {"output_dir": str(out), "run_id": "r", "log_step_ids": []}


class _Times(nn.Module):
    """``x * factor``; before returning, runs the action registered for its call number."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor
        self.calls = 0
        self.actions: dict[int, Callable[[], None]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.calls
        self.calls += 1
        action = self.actions.get(n)
        if action is not None:
            action()
        return x * self.factor


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = _Times(10.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.b(x))


class _Reentrant(nn.Module):
    """``b`` calls itself once: call 0 of ``b`` is open while call 1 runs inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.b = _Times(10.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x)


def _records(run_dir: Path | None) -> dict[tuple[str, int, str], list[float]]:
    assert run_dir is not None
    with ilstore.open_run(run_dir) as run:
        return {(k.module, k.call, k.kind): run.load(k).tolist() for k in run.keys(0)}


def test_a_call_cut_by_a_pause_keeps_its_inputs_and_the_next_call_records_nothing(tmp_path: Path) -> None:
    model = _Twice()
    with ilstore.capture(model, _cfg(tmp_path)) as cap:
        model.b.actions = {0: cap.pause, 1: cap.resume}  # pause inside call 0, resume inside call 1
        out = model(torch.ones(1))
    assert out.tolist() == [100.0]
    # before: call 0's outputs were [100.0], call 1's output
    assert _records(cap.run_dir) == {("b", 0, "inputs"): [1.0]}


def test_a_call_that_ends_paused_inside_an_open_call_of_its_module_leaves_that_call_whole(tmp_path: Path) -> None:
    model = _Reentrant()
    b = model.b
    inner_forward = b.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if b.calls == 0:  # call 0 runs call 1 inside it, then resumes
            b.calls += 1
            y = b(x)  # call 1: pauses before it returns
            cap.resume()
            return y * 2
        return inner_forward(x)

    b.forward = forward  # type: ignore[method-assign]
    with ilstore.capture(model, _cfg(tmp_path)) as cap:
        b.actions = {1: cap.pause}
        out = model(torch.ones(1))
    assert out.tolist() == [20.0]
    # before: call 1's paused post-hook left its frame open, and call 0's output was saved as call 1's
    assert _records(cap.run_dir) == {("b", 0, "inputs"): [1.0], ("b", 0, "outputs"): [20.0],
                                     ("b", 1, "inputs"): [1.0]}


def test_a_paused_forward_leaves_a_step_opened_outside_a_forward_open(tmp_path: Path) -> None:
    model = _Twice()
    with ilstore.capture(model, _cfg(tmp_path)) as cap:
        model.b(torch.full((1,), 3.0))  # outside a forward (an encoder run on its own): opens step 0
        cap.pause()
        model(torch.ones(1))  # a warm-up run: no step
        assert cap.step_index == 0  # before: 1, the paused forward ended step 0
        cap.resume()
        model(torch.full((1,), 2.0))  # continues and ends step 0
        assert cap.step_index == 1
    with ilstore.open_run(cap.run_dir) as run:
        assert run.steps() == [0]
    assert _records(cap.run_dir) == {("b", 0, "inputs"): [3.0], ("b", 0, "outputs"): [30.0],
                                     ("b", 1, "inputs"): [2.0], ("b", 1, "outputs"): [20.0],
                                     ("b", 2, "inputs"): [20.0], ("b", 2, "outputs"): [200.0]}


def test_a_manual_step_ended_paused_gives_no_warning_that_hooks_did_not_fire(tmp_path: Path) -> None:
    model = _Twice()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # before: "step 1 ended and no hooked module ran"
        with ilstore.capture(model, _cfg(tmp_path), manual_step=True) as cap:
            model(torch.ones(1))
            cap.step()
            cap.pause()
            model(torch.ones(1))
            cap.step()
            cap.step()  # still paused, nothing ran: no warning either
            cap.resume()
            model(torch.ones(1))
            cap.step()
    with ilstore.open_run(cap.run_dir) as run:
        assert run.steps() == [0, 3]
    with ilstore.capture(model, {**_cfg(tmp_path), "run_id": "r2"}, manual_step=True) as cap:
        with pytest.warns(ilstore.IlstoreWarning, match="no hooked module ran"):
            cap.step()  # not paused, no hook ran: the warning stays


def test_a_forward_paused_before_any_hook_gives_no_warning_that_hooks_did_not_fire(tmp_path: Path) -> None:
    model = _Twice()
    pre = model.register_forward_pre_hook(lambda *_: cap.pause())  # the step opens, then the pause
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # before: "step 0 ended and no hooked module ran"
        with ilstore.capture(model, _cfg(tmp_path)) as cap:
            model(torch.ones(1))
            pre.remove()
            cap.resume()
            model(torch.ones(1))
    with ilstore.open_run(cap.run_dir) as run:
        assert run.steps() == [0, 1]  # step 0: the calls made before the pause (none)
