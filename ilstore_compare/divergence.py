"""Per-call verdicts, the first divergence and where error is introduced.

Execution order is completion order: a call's outputs exist once it returns, so a submodule
that introduces an error is seen before the parent that contains it. Steps come in order;
the ranks of a multi-rank run advance in lockstep (a call's position among its own rank's
calls, then the rank).

A call whose outputs (``outputs`` or ``post_fwd_inputs``) differ is

* ``inherited`` when one of its captured inputs already differs, or a call nested in it
  (a submodule call) already has differing outputs, or it has no captured input tensors and
  the error was already present upstream (an earlier call in execution order, or the inputs
  of a call enclosing it, differ);
* ``introduced`` otherwise: its inputs match (or, with none captured, nothing upstream
  differed), so the error appears in this call's own computation.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

from ilstore.keys import CallKey

from .pairing import PlannedCall
from .result import (
    BAD_VALUE_STATUSES,
    MATCH,
    NOT_COMPARED,
    ONLY_IN_DIR1,
    ONLY_IN_DIR2,
    STATS_ONLY_MATCH,
    UNALIGNED,
    UNREADABLE,
    CallResult,
    Divergence,
    TensorResult,
)

__all__ = ["INTRODUCED", "INHERITED", "TOP_INTRODUCED", "analyse_calls", "merge_introduced"]

INTRODUCED = "introduced"
INHERITED = "inherited"
#: How many introduced-error calls the report ranks.
TOP_INTRODUCED = 5

_OUTPUT_KINDS = ("outputs", "post_fwd_inputs")
_COMPARED = BAD_VALUE_STATUSES | {MATCH, STATS_ONLY_MATCH}


def _max(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _worst_abs(entries: Sequence[TensorResult]) -> TensorResult | None:
    """The first entry with the largest ``max_abs_diff`` (None when no entry has one)."""
    worst, largest = None, -1.0
    for e in entries:
        value = e.metrics.max_abs_diff if e.metrics is not None else None
        if value is not None and value > largest:
            worst, largest = e, value
    return worst


def _min(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _rel_l2(entries: Sequence[TensorResult]) -> float | None:
    """Largest relative L2 error; a reference that is zero while dir1 is not counts as infinite."""
    values = []
    for e in entries:
        if e.metrics is None or (e.metrics.rel_l2 is None and e.metrics.cosine is None):  # (not known: overflow)
            continue
        values.append(e.metrics.rel_l2 if e.metrics.rel_l2 is not None else math.inf)
    return max(values) if values else None


def _verdict(presence: str, entries: Sequence[TensorResult]) -> str:
    statuses = {e.status for e in entries}
    if statuses & BAD_VALUE_STATUSES:
        return "mismatch"
    if UNREADABLE in statuses:
        return UNREADABLE  # a damaged run: the first thing to fix
    if statuses & {ONLY_IN_DIR1, ONLY_IN_DIR2} or (presence != "both" and statuses != {UNALIGNED}):
        return "one_sided"  # a call in one run only is accounted for when the map declares all its tensors
    if NOT_COMPARED in statuses:
        return "not_compared"
    if statuses == {UNALIGNED}:
        return UNALIGNED
    if STATS_ONLY_MATCH in statuses:
        return "stats_only_match"
    return "match" if entries else "no_tensors"


class _Info:
    __slots__ = ("planned", "entries", "out_bad", "in_bad", "has_inputs", "out_err", "in_err", "origin", "order")

    def __init__(self, planned: PlannedCall, entries: list[TensorResult]) -> None:
        self.planned = planned
        self.entries = entries
        outs = [e for e in entries if e.key.kind in _OUTPUT_KINDS]
        ins = [e for e in entries if e.key.kind == "inputs"]
        self.out_bad = any(e.bad_value for e in outs)
        self.in_bad = any(e.bad_value for e in ins)
        self.has_inputs = any(e.status in _COMPARED for e in ins)
        self.out_err = _rel_l2(outs)
        self.in_err = _rel_l2(ins)
        self.origin: str | None = None
        self.order = 0


def _nesting(infos: list[_Info]) -> tuple[dict[int, list[_Info]], dict[int, list[_Info]]]:
    """Descendants and ancestors of each call (by ``id``), from start/end positions of one run."""
    groups: dict[tuple[int, int, int], list[_Info]] = defaultdict(list)
    for info in infos:  # positions from different runs never mix
        p = info.planned
        groups[(p.call.rank, p.call.step, p.source)].append(info)
    below: dict[int, list[_Info]] = defaultdict(list)
    above: dict[int, list[_Info]] = defaultdict(list)
    for members in groups.values():
        members.sort(key=lambda i: i.planned.start)
        for idx, info in enumerate(members):
            end = info.planned.end
            for other in members[idx + 1:]:
                if other.planned.end >= end:
                    break  # started after this call returned: so did every later one
                below[id(info)].append(other)
                above[id(other)].append(info)
    return below, above


def _divergence(info: _Info) -> Divergence:
    call = info.planned.call
    growth = None
    if info.out_err is not None and info.in_err is not None and info.in_err > 0 and math.isfinite(info.in_err):
        growth = info.out_err / info.in_err
    bad = tuple(e.key.display() for e in info.entries if e.key.kind in _OUTPUT_KINDS and e.bad_value)
    return Divergence(step=call.step, module=call.module, call=call.call, rank=call.rank,
                      origin=info.origin or INTRODUCED, output_rel_l2=info.out_err, input_rel_l2=info.in_err,
                      growth=growth, tensors=bad)


def _rank_key(d: Divergence, order: int) -> tuple[int, float, float, int]:
    out = d.output_rel_l2
    if out is None:
        return (3, 0.0, 0.0, order)
    if d.input_rel_l2 == 0:
        return (0, 0.0, -out, order)  # from identical inputs: unbounded growth
    if d.growth is not None:
        return (1, -d.growth, -out, order)
    return (2, 0.0, -out, order)


def analyse_calls(planned: Sequence[PlannedCall], tensors: Sequence[TensorResult],
                  top: int = TOP_INTRODUCED, *, bad_from: int | None = None,
                  ) -> tuple[list[CallResult], Divergence | None, list[Divergence]]:
    """Verdict and origin of every call, the first divergence, and the top introduced-error calls.

    Args:
        planned: the calls, in step then start order.
        tensors: every tensor entry (any order).
        top: how many introduced-error calls to rank.
        bad_from: the first step at which a call analysed elsewhere (a step :mod:`.columnar`
            decides, never one of ``planned``'s) has differing outputs: for the calls of later
            steps the error is already present upstream. None: no such call.

    Returns:
        ``(calls, first_divergence, introduced)``: calls in the order of ``planned``;
        ``introduced`` ranked by growth of the relative L2 error (from identical inputs first,
        then by ``output / input`` error, then by output error), at most ``top``.
    """
    by_call: dict[CallKey, list[TensorResult]] = defaultdict(list)
    for entry in tensors:
        by_call[entry.key.call_key].append(entry)
    infos = [_Info(p, by_call.get(p.call, [])) for p in planned]
    execution = sorted(infos, key=lambda i: (i.planned.call.step, i.planned.end, i.planned.call.rank, i.planned.source))
    for n, info in enumerate(execution):
        info.order = n
    below, above = _nesting(infos)
    seen_bad = False
    first: _Info | None = None
    introduced: list[_Info] = []
    for info in execution:
        if not info.out_bad:
            continue
        nested_bad = any(d.out_bad for d in below.get(id(info), []))
        upstream = seen_bad or (bad_from is not None and info.planned.call.step > bad_from) \
            or any(a.in_bad for a in above.get(id(info), []))
        if info.in_bad or nested_bad or (not info.has_inputs and upstream):
            info.origin = INHERITED
        else:
            info.origin = INTRODUCED
            introduced.append(info)
        if first is None:
            first = info
        seen_bad = True
    ranked = sorted(((_divergence(i), i.order) for i in introduced), key=lambda pair: _rank_key(*pair))
    calls = []
    for info in infos:
        es = info.entries
        worst = _worst_abs(es)
        worst_abs = worst.metrics.max_abs_diff if worst is not None and worst.metrics is not None else None
        calls.append(CallResult(
            call=info.planned.call, presence=info.planned.presence, verdict=_verdict(info.planned.presence, es),
            origin=info.origin, order=info.order, tensors=len(es),
            mismatched_tensors=sum(1 for e in es if e.bad_value),
            unaligned_tensors=sum(1 for e in es if e.status == UNALIGNED), output_rel_l2=info.out_err,
            input_rel_l2=info.in_err,
            max_abs_diff=worst_abs,  # and where, but not for a 0 (every tensor holds it)
            max_abs_diff_at=(worst.key.kind, *worst.key.path) if worst is not None and worst_abs else None,
            max_rel_diff=_max(e.metrics.max_rel_diff for e in es if e.metrics is not None),
            min_cosine=_min(e.metrics.cosine for e in es if e.metrics is not None)))
    return calls, (_divergence(first) if first is not None else None), [d for d, _ in ranked[:top]]


def merge_introduced(*ranked: Sequence[Divergence], top: int = TOP_INTRODUCED) -> list[Divergence]:
    """Introduced-error calls ranked apart, each list for its own steps (no step in two lists),
    ranked together as :func:`analyse_calls` ranks them; at most ``top``.

    Between two steps execution order is step order, so the tie-break by execution position
    is one by step, and within a step the list's own order.
    """
    merged = sorted((d for r in ranked for d in r), key=lambda d: (*_rank_key(d, 0)[:3], d.step))  # stable
    return merged[:top]
