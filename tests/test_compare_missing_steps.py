"""Steps asked for that neither run has: coverage fails closed (docs/compare.md, "Exit status").

A step asked for by itself (``--steps 0,7``, ``steps=[0, 7]``) that is in neither run keeps the
exit status at 1 (verdict ``incomplete``), as a step in one run only does; a step that only a
range selects (``--steps 0-9``, ``steps=range(10)``) is a filter: it is noted, and no gap. The
same holds whatever path compares the steps: one plan, windows of steps, or the statistics
tables' arrays.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import ilstore
from ilstore_compare import CompareOptions, columnar, compare, engine
from ilstore_compare.cli import compare_cmd
from ilstore_compare.report_html import render_html
from ilstore_compare.report_json import validate_report
from ilstore_compare.report_md import render_markdown


def _run(out: Path, run_id: str, mode: str = "tensors", steps: int = 2) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    config = {"output_dir": str(out), "run_id": run_id, "log_step_ids": [], "mode": mode}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        for _ in range(steps):
            model(torch.ones(2, 4))
    assert cap.run_dir is not None
    return cap.run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``a`` and ``b``: the same two steps (0 and 1), tensors; ``sa``, ``sb``: the same, statistics only."""
    out = tmp_path_factory.mktemp("missing-steps")
    return {"a": _run(out, "a"), "b": _run(out, "b"), "sa": _run(out, "sa", "stats"), "sb": _run(out, "sb", "stats")}


def _cli(*args: str | Path) -> Any:
    return CliRunner().invoke(compare_cmd, [str(a) for a in args], catch_exceptions=False)


def test_a_step_asked_for_in_neither_run_fails_closed_in_every_report(runs: dict[str, Path]) -> None:
    base = ("--dir1", runs["a"], "--dir2", runs["b"], "--steps", "0,7")
    md = _cli(*base)
    assert md.exit_code == 1, md.stdout
    assert "INCOMPLETE" in md.stdout and "step 7 is in neither run" in md.stdout
    assert "steps asked for, in neither run" in md.stdout  # the summary row
    js = _cli(*base, "--format", "json")
    assert js.exit_code == 1
    data = json.loads(js.stdout)
    assert validate_report(data) == []
    assert data["verdict"] == "incomplete" and data["exit_code"] == 1
    assert data["summary"]["steps_in_neither"] == [7] and data["summary"]["steps"] == [0]
    assert data["options"]["steps"] == [0, 7] and data["options"]["required_steps"] == [0, 7]
    assert any("step 7 is in neither run" in n for n in data["notes"])
    html = _cli(*base, "--format", "html")
    assert html.exit_code == 1 and "INCOMPLETE" in html.stdout and "step 7 is in neither run" in html.stdout
    # alone, the missing step is an empty comparison, as before
    assert _cli("--dir1", runs["a"], "--dir2", runs["b"], "--steps", "7").exit_code == 1


def test_a_range_only_filters(runs: dict[str, Path]) -> None:
    """Steps 2-9 of ``0-9`` are in neither run: noted once, as a range, and no gap; a single step
    listed beside a range is still asked for."""
    res = _cli("--dir1", runs["a"], "--dir2", runs["b"], "--steps", "0-9")
    assert res.exit_code == 0, res.stdout
    assert "steps 2–9 are in neither run" in res.stdout and "a range only selects" in res.stdout
    res = _cli("--dir1", runs["a"], "--dir2", runs["b"], "--steps", "0-3,8", "--format", "json")
    data = json.loads(res.stdout)
    assert res.exit_code == 1 and data["summary"]["steps_in_neither"] == [8]
    assert data["options"]["required_steps"] == [8]


def test_python_steps_a_list_asks_a_range_filters(runs: dict[str, Path]) -> None:
    assert CompareOptions(steps=[7, 0]).required_steps == (0, 7)
    assert CompareOptions(steps=range(10)).required_steps == ()
    assert CompareOptions(steps="0-3,8,2").required_steps == (2, 8)
    assert CompareOptions().required_steps is None
    assert CompareOptions.create(CompareOptions(steps="0-3"), workers=2).required_steps == ()
    assert CompareOptions.create(CompareOptions(steps="0-3"), steps=[1]).required_steps == (1,)
    r = compare(runs["a"], runs["b"], steps=[0, 7])
    assert (r.exit_code, r.verdict, r.summary.steps_in_neither) == (1, "incomplete", (7,))
    assert compare(runs["a"], runs["b"], steps=range(10)).exit_code == 0


def test_windows_and_statistics_tables_fail_closed_too(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    whole = compare(runs["a"], runs["b"], steps=[0, 1, 7])
    with monkeypatch.context() as m:  # a window of one pair at a time
        m.setattr(engine, "_WINDOW_PAIRS", 1)
        windowed = compare(runs["a"], runs["b"], steps=[0, 1, 7])
    assert windowed.exit_code == whole.exit_code == 1
    assert windowed.summary == whole.summary and windowed.notes == whole.notes
    assert render_markdown(windowed) == render_markdown(whole)

    planned: list[Any] = []
    plain_steps = columnar.plain_steps

    def recording(*args: Any, **kwargs: Any) -> Any:
        planned.append(plain_steps(*args, **kwargs))
        return planned[-1]

    monkeypatch.setattr(columnar, "plain_steps", recording)
    fast = compare(runs["sa"], runs["sb"], steps=[0, 1, 7], allow_stats_only=True)
    assert planned and planned[-1] is not None and planned[-1].templates  # steps 0-1 decided in arrays
    assert (fast.exit_code, fast.verdict, fast.summary.steps_in_neither) == (1, "incomplete", (7,))
    assert "step 7 is in neither run" in render_html(fast)
    assert compare(runs["sa"], runs["sb"], steps=[0, 1], allow_stats_only=True).exit_code == 0
