"""Pairing: find the runs, apply filters and the name map, and line up both runs' tensors.

Only the :class:`~ilstore.store.base.StoreReader` interface is used, so either side may be
any backend. Tensors pair by :class:`~ilstore.keys.TensorKey` (rank, step, module, call,
kind, path), after the map's module renames and path rules (:mod:`.align`): the device plays
no part. The map's unaligned declarations are attached to the pairs they cover. The plan holds
metadata only; no tensor is loaded here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ilstore.errors import AmbiguousRunError as CoreAmbiguousRunError
from ilstore.keys import KINDS, CallKey, TensorKey
from ilstore.store.base import StoreReader
from ilstore.store.registry import find_run

from .align import Side, align_call
from .errors import AmbiguousRunError, NameMapError
from .mapping import NameMap, PathRule, TensorPath
from .selection import compile_patterns, parse_steps, split_patterns  # re-exported: they lived here

__all__ = ["Side", "Pair", "PlannedCall", "Plan", "resolve_run_dir", "parse_steps", "split_patterns",
           "compile_patterns", "build_plan"]

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
    """What to compare: pairs and calls in step, then start order; notes for the report."""

    pairs: list[Pair] = field(default_factory=list)
    calls: list[PlannedCall] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    steps_only1: list[int] = field(default_factory=list)
    steps_only2: list[int] = field(default_factory=list)
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


def build_plan(r1: StoreReader, r2: StoreReader, *, steps: Iterable[int] | None,
               modules: list[re.Pattern[str]] | None, name_map: NameMap | None,
               planned_elsewhere: Container[int] = ()) -> Plan:
    """Line up the tensors of two runs (metadata only).

    Args:
        r1: dir1's reader.
        r2: dir2's reader (the reference).
        steps: steps to compare, None for every step of either run.
        modules: module-name regexes (``re.search``, after the name map); None for all.
        name_map: rules renaming one side's modules into the other's naming.
        planned_elsewhere: steps (of both runs) the caller plans itself: they are counted in
            ``steps`` but get no calls or pairs here (:mod:`.columnar`).

    Raises:
        NameMapError: the map makes two calls of one run, or two tensors of one call, collide.
        StoreError: a run's metadata is unreadable.
    """
    plan = Plan()
    steps1, steps2 = set(r1.steps()), set(r2.steps())
    wanted = sorted(steps1 | steps2) if steps is None else sorted(set(steps))
    for name, reader in (("dir1", r1), ("dir2", r2)):
        if reader.status not in ("complete", "unknown"):
            plan.notes.append(f"{name} run status is {reader.status!r}: it did not finish cleanly")
        cut = reader.incomplete_steps()
        if cut:
            plan.notes.append(f"{name} has incomplete step(s) {cut} (cut before they finished); they are not compared")
    rename1 = name_map.rename if name_map is not None and name_map.apply_to == "dir1" else None
    rename2 = name_map.rename if name_map is not None and name_map.apply_to == "dir2" else None
    rules1 = name_map.side_rules("dir1") if name_map is not None else ()
    rules2 = name_map.side_rules("dir2") if name_map is not None else ()
    for step in wanted:
        in1, in2 = step in steps1, step in steps2
        if not in1 and not in2:
            plan.notes.append(f"step {step} is in neither run")
            continue
        plan.steps.append(step)
        if not in2:
            plan.steps_only1.append(step)
        if not in1:
            plan.steps_only2.append(step)
        if in1 and in2 and step in planned_elsewhere:
            continue
        calls1 = _side_calls(r1, step, rename1, "dir1") if in1 else {}
        calls2 = _side_calls(r2, step, rename2, "dir2") if in2 else {}
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
            t1 = _tensors(r1, c1.own if c1 else None, call, rules1, "dir1")
            t2 = _tensors(r2, c2.own if c2 else None, call, rules2, "dir2")
            for kind in KINDS:  # inputs, then outputs, then post-forward inputs; dir1's order first
                for tp in [tp for tp in t1 if tp[0] == kind] + [tp for tp in t2 if tp[0] == kind and tp not in t1]:
                    pair = Pair(call.tensor(*tp), t1.get(tp), t2.get(tp), renamed)
                    if name_map is not None and name_map.unaligned:
                        reason = name_map.unaligned_reason(call.module, tp, pair.presence)
                        if reason is not None:
                            pair = Pair(pair.key, pair.side1, pair.side2, renamed, reason)
                    plan.pairs.append(pair)
    return plan
