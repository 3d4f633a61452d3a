"""The oracle verdict: is the candidate's error, call by call, as small as a correct reference's?

dir1 (the candidate) and dir2 (the reference) are both replayed from one higher-precision
oracle run, so each has a local error per call against the oracle (:mod:`.local`). A call is
flagged only when the candidate's local error exceeds ``K`` times the reference's; with a
reference error of 0, any candidate error flags it. This is the rule PyTorch's own accuracy
checks use (a kernel is as good as a correct one of the same precision), which a two-way diff
of candidate against reference cannot say.

Example:
    >>> from ilstore.keys import CallKey
    >>> from .result import LocalError
    >>> def e(rel):
    ...     return LocalError(CallKey(0, 0, "fc", 0), rel, rel, None, 0, True, True, None, False, False, 0)
    >>> def verdict(candidate, reference):
    ...     (c,) = oracle_calls([e(candidate)], [e(reference)], 2.0)
    ...     return c.flagged, c.ratio
    >>> verdict(0.75, 0.25), verdict(0.5, 0.25), verdict(0.1, 0.0), verdict(0.0, 0.0)
    ((True, 3.0), (False, 2.0), (True, None), (False, None))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from ilstore.keys import CallKey
from ilstore.store.base import StoreReader

from .result import LocalError, OracleCall

__all__ = ["oracle_calls", "is_flagged", "enclosing_calls", "explain_containers"]


def is_flagged(candidate: float, reference: float, factor: float) -> bool:
    """``candidate > factor * reference``; with ``reference == 0``: ``candidate > 0``."""
    if reference == 0:
        return candidate > 0
    return candidate > factor * reference


def _ratio(candidate: float, reference: float) -> float | None:
    if reference == 0 or (math.isinf(candidate) and math.isinf(reference)):
        return None
    return candidate / reference


def _unevaluated(side: str, entry: LocalError | None) -> str | None:
    if entry is None:
        return f"not in the {side} replay"
    if not entry.compared or entry.rel_l2 is None:
        return f"{side}: {entry.reason or 'local error not measured'}"
    return None


def oracle_calls(candidate: Sequence[LocalError], reference: Sequence[LocalError], factor: float) -> list[OracleCall]:
    """The oracle verdict of every call either replay has, in the candidate's execution order.

    Args:
        candidate: dir1's local errors against the oracle.
        reference: dir2's local errors against the oracle.
        factor: K.

    Returns:
        One :class:`OracleCall` per call; a call missing from a replay, or whose local error
        was not measured in either, is not evaluated (the reason says why) and not flagged.
    """
    cand = {e.call: e for e in candidate}
    ref = {e.call: e for e in reference}
    order: list[CallKey] = [e.call for e in sorted(candidate, key=lambda e: e.order)]
    order += [e.call for e in sorted(reference, key=lambda e: e.order) if e.call not in cand]
    out = []
    for call in order:
        c, r = cand.get(call), ref.get(call)
        problems = [p for p in (_unevaluated("candidate", c), _unevaluated("reference", r)) if p]
        container = bool((c is not None and c.container) or (r is not None and r.container))
        notes = [f"{side}: {e.reason}" for side, e in (("candidate", c), ("reference", r))
                 if e is not None and e.compared and e.reason]
        if problems:
            out.append(OracleCall(call, c.rel_l2 if c is not None and c.compared else None,
                                  r.rel_l2 if r is not None and r.compared else None, None, False, False,
                                  "; ".join(problems + notes), container))
            continue
        assert c is not None and r is not None and c.rel_l2 is not None and r.rel_l2 is not None
        out.append(OracleCall(call, c.rel_l2, r.rel_l2, _ratio(c.rel_l2, r.rel_l2),
                              is_flagged(c.rel_l2, r.rel_l2, factor), True, "; ".join(notes) or None, container))
    return out


def enclosing_calls(reader: StoreReader, steps: Sequence[int]) -> dict[CallKey, tuple[CallKey, ...]]:
    """For each call of ``steps``, the calls it ran inside (outermost first), from the start and end orders.

    A call ran inside another when it started after it and ended before it. Calls of other
    ranks never nest.
    """
    out: dict[CallKey, tuple[CallKey, ...]] = {}
    for step in steps:
        starts = {c: n for n, c in enumerate(reader.calls(step))}
        ends = {c: n for n, c in enumerate(reader.call_ends(step))}
        stack: list[CallKey] = []
        for call in sorted(starts, key=lambda c: (c.rank, starts[c])):
            while stack and (stack[-1].rank != call.rank or ends.get(stack[-1], -1) < ends.get(call, -1)):
                stack.pop()  # that call had returned before this one started
            out[call] = tuple(stack)
            stack.append(call)
    return out


def explain_containers(calls: Sequence[OracleCall], enclosing: Mapping[CallKey, Sequence[CallKey]]) -> list[OracleCall]:
    """Unflag a container whose flag is explained by a flagged call that ran inside it.

    With every call fed the oracle's inputs, a container's output carries the error of its last
    child (e.g. an MLP's output is its down projection's), so a faulty child flags its containers
    too. The child is the finding; each container it explains keeps its figures, is not flagged
    and says which flagged call it carries.
    """
    flagged_inside: dict[CallKey, list[CallKey]] = {}
    for c in calls:
        if c.flagged:
            for outer in enclosing.get(c.call, ()):
                flagged_inside.setdefault(outer, []).append(c.call)
    out = []
    for c in calls:
        inner = flagged_inside.get(c.call)
        if c.flagged and inner:
            names = ", ".join(f"{k.module}#{k.call}" if k.call else k.module for k in inner[:3])
            more = f" and {len(inner) - 3} more" if len(inner) > 3 else ""
            note = f"not flagged itself: it carries the error of {names}{more}, flagged inside it"
            c = dataclasses.replace(c, flagged=False, reason="; ".join(p for p in (c.reason, note) if p))
        out.append(c)
    return out
