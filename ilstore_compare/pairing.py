"""Pairing: find the runs, apply filters and the name map, and line up both runs' tensors.

Only the :class:`~ilstore.store.base.StoreReader` interface is used, so either side may be
any backend. Tensors pair by :class:`~ilstore.keys.TensorKey` (rank, step, module, call,
kind, path), after the map's module renames and path rules (:mod:`.align`): the device plays
no part. The map's unaligned declarations are attached to the pairs they cover. The plan holds
metadata only; no tensor is loaded here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ilstore.errors import AmbiguousRunError as CoreAmbiguousRunError
from ilstore.keys import KINDS, CallKey, TensorKey
from ilstore.store.base import StoreReader
from ilstore.store.registry import find_run

from .align import Side, align_call
from .errors import AmbiguousRunError, NameMapError
from .mapping import NameMap, PathRule, TensorPath
from .selection import compile_patterns, parse_steps, split_patterns, step_ranges  # re-exported: they lived here

__all__ = ["Side", "Pair", "PlannedCall", "Plan", "resolve_run_dir", "parse_steps", "split_patterns",
           "compile_patterns", "Planner", "build_plan", "neither_notes"]

# -- run directories -------------------------------------------------------------------------
def resolve_run_dir(path: str | Path) -> Path:
    """The run directory ``path`` stands for: itself, or the one run inside an ``output_dir``.

    Raises:
        RunNotFoundError: ``path`` is missing, not a directory, or neither a run nor a
            directory holding one.
        AmbiguousRunError: ``path`` holds several runs (they are listed).
    """
    try:
        return find_run(path)
    except CoreAmbiguousRunError as exc:
        raise AmbiguousRunError(exc.directory, exc.runs) from None


# -- the plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """A tensor to compare; ``side1``/``side2`` is None when it is missing from that run.

    Attributes:
        key: the shared key (names after the map's renames and path rules).
        side1, side2: where each run's tensor comes from.
        renamed_from: the renamed run's own module name, when a rename rule changed it.
        unaligned: ``"unaligned[i]: reason"`` when the map declares the tensor unalignable.
    """

    key: TensorKey
    side1: Side | None
    side2: Side | None
    renamed_from: str | None = None
    unaligned: str | None = None

    @property
    def presence(self) -> str:
        return "both" if self.side1 is not None and self.side2 is not None else "dir1" if self.side1 else "dir2"


@dataclass(frozen=True)
class PlannedCall:
    """A module call of the comparison.

    Attributes:
        call: the call (names after the name map).
        presence: ``both``, ``dir1`` or ``dir2``.
        start, end: its position among its rank's calls of the step, in start and in
            completion order (from dir1 when it has the call; nesting is read from them).
        source: ``1`` or ``2``, the run those positions come from.
    """

    call: CallKey
    presence: str
    start: int
    end: int
    source: int


@dataclass
class Plan:
    """What to compare: pairs and calls in step, then start order; notes for the report.

    Of the steps wanted that neither run has, ``steps_missing`` holds those asked for one by one
    (a coverage gap) and ``steps_skipped`` those only a range selected (no gap).
    """

    pairs: list[Pair] = field(default_factory=list)
    calls: list[PlannedCall] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    steps_only1: list[int] = field(default_factory=list)
    steps_only2: list[int] = field(default_factory=list)
    steps_missing: list[int] = field(default_factory=list)
    steps_skipped: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _CallSide:
    own: CallKey
    start: int
    end: int


def _side_calls(reader: StoreReader, step: int, rename: Callable[[str], str] | None,
                label: str) -> dict[CallKey, _CallSide]:
    """Calls of one run's step keyed by their shared name, with per-rank start/end positions."""
    ends: dict[CallKey, int] = {}
    counters: dict[int, int] = {}
    for c in reader.call_ends(step):
        ends[c] = counters.get(c.rank, 0)
        counters[c.rank] = ends[c] + 1
    out: dict[CallKey, _CallSide] = {}
    counters = {}
    for c in reader.calls(step):
        start = counters.get(c.rank, 0)
        counters[c.rank] = start + 1
        shared = CallKey(c.rank, c.step, rename(c.module), c.call) if rename else c
        if shared in out:
            other = out[shared].own.module
            raise NameMapError(f"the name map turns both {other!r} and {c.module!r} of {label} into {shared.module!r} "
                               f"(step {step}, call {c.call}); make the rules tell them apart")
        out[shared] = _CallSide(c, start, ends.get(c, start))
    return out


def _tensors(reader: StoreReader, own: CallKey | None, shared: CallKey, rules: tuple[PathRule, ...],
             label: str) -> dict[TensorPath, Side]:
    """One run's tensors of a call, every kind, after that run's path rules."""
    if own is None:
        return {}
    found = {(kind, key.path): Side(key, node) for kind in KINDS for key, node in reader.tensor_nodes(own, kind)}
    if not rules:
        return found
    where = f"{label} step {shared.step} {shared.module}" + (f"#{shared.call}" if shared.call else "")
    return align_call(found, shared.module, rules, where)


class Planner:
    """Lines up the tensors of two runs a few steps at a time (metadata only): :func:`build_plan`
    plans every step at once; a comparison of a long run plans and compares a window of steps at
    a time, so that no plan of the whole run is held (see :mod:`.engine`).

    Args:
        r1: dir1's reader.
        r2: dir2's reader (the reference).
        steps: steps to compare, None for every step of either run.
        modules: module-name regexes (``re.search``, after the name map); None for all.
        name_map: rules renaming one side's modules into the other's naming.
        planned_elsewhere: steps (of both runs) the caller plans itself: they are counted in
            ``steps`` but get no calls or pairs here (:mod:`.columnar`).
        required: the steps of ``steps`` asked for one by one (``CompareOptions.required_steps``):
            one that neither run has goes to ``Plan.steps_missing``, any other to
            ``Plan.steps_skipped``.

    Attributes:
        wanted: the steps to plan, in order (those asked for, or every step of either run), as
            an int64 array (no object per step).
        notes: what the plan of every step starts with (a run that did not finish, incomplete
            steps).
    """

    def __init__(self, r1: StoreReader, r2: StoreReader, *, steps: Iterable[int] | None,
                 modules: list[re.Pattern[str]] | None, name_map: NameMap | None,
                 planned_elsewhere: Container[int] = (), required: Iterable[int] = ()) -> None:
        self.r1, self.r2, self.modules, self.name_map = r1, r2, modules, name_map
        self.planned_elsewhere, self.required = planned_elsewhere, frozenset(required)
        # sorted int64 arrays, not sets: a 100,000-step run's step numbers as objects take ~16 MB
        steps1, steps2 = _sorted_steps(r1.steps()), _sorted_steps(r2.steps())
        asked = None if steps is None else sorted(set(steps))
        self.wanted: Sequence[int] | np.ndarray
        if asked is None:
            self.wanted = np.union1d(steps1, steps2)
        elif all(_INT64[0] <= s <= _INT64[1] for s in asked):
            self.wanted = np.asarray(asked, dtype=np.int64)
        else:  # a number no step of a run can have: noted as in neither run, in its place
            self.wanted = asked
        fits = np.asarray([_INT64[0] <= s <= _INT64[1] for s in self.wanted], dtype=bool) \
            if isinstance(self.wanted, list) else None
        self._in1, self._in2 = _members(self.wanted, steps1, fits), _members(self.wanted, steps2, fits)
        self.notes: list[str] = []
        for name, reader in (("dir1", r1), ("dir2", r2)):
            if reader.status not in ("complete", "unknown"):
                self.notes.append(f"{name} run status is {reader.status!r}: it did not finish cleanly")
            cut = reader.incomplete_steps()
            if cut:
                self.notes.append(f"{name} has incomplete step(s) {cut} (cut before they finished); they are not "
                                  "compared")
        self._rename1 = name_map.rename if name_map is not None and name_map.apply_to == "dir1" else None
        self._rename2 = name_map.rename if name_map is not None and name_map.apply_to == "dir2" else None
        self._rules1 = name_map.side_rules("dir1") if name_map is not None else ()
        self._rules2 = name_map.side_rules("dir2") if name_map is not None else ()

    def plan(self) -> Plan:
        """The plan of every step of :attr:`wanted` (without :attr:`notes`).

        Raises:
            NameMapError: the map makes two calls of one run, or two tensors of one call, collide.
            StoreError: a run's metadata is unreadable.
        """
        return self.window(0, None)[0]

    def window(self, start: int, pairs: int | None) -> tuple[Plan, int]:
        """The plan of the steps of :attr:`wanted` from ``start`` up to the first step at which
        it has ``pairs`` pairs or more (whole steps; None: to the end), and where it stopped.

        Raises:
            NameMapError: the map makes two calls of one run, or two tensors of one call, collide.
            StoreError: a run's metadata is unreadable.
        """
        plan = Plan()
        r1, r2, modules, name_map = self.r1, self.r2, self.modules, self.name_map
        for i in range(start, len(self.wanted)):
            if pairs is not None and len(plan.pairs) >= pairs:
                return plan, i
            step, in1, in2 = int(self.wanted[i]), bool(self._in1[i]), bool(self._in2[i])
            if not in1 and not in2:
                (plan.steps_missing if step in self.required else plan.steps_skipped).append(step)
                continue
            plan.steps.append(step)
            if not in2:
                plan.steps_only1.append(step)
            if not in1:
                plan.steps_only2.append(step)
            if in1 and in2 and step in self.planned_elsewhere:
                continue
            calls1 = _side_calls(r1, step, self._rename1, "dir1") if in1 else {}
            calls2 = _side_calls(r2, step, self._rename2, "dir2") if in2 else {}
            order = list(calls1) + [c for c in calls2 if c not in calls1]
            for call in order:
                if modules is not None and not any(p.search(call.module) for p in modules):
                    continue
                c1, c2 = calls1.get(call), calls2.get(call)
                presence = "both" if c1 and c2 else "dir1" if c1 else "dir2"
                pos = c1 or c2
                assert pos is not None
                plan.calls.append(PlannedCall(call, presence, pos.start, pos.end, 1 if c1 else 2))
                renamed = None
                if c1 and c1.own.module != call.module:
                    renamed = c1.own.module
                elif c2 and c2.own.module != call.module:
                    renamed = c2.own.module
                t1 = _tensors(r1, c1.own if c1 else None, call, self._rules1, "dir1")
                t2 = _tensors(r2, c2.own if c2 else None, call, self._rules2, "dir2")
                for kind in KINDS:  # inputs, then outputs, then post-forward inputs; dir1's order first
                    for tp in [tp for tp in t1 if tp[0] == kind] + [tp for tp in t2 if tp[0] == kind and tp not in t1]:
                        pair = Pair(call.tensor(*tp), t1.get(tp), t2.get(tp), renamed)
                        if name_map is not None and name_map.unaligned:
                            reason = name_map.unaligned_reason(call.module, tp, pair.presence)
                            if reason is not None:
                                pair = Pair(pair.key, pair.side1, pair.side2, renamed, reason)
                        plan.pairs.append(pair)
        return plan, len(self.wanted)


_INT64 = (-2**63, 2**63 - 1)


def _sorted_steps(steps: Iterable[int]) -> np.ndarray:
    """A run's step numbers as a sorted int64 array without repeats."""
    return np.unique(np.fromiter(steps, dtype=np.int64))


def _members(steps: Sequence[int] | np.ndarray, of: np.ndarray, fits: np.ndarray | None) -> np.ndarray:
    """Per step of ``steps`` (sorted), whether it is in ``of`` (sorted); ``fits``: which of
    ``steps`` are int64 numbers (None: all)."""
    found = np.zeros(len(steps), dtype=bool)
    if not len(of) or not len(steps):
        return found
    ours = np.asarray(steps, dtype=np.int64) if fits is None else \
        np.asarray([s for s, ok in zip(steps, fits, strict=True) if ok], dtype=np.int64)
    at = np.minimum(np.searchsorted(of, ours), len(of) - 1)
    if fits is None:
        return of[at] == ours
    found[fits] = of[at] == ours
    return found


def neither_notes(missing: Sequence[int], skipped: Sequence[int]) -> list[str]:
    """The report's notes on the steps wanted that neither run has: those asked for one by one
    (``missing``, a coverage gap) and those only a range selected (``skipped``).

    >>> neither_notes([7], [2, 3, 4])
    ['step 7 is in neither run: asked for, so not compared (a coverage gap)', \
'steps 2–4 are in neither run (selected by a range, and a range only selects: no gap)']
    """
    def which(steps: Sequence[int]) -> str:
        return f"step {steps[0]} is" if len(steps) == 1 else f"steps {step_ranges(steps)} are"

    notes = [f"{which(missing)} in neither run: asked for, so not compared (a coverage gap)"] if missing else []
    if skipped:
        notes.append(f"{which(skipped)} in neither run (selected by a range, and a range only selects: no gap)")
    return notes


def build_plan(r1: StoreReader, r2: StoreReader, *, steps: Iterable[int] | None,
               modules: list[re.Pattern[str]] | None, name_map: NameMap | None,
               planned_elsewhere: Container[int] = (), required: Iterable[int] = ()) -> Plan:
    """Line up the tensors of two runs (metadata only): every step's plan at once, with the
    :class:`Planner`'s notes first and :func:`neither_notes` last. The arguments are the
    :class:`Planner`'s.

    Raises:
        NameMapError: the map makes two calls of one run, or two tensors of one call, collide.
        StoreError: a run's metadata is unreadable.
    """
    planner = Planner(r1, r2, steps=steps, modules=modules, name_map=name_map, planned_elsewhere=planned_elsewhere,
                      required=required)
    plan = planner.plan()
    plan.notes[:0] = planner.notes
    plan.notes += neither_notes(plan.steps_missing, plan.steps_skipped)
    return plan
