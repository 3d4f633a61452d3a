"""Whole steps of two statistics runs compared at once, without an object per tensor (issue 13).

:mod:`.stats_table` takes a statistics-only pair's nodes from the runs' statistics tables and
decides it in float64 arrays, but the plan still makes a :class:`~.pairing.Pair` per tensor and
the result an entry per tensor and per call: a few hundred steps a second. Here a step is
planned and decided as a whole when it is a *plain step*:

* both runs completed it, both tables hold its rows, and each run's calls of the step (start
  order, end order) are known, one rank, no call listed twice;
* after the ``modules`` filter, both runs have the same calls;
* every side of every call is in the table's fast part on both runs (no stored body, a float
  dtype, the statistics finite and no NaN/Inf in the tensor), the two runs have the same tensor
  paths on each side, with the same shapes and dtypes;
* every pair passes :meth:`~.stats_table.TableComparison._check` (the arithmetic of
  :func:`~.metrics.compare_stats`, vectorised).

Steps share a *template* when their layouts in both tables and their call orders are the same:
the template is planned once, from the tables' key columns, and the check runs over all of its
steps at once. A plain step's entries are all ``stats_only_match`` and its calls' verdicts
``stats_only_match`` (``no_tensors`` for a call without tensors), with no origin: the result
holds them as blocks (:mod:`.entries`) that make an entry only when it is read. Every other
step (one pair fails, a NaN, a one-sided tensor or call, a step in one run only) is planned and
compared by the general path, table-backed as before; its calls are the only ones the
divergence analysis needs, because a plain step has no differing value and calls nest only
within a step. So every entry, call, count, order and verdict is the general path's
(``tests/test_stats_table.py`` compares them on runs of several shapes in every backend).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ilstore.keys import KINDS, CallKey, TensorKey
from ilstore.store.base import StoreReader

from .entries import Block, Entries
from .options import CompareOptions
from .pairing import Plan
from .result import STATS_ONLY_MATCH, CallResult, TensorResult
from .stats_table import CHECKED, TableComparison, TableRun

__all__ = ["CallOrder", "call_orders", "StepTemplate", "PlainSteps", "plain_steps", "assemble"]

#: One step's calls: ``(rank, (module, call) in start order, (module, call) in end order)``.
CallOrder = tuple[int, tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]


def call_orders(reader: StoreReader, steps: Iterable[int]) -> dict[int, CallOrder | None]:
    """Each step's calls in start and end order; None for a step whose calls are of several ranks.

    Steps with the same orders share one tuple, so a template is found by identity. A reader
    that offers ``call_orders()`` (every step's orders read in one pass, None when it cannot)
    is asked that; otherwise each step's :meth:`~StoreReader.calls` and
    :meth:`~StoreReader.call_ends`.
    """
    bulk = getattr(reader, "call_orders", None)
    found = bulk() if callable(bulk) else None
    if isinstance(found, dict):
        return found
    interned: dict[CallOrder, CallOrder] = {}
    out: dict[int, CallOrder | None] = {}
    for step in steps:
        calls, ends = reader.calls(step), reader.call_ends(step)
        ranks = {c.rank for c in calls} | {c.rank for c in ends}
        if len(ranks) > 1:
            out[step] = None
            continue
        order = (ranks.pop() if ranks else 0, tuple((c.module, c.call) for c in calls),
                 tuple((c.module, c.call) for c in ends))
        out[step] = interned.setdefault(order, order)
    return out


class StepTemplate:
    """The plan and the entries of every plain step with one layout pair and one call order.

    Attributes:
        rank: the calls' rank.
        calls: the planned calls ``(module, call, start, end, tensors)``, in dir1's start order.
        ranks: each call's position in the step's execution (completion) order.
        rows1, rows2: each pair's index in its run's layout (its row is the step's first plus it).
        numel: each pair's element count (dir2's), for the L2 norm's bound.
        pairs: what an entry needs, per pair: ``(module, call, kind, path, shape1, shape2,
            dtype, device1, device2, note)``.
    """

    __slots__ = ("rank", "calls", "ranks", "rows1", "rows2", "numel", "pairs")

    def __init__(self, rank: int, calls: list[tuple[str, int, int, int, int]],
                 pairs: list[tuple[Any, ...]], rows1: list[int], rows2: list[int], numel: list[int]) -> None:
        self.rank, self.calls, self.pairs = rank, calls, pairs
        by_end = sorted(range(len(calls)), key=lambda j: calls[j][3])  # stable: ties keep start order
        self.ranks = [0] * len(calls)
        for position, j in enumerate(by_end):
            self.ranks[j] = position
        self.rows1 = np.asarray(rows1, dtype=np.int64)
        self.rows2 = np.asarray(rows2, dtype=np.int64)
        self.numel = np.asarray(numel, dtype=np.float64)

    def tensor(self, step: int, j: int) -> TensorResult:
        """The ``stats_only_match`` entry of pair ``j`` at ``step`` (what :func:`.stats_table._entry` makes)."""
        module, call, kind, path, shape1, shape2, dtype, device1, device2, note = self.pairs[j]
        return TensorResult(TensorKey(step, module, call, kind, path, self.rank), STATS_ONLY_MATCH, None, shape1,
                            shape2, dtype, dtype, device1, device2, False, None, (), note, "both")

    def call(self, step: int, j: int, base: int) -> CallResult:
        """Call ``j``'s entry at ``step``; ``base``: the execution position of the step's first call."""
        module, call, _start, _end, tensors = self.calls[j]
        return CallResult(CallKey(self.rank, step, module, call), "both",
                          STATS_ONLY_MATCH if tensors else "no_tensors", None, base + self.ranks[j], tensors, 0)


def _template(run1: TableRun, run2: TableRun, layout1: int, layout2: int, order1: CallOrder, order2: CallOrder,
              modules: list[re.Pattern[str]] | None) -> StepTemplate | None:
    """The template of steps with these layouts and call orders, None when they are not plain."""
    rank, starts1, ends1 = order1
    if rank != order2[0] or len(set(starts1)) != len(starts1) or len(set(ends1)) != len(ends1):
        return None
    if len(set(order2[1])) != len(order2[1]):
        return None

    def kept(calls: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        return [c for c in calls if modules is None or any(p.search(c[0]) for p in modules)]

    planned = kept(starts1)
    if set(planned) != set(kept(order2[1])):
        return None
    start_of = {c: i for i, c in enumerate(starts1)}
    end_of = {c: i for i, c in enumerate(ends1)}
    keys1, keys2 = run1.layouts[layout1], run2.layouts[layout2]
    groups1, groups2 = run1.groups(layout1), run2.groups(layout2)
    calls: list[tuple[str, int, int, int, int]] = []
    pairs: list[tuple[Any, ...]] = []
    rows1: list[int] = []
    rows2: list[int] = []
    numel: list[int] = []
    for module, call in planned:
        count = 0
        for kind in KINDS:
            g1, g2 = groups1.get((module, call, kind)), groups2.get((module, call, kind))
            if g1 is None and g2 is None:
                continue
            if g1 is None or g2 is None or not g1[1] or not g2[1]:
                return None
            paths1 = [keys1[i][3] for i in g1[0]]
            by_path2 = {keys2[i][3]: i for i in g2[0]}
            if len(set(paths1)) != len(paths1) or len(by_path2) != len(g2[0]) or set(paths1) != by_path2.keys():
                return None
            for i1, path in zip(g1[0], paths1, strict=True):
                i2 = by_path2[path]
                e1, e2 = keys1[i1], keys2[i2]
                if e1[5] != e2[5] or e1[4] != e2[4]:  # shape, dtype: the general path decides those
                    return None
                note = (f"dir1: {e1[9] or 'body not stored'}; dir2: {e2[9] or 'body not stored'}; "
                        f"compared by statistics: {CHECKED}")
                pairs.append((module, call, kind, path, tuple(int(d) for d in e1[5]), tuple(int(d) for d in e2[5]),
                              e1[4], _text(e1[7]), _text(e2[7]), note))
                rows1.append(i1)
                rows2.append(i2)
                numel.append(e2[6])
                count += 1
        start = start_of[(module, call)]
        calls.append((module, call, start, end_of.get((module, call), start), count))
    return StepTemplate(rank, calls, pairs, rows1, rows2, numel)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclasses.dataclass
class PlainSteps:
    """The plain steps of a comparison: step -> its template."""

    templates: dict[int, StepTemplate]


def plain_steps(table: TableComparison, o: CompareOptions, modules: list[re.Pattern[str]] | None) -> PlainSteps:
    """Find the plain steps of the comparison (see the module's docstring) and decide them.

    Args:
        table: the two runs' tables.
        o: the options (the steps asked for, the tolerances).
        modules: the ``modules`` filter, compiled.
    """
    run1, run2 = table.run1, table.run2
    steps = sorted(run1.blocks) if o.steps is None else sorted(set(o.steps))
    both = [s for s in steps if s in run1.blocks and s in run2.blocks]
    if not both:
        return PlainSteps({})
    orders1, orders2 = call_orders(run1.reader, both), call_orders(run2.reader, both)
    templates: dict[tuple[int, int, int, int], StepTemplate | None] = {}
    chosen: dict[int, tuple[StepTemplate, list[int], list[int], list[int]]] = {}
    for step in both:
        order1, order2 = orders1.get(step), orders2.get(step)
        if order1 is None or order2 is None:
            continue
        (layout1, start1), (layout2, start2) = run1.blocks[step], run2.blocks[step]
        signature = (layout1, layout2, id(order1), id(order2))
        if signature not in templates:
            templates[signature] = _template(run1, run2, layout1, layout2, order1, order2, modules)
        template = templates[signature]
        if template is None:
            continue
        group = chosen.get(id(template))
        if group is None:
            group = chosen[id(template)] = (template, [], [], [])
        group[1].append(step)
        group[2].append(start1)
        group[3].append(start2)
    out: dict[int, StepTemplate] = {}
    for template, group_steps, starts1, starts2 in chosen.values():
        ok = table.plain_pass(np.asarray(starts1, dtype=np.int64), np.asarray(starts2, dtype=np.int64),
                              template.rows1, template.rows2, template.numel, o)
        for step, passed in zip(group_steps, ok.tolist(), strict=True):
            if passed:
                out[step] = template
    return PlainSteps(out)


class _TensorBlock:
    """The entries of consecutive plain steps that share a template."""

    status = STATS_ONLY_MATCH
    __slots__ = ("template", "steps")

    def __init__(self, template: StepTemplate, steps: list[int]) -> None:
        self.template, self.steps = template, steps

    def __len__(self) -> int:
        return len(self.steps) * len(self.template.pairs)

    def item(self, i: int) -> TensorResult:
        k, j = divmod(i, len(self.template.pairs))
        return self.template.tensor(self.steps[k], j)


class _CallBlock:
    """The calls of consecutive plain steps that share a template."""

    status: str | None = None
    __slots__ = ("template", "steps", "bases")

    def __init__(self, template: StepTemplate, steps: list[int], bases: list[int]) -> None:
        self.template, self.steps, self.bases = template, steps, bases

    def __len__(self) -> int:
        return len(self.steps) * len(self.template.calls)

    def item(self, i: int) -> CallResult:
        k, j = divmod(i, len(self.template.calls))
        return self.template.call(self.steps[k], j, self.bases[k])

    def step_calls(self, k: int) -> list[CallResult]:
        """The calls of the block's ``k``-th step (``self.steps[k]``). Every step's calls differ
        from another's only in their step and execution position (``order``)."""
        return [self.template.call(self.steps[k], j, self.bases[k]) for j in range(len(self.template.calls))]


def assemble(plan: Plan, plain: PlainSteps, tensors: Sequence[TensorResult], calls: Sequence[CallResult]
             ) -> tuple[Entries[TensorResult], Entries[CallResult]]:
    """Every entry and call in the general path's order: the plain steps' blocks between the
    other steps' entries (``tensors``, ``calls``: those of ``plan``, which left the plain steps
    out, as the engine and :func:`~.divergence.analyse_calls` gave them).

    A call's ``order`` counts every call of the comparison; :func:`~.divergence.analyse_calls`
    counted only the calls of the plan, so theirs are moved up by the plain steps' calls before
    them (steps come first in execution order, so no other order changes).
    """
    tensor_parts: list[tuple[TensorResult, ...] | Block[TensorResult]] = []
    call_parts: list[tuple[CallResult, ...] | Block[CallResult]] = []
    t_at = c_at = 0  # next entry and call of the plan
    before = 0  # calls of every step so far
    planned_before = 0  # calls of the plan's steps so far
    block: tuple[_TensorBlock, _CallBlock] | None = None
    for step in plan.steps:
        template = plain.templates.get(step)
        if template is not None:
            if block is None or block[0].template is not template:
                block = (_TensorBlock(template, []), _CallBlock(template, [], []))
                tensor_parts.append(block[0])
                call_parts.append(block[1])
            block[0].steps.append(step)
            block[1].steps.append(step)
            block[1].bases.append(before)
            before += len(template.calls)
            continue
        block = None
        t_end = t_at
        while t_end < len(tensors) and tensors[t_end].key.step == step:
            t_end += 1
        c_end = c_at
        while c_end < len(calls) and calls[c_end].call.step == step:
            c_end += 1
        shift = before - planned_before
        tensor_parts.append(tuple(tensors[t_at:t_end]))
        call_parts.append(tuple(dataclasses.replace(c, order=c.order + shift) if shift else c
                                for c in calls[c_at:c_end]))
        before += c_end - c_at
        planned_before += c_end - c_at
        t_at, c_at = t_end, c_end
    assert t_at == len(tensors) and c_at == len(calls), "plan entries outside the plan's steps"
    return Entries(tensor_parts), Entries(call_parts)
