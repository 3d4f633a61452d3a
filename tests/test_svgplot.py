"""The HTML report's error plot stays small for long comparisons and keeps what matters."""

from __future__ import annotations

import re

from ilstore.keys import CallKey
from ilstore_compare.result import CallResult
from ilstore_compare.svgplot import MAX_POINTS, error_plot_svg

LEGEND = 3  # the legend's circles


def calls(steps: int, per_step: int, special: dict[int, tuple[str, str | None, float]]) -> list[CallResult]:
    """``steps`` x ``per_step`` matching calls (errors 1e-7 .. 2e-7), with ``special`` positions replaced."""
    out = []
    for order in range(steps * per_step):
        verdict, origin, err = special.get(order, ("match", None, 1e-7 * (1 + (order % 7) / 7)))
        key = CallKey(rank=0, step=order // per_step, module=f"layers.{order % per_step}", call=0)
        out.append(CallResult(call=key, presence="both", verdict=verdict, origin=origin, order=order, tensors=1,
                              mismatched_tensors=int(verdict == "mismatch"), output_rel_l2=err))
    return out


def circles(svg: str) -> list[str]:
    return re.findall(r"<circle [^>]*>(?:<title>[^<]*</title></circle>)?", svg)


def test_short_comparison_plots_every_call_and_separates_every_step() -> None:
    svg = error_plot_svg(calls(3, 5, {7: ("mismatch", "introduced", 1e-3)}), None, 1e-5)
    assert len(circles(svg)) == 15 + LEGEND
    assert len(re.findall(r">step \d+</text>", svg)) == 3
    assert "step 1 layers.2: mismatch (introduced), output rel L2 0.001" in svg
    assert "the most significant of" not in svg


def test_long_comparison_is_bounded_and_keeps_the_significant_calls() -> None:
    n_steps, per_step = 2000, 16
    introduced, worst = 12_345, 30_001  # an introduced call with a small error; the largest error
    special = {introduced: ("mismatch", "introduced", 2e-6), worst: ("mismatch", "inherited", 0.5)}
    svg = error_plot_svg(calls(n_steps, per_step, special), None, 1e-5)
    points = circles(svg)
    assert len(points) - LEGEND <= MAX_POINTS and len(points) - LEGEND >= MAX_POINTS - 1
    titles = " ".join(points)
    assert f"step {introduced // per_step} layers.{introduced % per_step}" in titles  # outranks larger matches
    assert f"step {worst // per_step} layers.{worst % per_step}: mismatch (inherited), output rel L2 0.5" in titles
    assert "the most significant of" in titles
    assert len(re.findall(r">step \d+</text>", svg)) <= 9  # not 2,000 step lines
    assert len(svg) < 600_000
    # a stretch of matches is shown by its largest error: 1e-7 * (1 + 6/7) (every stretch has 21-22 calls)
    assert "output rel L2 1.86e-07 (the most significant of 21 calls here)" in titles
    assert "output rel L2 1e-07" not in titles
