"""The HTML report's error plot stays small for long comparisons and keeps what matters."""

from __future__ import annotations

import dataclasses
import random
import re
import tracemalloc
from collections.abc import Sequence
from typing import Any

import pytest

from ilstore.keys import CallKey
from ilstore_compare.result import CallResult, LocalError
from ilstore_compare.svgplot import MAX_POINTS, error_plot_svg

LEGEND = 4  # the legend's circles


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
    # the legend names every colour and the dashed rtol line, which is no pass/fail threshold
    assert ">other (e.g. only inputs differ)</text>" in svg
    assert "rtol = 1e-05 (a guide; verdicts are per element)" in svg


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


class _Lazy(Sequence[CallResult]):
    """Calls made when read (as a long comparison's result reads them back a window at a time),
    in step order, each step's calls in start order: its execution positions reversed."""

    def __init__(self, steps: int, per_step: int) -> None:
        self.steps, self.per_step = steps, per_step

    def __len__(self) -> int:
        return self.steps * self.per_step

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not 0 <= i < len(self):
            raise IndexError(i)
        step, j = divmod(i, self.per_step)
        key = CallKey(rank=0, step=step, module=f"layers.{j}", call=0)
        return CallResult(call=key, presence="both", verdict="mismatch", origin="inherited",
                          order=step * self.per_step + self.per_step - 1 - j, tensors=1, mismatched_tensors=1,
                          output_rel_l2=1e-3 * (1 + (i % 11) / 11))


@pytest.mark.slow  # a long comparison: ~8 s
def test_the_plot_of_a_long_comparison_holds_a_step_of_calls_at_a_time() -> None:
    """Calls listed step by step are put in execution order a step at a time: the plot of
    40,000 calls made on demand never holds them all (it did: ~25 MB), and it is the plot of the
    same calls listed in any other order (those are sorted whole)."""
    lazy = _Lazy(2500, 16)
    error_plot_svg(_Lazy(3, 16), None, 1e-5)  # set-up done once is not counted
    tracemalloc.start()
    try:
        svg = error_plot_svg(lazy, None, 1e-5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, peak
    shuffled = list(lazy)
    random.Random(0).shuffle(shuffled)
    assert error_plot_svg(shuffled, None, 1e-5) == svg == error_plot_svg(sorted(shuffled, key=lambda c: c.order),
                                                                          None, 1e-5)


def test_local_errors_are_diamonds_on_the_same_scale_with_their_own_legend_row() -> None:
    base = calls(2, 4, {5: ("mismatch", "introduced", 1e-2)})
    local = {1: 3e-9, 5: 4e-2, 6: None}  # 6: not measured (no diamond); 0, 2, ...: no local error at all
    with_local = [dataclasses.replace(c, local=LocalError(c.call, rel_l2=local[c.order], max_abs_diff=None,
                                                          max_ulp=None, mismatched=None, replayed=True,
                                                          compared=local[c.order] is not None, reason=None,
                                                          container=False, random=False, order=c.order))
                  if c.order in local else c for c in base]
    svg = error_plot_svg(with_local, None, 1e-5)
    diamonds = re.findall(r'<path d="M[^"]*"[^>]*><title>([^<]*)</title>', svg)
    assert diamonds == ["step 0 layers.1: local error (by replay) rel L2 3e-09, output rel L2 1.14e-07",
                        "step 1 layers.1: local error (by replay) rel L2 0.04, output rel L2 0.01"]
    assert len(circles(svg)) == 8 + LEGEND  # the calls' own points are unchanged
    assert ">local error: what the call adds, measured by replay on the reference's inputs" in svg
    assert ">1e-9</text>" in svg and ">1e-1</text>" in svg  # the scale takes the local errors in
    assert 'viewBox="0 0 960 356"' in svg  # one legend row more
    plain = error_plot_svg(base, None, 1e-5)
    assert "<path" not in plain and "local error" not in plain and 'viewBox="0 0 960 340"' in plain
