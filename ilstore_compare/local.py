"""Local error: what each module call introduces, measured by replay.

A replay run (captured with ``replay_from``) fed every selected call the inputs the reference
run recorded for it, so the difference between the replay's outputs and the reference's outputs
of the same call is the error that call itself introduces, whatever happened upstream. This
module measures the local error of every call (one call at a time, :mod:`.local_call`: all its
output tensors together, with the comparer's own metrics), ranks the calls by it (the ranking,
window by window for a long comparison, is :mod:`.local_rank`'s) and finds the first call, in
execution order, whose local error crosses the comparison's tolerance.

The per-call replay record is the ``"replay"`` object on the top level of the call's
``outputs`` structure: ``replayed``, ``replaced``, ``kept``, ``reason``, ``random``,
``container`` (see ``docs/compare.md``, "Replay and local error").

A call that could not be replayed, or whose local error cannot be measured (outputs missing on
a side, shapes that differ, bodies not stored, and, with ``keep_going``, a body whose file
cannot be read), is listed with the reason and counts as not compared: the comparison fails
closed. A call whose outputs hold no tensor on either side
(``None``, a number) has nothing to measure and no entry. Where the replay comes from, and the
check that it is a replay of the run it is compared with, is :mod:`.provenance`'s.
"""

from __future__ import annotations

import dataclasses
import math
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

from ilstore.keys import CallKey
from ilstore.store.base import StoreReader

from .divergence import INTRODUCED
from .entries import concrete
from .local_call import REPLAY_KEY, completion_order, measure_call, nested_calls, unmeasured
from .local_rank import Ranked, Ranking, rank
from .mapping import NameMap
from .options import CompareOptions
from .result import MEASURED, CallResult, Divergence, LocalError, LocalReport, TensorResult, Unreadable

__all__ = ["REPLAY_KEY", "local_errors", "rank", "first_exceeding", "not_replayed", "local_report",
           "measured_divergence", "local_notes", "Measurer", "Ranking", "LocalWindows", "Ranked"]


def local_errors(replay: StoreReader, reference: StoreReader, options: CompareOptions, *,
                 rename: Callable[[str], str] | None = None, patterns: Sequence[re.Pattern[str]] | None = None,
                 expected: Iterable[CallKey] = (), labels: tuple[str, str] = ("replay", "reference")
                 ) -> list[LocalError]:
    """The local error of every selected call of ``replay`` against ``reference``, ranked.

    Args:
        replay: the replay run.
        reference: the run it was replayed from.
        options: the comparison's options (steps, tolerances, ``exact``, ``equal_nan``).
        rename: turns the runs' module names into the names the report uses (a name map).
        patterns: module-name regexes (after ``rename``); None for every module.
        expected: further calls (report names) the report needs a local error for: those the
            replay run lacks are listed as not compared.
        labels: what messages and :class:`~.result.Unreadable` entries call the two runs
            (``dir1``, ``dir2``, ``replay``, ``oracle``).

    Returns:
        One entry per call with tensor outputs (a call whose outputs hold no tensor on either
        side has nothing to measure and no entry): measured calls by ``rel_l2``, largest first
        (infinite first; at equal error leaves before containers, then execution order), then
        the calls not measured, in execution order.

    Raises:
        IlstoreError: a run's files cannot be read (the message names the file); with
            ``options.keep_going`` an unreadable output body instead leaves its call unmeasured,
            the entry naming the file and the reason.
    """
    entries, extra = Measurer(replay, reference, options, rename=rename, patterns=patterns,
                              labels=labels).window(None, expected)
    return rank(entries + extra)


class Measurer:
    """Measures the local errors of :func:`local_errors` a window of steps at a time (issue 18).

    Each call of :meth:`window` measures the replay's steps up to a bound: with the windows
    together, the entries (and their ``order``) are those :func:`local_errors` measures at once.
    Only the replay's steps and, per step, its number of calls are read up front (an entry's
    ``order`` counts the calls of every step before it, and a call missing from the completion
    order, like a call the replay lacks, is placed after all of them).

    Args:
        replay, reference, options, rename, patterns, labels: as for :func:`local_errors`.
    """

    def __init__(self, replay: StoreReader, reference: StoreReader, options: CompareOptions, *,
                 rename: Callable[[str], str] | None = None, patterns: Sequence[re.Pattern[str]] | None = None,
                 labels: tuple[str, str] = ("replay", "reference")) -> None:
        self.replay, self.reference, self.options = replay, reference, options
        self.rename, self.patterns, self.labels = rename, patterns, labels
        have = set(replay.steps())
        self.steps = sorted(have) if options.steps is None else [s for s in options.steps if s in have]
        del have
        self._ref_steps = sorted(reference.steps())
        #: how many calls have a completion position (an entry's ``order`` is below this, or this)
        self.total = sum(len(set(replay.call_ends(step))) for step in self.steps)
        self._next = 0  # the first step of self.steps not measured yet
        self._offset = 0  # the order of that step's first call
        self._extra = 0  # calls not in the replay listed so far

    @property
    def done(self) -> bool:
        """Every step is measured."""
        return self._next >= len(self.steps)

    def bound(self, calls: int) -> int:
        """The step up to which the steps not measured yet hold about ``calls`` calls (at least one step)."""
        n, i = 0, self._next
        while i < len(self.steps) - 1:
            n += len(self.replay.calls(self.steps[i]))
            if n >= calls:
                break
            i += 1
        return self.steps[i]

    def window(self, upto: int | None, expected: Iterable[CallKey] = ()) -> tuple[list[LocalError], list[LocalError]]:
        """The entries of the steps up to ``upto`` (None: every step left), in measuring order, and
        those of the ``expected`` calls the steps lack (steps up to ``upto`` only: the calls of the
        steps of this window), not ranked."""
        replay, reference, options, rename, patterns = self.replay, self.reference, self.options, self.rename, \
            self.patterns
        entries: list[LocalError] = []
        seen: set[CallKey] = set()
        while self._next < len(self.steps) and (upto is None or self.steps[self._next] <= upto):
            step = self.steps[self._next]
            self._next += 1
            order, used = completion_order(replay, step, self._offset)
            self._offset += used
            containers = nested_calls(replay, step)
            at = bisect_left(self._ref_steps, step)
            step_in_ref = at < len(self._ref_steps) and self._ref_steps[at] == step
            ref_calls = set(reference.calls(step)) if step_in_ref else set()
            for call in replay.calls(step):
                shown = CallKey(call.rank, call.step, rename(call.module), call.call) if rename else call
                if patterns is not None and not any(p.search(shown.module) for p in patterns):
                    continue
                seen.add(shown)
                entry = measure_call(replay, reference, call, shown, options, step_in_ref, call in ref_calls,
                             call in containers, order.get(call, self.total), self.labels)
                if entry is not None:
                    entries.append(entry)
        extra = [c for c in expected if c not in seen and (options.steps is None or c.step in options.steps)]
        missing = [unmeasured(call, "not in the replay run (it did not capture this call)", replayed=False,
                               container=False, random=False, order=n)
                   for n, call in enumerate(extra, self.total + self._extra)]
        self._extra += len(extra)
        return entries, missing


def first_exceeding(entries: Iterable[LocalError]) -> LocalError | None:
    """The first call in execution order whose local error crosses the tolerance (None: no such call)."""
    crossing = [e for e in entries if e.compared and e.exceeds]
    return min(crossing, key=lambda e: e.order) if crossing else None


def not_replayed(entries: Iterable[LocalError], before: int | None = None) -> list[LocalError]:
    """The unmeasured entries, in execution order (only those before position ``before`` if given)."""
    out = [e for e in entries if not e.compared and (before is None or e.order < before)]
    return sorted(out, key=lambda e: e.order)


# -- into the comparison's result ------------------------------------------------------------------
def local_report(replay: StoreReader, source: str, replayed: dict[str, str], reference: StoreReader,
                 options: CompareOptions, nmap: NameMap | None, patterns: Sequence[re.Pattern[str]] | None,
                 calls: Sequence[CallResult]) -> LocalReport:
    """The local errors of ``replay`` against ``reference`` for the comparison whose calls are ``calls``.

    Args:
        replay: the replay of dir2 (dir1 itself, or ``--replay``).
        source: ``dir1`` or ``replay``.
        replayed: its ``replayed_from`` record.
        reference: dir2.
        options: the comparison's options.
        nmap: the comparison's name map: the replay shares dir2's module names, renamed when
            the map applies to dir2.
        patterns: the comparison's module filters.
        calls: the comparison's calls; with ``--replay``, those in both dir1 and dir2 need a
            local error (the replay run lacking one fails closed).
    """
    windows = LocalWindows(replay, source, replayed, reference, options, nmap, patterns)
    windows.window(calls, None)
    return windows.report()


class LocalWindows:
    """The local errors of a comparison, measured beside it a window of steps at a time (issue 18).

    The engine calls :meth:`window` with each window's calls (the calls of the steps up to a
    bound), which measures the replay's steps up to that bound and gives the calls their local
    error; then :meth:`report`, which measures the steps left (the replay's steps after the
    last window's) and gives the :class:`~.result.LocalReport` of every call: the one
    :func:`local_report` gives for all the calls at once. The entries of every window after the
    first are kept in a temporary file (see :class:`~.local_rank.Ranked`).

    Args:
        replay, source, replayed, reference, options, nmap, patterns: as for :func:`local_report`.
    """

    def __init__(self, replay: StoreReader, source: str, replayed: dict[str, str], reference: StoreReader,
                 options: CompareOptions, nmap: NameMap | None, patterns: Sequence[re.Pattern[str]] | None) -> None:
        rename = nmap.rename if nmap is not None and nmap.apply_to == "dir2" else None
        labels = ("dir1" if source == "dir1" else "replay", "dir2")
        self._measure = Measurer(replay, reference, options, rename=rename, patterns=patterns, labels=labels)
        self._ranking = Ranking()
        self._source, self._replayed = source, replayed
        self._runs = (str(replay.run_dir), str(reference.run_dir))

    def window(self, calls: Sequence[CallResult], upto: int | None) -> list[CallResult]:
        """``calls`` (those of the steps up to ``upto``; None: every step) with their local errors."""
        expected = [c.call for c in calls if c.presence == "both"] if self._source == "replay" else []
        by_call = {e.call: e for e in self._ranking.add(*self._measure.window(upto, expected))}
        return [dataclasses.replace(c, local=by_call.get(c.call)) for c in calls]

    def report(self, calls: int = 4096) -> LocalReport:
        """The report of every call, once the steps left are measured (about ``calls`` calls at a time)."""
        while not self._measure.done:
            self._ranking.add(*self._measure.window(self._measure.bound(calls)))
        return LocalReport(replay=self._runs[0], reference=self._runs[1], replayed_from=self._replayed,
                           source=self._source, errors=self._ranking.errors(), first=self._ranking.first)

    @property
    def lost(self) -> list[Unreadable]:
        """The bodies the measurement could not read, in the order of the report's ``errors``."""
        return self._ranking.lost


def measured_divergence(local: LocalReport, calls: Sequence[CallResult],
                        tensors: Sequence[TensorResult]) -> Divergence | None:
    """The first divergence labelled from the measurement: the first call whose local error crosses the
    tolerance (``basis`` ``measured``, ``origin`` ``introduced``), with its propagated errors; None if none.

    Only the parts of ``calls`` and ``tensors`` that may hold its step are read (:func:`~.entries.concrete`).
    """
    m = local.first
    if m is None:
        return None
    c = next((c for c in concrete(calls, m.call.step) if c.call == m.call), None)
    out, inp = (c.output_rel_l2, c.input_rel_l2) if c is not None else (None, None)
    growth = out / inp if out is not None and inp is not None and 0 < inp < math.inf else None
    bad = tuple(t.key.display() for t in concrete(tensors, m.call.step)
                if t.key.call_key == m.call and t.key.kind != "inputs" and t.bad_value)
    return Divergence(step=m.call.step, module=m.call.module, call=m.call.call, rank=m.call.rank, origin=INTRODUCED,
                      output_rel_l2=out, input_rel_l2=inp, growth=growth, tensors=bad, basis=MEASURED,
                      local_rel_l2=m.rel_l2)


def _label(e: LocalError) -> str:
    k = e.call
    return f"step {k.step} {'rank' + str(k.rank) + ' ' if k.rank else ''}{k.module}" + (f"#{k.call}" if k.call else "")


def _listing(entries: Sequence[LocalError]) -> str:
    return ", ".join(f"{_label(e)} ({e.reason})" for e in entries[:3]) + (" …" if len(entries) > 3 else "")


def local_notes(local: LocalReport) -> list[str]:
    """What the report must say about calls without a local error (the measurement cannot speak for them)."""
    missing = local.not_compared  # in execution order: what not_replayed(local.errors) gives
    if not missing:
        return []
    if local.first is None:
        return [f"{len(missing)} call(s) could not be replayed or measured; their local error is unknown: "
                + _listing(missing)]
    before = not_replayed(missing, local.first.order)
    if not before:
        return []
    return [f"{len(before)} call(s) before the measured first divergence could not be replayed or measured, so the "
            f"error may start earlier: {_listing(before)}"]
