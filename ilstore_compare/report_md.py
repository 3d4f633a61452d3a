"""The markdown report (the default): summary, first divergence, per-step call tables, details."""

from __future__ import annotations

from collections.abc import Sequence
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

__all__ = ["render_markdown"]

#: One-sided and differing tensors listed without ``--verbose``.
BRIEF_LIMIT = 50


def _cell(value: Any) -> Any:
    return value.replace("|", "\\|") if isinstance(value, str) else value


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    return str(tabulate([[_cell(v) for v in row] for row in rows], headers=list(headers), tablefmt="github",
                    disable_numparse=True))


def render_markdown(result: CompareResult, verbose: bool = False) -> str:
    """Render the report as GitHub-flavoured markdown.

    Args:
        result: what :func:`ilstore_compare.compare` returned.
        verbose: list every tensor (default: only those that differ or are one-sided, at most
            :data:`BRIEF_LIMIT`).
    """
    out: list[str] = ["# ilstore compare report", "", f"**{verdict_line(result)}**", ""]
    out += [_table([["path", result.dir1, result.dir2], ["backend", result.backend1, result.backend2],
                    ["run status", result.status1, result.status2]], ["", "dir1", "dir2 (reference)"]), ""]
    out += [f"Verdict rule: {options_line(result)}.", ""]
    for note in result.notes:
        out.append(f"> note: {note}")
    if result.notes:
        out.append("")
    out += ["## Summary", "", _table(summary_rows(result), ["", "count"]), ""]

    out += ["## First divergence", ""]
    first = result.first_divergence
    if first is None:
        out += ["No module call has differing outputs.", ""]
    else:
        out += [divergence_text(first), ""]
        out += [_table(tensor_rows(first_divergence_tensors(result)), TENSOR_HEADERS), ""]
    if result.introduced:
        out += ["## Where error is introduced", "",
                "Calls whose inputs match but whose outputs differ, by how much the relative L2 error grows "
                "there (output / input).", "", _table(introduced_rows(result.introduced), INTRODUCED_HEADERS), ""]
    unaligned = unaligned_rows(result.tensors)
    if unaligned:
        out += ["## Declared unaligned by the map", "",
                "Tensors the map says cannot be aligned between the runs: counted, not compared"
                + (" (accepted with --allow-unaligned)." if result.options.allow_unaligned
                   else " (they keep the exit status at 1 unless --allow-unaligned)."), "",
                _table(unaligned, UNALIGNED_HEADERS), ""]

    for step, calls in calls_by_step(result).items():
        out += [f"## Step {step}", "", "Module calls in start order (parents before their children).", "",
                _table(call_rows(calls), CALL_HEADERS), ""]

    shown = list(result.tensors) if verbose else [t for t in result.tensors if t.status in SEVERE]
    title = "Tensor details" if verbose else "Tensors that differ or are one-sided"
    if shown:
        out += [f"## {title}", ""]
        cut = shown if verbose else shown[:BRIEF_LIMIT]
        for step, tensors in tensors_by_step(cut).items():
            out += [f"### Step {step}", "", _table(tensor_rows(tensors), TENSOR_HEADERS), ""]
        if len(cut) < len(shown):
            out += [f"… and {len(shown) - len(cut)} more; use --verbose (or --format json) for all.", ""]
    return "\n".join(out).rstrip() + "\n"
