"""The outline of the markdown and HTML reports, written once: a list of blocks each format renders.

:func:`outline` decides what the report says and in which order (sections, paragraphs,
tables, what ``--verbose`` and the brief limit change); :mod:`.report_md` and
:mod:`.report_html` only turn blocks into their syntax. Blocks a format cannot show (the
error plot in markdown) name the formats that show them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .entries import Entries, tally, with_status
from .report_common import (
    CALL_HEADERS,
    INTRODUCED_HEADERS,
    SEVERE,
    TENSOR_HEADERS,
    TOKEN_LOST_HEADERS,
    TOKEN_REQUEST_HEADERS,
    TOKEN_STEP_HEADERS,
    UNALIGNED_HEADERS,
    UNREADABLE_HEADERS,
    call_rows,
    calls_by_step,
    divergence_text,
    first_divergence_tensors,
    introduced_rows,
    options_line,
    step_ranges,
    summary_rows,
    tensor_rows,
    tensors_by_step,
    token_line,
    token_lost_rows,
    token_request_rows,
    token_step_rows,
    unaligned_rows,
    unreadable_line,
    unreadable_rows,
    verdict_line,
)
from .report_local import (
    CALL_LOCAL_HEADERS,
    LOCAL_HEADERS,
    ORACLE_HEADERS,
    TOP_LOCAL,
    UNREPLAYED_HEADERS,
    call_local_cells,
    local_intro,
    local_rows,
    measured_text,
    no_measured_text,
    oracle_intro,
    oracle_line,
    oracle_rows,
    unreplayed_rows,
)
from .result import CallResult, CompareResult, LocalError
from .svgplot import error_plot_svg

__all__ = ["BRIEF_LIMIT", "Heading", "Text", "Notes", "Table", "Figure", "Block", "outline"]

#: One-sided and differing tensors listed without ``--verbose``.
BRIEF_LIMIT = 50


@dataclass(frozen=True)
class Heading:
    """A section title; ``level`` 1 is the report's title."""

    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    """A paragraph; ``style`` ``verdict`` is the headline verdict (``css`` its class)."""

    text: str
    style: str = ""
    css: str = ""


@dataclass(frozen=True)
class Notes:
    """Remarks for the reader, one per line."""

    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class Figure:
    """Inline markup (the SVG plot), rendered only by the formats in ``formats``, under its own heading."""

    title: str
    markup: Callable[[], str]
    formats: frozenset[str]


Block = Heading | Text | Notes | Table | Figure


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> Table:
    return Table(tuple(headers), tuple(tuple(r) for r in rows))


def outline(result: CompareResult, verbose: bool = False) -> list[Block]:
    """The report's blocks, in order.

    Args:
        result: what :func:`ilstore_compare.compare` returned.
        verbose: list every tensor (default: only those that differ or are one-sided, at most
            :data:`BRIEF_LIMIT`).
    """
    headline = verdict_line(result)
    if result.oracle is not None:
        headline = f"{oracle_line(result.oracle)} (exit status {result.exit_code})"
        if result.unreadable:
            headline += "; " + unreadable_line(result)
    out: list[Block] = [Heading("ilstore compare report", 1), Text(headline, "verdict", result.verdict),
                        _table([["path", result.dir1, result.dir2], ["backend", result.backend1, result.backend2],
                                ["run status", result.status1, result.status2]], ["", "dir1", "dir2 (reference)"]),
                        Text(f"Verdict rule: {options_line(result)}.")]
    if result.notes:
        out.append(Notes(result.notes))
    if result.unreadable:  # every entry, verbose or not: each is a file to repair
        out += [Heading("Unreadable tensors"),
                Text("These stored tensor bodies could not be read (file missing, truncated or corrupt): they were "
                     "not compared, everything else was. Repair or recapture the run; the exit status is 2."),
                _table(unreadable_rows(result.unreadable), UNREADABLE_HEADERS)]
    tokens = result.token_alignment
    if tokens is not None:  # --align-tokens: how the runs' tokens were paired (docs/parallel.md)
        out += [Heading("Token alignment"), Text(token_line(tokens)),
                _table(token_request_rows(tokens), TOKEN_REQUEST_HEADERS)]
        if tokens.not_aligned:
            out.append(_table(token_lost_rows(tokens), TOKEN_LOST_HEADERS))
        if verbose or len(tokens.steps) <= BRIEF_LIMIT:
            out.append(_table(token_step_rows(tokens), TOKEN_STEP_HEADERS))
    out += [Heading("Summary"), _table(summary_rows(result), ["", "count"])]
    out.append(Figure("Error along execution order",
                      lambda: error_plot_svg(result.calls, result.first_divergence, result.options.rtol),
                      frozenset({"html"})))

    out.append(Heading("First divergence"))
    first = result.first_divergence
    if result.local is not None:
        out += _measured_first(result)
    elif first is None:
        out.append(Text("No module call has differing outputs."))
    else:
        out += [Text(divergence_text(first)), _table(tensor_rows(first_divergence_tensors(result)), TENSOR_HEADERS)]
    if result.local is not None:
        out += _local_section(result, verbose)
    if result.oracle is not None:
        out += _oracle_section(result, verbose)
    if result.introduced:
        out += [Heading("Where error is introduced"),
                Text("Calls whose inputs match but whose outputs differ, by how much the relative L2 error grows "
                     "there (output / input)."), _table(introduced_rows(result.introduced), INTRODUCED_HEADERS)]
    unaligned = unaligned_rows(result.tensors)
    if unaligned:
        out += [Heading("Declared unaligned by the map"),
                Text("Tensors the map says cannot be aligned between the runs: counted, not compared"
                     + (" (accepted with --allow-unaligned)." if result.options.allow_unaligned
                        else " (they keep the exit status at 1 unless --allow-unaligned).")),
                _table(unaligned, UNALIGNED_HEADERS)]

    side = call_local_cells if result.local is not None else None
    headers = CALL_HEADERS + (CALL_LOCAL_HEADERS if side is not None else [])
    intro = "Module calls in start order (parents before their children)." + (
        " Propagated error (dir1 vs dir2) and local error (measured by replay) side by side." if side is not None
        else "")
    groups, held_back = _step_groups(result.calls, side, None if verbose else BRIEF_LIMIT)
    for steps, rows in groups:
        if len(steps) == 1:
            out += [Heading(f"Step {steps[0]}"), Text(intro), _table(rows, headers)]
        else:  # a long run's identical steps: one table, not one per step
            out += [Heading(f"Steps {step_ranges(steps)}"),
                    Text(f"{intro} These {len(steps)} consecutive steps have the same module calls with the same "
                         "verdicts and figures, so they share one table."), _table(rows, headers)]
    tabled = {step for steps, _ in groups for step in steps}
    rest = [step for step in result.summary.steps if step not in tabled]
    if rest and held_back:  # (steps of the run with no call compared, a --modules matching none there, have no table)
        out.append(Text(f"The call tables of {len(rest)} more step(s) ({step_ranges(rest)}) are not shown (the "
                        f"first {BRIEF_LIMIT} tables are): --verbose shows every step's table, --steps picks steps, "
                        "--format json lists every call."))

    if verbose:
        cut = list(result.tensors)
        shown = len(cut)
    else:  # the first BRIEF_LIMIT made; the rest only counted (a block of entries counts without making them)
        cut = list(itertools.islice(with_status(result.tensors, SEVERE), BRIEF_LIMIT))
        shown = len(cut) if len(cut) < BRIEF_LIMIT else sum(
            n for status, n in tally(result.tensors, "status").items() if status in SEVERE)
    if cut:
        out.append(Heading("Tensor details" if verbose else "Tensors that differ or are one-sided"))
        for step, tensors in tensors_by_step(cut).items():
            out += [Heading(f"Step {step}", 3), _table(tensor_rows(tensors), TENSOR_HEADERS)]
        if len(cut) < shown:
            out.append(Text(f"… and {shown - len(cut)} more; use --verbose (or --format json) for all."))
    return out


def _step_tables(calls: Sequence[CallResult], side: Any) -> Iterator[tuple[int, list[list[Any]]]]:
    """``(step, its call table's rows)`` in order of the steps' first calls.

    The calls of a block of plain steps (:class:`.columnar._CallBlock`, ``step_calls``) give
    every step of the block the same rows (they differ only in step and execution position,
    neither of which is a cell), so its table is made once and shared, without making every
    step's call objects: a 100,000-step run's report would otherwise build 1.6 M of them.
    """
    parts: Iterable[Any] = calls.parts() if isinstance(calls, Entries) and side is None else (calls,)
    for part in parts:
        step_calls = getattr(part, "step_calls", None)
        if step_calls is None:
            for step, members in calls_by_step(part).items():
                yield step, call_rows(members, side)
            continue
        rows: list[list[Any]] | None = None
        for k, step in enumerate(part.steps):
            if rows is None:
                rows = call_rows(step_calls(k), side)
            yield step, rows


def _step_groups(calls: Sequence[CallResult], side: Any,
                 limit: int | None = None) -> tuple[list[tuple[list[int], list[list[Any]]]], bool]:
    """Consecutive steps (numbers in a row) whose call tables are equal cell for cell, grouped;
    the first ``limit`` groups (no table made beyond them) or all; and whether groups were left
    out (a step with calls past the limit)."""
    groups: list[tuple[list[int], list[list[Any]]]] = []
    for step, rows in _step_tables(calls, side):
        if limit is not None and len(groups) > limit:  # a group past the limit has begun (it may merge no more)
            return groups[:limit], True
        if groups and groups[-1][0][-1] == step:  # one step's calls in two parts: one table
            steps, before = groups[-1]
            if len(steps) == 1:
                groups[-1] = (steps, before + rows)
            else:
                steps.pop()
                groups.append(([step], before + rows))
        elif groups and groups[-1][0][-1] + 1 == step and (groups[-1][1] is rows or groups[-1][1] == rows):
            groups[-1][0].append(step)
        else:
            groups.append(([step], rows))
    return (groups, False) if limit is None or len(groups) <= limit else (groups[:limit], True)


def _measured_first(result: CompareResult) -> list[Block]:
    """The first divergence labelled from the measurement, and the threshold-based guess beside it."""
    assert result.local is not None
    first, guess = result.first_divergence, result.threshold_divergence
    out: list[Block] = []
    if first is None:
        out.append(Text(no_measured_text(result)))
    else:
        out += [Text(measured_text(first, result.local)),
                _table(tensor_rows(first_divergence_tensors(result)), TENSOR_HEADERS)]
    if guess is not None:
        out.append(Text(f"Without replay, the tolerance alone would point at: {divergence_text(guess)}."))
    return out


def _local_section(result: CompareResult, verbose: bool) -> list[Block]:
    local = result.local
    assert local is not None
    measured = nonzero = 0  # counted; only the entries listed are held (every measured one with --verbose)
    shown: list[LocalError] = []
    for e in local.errors:
        if not e.compared:
            continue
        measured += 1
        # exact: no error and no element out of the tolerance (NaN on both sides with equal_nan off is one)
        inexact = e.rel_l2 != 0 or bool(e.mismatched)
        if inexact:
            nonzero += 1
        if verbose or (inexact and len(shown) < TOP_LOCAL):
            shown.append(e)
    out: list[Block] = [Heading("Local error (where error is introduced, measured)"), Text(local_intro(local))]
    if shown:
        cut = "." if len(shown) == nonzero or verbose else (
            f"; the top {len(shown)} of {nonzero} (--verbose or --format json for all).")
        out += [Text("Calls by local error (relative L2 over all their outputs), largest first" + cut),
                _table(local_rows(shown, result.calls), LOCAL_HEADERS)]
    if not verbose and nonzero < measured:
        out.append(Text(f"{measured - nonzero} measured call(s) reproduce the reference's outputs exactly "
                        "(local error 0)" + (" and are not listed (--verbose lists them)." if nonzero else ".")))
    missing = local.not_compared
    if missing:
        out += [Heading("Calls not replayed or not measured", 3),
                Text("No local error for these; they count as not compared (exit status 1, or 2 where a file "
                     "could not be read)."),
                _table(unreplayed_rows(missing), UNREPLAYED_HEADERS)]
    return out


def _oracle_section(result: CompareResult, verbose: bool) -> list[Block]:
    o = result.oracle
    assert o is not None
    out: list[Block] = [Heading("Oracle verdict"), Text(oracle_intro(o))]
    if o.flagged:
        out += [Heading("Flagged calls", 3), _table(oracle_rows(o.flagged), ORACLE_HEADERS)]
    if o.not_evaluated:
        out += [Heading("Calls not evaluated", 3), _table(oracle_rows(o.not_evaluated), ORACLE_HEADERS)]
    if verbose:
        out += [Heading("Every call", 3), _table(oracle_rows(o.calls), ORACLE_HEADERS)]
    return out
