"""A call row's max abs diff names the tensor that holds it (unless it is the call's one output):
an input mask that differs by 1e36 no longer reads as the module's own error."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

import ilstore
from ilstore_compare import compare
from ilstore_compare.report_html import render_html
from ilstore_compare.report_json import render_json, validate_report
from ilstore_compare.report_md import render_markdown


class _Masked(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x * 2  # the mask is not used: it differs between the runs, the output does not


class _Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + 1, x * 3


class _Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class _Root(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.masked, self.pair, self.one = _Masked(), _Pair(), _Double()

    def forward(self, x: torch.Tensor, low: float) -> torch.Tensor:
        y = self.masked(x, torch.full((2, 4), low))
        a, b = self.pair(y)
        return self.one(a + b)


def _runs(tmp_path: Path) -> tuple[Path, Path]:
    runs = []
    for run_id, low, bump in (("a", torch.finfo(torch.float32).min, 0.0), ("b", torch.finfo(torch.bfloat16).min, 0.5)):
        model = _Root()
        x = torch.arange(8.0).reshape(2, 4)
        x[0, 0] += bump  # dir1 and dir2 differ in the input too: by 0.5 at one element
        with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": run_id}) as cap:
            model(x, low)
        assert cap.run_dir is not None
        runs.append(cap.run_dir)
    return runs[0], runs[1]


def _call_rows(markdown: str) -> dict[str, str]:
    """The step's call table: module name -> its row."""
    lines = markdown.splitlines()
    head = lines.index("## Step 0")
    table = [line for line in lines[head:] if line.startswith("| ")]
    return {line.split("|")[1].strip(): line for line in table[1:4]}


def test_the_worst_tensor_is_named_unless_it_is_the_one_output(tmp_path: Path) -> None:
    a, b = _runs(tmp_path)
    result = compare(a, b)
    calls = {c.call.module: c for c in result.calls}
    gap = float(torch.finfo(torch.bfloat16).min) - float(torch.finfo(torch.float32).min)
    assert calls["masked"].max_abs_diff == gap and calls["masked"].max_abs_diff_at == ("inputs", "1")
    assert calls["pair"].max_abs_diff == 3.0 and calls["pair"].max_abs_diff_at == ("outputs", "1")  # 0.5 * 2 * 3
    assert calls["one"].max_abs_diff == 8.0 and calls["one"].max_abs_diff_at == ("outputs",)  # (a + b) * 2
    rows = _call_rows(render_markdown(result))
    assert "| 1.33e+36 (inputs[1]) " in rows["masked"]
    assert "| 3 (outputs[1]) " in rows["pair"]
    assert "| 8 " in rows["one"] and "(outputs" not in rows["one"] and "(inputs" not in rows["one"]
    html = render_html(result)
    assert "1.33e+36 (inputs[1])" in html and "3 (outputs[1])" in html
    report = json.loads(render_json(result))
    assert validate_report(report) == []
    at = {c["module"]: c["max_abs_diff_at"] for c in report["calls"]}
    assert at == {"masked": ["inputs", "1"], "pair": ["outputs", "1"], "one": ["outputs"]}


def test_equal_runs_name_nothing(tmp_path: Path) -> None:
    a, _ = _runs(tmp_path)
    result = compare(a, a)
    assert {(c.max_abs_diff, c.max_abs_diff_at) for c in result.calls} == {(0.0, None)}
    assert "(inputs" not in render_markdown(result) and "(outputs" not in render_markdown(result)
