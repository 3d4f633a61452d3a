"""Formatting shared by the markdown and HTML reports: labels, numbers and table rows."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ilstore.keys import CallKey, TensorKey

from .entries import concrete, with_status
from .metrics import MetricInfo, cosine_text, metric_infos
from .result import CallResult, CompareResult, Divergence, TensorResult, Unreadable
from .selection import step_ranges
from .tokens import TokenAlignment

__all__ = ["num", "call_label", "tensor_label", "verdict_line", "summary_rows", "options_line", "call_rows",
           "CALL_HEADERS", "tensor_rows", "TENSOR_HEADERS", "TENSOR_COLUMNS", "divergence_text", "introduced_rows",
           "INTRODUCED_HEADERS", "calls_by_step", "tensors_by_step", "SEVERE", "unaligned_rows", "UNALIGNED_HEADERS",
           "first_divergence_tensors", "unreadable_rows", "UNREADABLE_HEADERS", "unreadable_line",
           "token_line", "token_request_rows", "TOKEN_REQUEST_HEADERS", "token_lost_rows", "TOKEN_LOST_HEADERS",
           "token_step_rows", "TOKEN_STEP_HEADERS"]

#: Tensor statuses listed by default (without ``--verbose``).
SEVERE = frozenset({"mismatch", "shape_mismatch", "stats_only_mismatch", "not_compared", "only_in_dir1",
                    "only_in_dir2", "unreadable"})


def num(x: float | int | None, pct: bool = False) -> str:
    """A compact number: ``—`` for missing, ``inf``, three significant digits."""
    if x is None:
        return "—"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x}%" if pct else str(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    text = "0" if x == 0 else f"{x:.3g}"
    return text + "%" if pct else text


def call_label(call: CallKey) -> str:
    rank = f"rank{call.rank} " if call.rank else ""
    return f"{rank}{call.module}" + (f"#{call.call}" if call.call else "")


def tensor_label(key: TensorKey) -> str:
    return _label(key.kind, key.path)


def _label(kind: str, path: Sequence[str]) -> str:
    return kind + "".join(f"[{p}]" for p in path)


def verdict_line(result: CompareResult) -> str:
    words = {"match": "MATCH: every tensor compared and matched",
             "mismatch": "MISMATCH: some tensors differ",
             "incomplete": "INCOMPLETE: no values differ, but not every tensor could be compared on both sides",
             "empty": "EMPTY: nothing was compared"}
    line = f"{words[result.verdict]} (exit status {result.exit_code})"
    if result.unreadable:
        line += "; " + unreadable_line(result)
    s = result.summary
    if s.unaligned and not result.options.allow_unaligned and result.verdict == "incomplete":
        line += (f"; {s.unaligned} tensor(s) the map declares unaligned count as gaps "
                 "(--allow-unaligned accepts them)")
    if s.steps_in_neither:
        line += (f"; {len(s.steps_in_neither)} step(s) asked for are in neither run "
                 f"({step_ranges(s.steps_in_neither)}) and count as gaps")
    local = result.local
    if local is not None and local.not_compared:
        line += f"; {len(local.not_compared)} call(s) could not be replayed or measured (not compared)"
    if local is not None and local.first is not None and s.mismatched == 0:
        line += "; a call's local error crosses the tolerance"
    tokens = result.token_alignment
    if tokens is not None and not tokens.complete:
        lost = sum(n for _, _, n in tokens.not_aligned)
        line += f"; {lost} token(s) could not be aligned" + (
            "" if result.options.allow_unaligned else " and count as gaps (--allow-unaligned accepts them)")
    return line


# -- token alignment (--align-tokens) ---------------------------------------------------------------
TOKEN_REQUEST_HEADERS = ["request (dir1)", "request (dir2)", "matched by", "tokens dir1", "tokens dir2", "aligned",
                         "diverges at"]
TOKEN_LOST_HEADERS = ["run", "tokens", "not aligned because"]
TOKEN_STEP_HEADERS = ["step", "dir1 step", "request (dir1)", "dir2 step(s)", "request (dir2)", "positions", "tokens",
                      "per-request rows"]


def token_line(tokens: TokenAlignment) -> str:
    """One sentence: how many tokens were aligned, from what, in how many steps."""
    return (f"{tokens.aligned} token(s) aligned, of {tokens.tokens1} in dir1 and {tokens.tokens2} in dir2 "
            f"({'every token' if tokens.complete else 'not every token'}); compared in {len(tokens.steps)} step(s), "
            f"one per request and dir1 step. dir1: {tokens.source1}. dir2: {tokens.source2}.")


def token_request_rows(tokens: TokenAlignment) -> list[list[Any]]:
    return [[r.request1 or "—", r.request2 or "—", r.how, r.tokens1, r.tokens2, r.aligned, num(r.diverges_at)]
            for r in tokens.requests]


def token_lost_rows(tokens: TokenAlignment) -> list[list[Any]]:
    return [[run, n, reason] for run, reason, n in tokens.not_aligned]


def token_step_rows(tokens: TokenAlignment) -> list[list[Any]]:
    return [[s.step, s.step1, s.request1, ", ".join(map(str, s.steps2)), s.request2,
             f"{s.positions[0]}–{s.positions[-1]}" if len(s.positions) > 1 else str(s.positions[0]), len(s.tokens1),
             "compared" if s.last1 is not None and s.last2 is not None else "dir1 only" if s.last1 is not None
             else "dir2 only" if s.last2 is not None else "—"] for s in tokens.steps]



def options_line(result: CompareResult) -> str:
    o = result.options
    if o.exact:
        rule = "bitwise equality (--exact)"
    else:
        rule = f"|a − b| ≤ atol + rtol·|b| with rtol={o.rtol:g}, atol={o.atol:g} (b: dir2, the reference)"
    nan = "NaN equals NaN in the same place" if o.equal_nan else "NaN never matches"
    parts = [rule, nan]
    if o.steps is not None:
        parts.append(f"steps {', '.join(map(str, o.steps))}")
    if o.modules is not None:
        parts.append(f"modules matching {', '.join(o.modules)}")
    if o.map is not None:
        m = o.map
        parts.append(f"map: {len(m.rules)} rename rule(s) applied to {m.apply_to}, "
                     f"{len(m.path_rules)} path rule(s), {len(m.unaligned)} unaligned declaration(s)")
    if o.squeeze_shapes:
        parts.append("shapes that differ only by size-1 dimensions compared squeezed")
    if o.allow_stats_only:
        parts.append("stats-only matches accepted")
    if o.allow_unaligned:
        parts.append("tensors declared unaligned accepted")
    if o.replay is not None:
        parts.append(f"local error from the replay run {o.replay}")
    if o.oracle is not None:
        parts.append(f"oracle {o.oracle}, factor {o.oracle_factor:g}")
    return "; ".join(parts)


def summary_rows(result: CompareResult) -> list[list[Any]]:
    s = result.summary
    rows: list[list[Any]] = [
        ["tensors (paired or one-sided)", s.tensors],
        ["compared", s.compared],
        ["matched", s.matched],
        ["mismatched", s.mismatched],
        ["  of which shape mismatches", s.shape_mismatches],
        ["  of which stats-only mismatches", s.stats_only_mismatched],
        ["stats-only matches (bodies not stored)", s.stats_only_matched],
        ["dtype differs (values compared upcast)", s.dtype_mismatches],
        ["not compared (no body, no statistics, or unreadable)", s.not_compared],
        ["  of which unreadable (file missing or damaged)", s.unreadable],
        ["only in dir1", s.only_in_dir1],
        ["only in dir2", s.only_in_dir2],
        ["declared unaligned by the map (not compared)", s.unaligned],
        ["compared squeezed (only size-1 dimensions differ)", s.squeezed],
        ["module calls", s.calls],
        ["module calls that differ", s.calls_mismatched],
        ["module calls only in dir1", s.calls_only_in_dir1],
        ["module calls only in dir2", s.calls_only_in_dir2],
        ["module calls declared unaligned", s.calls_unaligned],
        ["steps", step_ranges(s.steps) or "—"],
    ]
    for label, only in (("only in dir1", s.steps_only_in_dir1), ("only in dir2", s.steps_only_in_dir2),
                        ("asked for, in neither run", s.steps_in_neither)):
        if only:  # a count, then which: a lone step number in the count column read as "none"
            rows.append([f"steps {label}", f"{len(only)} (step{'s' if len(only) > 1 else ''} {step_ranges(only)})"])
    return rows


def unreadable_line(result: CompareResult) -> str:
    """What the unreadable tensors mean for the reader (the headline and the section say it)."""
    files = {u.file or u.reason for u in result.unreadable}
    return (f"{len(result.unreadable)} tensor(s) could not be read ({len(files)} file(s) missing or damaged) and "
            "were not compared: repair or recapture the run")


UNREADABLE_HEADERS = ["run", "tensor", "file", "reason", "during"]


def unreadable_rows(entries: Sequence[Unreadable]) -> list[list[Any]]:
    """One row per unreadable tensor: the run, the tensor (that run's naming), the file and the reason."""
    return [[u.run, u.key.display(), u.file or "—", u.reason,
             "local error" if u.during == "local_error" else "compare"] for u in entries]


def divergence_text(d: Divergence) -> str:
    where = f"step {d.step}, {call_label(CallKey(d.rank, d.step, d.module, d.call))}"
    if d.origin == "introduced":
        why = "its inputs match, its outputs differ: the error is introduced in this call"
    else:
        why = "its inputs (or a call nested in it) already differed: the error is inherited"
    return f"{where} — {d.origin}: {why}"


INTRODUCED_HEADERS = ["step", "module call", "output rel L2", "input rel L2", "growth", "differing outputs"]


def _short(d: Divergence, display: str) -> str:
    """``outputs[0]`` from a differing tensor's display form (``rank1 step 0 mod#2 outputs[0]``)."""
    prefix = CallKey(d.rank, d.step, d.module, d.call).tensor("outputs").display().rsplit(" ", 1)[0] + " "
    return display.removeprefix(prefix)


def introduced_rows(items: Sequence[Divergence]) -> list[list[Any]]:
    rows = []
    for d in items:
        growth = "∞ (identical inputs)" if d.input_rel_l2 == 0 and d.output_rel_l2 else num(d.growth)
        rows.append([d.step, call_label(CallKey(d.rank, d.step, d.module, d.call)), num(d.output_rel_l2),
                     num(d.input_rel_l2), growth, ", ".join(_short(d, t) for t in d.tensors) or "—"])
    return rows


CALL_HEADERS = ["module call", "verdict", "origin", "tensors", "differ", "unaligned", "max abs diff", "max rel diff",
                "out rel L2", "min cos"]


def max_abs_cell(c: CallResult) -> str:
    """The call's largest ``|a - b|``, naming the tensor that holds it unless that is the call's one
    output (``1.3e+36 (inputs[attention_mask])``: an input, or one output of several)."""
    at = c.max_abs_diff_at
    if c.max_abs_diff is None or at is None or at == ("outputs",):
        return num(c.max_abs_diff)
    return f"{num(c.max_abs_diff)} ({_label(at[0], at[1:])})"


def call_rows(calls: Sequence[CallResult], local: Callable[[CallResult], list[str]] | None = None) -> list[list[Any]]:
    """One row per call (:data:`CALL_HEADERS`), then ``local(call)``'s cells when given (the local error)."""
    rows = []
    for c in calls:
        verdict = c.verdict
        if c.presence != "both":
            verdict = f"unaligned, only in {c.presence}" if c.verdict == "unaligned" else f"only in {c.presence}"
        rows.append([call_label(c.call), verdict, c.origin or "", c.tensors, c.mismatched_tensors,
                     c.unaligned_tensors, max_abs_cell(c), num(c.max_rel_diff), num(c.output_rel_l2),
                     cosine_text(c.min_cosine, num)] + (local(c) if local is not None else []))
    return rows


def first_divergence_tensors(result: CompareResult) -> list[TensorResult]:
    """The entries of the first divergence's call, in the report's order."""
    d = result.first_divergence
    if d is None:
        return []
    call = CallKey(d.rank, d.step, d.module, d.call)
    # a call with a differing value is held, or singled out of its block (.columnar): of step d.step
    return [t for t in concrete(result.tensors, d.step) if t.key.call_key == call]


UNALIGNED_HEADERS = ["declared by", "found in", "tensors", "module calls", "reason"]


def unaligned_rows(tensors: Sequence[TensorResult], max_calls: int = 6) -> list[list[Any]]:
    """Tensors the map declares unaligned, one row per declaration and run they were found in."""
    groups: dict[tuple[str, str], list[TensorResult]] = {}
    for t in with_status(tensors, ("unaligned",)):
        groups.setdefault((t.note or "", t.presence), []).append(t)
    def order(group: tuple[str, str]) -> tuple[int, str]:
        m = re.match(r"unaligned\[(\d+)\]", group[0])
        return (int(m.group(1)) if m else -1, group[1])

    rows = []
    for (note, presence), members in sorted(groups.items(), key=lambda item: order(item[0])):
        rule, _, reason = note.partition(": ")
        calls = list(dict.fromkeys(f"{call_label(t.key.call_key)} {tensor_label(t.key)}" for t in members))
        shown = ", ".join(calls[:max_calls]) + (f", … (+{len(calls) - max_calls})" if len(calls) > max_calls else "")
        found = "both" if presence == "both" else f"{presence} only"
        rows.append([rule, found, len(members), shown, reason])
    return rows


def _pair(a: Any, b: Any) -> str:
    fa = "—" if a is None else (str(list(a)) if isinstance(a, tuple) else str(a).removeprefix("torch."))
    fb = "—" if b is None else (str(list(b)) if isinstance(b, tuple) else str(b).removeprefix("torch."))
    return fa if fa == fb else f"{fa} vs {fb}"


def _join(*parts: str | None) -> str:
    return "; ".join(p for p in parts if p)


def _stat_failed(name: str, v1: Any, v2: Any) -> str:
    """One statistic that failed a stats-only pair, as the note shows it."""
    if name == "nan_count" and v1 == v2:  # equal counts fail only because NaN matches NaN with --equal-nan alone
        return f"nan_count {v1} on both sides (NaN matches NaN only with --equal-nan)"
    return f"{name} {num(v1) if isinstance(v1, float) else v1} vs {num(v2) if isinstance(v2, float) else v2}"


def _tensor_note(t: TensorResult) -> str:
    note = t.note or ""
    if t.stats_failed:
        note = "; ".join([note] if note else []) + ("; " if note else "") + "differ: " + ", ".join(
            _stat_failed(name, v1, v2) for name, v1, v2 in t.stats_failed)
    if t.renamed_from:
        note = _join(note, f"renamed from {t.renamed_from}")
    return _join(note, *t.alignment)


def _metric_cell(name: str, info: MetricInfo) -> Callable[[TensorResult], str]:
    def cell(t: TensorResult) -> str:
        m = t.metrics
        if m is None:
            return "—"
        return info.cell(m, num) if info.cell is not None else num(getattr(m, name))

    return cell


#: The columns of the tensor tables, ``(header, cell)``: who and what, then one column per
#: labelled :class:`~ilstore_compare.metrics.TensorMetrics` field (its :class:`MetricInfo`), then the note.
TENSOR_COLUMNS: list[tuple[str, Callable[[TensorResult], str]]] = [
    ("module call", lambda t: call_label(t.key.call_key)),
    ("tensor", lambda t: tensor_label(t.key)),
    ("status", lambda t: t.status),
    ("shape", lambda t: _pair(t.shape1, t.shape2) + (" (squeezed)" if t.squeezed else "")),
    ("dtype", lambda t: _pair(t.dtype1, t.dtype2)),
    *((info.label, _metric_cell(name, info)) for name, info in metric_infos() if info.label is not None),
    ("note", _tensor_note),
]
TENSOR_HEADERS = [header for header, _ in TENSOR_COLUMNS]


def tensor_rows(tensors: Sequence[TensorResult]) -> list[list[Any]]:
    return [[cell(t) for _, cell in TENSOR_COLUMNS] for t in tensors]


def calls_by_step(calls: Iterable[CallResult]) -> dict[int, list[CallResult]]:
    out: dict[int, list[CallResult]] = {}
    for c in calls:
        out.setdefault(c.call.step, []).append(c)
    return out


def tensors_by_step(tensors: Sequence[TensorResult]) -> dict[int, list[TensorResult]]:
    out: dict[int, list[TensorResult]] = {}
    for t in tensors:
        out.setdefault(t.key.step, []).append(t)
    return out
