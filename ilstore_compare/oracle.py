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
from ilstore.records import iter_tensor_nodes
from ilstore.store.base import StoreReader

from .entries import Entries, Held
from .local import Measurer, Ranking
from .local_call import nested_calls
from .options import CompareOptions
from .result import CallResult, LocalError, OracleCall, Unreadable
from .spill import Spill

__all__ = ["oracle_calls", "is_flagged", "enclosing_calls", "last_children", "explain_containers", "OracleWindows"]


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


def last_children(reader: StoreReader, steps: Sequence[int]) -> dict[CallKey, CallKey]:
    """For each call of ``steps`` that other calls ran inside (a container), its last direct child to end:
    the one call inside it whose output can be its output (:func:`enclosing_calls` says which are direct).

    Example: a block computing ``x + act(fc(x))`` runs ``fc`` then ``act`` inside it; its last child is
    ``act``, whose output flows into the block's; ``fc``'s does only through ``act``.
    """
    out: dict[CallKey, CallKey] = {}
    for step in steps:
        ends = {c: n for n, c in enumerate(reader.call_ends(step))}
        for call, outer in enclosing_calls(reader, [step]).items():
            if outer and ends.get(call, -1) >= ends.get(out.get(outer[-1], call), -1):
                out[outer[-1]] = call
    return out


def explain_containers(calls: Sequence[OracleCall], last: Mapping[CallKey, CallKey]) -> list[OracleCall]:
    """Unflag a container whose flag is explained by its last child (``last``, :func:`last_children`), flagged.

    With every call fed the oracle's inputs, a container's output carries the error of its last
    child (e.g. an MLP's output is its down projection's), so a faulty last child flags its
    containers too. The child is the finding; each container it explains keeps its figures, is not
    flagged and says which flagged call it carries. A flagged call elsewhere inside it (one whose
    output is not the container's) explains nothing: the container's own code may be at fault, and
    it stays flagged. The last child's own flag counts even when a child of its own explains it
    (the error flows out through it): the reason names the call flagged in its own right.
    """
    flagged = {c.call for c in calls if c.flagged}

    def culprit(call: CallKey, seen: frozenset[CallKey] = frozenset()) -> CallKey | None:
        """The call flagged in its own right whose error ``call``'s last child carries out, if any."""
        child = last.get(call)
        if child is None or child not in flagged or child in seen:
            return None
        return culprit(child, seen | {call}) or child

    out = []
    for c in calls:
        source = culprit(c.call) if c.flagged else None
        if source is not None:
            child = last[c.call]
            name = f"{source.module}#{source.call}" if source.call else source.module
            via = "" if child == source else (
                f" (through its last call inside it, {child.module}#{child.call})" if child.call else
                f" (through its last call inside it, {child.module})")
            note = f"not flagged itself: it carries the error of {name}, flagged inside it{via}"
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
    execution order, then the reference's own; then the oracle's selected calls that neither
    replay captured, not evaluated (fail closed: the verdict cannot speak for them). The verdicts
    of every window after the first are kept in a temporary file (:mod:`.spill`).

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
        self._r1, self._r2, self._oracle, self._patterns = candidate, reference, oracle, patterns
        self._sides = [(Measurer(reader, oracle, options, patterns=patterns, labels=(label, "oracle")),
                        Ranking(keep=False)) for reader, label in ((candidate, "dir1"), (reference, "dir2"))]
        have = sorted(oracle.steps())
        self._oracle_steps = have if options.steps is None else [s for s in have if s in set(options.steps)]
        self._replay_steps = (set(candidate.steps()), set(reference.steps()))
        self._oracle_next = 0  # the first of self._oracle_steps not looked at yet (calls in neither replay)
        self._windows = 0
        self._spill: Spill | None = None
        # the candidate's calls in its order, then the reference's own, then the oracle's that neither replay
        # has; each either with a place in the completion order (parts, window by window) or not (placed after
        # all those, kept with their rank)
        self._parts: tuple[list[Held[OracleCall]], ...] = ([], [], [])
        self._tails: tuple[list[tuple[Any, OracleCall]], ...] = ([], [], [])

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
        verdicts = explain_containers(verdicts, last_children(self._r1, sorted({c.call.step for c in verdicts})))
        at = 0
        for side, (placed, tail) in enumerate(groups):
            part = tuple(verdicts[at:at + len(placed)])
            at += len(placed)
            self._tails[side].extend((key, v) for (key, _), v in zip(tail, verdicts[at:at + len(tail)], strict=True))
            at += len(tail)
            self._hold(side, part, window)
        self._hold(2, self._in_neither(upto), window)

    def _hold(self, side: int, part: tuple[OracleCall, ...], window: int) -> None:
        if window and part:
            self._spill = self._spill or Spill()
            steps = [c.call.step for c in part]
            self._parts[side].append(self._spill.add(part, first_step=min(steps), last_step=max(steps)))
        else:
            self._parts[side].append(part)

    def _in_neither(self, upto: int | None) -> tuple[OracleCall, ...]:
        """The oracle's selected calls of its steps up to ``upto`` (None: every step left) that neither
        replay captured: not evaluated (the verdict cannot speak for them, as a call a ``--replay`` run
        lacks). A call whose recorded outputs hold no tensor has nothing to measure and is left out."""
        out: list[OracleCall] = []
        steps = self._oracle_steps
        while self._oracle_next < len(steps) and (upto is None or steps[self._oracle_next] <= upto):
            step = steps[self._oracle_next]
            self._oracle_next += 1
            replayed = {c for r, have in zip((self._r1, self._r2), self._replay_steps, strict=True) if step in have
                        for c in r.calls(step)}
            missing = [c for c in self._oracle.calls(step) if c not in replayed and (
                self._patterns is None or any(p.search(c.module) for p in self._patterns))]
            missing = [c for c in missing if not _no_tensor(self._oracle.structure(c, "outputs"))]
            containers = nested_calls(self._oracle, step) if missing else set()
            out += [OracleCall(c, None, None, None, False, False, "in the oracle, in neither replay (not captured)",
                               c in containers) for c in missing]
        return tuple(out)

    def calls(self, calls: int = 4096) -> Sequence[OracleCall]:
        """Every call's verdict, once the steps left are measured (about ``calls`` calls at a time): a
        tuple when there was one window, else an :class:`~.entries.Entries`."""
        m1, m2 = self._sides[0][0], self._sides[1][0]
        while not (m1.done and m2.done):
            pending = [m.bound(calls) for m in (m1, m2) if not m.done]
            self._judge(min(pending))
        self._hold(2, self._in_neither(None), 0)  # the oracle's steps after the replays' last, if any
        parts: list[Held[OracleCall]] = []
        for side in (0, 1, 2):
            parts += self._parts[side]
            parts.append(tuple(v for _, v in sorted(self._tails[side], key=lambda item: item[0])))
        if self._windows <= 1:
            return tuple(v for part in parts for v in part)
        return Entries(parts)

    @property
    def lost(self) -> list[Unreadable]:
        """The bodies the measurements could not read: the candidate's, then the reference's."""
        return self._sides[0][1].lost + self._sides[1][1].lost


def _no_tensor(structure: Any) -> bool:
    """Outputs recorded, holding no tensor (outputs not recorded may have held one: not this)."""
    return structure is not None and next(iter_tensor_nodes(structure), None) is None


def _rank_key(e: LocalError) -> tuple[Any, ...]:
    """Where :func:`~.local.rank` puts ``e`` among entries of the same ``order`` (then the earlier
    window first, then the window's own ranking)."""
    if e.compared and e.rel_l2 is not None:
        return (0, -e.rel_l2, e.container)
    return (1,)
