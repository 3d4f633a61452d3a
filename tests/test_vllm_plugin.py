"""The vLLM plug-in's logic against a fake model runner (no vLLM needed; real vLLM: test_vllm.py).

The fake runner mimics what the plug-in relies on in vLLM's runners: ``load_model`` then
``get_model``; ``execute_model(scheduler_output)`` that returns early when nothing is
scheduled, otherwise runs the model body and returns None; ``sample_tokens`` that computes the
logits from the stored hidden states; and model runs outside any step (``profile_run``).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import ilstore
from ilstore.errors import ConfigError
from ilstore.integrations import vllm as plugin

EMPTY = "EMPTY_MODEL_RUNNER_OUTPUT"


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)


def _vllm_config(compiled: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        compilation_config=SimpleNamespace(mode=3 if compiled else 0, cudagraph_mode=SimpleNamespace(name="NONE")),
        model_config=SimpleNamespace(enforce_eager=not compiled))


class FakeRunner:
    """Shaped like vLLM's V1 model runner, as far as the plug-in looks."""

    def __init__(self, compiled: bool = False, pooling: bool = False) -> None:
        self.vllm_config = _vllm_config(compiled)
        self.pooling = pooling
        self.hidden: torch.Tensor | None = None

    def load_model(self) -> None:
        self.model = TinyLM()

    def get_model(self) -> torch.nn.Module:
        return self.model

    def profile_run(self) -> None:  # vLLM's memory profiling / warm-up: not a step
        self.model.compute_logits(self.model(torch.zeros(7, 4)))

    def execute_model(self, scheduler_output: Any, intermediate_tensors: Any = None) -> Any:
        if not scheduler_output.total_num_scheduled_tokens:
            return EMPTY
        hidden = self.model(torch.ones(scheduler_output.total_num_scheduled_tokens, 4))
        if getattr(scheduler_output, "fail", False):
            raise RuntimeError("the engine failed mid-step")
        if self.pooling:
            return hidden.sum(0)  # a final output: sample_tokens is not called
        self.hidden = hidden
        return None

    def sample_tokens(self, grammar_output: Any) -> Any:
        if self.hidden is None:
            return None
        logits, self.hidden = self.model.compute_logits(self.hidden), None
        return logits.argmax(-1)


def _sched(tokens: int) -> SimpleNamespace:
    return SimpleNamespace(total_num_scheduled_tokens=tokens)


def _engine_step(runner: FakeRunner, tokens: int) -> None:
    """What vLLM's engine core does per step: execute_model, then sample_tokens if it gave None."""
    if runner.execute_model(_sched(tokens)) is None:
        runner.sample_tokens(None)


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeRunner]:
    """A fresh FakeRunner class published as the only runner class the plug-in patches."""
    # A subclass holding copies of the methods, so the wrappers never leak into other tests.
    cls = type("FakeRunner", (FakeRunner,), {k: v for k, v in vars(FakeRunner).items() if not k.startswith("__")})
    module = types.ModuleType("fake_vllm_runner")
    module.FakeRunner = cls  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_vllm_runner", module)
    monkeypatch.setattr(plugin, "RUNNER_CLASSES", (("fake_vllm_runner", "FakeRunner"), ("no.such.module", "X")))
    monkeypatch.setattr(plugin, "_config", None)
    monkeypatch.delenv("ILSTORE_CONFIG", raising=False)
    return cls


def _register(monkeypatch: pytest.MonkeyPatch, config: dict[str, Any]) -> None:
    monkeypatch.setenv("ILSTORE_CONFIG", json.dumps(config))
    plugin.register()


def _loaded(cls: type[FakeRunner], **kwargs: Any) -> tuple[FakeRunner, plugin.EngineCapture]:
    runner = cls(**kwargs)
    runner.load_model()
    cap = runner._ilstore_capture
    assert isinstance(cap, plugin.EngineCapture)
    return runner, cap


def test_unset_or_disabled_config_patches_nothing(fake_vllm: type[FakeRunner], monkeypatch: pytest.MonkeyPatch) -> None:
    plain = dict(fake_vllm.__dict__)
    plugin.register()
    _register(monkeypatch, {"enabled": False})
    assert dict(fake_vllm.__dict__) == plain
    runner = fake_vllm()
    runner.load_model()
    assert getattr(runner, "_ilstore_capture", None) is None


def test_bad_config_is_an_error(fake_vllm: type[FakeRunner], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="log_step_id"):
        _register(monkeypatch, {"log_step_id": [0]})


def test_one_step_per_scheduled_execute_model(fake_vllm: type[FakeRunner], monkeypatch: pytest.MonkeyPatch,
                                              out_dir: Path) -> None:
    _register(monkeypatch, {"output_dir": str(out_dir), "run_id": "r", "log_step_ids": [0, 1]})
    plugin.register()  # vLLM may call it again: nothing is wrapped twice
    assert hasattr(fake_vllm.execute_model, "__ilstore_wrapped__")
    assert not hasattr(fake_vllm.execute_model.__wrapped__, "__ilstore_wrapped__")  # type: ignore[attr-defined]
    runner, cap = _loaded(fake_vllm)
    runner.profile_run()  # before the first step: neither counted nor logged
    _engine_step(runner, 3)
    _engine_step(runner, 0)  # nothing scheduled: not a step
    runner.profile_run()  # between steps (e.g. a data-parallel dummy batch)
    _engine_step(runner, 2)
    _engine_step(runner, 1)  # step 2: counted, not logged
    assert cap.step_index == 3
    cap.close()
    with ilstore.open_run(out_dir / "r") as run:
        assert run.status == "complete" and run.steps() == [0, 1]
        for step, tokens in ((0, 3), (1, 2)):
            # the logits (sample_tokens) land in the step of the forward that made their inputs
            assert [(c.module, c.call) for c in run.calls(step)] == [("body", 0), ("head", 0)]
            head_out = run.keys(step)[-1]
            assert head_out.module == "head" and run.meta(head_out)["shape"] == [tokens, 6]


def test_final_output_from_execute_model_ends_the_step(fake_vllm: type[FakeRunner], monkeypatch: pytest.MonkeyPatch,
                                                       out_dir: Path) -> None:
    _register(monkeypatch, {"output_dir": str(out_dir), "run_id": "p", "log_step_ids": []})
    runner, cap = _loaded(fake_vllm, pooling=True)
    _engine_step(runner, 4)
    runner.sample_tokens(None)  # a stray call outside a step changes nothing
    _engine_step(runner, 5)
    cap.close()
    with ilstore.open_run(out_dir / "p") as run:
        assert run.steps() == [0, 1]
        assert [run.meta(k)["shape"] for k in run.keys() if k.kind == "outputs"] == [[4, 4], [5, 4]]


def test_failed_step_still_advances(fake_vllm: type[FakeRunner], monkeypatch: pytest.MonkeyPatch,
                                    out_dir: Path) -> None:
    _register(monkeypatch, {"output_dir": str(out_dir), "run_id": "f", "log_step_ids": []})
    runner, cap = _loaded(fake_vllm)
    with pytest.raises(RuntimeError, match="mid-step"):
        runner.execute_model(SimpleNamespace(total_num_scheduled_tokens=3, fail=True))
    assert not cap.live and cap.step_index == 1  # what ran before the error stays in step 0
    _engine_step(runner, 2)
    cap.close()
    with ilstore.open_run(out_dir / "f") as run:
        assert run.steps() == [0, 1]
        assert [c.module for c in run.calls(0)] == ["body"] and [c.module for c in run.calls(1)] == ["body", "head"]


def test_compiled_engine_warns(fake_vllm: type[FakeRunner], monkeypatch: pytest.MonkeyPatch, out_dir: Path) -> None:
    _register(monkeypatch, {"output_dir": str(out_dir), "run_id": "c"})
    with pytest.warns(ilstore.IlstoreWarning, match="compiled or with CUDA graphs.*enforce_eager"):
        _, cap = _loaded(fake_vllm, compiled=True)
    cap.close()
    with ilstore.open_run(out_dir / "c") as run:  # and the run says so
        (said,) = run.capture_warnings
        assert said.startswith("vLLM runs this model compiled or with CUDA graphs (enforce_eager=False")


def test_run_id_is_pinned_for_child_processes(fake_vllm: type[FakeRunner], monkeypatch: pytest.MonkeyPatch,
                                              out_dir: Path) -> None:
    _register(monkeypatch, {"output_dir": str(out_dir)})
    pinned = json.loads(__import__("os").environ["ILSTORE_CONFIG"])
    assert plugin._config is not None and pinned["run_id"] == plugin._config.run_id
    runner, cap = _loaded(fake_vllm)
    assert cap.run_dir == out_dir / pinned["run_id"]
    cap.close()


def test_capture_that_cannot_start_leaves_the_engine_running(fake_vllm: type[FakeRunner],
                                                             monkeypatch: pytest.MonkeyPatch, out_dir: Path) -> None:
    config = {"output_dir": str(out_dir), "run_id": "taken"}
    with ilstore.capture(torch.nn.Sequential(torch.nn.Linear(2, 2)), config):
        pass  # an earlier run with the same run id
    _register(monkeypatch, config)
    runner = fake_vllm()
    with pytest.warns(ilstore.IlstoreWarning, match="capture not attached.*already exists"):
        runner.load_model()
    assert runner._ilstore_capture is None
    _engine_step(runner, 2)  # the wrappers pass straight through
    _register(monkeypatch, {**config, "on_error": "raise"})
    with pytest.raises(ilstore.StoreError, match="already exists"):
        fake_vllm().load_model()


def test_unknown_runner_layout_warns_and_leaves_vllm_alone(fake_vllm: type[FakeRunner],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(fake_vllm, "sample_tokens")  # a vLLM version whose runner looks different
    with pytest.warns(ilstore.IlstoreWarning, match="could not hook.*sample_tokens"):
        _register(monkeypatch, {"enabled": True})
    assert not hasattr(fake_vllm.execute_model, "__ilstore_wrapped__")  # all or nothing
