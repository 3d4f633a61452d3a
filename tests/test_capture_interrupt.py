"""Ctrl-C (``KeyboardInterrupt``) inside a captured model's forward.

torch runs ``always_call`` forward hooks when a forward raises an ``Exception``, not when a
``BaseException`` such as ``KeyboardInterrupt`` passes through it (``Module._call_impl`` catches
``Exception``), so the capture's root hook that ends a step never runs. A user who catches the
interrupt (a notebook, a serving loop) and runs the model again gets a capture that is
consistent (ilstore/capture.py, ``_root_call_gone``): the interrupted forward's step is
abandoned like the step of a forward that raised (no completed step, listed as incomplete when
records of it were written), the step counter moves past it, and each later forward is a step
of its own whose records equal those of a run without the interrupt. A forward that began
paused and was interrupted leaves the capture paused no longer than ``resume()`` says.

Before the fix every later forward was merged into the interrupted step (its call indices
counting on), or, after an interrupted paused forward, nothing was ever recorded again.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import ilstore
from ilstore.cli import cli
from ilstore.summary import summarize_run

BACKENDS = ["pt", "safetensors", "hdf5"]


class _Block(nn.Module):
    """A nested module whose forward raises ``self.interrupt`` (when set) between two calls."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.GELU()
        self.interrupt: type[BaseException] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lin(x)
        if self.interrupt is not None:
            raise self.interrupt()  # Ctrl-C arriving while the model runs
        return self.act(x)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Linear(4, 4)
        self.block = _Block()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, depth: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = self.block(self.emb(x))
        if depth:  # a nested call of the root: part of the same step
            h = h + self(x * 0.5, depth - 1)[0].sum()
        return self.head(h), {"hidden": h}


def _cfg(out: Path, run_id: str, backend: str, **extra: object) -> dict[str, object]:
    return {"output_dir": str(out), "run_id": run_id, "backend": backend, "log_step_ids": [], **extra}


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, 4, generator=g) for _ in range(3)]


def _interrupted(model: _Model, x: torch.Tensor, exc: type[BaseException] = KeyboardInterrupt,
                 depth: int = 0) -> None:
    """Run a forward that is interrupted in ``block`` (the innermost call when ``depth``), and catch it."""
    model.block.interrupt = exc
    try:
        with pytest.raises(exc):
            model(x, depth)
    finally:
        model.block.interrupt = None


def _contents(run_dir: Path, step: int) -> list[tuple[object, ...]]:
    """Every tensor of ``step``: its key without the step, its metadata and its bytes."""
    out: list[tuple[object, ...]] = []
    with ilstore.open_run(run_dir) as run:
        for key in run.keys(step):
            t = run.load(key)
            meta = dict(run.meta(key))
            out.append((key.module, key.call, key.kind, key.path, sorted(meta.items(), key=str),
                        t.dtype, tuple(t.shape), t.numpy().tobytes()))
    return out


def _reference(out: Path, backend: str, xs: list[torch.Tensor], depth: int = 0) -> Path:
    """The same forwards, never interrupted."""
    model = _Model()
    with ilstore.capture(model, _cfg(out, "reference", backend)) as cap:
        for x in xs:
            model(x, depth)
    assert cap.run_dir is not None
    return cap.run_dir


def _ls(run_dir: Path) -> str:
    result = CliRunner().invoke(cli, ["ls", str(run_dir), "--calls"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("async_writes", [True, False])
def test_ctrl_c_in_a_nested_module_then_two_forwards(tmp_path: Path, backend: str, async_writes: bool) -> None:
    xs = _inputs()
    model = _Model()
    with torch.no_grad():
        cap = ilstore.capture(model, _cfg(tmp_path, "interrupted", backend, async_writes=async_writes))
        _interrupted(model, xs[0])  # step 0; seen as interrupted when the next forward begins
        outs = [model(x) for x in xs[1:]]
        assert cap.step_index == 3  # the forwards after it were steps 1 and 2
        cap.close()
        ref = _reference(tmp_path, backend, xs)
    assert cap.run_dir is not None
    with ilstore.open_run(cap.run_dir) as run:
        assert run.status == "complete"
        assert run.steps() == [1, 2]
        assert run.incomplete_steps() == [0]  # records of it were written: not completed, not listed
        for step in (1, 2):
            assert [(c.module, c.call) for c in run.calls(step)] == [
                ("emb", 0), ("block", 0), ("block.lin", 0), ("block.act", 0), ("head", 0)]
    for step in (1, 2):
        assert _contents(cap.run_dir, step) == _contents(ref, step)
    # the model's own outputs are untouched
    with torch.no_grad():
        plain = _Model()
        for x, out in zip(xs[1:], outs, strict=True):
            expected = plain(x)
            assert torch.equal(out[0], expected[0]) and torch.equal(out[1]["hidden"], expected[1]["hidden"])
    summary = summarize_run(cap.run_dir)
    assert [s.step for s in summary.steps] == [1, 2] and list(summary.incomplete_steps) == [0]
    assert summary.status == "complete"
    listing = _ls(cap.run_dir)
    assert "status complete, 2 step(s)" in listing
    assert "incomplete step(s), cut before they finished: [0]" in listing


@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_in_a_forward_that_began_paused(tmp_path: Path, backend: str) -> None:
    """An interrupted warm-up run (paused) is no step, and after ``resume()`` the next forwards
    are recorded as steps 0 and 1, as if the warm-up had finished."""
    xs = _inputs()
    model = _Model()
    with torch.no_grad():
        with ilstore.capture(model, _cfg(tmp_path, "interrupted", backend)) as cap:
            cap.pause()
            _interrupted(model, xs[0])
            model(xs[0])  # still paused: no step either
            cap.resume()
            assert cap.step_index == 0
            for x in xs[1:]:
                model(x)
            assert cap.step_index == 2
        ref = _reference(tmp_path, backend, xs[1:])
    assert cap.run_dir is not None
    with ilstore.open_run(cap.run_dir) as run:
        assert run.status == "complete" and run.steps() == [0, 1] and run.incomplete_steps() == []
    for step in (0, 1):
        assert _contents(cap.run_dir, step) == _contents(ref, step)
    assert "incomplete" not in _ls(cap.run_dir)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_after_pausing_inside_the_forward(tmp_path: Path, backend: str) -> None:
    """``pause()`` inside a forward, then Ctrl-C before its end: the step is abandoned, and once
    resumed the next forwards are steps of their own."""
    xs = _inputs()
    model = _Model()
    with torch.no_grad():
        with ilstore.capture(model, _cfg(tmp_path, "interrupted", backend)) as cap:
            handle = model.emb.register_forward_hook(lambda *_: cap.pause())
            _interrupted(model, xs[0])
            handle.remove()
            assert cap.paused
            cap.resume()
            for x in xs[1:]:
                model(x)
        ref = _reference(tmp_path, backend, xs)
    assert cap.run_dir is not None
    with ilstore.open_run(cap.run_dir) as run:
        assert run.status == "complete" and run.steps() == [1, 2] and run.incomplete_steps() == [0]
    for step in (1, 2):
        assert _contents(cap.run_dir, step) == _contents(ref, step)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_nested_root_calls_stay_one_step_and_an_interrupted_one_ends_it(tmp_path: Path,
                                                                       exc: type[BaseException]) -> None:
    """A root forward that calls the root again is one step; interrupted in the innermost call,
    the whole step is abandoned and the next forwards (nested too) are steps of their own."""
    xs = _inputs()
    model = _Model()
    with torch.no_grad():
        with ilstore.capture(model, _cfg(tmp_path, "interrupted", "pt")) as cap:
            _interrupted(model, xs[0], exc, depth=2)
            for x in xs[1:]:
                model(x, 2)
            assert cap.step_index == 3
        ref = _reference(tmp_path, "pt", xs, depth=2)
    assert cap.run_dir is not None
    with ilstore.open_run(cap.run_dir) as run:
        assert run.steps() == [1, 2] and run.incomplete_steps() == [0]
        assert [c.call for c in run.calls(1) if c.module == "emb"] == [0, 1, 2]
    for step in (1, 2):
        assert _contents(cap.run_dir, step) == _contents(ref, step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_right_after_an_interrupted_forward(tmp_path: Path, backend: str) -> None:
    """The interrupted step is not completed by ``close()``; the steps before it stay whole."""
    xs = _inputs()
    model = _Model()
    with torch.no_grad():
        cap = ilstore.capture(model, _cfg(tmp_path, "interrupted", backend))
        model(xs[0])
        _interrupted(model, xs[1])
        cap.close()
        cap.close()  # a second close does nothing
        ref = _reference(tmp_path, backend, xs[:1])
    assert cap.run_dir is not None
    with ilstore.open_run(cap.run_dir) as run:
        assert run.status == "complete" and run.steps() == [0] and run.incomplete_steps() == [1]
    assert _contents(cap.run_dir, 0) == _contents(ref, 0)
    assert "incomplete step(s), cut before they finished: [1]" in _ls(cap.run_dir)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_leaving_the_with_block_fails_the_run_and_keeps_its_steps(tmp_path: Path, backend: str) -> None:
    xs = _inputs()
    model = _Model()
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        with ilstore.capture(model, _cfg(tmp_path, "interrupted", backend)) as cap:
            model(xs[0])
            model.block.interrupt = KeyboardInterrupt
            model(xs[1])
    assert cap.run_dir is not None
    with ilstore.open_run(cap.run_dir) as run:
        assert run.status == "failed" and run.steps() == [0] and run.incomplete_steps() == [1]
    assert "status failed, 1 step(s)" in _ls(cap.run_dir)


def test_only_the_step_after_the_interrupt_is_logged(tmp_path: Path) -> None:
    """``log_step_ids`` counts the interrupted forward as a step: step 1 is the forward after it."""
    xs = _inputs()
    model = _Model()
    with torch.no_grad():
        with ilstore.capture(model, _cfg(tmp_path, "interrupted", "pt", log_step_ids=[1])) as cap:
            _interrupted(model, xs[0])
            model(xs[1])
            model(xs[2])
        ref = _reference(tmp_path, "pt", xs)
    assert cap.run_dir is not None
    with ilstore.open_run(cap.run_dir) as run:
        assert run.steps() == [1] and run.incomplete_steps() == []
    assert _contents(cap.run_dir, 1) == _contents(ref, 1)


class _TwoThreads(nn.Module):
    """Both threads are inside the forward at once (a barrier before and after its call)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bar = threading.Barrier(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.bar.wait(timeout=30)
        y = self.lin(x)
        self.bar.wait(timeout=30)
        return y


def test_a_root_forward_from_another_thread_is_nested_not_an_interrupt(tmp_path: Path) -> None:
    """A model called from two threads at once: the second thread's root forward is nested in the
    first's (one step, as before the interrupt detection), not taken for an interrupted one --
    the first thread's call frame is on its own stack, not on the second thread's."""
    model = _TwoThreads()
    with torch.no_grad(), ilstore.capture(model, _cfg(tmp_path, "threads", "pt")) as cap:
        for _ in range(2):
            threads = [threading.Thread(target=model, args=(torch.ones(1, 4),)) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    assert cap.run_dir is not None
    with ilstore.open_run(cap.run_dir) as run:
        assert run.steps() == [0, 1] and run.incomplete_steps() == []
        assert all(sum(c.module == "lin" for c in run.calls(step)) == 2 for step in (0, 1))
