"""Review of the oracle verdict and the local error (replay): four holes, each closed.

* A replay whose outputs hold NaN/Inf where the run it was replayed from is finite has an
  infinite local error (``rel_l2`` counts only the elements finite on both sides, which hid it:
  the oracle passed it with exit 0, the ranking put it last).
* A container is unflagged only by its last child (the one call inside it whose output can be its
  output), not by any flagged call nested in it.
* Calls the oracle recorded that neither replay captured are not evaluated (verdict
  ``incomplete``), as a call a ``--replay`` run lacks is not compared.
* The oracle verdict's reasons call the oracle "the oracle", not "the reference".

Runs are real captures of tiny models (fixed seeds): a float64 oracle, bfloat16 replays of it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ilstore
from ilstore.keys import CallKey
from ilstore_compare import compare
from ilstore_compare.oracle import explain_containers
from ilstore_compare.report_json import report_dict, validate_report
from ilstore_compare.report_md import render_markdown
from ilstore_compare.result import OracleCall
from test_compare_windows import _windowed

NAN, INF = float("nan"), float("inf")


class Block(nn.Module):
    """``scale * x + out(act(fc(x)))``: ``out`` is its last child; ``fc``'s output is not the block's."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.fc, self.act, self.out, self.scale = nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x + self.out(self.act(self.fc(x)))


def _model(dtype: torch.dtype, *, scale: float = 1.0, bad: tuple[str, ...] = (),
           poison: dict[str, float] | None = None, fill: dict[str, float] | None = None) -> nn.Module:
    """``0`` (Linear 16→32), ``1`` (a :class:`Block`), ``2`` (Linear 32→8); ``bad`` modules' weights
    perturbed; ``poison``: a module's first weight (``.weight``) or bias (``.bias``) set to a value;
    ``fill``: all of it."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), Block(scale), nn.Linear(32, 8))
    with torch.no_grad():
        for n, name in enumerate(bad):
            w = m.get_submodule(name).weight
            w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(2 + n)))
        for name, value in (poison or {}).items():
            module, _, param = name.rpartition(".")
            getattr(m.get_submodule(module), param).view(-1)[0] = value
        for name, value in (fill or {}).items():
            module, _, param = name.rpartition(".")
            getattr(m.get_submodule(module), param).fill_(value)
    return m.to(dtype).eval()


def _capture(out: Path, run_id: str, dtype: torch.dtype, *, steps: int = 2, replay_from: Path | None = None,
             **kw: Any) -> Path:
    cfg = {"output_dir": str(out), "run_id": run_id, "log_step_ids": [], **kw.pop("cfg", {})}
    if replay_from is not None:
        cfg["replay_from"] = str(replay_from)
    m = _model(dtype, **kw)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 16, generator=gen, dtype=torch.float64) for _ in range(steps)]
    with torch.no_grad(), ilstore.capture(m, cfg) as cap:
        for x in xs:
            m(x.to(dtype))
    assert cap.run_dir is not None
    return cap.run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("oracle-review")
    oracle = _capture(out, "fp64", torch.float64)
    bf16 = torch.bfloat16

    def rep(run_id: str, **kw: Any) -> Path:
        return _capture(out, run_id, bf16, replay_from=oracle, **kw)

    nan_ref = _capture(out, "nan_ref", torch.float32, poison={"1.out.weight": NAN})
    return {
        "oracle": oracle,
        "ref": rep("ref"),
        # one NaN weight in 1.out: a NaN output column where the oracle is finite
        "nan_col": rep("nan_col", poison={"1.out.weight": NAN}),
        "nan_all": rep("nan_all", fill={"2.weight": NAN}),
        "inf_col": rep("inf_col", poison={"2.bias": INF}),
        # the NaN in the run replayed from, and in its replay at the same places: as before
        "nan_ref": nan_ref,
        "nan_same": _capture(out, "nan_same", torch.float32, replay_from=nan_ref, poison={"1.out.weight": NAN}),
        # the block's own code broken (1.5 x), and 1.fc (not its last child) broken too
        "block": rep("block", scale=1.5),
        "block_fc": rep("block_fc", scale=1.5, bad=("1.fc",)),
        # 1.out, the block's last child, broken: the block carries its error
        "out": rep("out", bad=("1.out",)),
        # both replays without 2 (not captured)
        "no2_ref": rep("no2_ref", cfg={"module_call_match": [r"^[01]"]}),
        "no2_cand": rep("no2_cand", cfg={"module_call_match": [r"^[01]"]}),
        # a replay of one step of the two
        "one_step": rep("one_step", steps=1),
        # three steps, the oracle two
        "three_steps": rep("three_steps", steps=3),
    }


def _oracle_call(result: Any, module: str, step: int = 0) -> OracleCall:
    return next(c for c in result.oracle.calls if c.call.module == module and c.call.step == step)


# -- 1. NaN/Inf where the oracle is finite: an infinite local error ---------------------------------
@pytest.mark.parametrize("case, module, text", [
    ("nan_col", "1.out", "the replay has 4 NaN / 0 Inf where the oracle is finite"),
    ("nan_all", "2", "the replay has 32 NaN / 0 Inf where the oracle is finite"),
    ("inf_col", "2", "the replay has 0 NaN / 4 Inf where the oracle is finite"),
])
def test_oracle_flags_a_replay_with_nan_or_inf_where_the_oracle_is_finite(runs: dict[str, Path], case: str,
                                                                          module: str, text: str) -> None:
    result = compare(runs[case], runs["ref"], oracle=runs["oracle"])
    assert result.oracle is not None
    c = _oracle_call(result, module)
    assert c.candidate_rel_l2 == math.inf and c.flagged and c.evaluated and text in (c.reason or "")
    assert (0, module) in {(f.call.step, f.call.module) for f in result.oracle.flagged}
    assert result.exit_code == 1 and result.verdict == "mismatch"
    data = report_dict(result)
    assert validate_report(data) == []
    item = next(i for i in data["oracle"]["calls"] if i["module"] == module and i["step"] == 0)
    assert item["candidate_rel_l2"] is None and item["flagged"] and item["evaluated"]


@pytest.mark.parametrize("case, module, text", [
    ("nan_col", "1.out", "the replay has 4 NaN / 0 Inf where the reference is finite"),
    ("nan_all", "2", "the replay has 32 NaN / 0 Inf where the reference is finite"),
    ("inf_col", "2", "the replay has 0 NaN / 4 Inf where the reference is finite"),
])
def test_local_error_of_a_replay_with_nan_or_inf_is_infinite_and_ranked_first(runs: dict[str, Path], case: str,
                                                                              module: str, text: str) -> None:
    result = compare(runs[case], runs["oracle"])  # dir1 a replay of dir2: its local errors
    assert result.local is not None
    top = list(result.local.errors)[:2]  # both steps
    assert {(e.call.step, e.call.module) for e in top} == {(0, module), (1, module)}
    assert all(e.rel_l2 == math.inf and e.compared and e.exceeds and text in (e.reason or "") for e in top)
    data = report_dict(result)
    assert validate_report(data) == []
    assert data["local_errors"][0]["rel_l2"] is None and data["local_errors"][0]["compared"] is True
    assert text in render_markdown(result)


def test_the_same_nan_on_both_sides_keeps_its_finite_local_error(runs: dict[str, Path]) -> None:
    result = compare(runs["nan_same"], runs["nan_ref"])
    assert result.local is not None
    errors = {(e.call.step, e.call.module): e for e in result.local.errors}
    e = errors[(0, "1.out")]
    assert e.compared and e.rel_l2 == 0.0 and e.mismatched and "NaN" not in (e.reason or "")
    # NaN against NaN (equal_nan off) is out of the tolerance: the call does not reproduce the reference
    # exactly, and the markdown does not count it among those that do
    exact = sum(1 for e in result.local.errors if e.compared and e.rel_l2 == 0 and not e.mismatched)
    md = render_markdown(result)
    assert f"{exact} measured call(s) reproduce the reference's outputs exactly" in md
    assert exact < sum(1 for e in result.local.errors if e.compared and e.rel_l2 == 0)


def test_nonfinite_differences_are_counted_by_kind() -> None:
    from ilstore_compare.local_call import _nonfinite_text

    a = torch.tensor([NAN, INF, 1.0, NAN, INF, -INF, NAN, 2.0])
    b = torch.tensor([1.0, 2.0, NAN, NAN, -INF, -INF, INF, 2.0])
    assert _nonfinite_text([(a, b)], "oracle") == (
        "the replay has 1 NaN / 1 Inf where the oracle is finite; the oracle has 1 NaN/Inf where the replay is "
        "finite; 2 element(s) NaN/Inf on both sides differ (NaN against Inf, or Inf of the other sign)")
    assert _nonfinite_text([(a[3:6:2], b[3:6:2]), (torch.arange(3), torch.arange(3))], "reference") is None


# -- 2. a container is explained by its last child only --------------------------------------------
def test_a_container_broken_itself_stays_flagged_beside_a_flagged_child_that_is_not_its_last(
        runs: dict[str, Path]) -> None:
    alone = compare(runs["block"], runs["ref"], oracle=runs["oracle"])
    both = compare(runs["block_fc"], runs["ref"], oracle=runs["oracle"])
    assert alone.oracle is not None and both.oracle is not None
    assert {c.call.module for c in alone.oracle.flagged} == {"1"}
    assert {c.call.module for c in both.oracle.flagged} == {"1", "1.fc"}
    block = _oracle_call(both, "1")
    assert block.flagged and block.container and "carries" not in (block.reason or "")
    assert both.exit_code == 1


def test_a_container_is_explained_by_its_flagged_last_child(runs: dict[str, Path]) -> None:
    result = compare(runs["out"], runs["ref"], oracle=runs["oracle"])
    assert result.oracle is not None and result.exit_code == 1
    assert {c.call.module for c in result.oracle.flagged} == {"1.out"}
    block = _oracle_call(result, "1")
    assert not block.flagged and block.ratio is not None and block.ratio > 2
    assert "not flagged itself: it carries the error of 1.out, flagged inside it" in (block.reason or "")


def test_explanation_passes_through_last_children_only() -> None:
    def call(module: str) -> CallKey:
        return CallKey(0, 0, module, 0)

    def verdict(module: str, flagged: bool) -> OracleCall:
        return OracleCall(call(module), 1.0, 0.1, 10.0, flagged, True, None, module in ("a", "a.b"))

    # a runs a.b then a.x; a.b runs a.b.c; a.b.c flagged, so is a.b (its container) and a
    calls = [verdict("a.b.c", True), verdict("a.b", True), verdict("a.x", False), verdict("a", True)]
    last = {call("a.b"): call("a.b.c"), call("a"): call("a.x")}
    out = {c.call.module: c for c in explain_containers(calls, last)}
    assert not out["a.b"].flagged and out["a"].flagged  # a's last child, a.x, is not flagged
    last[call("a")] = call("a.b")
    out = {c.call.module: c for c in explain_containers(calls, last)}
    assert [m for m, c in out.items() if c.flagged] == ["a.b.c"]
    assert out["a"].reason == ("not flagged itself: it carries the error of a.b.c, flagged inside it "
                               "(through its last call inside it, a.b)")


# -- 3. calls of the oracle that neither replay captured ---------------------------------------------
def test_oracle_calls_neither_replay_captured_are_not_evaluated(runs: dict[str, Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    result = compare(runs["no2_cand"], runs["no2_ref"], oracle=runs["oracle"])
    assert result.oracle is not None
    missing = [c for c in result.oracle.not_evaluated]
    assert {(c.call.step, c.call.module) for c in missing} == {(0, "2"), (1, "2")}
    assert all(c.reason == "in the oracle, in neither replay (not captured)" and not c.flagged for c in missing)
    assert result.verdict == "incomplete" and result.exit_code == 1
    assert validate_report(report_dict(result)) == []
    windowed = _windowed(monkeypatch, 1, runs["no2_cand"], runs["no2_ref"], oracle=runs["oracle"])
    assert windowed.oracle is not None and list(windowed.oracle.calls) == list(result.oracle.calls)
    # the module filter leaves 2 out of the comparison: nothing is missing
    kept = compare(runs["no2_cand"], runs["no2_ref"], oracle=runs["oracle"], modules="^1")
    assert kept.oracle is not None and not kept.oracle.not_evaluated and kept.exit_code == 0


def test_oracle_steps_neither_replay_captured_are_not_evaluated(runs: dict[str, Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    result = compare(runs["one_step"], runs["one_step"], oracle=runs["oracle"])
    assert result.oracle is not None and result.exit_code == 1 and result.verdict == "incomplete"
    assert {c.call.step for c in result.oracle.not_evaluated} == {1}
    assert all("in neither replay" in (c.reason or "") for c in result.oracle.not_evaluated)
    windowed = _windowed(monkeypatch, 1, runs["one_step"], runs["one_step"], oracle=runs["oracle"])
    assert windowed.oracle is not None and list(windowed.oracle.calls) == list(result.oracle.calls)
    only = compare(runs["one_step"], runs["one_step"], oracle=runs["oracle"], steps=[0])
    assert only.oracle is not None and not only.oracle.not_evaluated and only.exit_code == 0


# -- 4. the oracle is "the oracle" --------------------------------------------------------------------
def test_oracle_reasons_name_the_oracle(runs: dict[str, Path]) -> None:
    result = compare(runs["three_steps"], runs["ref"], oracle=runs["oracle"])
    assert result.oracle is not None
    step2 = [c for c in result.oracle.not_evaluated if c.call.step == 2]
    assert step2 and all((c.reason or "").startswith("candidate: step 2 is not in the oracle (stepping mismatch)")
                         for c in step2)
    assert not any("not in the reference (" in (c.reason or "") for c in result.oracle.calls)
