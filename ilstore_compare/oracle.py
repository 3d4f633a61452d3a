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
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ilstore.keys import CallKey
from ilstore.store.base import StoreReader

from .entries import Entries, Held
from .local import Measurer, Ranking
from .options import CompareOptions
from .result import CallResult, LocalError, OracleCall, Unreadable
from .spill import Spill

__all__ = ["oracle_calls", "is_flagged", "enclosing_calls", "explain_containers", "OracleWindows"]


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
    return [_verdict(call, cand.get(call), ref.get(call), factor) for call in order]


def _verdict(call: CallKey, c: LocalError | None, r: LocalError | None, factor: float) -> OracleCall:
    problems = [p for p in (_unevaluated("candidate", c), _unevaluated("reference", r)) if p]
    container = bool((c is not None and c.container) or (r is not None and r.container))
    notes = [f"{side}: {e.reason}" for side, e in (("candidate", c), ("reference", r))
             if e is not None and e.compared and e.reason]
    if problems:
        return OracleCall(call, c.rel_l2 if c is not None and c.compared else None,
                          r.rel_l2 if r is not None and r.compared else None, None, False, False,
                          "; ".join(problems + notes), container)
    assert c is not None and r is not None and c.rel_l2 is not None and r.rel_l2 is not None
    return OracleCall(call, c.rel_l2, r.rel_l2, _ratio(c.rel_l2, r.rel_l2), is_flagged(c.rel_l2, r.rel_l2, factor),
                      True, "; ".join(notes) or None, container)


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


class OracleWindows:
    """The oracle verdict of a comparison, found beside it a window of steps at a time (issue 18).

    The engine calls :meth:`window` with each window's last step: both replays' local errors
    against the oracle are measured for the steps up to it (:class:`~.local.Measurer`) and
    judged (:func:`oracle_calls`, :func:`explain_containers`: both need the window's steps
    only); then :meth:`calls` measures the steps left and gives every call's verdict in the order
    :func:`oracle_calls` gives them for all the steps at once: the candidate's calls in its
    execution order, then the reference's own. The verdicts of every window after the first are
    kept in a temporary file (:mod:`.spill`).

    Args:
        candidate, reference: dir1 and dir2, both replays of ``oracle``.
        oracle: the oracle run.
        options: the comparison's options (``oracle_factor`` set).
        patterns: the comparison's module filters.
    """

    def __init__(self, candidate: StoreReader, reference: StoreReader, oracle: StoreReader, options: CompareOptions,
                 patterns: Sequence[re.Pattern[str]] | None) -> None:
        assert options.oracle_factor is not None
        self._factor = options.oracle_factor
        self._r1 = candidate
        self._sides = [(Measurer(reader, oracle, options, patterns=patterns, labels=(label, "oracle")),
                        Ranking(keep=False)) for reader, label in ((candidate, "dir1"), (reference, "dir2"))]
        self._windows = 0
        self._spill: Spill | None = None
        # the candidate's calls in its order, then the reference's own; each either with a place in the
        # completion order (parts, window by window) or not (placed after all those, kept with their rank)
        self._parts: tuple[list[Held[OracleCall]], list[Held[OracleCall]]] = ([], [])
        self._tails: tuple[list[tuple[Any, OracleCall]], list[tuple[Any, OracleCall]]] = ([], [])

    def window(self, calls: Sequence[CallResult], upto: int | None) -> None:
        """Measure and judge the steps up to ``upto`` (None: every step left), those of a window
        whose calls are ``calls`` (unchanged: the oracle verdict is not theirs)."""
        self._judge(upto)

    def _judge(self, upto: int | None) -> None:
        window = self._windows
        self._windows += 1
        (m1, rank1), (m2, rank2) = self._sides
        cand = rank1.add(*m1.window(upto))
        ref = rank2.add(*m2.window(upto))
        cand_calls = {e.call: e for e in cand}
        ref_calls = {e.call: e for e in ref}
        own = [(i, e) for i, e in enumerate(ref) if e.call not in cand_calls]
        # (placed, tail): by position in the completion order; then those without one, with their place in
        # the ranking (sorted by it once every window is judged)
        groups = []
        for entries, total in ((list(enumerate(cand)), m1.total), (own, m2.total)):
            placed = sorted((e for _, e in entries if e.order < total), key=lambda e: e.order)
            tail = [((_rank_key(e), window, i), e) for i, e in entries if e.order >= total]
            groups.append((placed, tail))
        calls = [e.call for placed, tail in groups for e in placed + [e for _, e in tail]]
        verdicts = [_verdict(call, cand_calls.get(call), ref_calls.get(call), self._factor) for call in calls]
        verdicts = explain_containers(verdicts, enclosing_calls(self._r1, sorted({c.call.step for c in verdicts})))
        at = 0
        for side, (placed, tail) in enumerate(groups):
            part = tuple(verdicts[at:at + len(placed)])
            at += len(placed)
            self._tails[side].extend((key, v) for (key, _), v in zip(tail, verdicts[at:at + len(tail)], strict=True))
            at += len(tail)
            if window and part:
                self._spill = self._spill or Spill()
                steps = [c.call.step for c in part]
                self._parts[side].append(self._spill.add(part, first_step=min(steps), last_step=max(steps)))
            else:
                self._parts[side].append(part)

    def calls(self, calls: int = 4096) -> Sequence[OracleCall]:
        """Every call's verdict, once the steps left are measured (about ``calls`` calls at a time): a
        tuple when there was one window, else an :class:`~.entries.Entries`."""
        m1, m2 = self._sides[0][0], self._sides[1][0]
        while not (m1.done and m2.done):
            pending = [m.bound(calls) for m in (m1, m2) if not m.done]
            self._judge(min(pending))
        parts: list[Held[OracleCall]] = []
        for side in (0, 1):
            parts += self._parts[side]
            parts.append(tuple(v for _, v in sorted(self._tails[side], key=lambda item: item[0])))
        if self._windows <= 1:
            return tuple(v for part in parts for v in part)
        return Entries(parts)

    @property
    def lost(self) -> list[Unreadable]:
        """The bodies the measurements could not read: the candidate's, then the reference's."""
        return self._sides[0][1].lost + self._sides[1][1].lost


def _rank_key(e: LocalError) -> tuple[Any, ...]:
    """Where :func:`~.local.rank` puts ``e`` among entries of the same ``order`` (then the earlier
    window first, then the window's own ranking)."""
    if e.compared and e.rel_l2 is not None:
        return (0, -e.rel_l2, e.container)
    return (1,)
