"""Capture's hooks skip torch.compiler.disable's wrapper when no dynamo frame evaluation is active.

Outside compiled code a hook is called directly (the wrapper costs microseconds a call); while
dynamo evaluates frames (the eager parts of a compiled function) it goes through the wrapper, so
dynamo never compiles ilstore's own frames; traced, it is a graph break (or nothing with skip).
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
import torch._dynamo  # loaded before the hooks are wrapped, as after a torch.compile

from ilstore.capture import _opaque


def _caller_names() -> list[str]:
    frame = sys._getframe(2)
    names = []
    while frame is not None and len(names) < 3:
        names.append(frame.f_code.co_name)
        frame = frame.f_back  # type: ignore[assignment]
    return names


@pytest.mark.parametrize("skip", [False, True])
def test_eager_hooks_are_called_directly(skip: bool) -> None:
    seen: list[list[str]] = []

    def hook(*args: Any) -> None:
        seen.append(_caller_names())

    wrapped = _opaque(hook, skip)
    assert wrapped is not hook  # dynamo is loaded: the hook is wrapped
    wrapped(1)
    assert seen[-1][0] == "step_aside"  # called straight from ilstore's wrapper, not through disable's


@pytest.mark.parametrize("skip", [False, True])
def test_hooks_inside_compiled_code_go_through_disable(skip: bool) -> None:
    calls: list[list[str]] = []

    def hook(*args: Any) -> None:
        calls.append(_caller_names())

    wrapped = _opaque(hook, skip)

    def eager_part(x: torch.Tensor) -> torch.Tensor:
        wrapped(x)  # what a hook call in a compiled model's graph break looks like
        return x * 2

    @torch.compile(backend="eager")
    def f(x: torch.Tensor) -> torch.Tensor:
        y = x + 1
        torch._dynamo.graph_break()
        return eager_part(y)

    torch._dynamo.reset()
    out = f(torch.ones(3))
    assert torch.equal(out, torch.full((3,), 4.0))
    if skip:
        assert not calls or calls[-1][0] != "step_aside"
    else:
        assert calls and calls[-1][0] != "step_aside"  # through disable's wrapper
