"""The reports of long runs: consecutive steps with equal call tables share one table, and step
lists are written as ranges (a 2,000-step run is one table and ``0–1999``, not 2,000 of each)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import ilstore
from ilstore_compare import compare
from ilstore_compare.report_common import step_ranges
from ilstore_compare.report_html import render_html
from ilstore_compare.report_md import render_markdown


def _run(out: Path, run_id: str, scale_step: int | None) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(out), "run_id": run_id, "log_step_ids": []}) as cap:
        for step in range(6):
            x = torch.ones(2, 8)
            model(x * 1.5 if step == scale_step else x)
    assert cap.run_dir is not None
    return cap.run_dir


def test_equal_consecutive_steps_share_one_table(tmp_path: Path) -> None:
    result = compare(_run(tmp_path, "a", 3), _run(tmp_path, "b", None))
    md = render_markdown(result)
    headings = [line for line in md.splitlines() if line.startswith("## Step")]
    # steps 4-5 equal steps 0-2 too, but a group is consecutive: the divergent step 3 splits them
    assert headings == ["## Steps 0–2", "## Step 3", "## Steps 4–5"]
    assert "These 3 consecutive steps have the same module calls" in md
    assert "| steps" in md and "0–5" in md
    assert "Steps 0–2" in render_html(result)


def test_verbose_report_groups_equal_steps_too(tmp_path: Path) -> None:
    result = compare(_run(tmp_path, "a", None), _run(tmp_path, "b", None), rtol=0, atol=0)
    md = render_markdown(result, verbose=True)
    assert [line for line in md.splitlines() if line.startswith("## Step")] == ["## Steps 0–5"]


def test_step_ranges() -> None:
    assert step_ranges([]) == ""
    assert step_ranges([7]) == "7"
    assert step_ranges([0, 1, 2, 4, 6, 7]) == "0–2, 4, 6–7"
    assert step_ranges(range(2000)) == "0–1999"


def test_plain_stats_steps_share_their_table_without_making_calls(tmp_path: Path, monkeypatch: Any) -> None:
    """A block of plain statistics steps (``.columnar``) gives its table once: the report does not
    make every step's call objects (1.6 M for a 100,000-step run), and says the same."""
    import ilstore_compare.columnar as columnar
    import ilstore_compare.engine

    def stats_run(run_id: str, scale_step: int | None) -> Path:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        config = {"output_dir": str(tmp_path), "run_id": run_id, "log_step_ids": [], "mode": "stats"}
        with torch.no_grad(), ilstore.capture(model, config) as cap:
            for step in range(40):
                x = torch.ones(2, 8)
                model(x * 1.5 if step == scale_step else x)
        assert cap.run_dir is not None
        return cap.run_dir

    a, b = stats_run("a", 17), stats_run("b", None)
    made = []
    real_call = columnar.StepTemplate.call

    def counting(self: Any, step: int, j: int, base: int) -> Any:
        made.append(step)
        return real_call(self, step, j, base)

    monkeypatch.setattr(columnar.StepTemplate, "call", counting)
    md = render_markdown(compare(a, b))
    assert [line for line in md.splitlines() if line.startswith("## Step")] == [
        "## Steps 0–16", "## Step 17", "## Steps 18–39"]
    assert sorted(set(made)) == [0, 18]  # one step of each block, for its table
    monkeypatch.setattr(columnar.StepTemplate, "call", real_call)
    monkeypatch.setattr(ilstore_compare.engine.stats_table, "attach", lambda *args: None)
    assert render_markdown(compare(a, b)) == md  # the general path's report (no statistics tables)


def test_brief_report_shows_the_first_tables_of_a_long_divergent_run(tmp_path: Path, monkeypatch: Any) -> None:
    """Steps whose tables all differ: the first BRIEF_LIMIT tables, the rest named as ranges;
    --verbose shows every table (the markdown and HTML reports share the outline)."""
    import ilstore_compare.report_outline as outline

    monkeypatch.setattr(outline, "BRIEF_LIMIT", 2)

    def run(run_id: str, scale: float) -> Path:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        cfg = {"output_dir": str(tmp_path), "run_id": run_id, "log_step_ids": []}
        with torch.no_grad(), ilstore.capture(model, cfg) as cap:
            for step in range(6):
                model(torch.ones(2, 8) * (1 + step / 10) * (scale if step != 2 else 1.0))
        assert cap.run_dir is not None
        return cap.run_dir

    result = compare(run("a", 1.001), run("b", 1.0))
    md = render_markdown(result)
    assert [line for line in md.splitlines() if line.startswith("## Step")] == ["## Step 0", "## Step 1"]
    assert "The call tables of 4 more step(s) (2–5) are not shown (the first 2 tables are)" in md
    html = render_html(result)
    assert "Step 1" in html and "Step 3" not in html and "4 more step(s) (2–5)" in html
    full = render_markdown(result, verbose=True)
    assert [line for line in full.splitlines() if line.startswith("## Step")] == [
        "## Step 0", "## Step 1", "## Step 2", "## Step 3", "## Step 4", "## Step 5"]
    assert "more step(s)" not in full
    # steps whose calls the modules filter leaves out have no table to hold back (a reviewer saw
    # "The call tables of 2 more step(s) (0–1) are not shown (the first 50 tables are)" there)
    none = compare(tmp_path / "a", tmp_path / "b", modules="no_such_module")
    assert none.summary.steps and "more step(s)" not in render_markdown(none)
    assert "more step(s)" not in render_html(none)


def test_steps_on_one_side_are_counted_then_named(tmp_path: Path) -> None:
    """The summary's count column gives a count: a lone step 0 once read as "none"."""
    a = _run(tmp_path, "a", None)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "b",
                                                  "log_step_ids": [1, 2, 3, 4]}) as cap:
        for _ in range(6):
            model(torch.ones(2, 8))
    assert cap.run_dir is not None
    md = render_markdown(compare(a, cap.run_dir))
    rows = [" ".join(line.split()) for line in md.splitlines() if line.startswith("| steps only in")]
    assert rows == ["| steps only in dir1 | 2 (steps 0, 5) |"], rows
