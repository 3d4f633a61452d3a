"""A capture's set-up with dynamo loaded: every hook goes through one disabled function, made once
per process, not a ``torch.compiler.disable`` wrapper of its own (issue 13: ~10-30 us per hook at
every set-up). The hooks stay opaque to dynamo (tests/test_compiled.py, tests/test_hook_wrapper.py)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo  # loaded before the capture is attached, as after a torch.compile

import ilstore

capture_module = importlib.import_module("ilstore.capture")


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()) for _ in range(10)])


def test_set_up_disables_one_function_whatever_the_number_of_hooks(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Any] = []
    real = torch.compiler.disable

    def counting(fn: Any = None, *args: Any, **kwargs: Any) -> Any:
        made.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch.compiler, "disable", counting)
    monkeypatch.setattr(capture_module, "_EAGER", None, raising=False)  # as in a process that has made none yet
    model = _model()
    for run in ("a", "b"):
        with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": run, "mode": "stats"}) as cap:
            assert len(cap.hooked_modules) == 30
            model(torch.ones(2, 4))
    assert len(made) == 1  # 2 x (60 module hooks + 2 root hooks) before


def test_the_shared_caller_runs_each_hook_with_its_own_arguments(tmp_path: Path) -> None:
    """Every hook reaches its own module's name through the one disabled function."""
    seen: list[tuple[str, Any]] = []
    hooks = [capture_module._opaque(lambda *a, name=name: seen.append((name, a))) for name in ("x", "y")]
    eager = capture_module._eager_caller()
    assert eager is capture_module._eager_caller()
    eager(hooks[0], 1, 2)
    eager(hooks[1], 3)
    hooks[0](4)
    assert seen == [("x", (1, 2)), ("y", (3,)), ("x", (4,))]
