"""A dependency-free inline SVG plot of the error along execution order (for the HTML report).

One point per module call, in completion order across steps: the largest relative L2 error of
its outputs on a log scale (beyond :data:`MAX_POINTS` calls, the most significant call of each
stretch, so the page stays small for runs of any length). Calls whose outputs are identical sit on
the ``0`` row; calls where the reference is zero but dir1 is not on the ``∞`` row. Colours: match, mismatch (inherited),
introduced; a vertical line marks the first divergence and dashed lines separate steps. With local
errors (a replay: ``CallResult.local``) each plotted call's local error is a hollow diamond on the
same scale, so the error a call adds stands beside the error it passes on.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from html import escape
from typing import Any

from ilstore.keys import CallKey

from .report_common import call_label
from .result import CallResult, Divergence

__all__ = ["MAX_POINTS", "error_plot_svg"]

_W, _H = 960, 340
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 24, 48
_COLORS = {"match": "#2e7d32", "inherited": "#ef6c00", "introduced": "#c62828", "other": "#757575"}
_LOCAL = "#6a1b9a"  # the local error's diamonds
_LEGEND_ROW = 16  # a second legend row (the local error's), when there is one


#: At most this many points: a longer comparison plots, per stretch of consecutive calls, the one
#: that matters most (introduced, then inherited, then other, then match; the largest error first).
MAX_POINTS = 1500
#: Steps separated by a line each up to this many; beyond, :data:`_STEP_LABELS` evenly spaced ones.
_MAX_STEP_LINES = 40
_STEP_LABELS = 9
_RANK = {"introduced": 3, "inherited": 2, "other": 1, "match": 0}


def _kind(c: CallResult) -> str:
    return c.origin or ("match" if c.verdict in ("match", "stats_only_match") else "other")


def _significance(c: CallResult) -> tuple[int, float]:
    v = c.output_rel_l2
    assert v is not None
    return _RANK[_kind(c)], v if not math.isnan(v) else math.inf


class _Unordered(Exception):
    """The calls are not in step order with each step's execution positions after the last's."""


def _by_step(calls: Iterable[CallResult]) -> Iterator[CallResult]:
    """The calls found in both runs in execution order (``order``), sorting one step's calls at a
    time: a comparison lists its calls step by step (start order within a step), and a step's
    execution positions all come after the step's before. Raises :class:`_Unordered` when the
    calls are not so (then the caller sorts them all)."""
    group: list[CallResult] = []
    top = -1
    for c in calls:
        if c.presence != "both":
            continue
        if group and c.call.step != group[-1].call.step:
            group.sort(key=lambda g: g.order)
            if group[0].order <= top:
                raise _Unordered
            top = group[-1].order
            yield from group
            group = []
        group.append(c)
    group.sort(key=lambda g: g.order)
    if group and group[0].order <= top:
        raise _Unordered
    yield from group


def _scanned(calls: Sequence[CallResult], first: Divergence | None) -> tuple[Callable[[], Iterator[CallResult]], _Scan]:
    """A way to go through the calls found in both runs in execution order, as often as wanted,
    holding one step's calls at a time (a 100,000-step comparison's 1.6 M calls are not held),
    and the first pass over them; calls in another order are sorted once, all held."""
    try:
        return (lambda: _by_step(calls)), _Scan(_by_step(calls), first)
    except _Unordered:
        held = sorted((c for c in calls if c.presence == "both"), key=lambda c: c.order)
        return (lambda: iter(held)), _Scan(held, first)


class _Scan:
    """What the plot needs from one pass over the ordered calls: how many (``n``), the range of
    the output errors, where each step begins (positions and steps, in arrays), where the first
    divergence is, and the calls with an output error while there are at most :data:`MAX_POINTS`."""

    def __init__(self, ordered: Iterable[CallResult], first: Divergence | None) -> None:
        self.n = 0
        self.measured = 0
        # smallest and largest positive finite output (and local) error
        self.low: float | None = None
        self.high: float | None = None
        self.starts, self.steps = array("q"), array("q")
        self.first_at: int | None = None
        self.few: list[tuple[int, CallResult]] = []
        self.local = False  # some plotted call has a local error
        target = (first.step, first.rank, first.module, first.call) if first is not None else None
        for i, c in enumerate(ordered):
            k = c.call
            if not self.steps or k.step != self.steps[-1]:
                self.starts.append(i)
                self.steps.append(k.step)
            if self.first_at is None and target is not None and (k.step, k.rank, k.module, k.call) == target:
                self.first_at = i
            v = c.output_rel_l2
            if v is not None:
                self.measured += 1
                if self.measured <= MAX_POINTS:
                    self.few.append((i, c))
                self._extend(v)
                local = _local(c)
                if local is not None:
                    self.local = True
                    self._extend(local)
            self.n = i + 1

    def _extend(self, v: float) -> None:
        if v > 0 and math.isfinite(v):
            self.low = v if self.low is None or v < self.low else self.low
            self.high = v if self.high is None or v > self.high else self.high


def _plotted(ordered: Iterable[CallResult], scan: _Scan) -> list[tuple[int, CallResult, int]]:
    """``(position, call, calls it stands for)`` of each point: every call with an output error, or,
    beyond :data:`MAX_POINTS`, the most significant call of each of that many equal stretches
    (positions ``b * n // MAX_POINTS`` up to the next; the first of equals)."""
    if scan.measured <= MAX_POINTS:
        return [(i, c, 1) for i, c in scan.few]
    n = scan.n
    best: dict[int, list[Any]] = {}  # stretch -> [position, call, its significance, calls in it]
    for i, c in enumerate(ordered):
        if c.output_rel_l2 is None:
            continue
        b = ((i + 1) * MAX_POINTS - 1) // n  # the last stretch b with b * n // MAX_POINTS <= i
        here = best.get(b)
        rank = _significance(c)
        if here is None:
            best[b] = [i, c, rank, 1]
        else:
            here[3] += 1
            if rank > here[2]:
                here[0], here[1], here[2] = i, c, rank
    return [(i, c, among) for _b, (i, c, _rank, among) in sorted(best.items())]


def _local(c: CallResult) -> float | None:
    """The call's local error (rel L2, by replay), when measured."""
    return c.local.rel_l2 if c.local is not None else None


def _diamond(x: float, y: float, r: float) -> str:
    return f"M{x:.1f},{y - r:.1f} L{x + r:.1f},{y:.1f} L{x:.1f},{y + r:.1f} L{x - r:.1f},{y:.1f} Z"


def _y_range(values: Sequence[float]) -> tuple[int, int]:
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if not positive:
        return -8, 0
    lo = math.floor(math.log10(min(positive)))
    hi = math.ceil(math.log10(max(positive)))
    return lo, max(hi, lo + 1)


def error_plot_svg(calls: Sequence[CallResult], first: Divergence | None, rtol: float) -> str:
    """Return an ``<svg>`` element (no XML prologue, no external references).

    Args:
        calls: every call of the comparison (any order; plotted by ``order``).
        first: the first divergence, marked by a vertical line.
        rtol: drawn as a dashed horizontal reference.
    """
    ordered, scan = _scanned(calls, first)
    lo, hi = _y_range([v for v in (scan.low, scan.high) if v is not None] + ([rtol] if rtol > 0 else []))
    top = _TOP + (_LEGEND_ROW if scan.local else 0)
    height = _H + top - _TOP
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    zero_y, inf_y = top + plot_h, top
    band_top, band_bottom = top + 26, top + plot_h - 22

    def x_of(i: int) -> float:
        return _LEFT + (plot_w * (i + 0.5) / max(scan.n, 1))

    def y_of(v: float) -> float:
        if v <= 0:
            return zero_y
        if not math.isfinite(v):
            return inf_y
        frac = (math.log10(v) - lo) / (hi - lo)
        return band_bottom - frac * (band_bottom - band_top)

    parts = [f'<svg class="error-plot" viewBox="0 0 {_W} {height}" width="100%" role="img" '
             f'aria-label="relative L2 error of module outputs along execution order">',
             f'<rect x="{_LEFT}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#bbb"/>']
    for e in range(lo, hi + 1):
        y = y_of(10.0 ** e)
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e0e0e0"/>')
        parts.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">1e{e}</text>')
    parts.append(f'<text x="{_LEFT - 6}" y="{zero_y:.1f}" text-anchor="end" font-size="11">0</text>')
    parts.append(f'<text x="{_LEFT - 6}" y="{inf_y + 10:.1f}" text-anchor="end" font-size="11">∞</text>')
    if rtol > 0:
        y = y_of(rtol)
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#1565c0" '
                     f'stroke-dasharray="6 4"><title>rtol = {rtol:g}</title></line>')
    count = len(scan.starts)
    shown = range(count) if count <= _MAX_STEP_LINES else [
        k * count // _STEP_LABELS for k in range(_STEP_LABELS)]  # the last 1/9 unlabelled: room
    for i, step in ((scan.starts[j], scan.steps[j]) for j in shown):
        x = x_of(i) - plot_w / max(scan.n, 1) / 2
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#9e9e9e" '
                     f'stroke-dasharray="3 3"/>')
        parts.append(f'<text x="{x + 3:.1f}" y="{top + plot_h + 14}" font-size="11">step {step}</text>')
    if first is not None and scan.first_at is not None:
        x = x_of(scan.first_at)
        k = CallKey(first.rank, first.step, first.module, first.call)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#c62828" '
                     f'stroke-width="1.5"><title>first divergence: {escape(call_label(k))}</title></line>')
    points, diamonds = [], []
    for i, c, among in _plotted(ordered(), scan):
        assert c.output_rel_l2 is not None
        kind = _kind(c)
        r = 4.5 if kind == "introduced" else 3
        tip = (f"step {c.call.step} {call_label(c.call)}: {c.verdict}"
               + (f" ({c.origin})" if c.origin else "") + f", output rel L2 {c.output_rel_l2:.3g}")
        if among > 1:
            tip += f" (the most significant of {among} calls here)"
        points.append((x_of(i), y_of(c.output_rel_l2), r, _COLORS[kind], tip))
        parts.append(f'<circle cx="{x_of(i):.1f}" cy="{y_of(c.output_rel_l2):.1f}" r="{r}" fill="{_COLORS[kind]}">'
                     f'<title>{escape(tip)}</title></circle>')
        local = _local(c)
        if local is not None:
            tip = (f"step {c.call.step} {call_label(c.call)}: local error (by replay) rel L2 {local:.3g}, "
                   f"output rel L2 {c.output_rel_l2:.3g}")
            diamonds.append(f'<path d="{_diamond(x_of(i), y_of(local), 4.5)}" fill="none" stroke="{_LOCAL}" '
                            f'stroke-width="1.5"><title>{escape(tip)}</title></path>')
    if len(points) > 1:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y, *_ in points)
        parts.insert(-len(points), f'<polyline points="{path}" fill="none" stroke="#90a4ae" stroke-width="1"/>')
    parts += diamonds  # over the circles: a local error equal to the output error stays visible
    parts.append(f'<text x="{_LEFT + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle" font-size="12">'
                 f'module calls in execution (completion) order</text>')
    parts.append(f'<text x="14" y="{top + plot_h / 2:.1f}" text-anchor="middle" font-size="12" '
                 f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">output rel L2 error</text>')
    legend_x = _LEFT + 8
    for n, (name, color) in enumerate((("match", _COLORS["match"]), ("introduced", _COLORS["introduced"]),
                                       ("inherited", _COLORS["inherited"]),
                                       ("other (e.g. only inputs differ)", _COLORS["other"]))):
        x = legend_x + n * 110
        parts.append(f'<circle cx="{x}" cy="{_TOP - 10}" r="4" fill="{color}"/>'
                     f'<text x="{x + 8}" y="{_TOP - 6}" font-size="11">{name}</text>')
    if rtol > 0:  # the line is a scale, not the verdict: that is per element (|a-b| <= atol + rtol |b|)
        x = legend_x + 3 * 110 + 200
        parts.append(f'<line x1="{x - 6}" x2="{x + 14}" y1="{_TOP - 10}" y2="{_TOP - 10}" stroke="#1565c0" '
                     f'stroke-dasharray="6 4"/><text x="{x + 20}" y="{_TOP - 6}" font-size="11">rtol = {rtol:g} '
                     f'(a guide; verdicts are per element)</text>')
    if scan.local:
        y = _TOP - 10 + _LEGEND_ROW
        parts.append(f'<path d="{_diamond(legend_x, y, 4.5)}" fill="none" stroke="{_LOCAL}" stroke-width="1.5"/>'
                     f'<text x="{legend_x + 8}" y="{y + 4}" font-size="11">local error: what the call adds, '
                     f'measured by replay on the reference\'s inputs (rel L2 of its outputs)</text>')
    parts.append("</svg>")
    return "\n".join(parts)
