"""The HTML report: the markdown report's content plus a plot of error along execution order,
in one self-contained file (inline CSS and SVG; no script, no network)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from tabulate import tabulate

from .report_common import (
    CALL_HEADERS,
    INTRODUCED_HEADERS,
    SEVERE,
    TENSOR_HEADERS,
    UNALIGNED_HEADERS,
    call_rows,
    calls_by_step,
    divergence_text,
    first_divergence_tensors,
    introduced_rows,
    options_line,
    summary_rows,
    tensor_rows,
    tensors_by_step,
    unaligned_rows,
    verdict_line,
)
from .result import CompareResult
from .svgplot import error_plot_svg

__all__ = ["render_html"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #212121; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f5f5f5; }
.verdict { font-size: 1.2em; font-weight: bold; padding: 0.5em; border-radius: 4px; }
.match { background: #e8f5e9; } .mismatch { background: #ffebee; }
.incomplete, .empty { background: #fff8e1; }
.note { color: #6d4c41; }
"""


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    return str(tabulate(rows, headers=list(headers), tablefmt="html", disable_numparse=True))


def render_html(result: CompareResult, verbose: bool = False) -> str:
    """Render the report as one self-contained HTML page.

    Args:
        result: what :func:`ilstore_compare.compare` returned.
        verbose: list every tensor (default: only those that differ or are one-sided).
    """
    title = f"ilstore compare: {result.dir1} vs {result.dir2}"
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{escape(title)}</title>",
           f"<style>{_CSS}</style></head><body>", "<h1>ilstore compare report</h1>",
           f'<p class="verdict {result.verdict}">{escape(verdict_line(result))}</p>',
           _table([["path", result.dir1, result.dir2], ["backend", result.backend1, result.backend2],
                   ["run status", result.status1, result.status2]], ["", "dir1", "dir2 (reference)"]),
           f"<p>Verdict rule: {escape(options_line(result))}.</p>"]
    out += [f'<p class="note">note: {escape(n)}</p>' for n in result.notes]
    out += ["<h2>Summary</h2>", _table(summary_rows(result), ["", "count"])]
    out += ["<h2>Error along execution order</h2>", error_plot_svg(result.calls, result.first_divergence,
                                                                   result.options.rtol)]
    out.append("<h2>First divergence</h2>")
    first = result.first_divergence
    if first is None:
        out.append("<p>No module call has differing outputs.</p>")
    else:
        out.append(f"<p>{escape(divergence_text(first))}</p>")
        out.append(_table(tensor_rows(first_divergence_tensors(result)), TENSOR_HEADERS))
    if result.introduced:
        out += ["<h2>Where error is introduced</h2>",
                "<p>Calls whose inputs match but whose outputs differ, by how much the relative L2 error grows "
                "there (output / input).</p>", _table(introduced_rows(result.introduced), INTRODUCED_HEADERS)]
    unaligned = unaligned_rows(result.tensors)
    if unaligned:
        out += ["<h2>Declared unaligned by the map</h2>",
                "<p>Tensors the map says cannot be aligned between the runs: counted, not compared.</p>",
                _table(unaligned, UNALIGNED_HEADERS)]
    for step, calls in calls_by_step(result).items():
        out += [f"<h2>Step {step}</h2>", "<p>Module calls in start order (parents before their children).</p>",
                _table(call_rows(calls), CALL_HEADERS)]
    shown = list(result.tensors) if verbose else [t for t in result.tensors if t.status in SEVERE]
    if shown:
        out.append(f"<h2>{'Tensor details' if verbose else 'Tensors that differ or are one-sided'}</h2>")
        for step, tensors in tensors_by_step(shown).items():
            out += [f"<h3>Step {step}</h3>", _table(tensor_rows(tensors), TENSOR_HEADERS)]
    out.append("</body></html>")
    return "\n".join(out) + "\n"
