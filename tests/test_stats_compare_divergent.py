"""Two statistics runs that differ (issue 13): steps whose pairs fail are decided in arrays too
(``columnar.plain_steps(..., failing=True)`` and ``columnar.analyse``), with every entry, call,
count, order, verdict, origin, first divergence and report of the general path."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import ilstore
import ilstore_compare.engine as engine
from ilstore.keys import CallKey
from ilstore_compare import columnar, compare
from ilstore_compare.entries import Entries, concrete, objects, with_status
from ilstore_compare.report_html import render_html
from ilstore_compare.report_json import render_json
from ilstore_compare.report_md import render_markdown
from ilstore_compare.result import CompareResult, Summary

BACKENDS = ["pt", "safetensors", "hdf5"]


class _Inner(torch.nn.Module):
    """Nested calls: ``inner`` around ``inner.x`` and ``inner.y``."""

    def __init__(self) -> None:
        super().__init__()
        self.x = torch.nn.Linear(8, 8)
        self.y = torch.nn.Linear(8, 8)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.y(torch.relu(self.x(h)))


class _Source(torch.nn.Module):
    """A call without input tensors (its error is inherited once an earlier call's outputs differ)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 8))
        self.bump = 0.0

    def forward(self) -> torch.Tensor:
        return self.w * 1.0 + self.bump


class _Model(torch.nn.Module):
    def __init__(self, nan_at: tuple[int, ...], src_at: tuple[int, ...]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 8)
        self.inner = _Inner()
        self.src = _Source()
        self.out = torch.nn.Linear(8, 8)
        self.nan_at, self.src_at = nan_at, src_at
        self.step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.step in self.nan_at:
            h = h.clone()
            h[0, 0] = math.nan
        h = self.inner(h)
        self.src.bump = 1e-3 if self.step in self.src_at else 0.0
        self.step += 1
        return self.out(h + self.src())


def _run(out: Path, run_id: str, steps: int, backend: str, *, noise_from: int | None = None,
         nan_at: tuple[int, ...] = (), src_at: tuple[int, ...] = ()) -> Path:
    """``steps`` forwards in ``mode: stats``; the input plus 1e-3 from step ``noise_from`` on."""
    model = _Model(nan_at, src_at)
    gen = torch.Generator().manual_seed(1)
    config = {"output_dir": str(out), "run_id": run_id, "backend": backend, "log_step_ids": [], "mode": "stats"}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        for step in range(steps):
            x = torch.randn(2, 8, generator=gen)
            model(x + (1e-3 if noise_from is not None and step >= noise_from else 0.0))
    assert cap.run_dir is not None
    return cap.run_dir


@pytest.fixture
def wired(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What compare() planned: ``plan`` (the general path's plan, the last one) and ``plain`` (the
    steps decided in arrays, failing ones too), recorded by wrapping the engine's two planners."""
    seen: dict[str, Any] = {}

    def recording(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen[name] = fn(*args, **kwargs)
            return seen[name]
        return wrapper

    monkeypatch.setattr(engine, "build_plan", recording("plan", engine.build_plan))
    monkeypatch.setattr(columnar, "plain_steps", recording("plain", columnar.plain_steps))
    return seen


def _general(monkeypatch: pytest.MonkeyPatch, dir1: Path, dir2: Path, **options: object) -> CompareResult:
    """The comparison without the statistics tables (every step pair by pair, from the files)."""
    with monkeypatch.context() as m:
        m.setattr(engine.stats_table, "attach", lambda *a: None)
        return compare(dir1, dir2, **options)


def _same(fast: CompareResult, slow: CompareResult) -> None:
    assert fast.tensors == slow.tensors
    assert fast.calls == slow.calls
    assert list(fast.calls) == list(slow.calls)
    assert fast.summary == slow.summary
    assert fast.first_divergence == slow.first_divergence
    assert fast.introduced == slow.introduced
    assert fast.notes == slow.notes
    assert fast.exit_code == slow.exit_code
    assert fast == slow
    for r in (fast, slow):
        s = r.summary
        assert Summary.of(r.tensors, r.calls, s.steps, s.steps_only_in_dir1, s.steps_only_in_dir2,
                          s.steps_in_neither) == s
    for verbose in (False, True):
        assert render_markdown(fast, verbose) == render_markdown(slow, verbose)
    assert render_json(fast) == render_json(slow)
    assert render_html(fast) == render_html(slow)


def _made_on_demand(result: CompareResult) -> int:
    """Entries held in blocks (made when read), singled out or not."""
    tensors = result.tensors
    if not isinstance(tensors, Entries):
        return 0
    return sum(len(p) for p in tensors.parts() if not isinstance(p, tuple))


@pytest.fixture(scope="module", params=BACKENDS)
def divergent_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run "a" (30 steps, a NaN in ``a``'s output at step 4) and runs "b" like it that differ:
    everywhere, from step 12 on, only in ``src`` at steps 9-20, and everywhere with their own NaN
    at step 16 too."""
    out = tmp_path_factory.mktemp(f"divergent-{request.param}")
    backend = request.param
    return {
        "a": _run(out, "a", 30, backend, nan_at=(4,)),
        "everywhere": _run(out, "everywhere", 30, backend, noise_from=0, nan_at=(4,)),
        "from-12": _run(out, "from12", 30, backend, noise_from=12, nan_at=(4,)),
        "one-module": _run(out, "src", 30, backend, nan_at=(4,), src_at=tuple(range(9, 21))),
        "nan-mixed": _run(out, "nanmix", 30, backend, noise_from=0, nan_at=(4, 16)),
    }


@pytest.mark.parametrize("case", ["everywhere", "from-12", "one-module", "nan-mixed"])
@pytest.mark.parametrize("options", [{}, {"equal_nan": True}, {"exact": True}, {"rtol": 0.5, "atol": 0.1},
                                     {"steps": [2, 4, 13, 16, 25, 40]}, {"modules": "^(inner|src|out)"},
                                     {"workers": 2}],
                         ids=lambda o: ",".join(o) or "defaults")
def test_failing_steps_in_arrays_equal_the_general_path(divergent_runs: dict[str, Path], case: str,
                                                        options: dict[str, object], wired: dict[str, Any],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = divergent_runs["a"], divergent_runs[case]
    fast = compare(a, b, **options)
    plan = wired["plan"]
    slow = _general(monkeypatch, a, b, **options)
    _same(fast, slow)
    # the steps without a NaN were decided in arrays, failing or not
    nan_steps = 2 if case == "nan-mixed" else 1
    wanted = [s for s in options.get("steps", range(30)) if isinstance(s, int) and s < 30]  # type: ignore[attr-defined]
    per_step = fast.summary.tensors // max(1, len(wanted))
    assert _made_on_demand(fast) >= (len(wanted) - nan_steps) * per_step - per_step
    # the general path's plan held the NaN steps' calls only
    assert len(plan.steps) == len(wanted) and len(plan.calls) <= nan_steps * 6


def test_divergence_found_in_arrays(divergent_runs: dict[str, Path], wired: dict[str, Any]) -> None:
    """What the cases are about: where the first divergence is and what it came from."""
    a = divergent_runs["a"]
    everywhere = compare(a, divergent_runs["everywhere"], equal_nan=True)
    assert everywhere.first_divergence is not None and everywhere.first_divergence.step == 0
    assert everywhere.summary.stats_only_mismatched > 30 * 8 and everywhere.exit_code == 1
    late = compare(a, divergent_runs["from-12"], equal_nan=True)
    assert late.first_divergence is not None and late.first_divergence.step == 12
    assert late.first_divergence.module == "a" and late.first_divergence.origin == "inherited"  # its input differs
    assert not any(c.mismatched_tensors for c in late.calls if c.call.step < 12)
    one = compare(a, divergent_runs["one-module"], equal_nan=True)
    d = one.first_divergence
    assert d is not None and (d.step, d.module, d.origin) == (9, "src", "introduced")
    src = [c for c in one.calls if c.call.module == "src" and c.verdict == "mismatch"]
    # src has no input tensors: after step 9 its error counts as already present upstream
    assert [c.call.step for c in src] == list(range(9, 21)) and src[0].origin == "introduced"
    assert {c.origin for c in src[1:]} == {"inherited"}
    assert [i.step for i in one.introduced] == [9]
    nan = compare(a, divergent_runs["nan-mixed"])
    assert nan.first_divergence is not None and nan.first_divergence.step == 0


def test_assemble_refuses_failing_steps(divergent_runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked to assemble failing steps without their analysis (:func:`columnar.analyse`),
    :func:`columnar.assemble` refuses."""
    a, b = divergent_runs["a"], divergent_runs["everywhere"]
    plain = columnar.PlainSteps({}, failing=True)
    with pytest.raises(ValueError, match="columnar.analyse"):
        columnar.assemble(engine.build_plan(*(ilstore.open_run(d) for d in (a, b)), steps=[], modules=None,
                                            name_map=None), plain, (), ())


@pytest.mark.parametrize("chunk", [1, 7])
def test_steps_analysed_a_chunk_at_a_time(divergent_runs: dict[str, Path], chunk: int, wired: dict[str, Any],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-call counts, the origins and the blocks' boundaries are computed over chunks of
    steps (bounded temporaries); whatever falls on the chunks' borders, the result is the same."""
    monkeypatch.setattr(columnar, "_CHUNK_STEPS", chunk)
    a = divergent_runs["a"]
    for case in ("from-12", "one-module"):
        fast = compare(a, divergent_runs[case])
        _same(fast, _general(monkeypatch, a, divergent_runs[case]))
        assert _made_on_demand(fast) > fast.summary.tensors // 2


def test_runs_that_differ_everywhere_are_blocks_only(out_dir: Path, wired: dict[str, Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs that differ at every step: no entry or call object is made until one is read, the
    counts are right, and consecutive steps whose calls came to the same share one block."""
    a = _run(out_dir, "a", 200, "safetensors")
    b = _run(out_dir, "b", 200, "safetensors", noise_from=0)
    result = compare(a, b)
    assert isinstance(result.tensors, Entries) and isinstance(result.calls, Entries)
    assert not list(objects(result.tensors)) and not list(objects(result.calls))
    s = result.summary
    assert s.tensors == 200 * 11 and s.calls == 200 * 6 and s.stats_only_mismatched == 200 * 10
    # every call but src (no input, its output unchanged) differs, from its differing input: at
    # every step the same verdicts and origins, so one block holds all the steps
    assert s.calls_mismatched == 200 * 5 and sorted(c.order for c in result.calls) == list(range(1200))
    assert {(c.verdict, c.origin) for c in result.calls if c.call.module != "src"} == {("mismatch", "inherited")}
    assert len(list(result.calls.parts())) == 1 and len(list(result.tensors.parts())) == 1
    d = result.first_divergence
    assert d is not None and (d.step, d.module, d.origin) == (0, "a", "inherited")
    _same(result, _general(monkeypatch, a, b))


def test_reading_a_few_entries_makes_a_few(divergent_runs: dict[str, Path], wired: dict[str, Any],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking for a status no block has, or for one step's singled-out entries, makes no entry of
    the other blocks; what comes back is the general path's."""
    a, b = divergent_runs["a"], divergent_runs["from-12"]
    fast, slow = compare(a, b, equal_nan=True), _general(monkeypatch, a, b, equal_nan=True)
    made: list[int] = []
    real = columnar._Group.tensor

    def counting(self: Any, k: int, j: int) -> Any:
        made.append(k)
        return real(self, k, j)

    monkeypatch.setattr(columnar._Group, "tensor", counting)
    assert list(with_status(fast.tensors, {"unaligned", "only_in_dir1"})) == [] and made == []
    d = fast.first_divergence
    assert d is not None and d.step == 12
    call = CallKey(d.rank, d.step, d.module, d.call)
    mine = [t for t in concrete(fast.tensors, d.step) if t.key.call_key == call]
    assert mine == [t for t in slow.tensors if t.key.call_key == call] and mine
    assert len(made) <= 11  # step 12's singled-out entries only (11 pairs a step)
    assert list(with_status(fast.tensors, {"stats_only_mismatch"})) == [
        t for t in slow.tensors if t.status == "stats_only_mismatch"]
