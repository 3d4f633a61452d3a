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
  :func:`~.metrics.compare_stats`, vectorised) -- or, with ``plain_steps(..., failing=True)``,
  passes or fails it: two runs that differ at every step (fp32 against bf16, two kernels) are
  decided in arrays too.

Steps share a *template* when their layouts in both tables and their call orders are the same:
the template is planned once, from the tables' key columns, and the check runs over all of its
steps at once (a :class:`_Group`: per step and pair, whether it fails). A passing pair's entry
is ``stats_only_match``; a failing pair's ``stats_only_mismatch``, its ``stats_failed`` from
:func:`~.metrics.compare_stats` itself on the table's rows (the check decided the verdict, the
function gives the failed statistics, and the two must agree). A call's verdict is ``mismatch``
when a pair of it fails, else ``stats_only_match`` (``no_tensors`` without tensors). The result
holds the entries as blocks (:mod:`.entries`) that make an entry only when it is read: one
block for consecutive steps of a template whose calls came to the same (verdicts, origins,
counts), so a report's call table is made once per block; a block singles out the entries of
its differing calls (:class:`.entries.Singled`), and counts its entries by status and its calls
by verdict without making them (:func:`.entries.tally`, :meth:`.result.Summary.of`).

Every other step (a NaN, a one-sided tensor or call, a stored body, a shape or dtype that
differs, a step in one run only; with ``failing=False`` also a step with a failing pair) is
planned and compared by the general path, table-backed as before. The divergence analysis
(:func:`analyse`) runs :func:`~.divergence.analyse_calls` on the plan's calls and its rules,
vectorised over the steps, on the steps decided here: calls nest only within a step, and
between steps the only thing carried over is whether an earlier step had a differing output,
which each side tells the other (``bad_from``). So every entry, call, count, order, verdict,
origin, first divergence and introduced call is the general path's
(``tests/test_stats_table.py`` and ``tests/test_stats_compare_divergent.py`` compare them, and
the reports, on runs of several shapes in every backend).
"""

from __future__ import annotations

import dataclasses
import re
from array import array
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ilstore.keys import KINDS, CallKey, TensorKey
from ilstore.store.base import StoreReader

from .divergence import _OUTPUT_KINDS, INHERITED, INTRODUCED, TOP_INTRODUCED, analyse_calls, merge_introduced
from .entries import Block, Entries
from .metrics import compare_stats
from .options import CompareOptions
from .pairing import Plan
from .result import STATS_ONLY_MATCH, STATS_ONLY_MISMATCH, CallResult, Divergence, TensorResult
from .stats_table import CHECKED, StepIndex, StepMap, TableComparison, TableRun

__all__ = ["CallOrder", "call_orders", "StepTemplate", "PlainSteps", "plain_steps", "assemble", "analyse"]

#: One step's calls: ``(rank, (module, call) in start order, (module, call) in end order)``.
CallOrder = tuple[int, tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]


def call_orders(reader: StoreReader, steps: Iterable[int]) -> Mapping[int, CallOrder | None]:
    """Each step's calls in start and end order; None for a step whose calls are of several ranks.

    Steps with the same orders share one tuple, so a template is found by identity. A reader
    that offers ``call_orders()`` (every step's orders read in one pass, None when it cannot)
    is asked that, and its mapping returned as it is (the step journal's holds no object per
    step); otherwise each step's :meth:`~StoreReader.calls` and :meth:`~StoreReader.call_ends`.
    """
    bulk = getattr(reader, "call_orders", None)
    found = bulk() if callable(bulk) else None
    if isinstance(found, Mapping):
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
            dtype, device1, device2, note)``; the pairs of a call follow each other, in the
            order of :attr:`calls`.
        first_pair: each call's first pair (and, last, the number of pairs).
        outputs, inputs: per pair, whether its kind is an output kind (``outputs``,
            ``post_fwd_inputs``) or ``inputs`` (for :func:`~.divergence.analyse_calls`' rules).
        has_inputs: per call, whether it has an input pair.
        inside: per call, the end (exclusive, in :attr:`calls`' order) of the calls nested in
            it, which follow it: :func:`~.divergence.analyse_calls`' nesting, from the positions.
        around: per call, the calls it is nested in.
    """

    __slots__ = ("rank", "calls", "ranks", "rows1", "rows2", "numel", "pairs", "first_pair", "outputs", "inputs",
                 "has_inputs", "inside", "around", "by_end")

    def __init__(self, rank: int, calls: list[tuple[str, int, int, int, int]],
                 pairs: list[tuple[Any, ...]], rows1: list[int], rows2: list[int], numel: list[int]) -> None:
        self.rank, self.calls, self.pairs = rank, calls, pairs
        by_end = sorted(range(len(calls)), key=lambda j: calls[j][3])  # stable: ties keep start order
        self.by_end = np.asarray(by_end, dtype=np.int64)
        self.ranks = [0] * len(calls)
        for position, j in enumerate(by_end):
            self.ranks[j] = position
        self.rows1 = np.asarray(rows1, dtype=np.int64)
        self.rows2 = np.asarray(rows2, dtype=np.int64)
        self.numel = np.asarray(numel, dtype=np.float64)
        self.first_pair = np.concatenate(([0], np.cumsum([c[4] for c in calls], dtype=np.int64)))
        self.outputs = np.asarray([p[2] in _OUTPUT_KINDS for p in pairs], dtype=bool)
        self.inputs = np.asarray([p[2] == "inputs" for p in pairs], dtype=bool)
        self.has_inputs = np.asarray([bool(self.inputs[self.first_pair[j]:self.first_pair[j + 1]].any())
                                      for j in range(len(calls))], dtype=bool)
        # analyse_calls' nesting: sorted by start (these are), a call's nested calls are those
        # after it up to the first that ends at or after it
        self.inside: list[int] = []
        self.around: list[list[int]] = [[] for _ in calls]
        for j, (_m, _c, _start, end, _n) in enumerate(calls):
            stop = j + 1
            while stop < len(calls) and calls[stop][3] < end:
                self.around[stop].append(j)
                stop += 1
            self.inside.append(stop)

    def tensor(self, step: int, j: int) -> TensorResult:
        """The ``stats_only_match`` entry of pair ``j`` at ``step`` (what :func:`.stats_table._entry` makes)."""
        module, call, kind, path, shape1, shape2, dtype, device1, device2, note = self.pairs[j]
        return TensorResult(TensorKey(step, module, call, kind, path, self.rank), STATS_ONLY_MATCH, None, shape1,
                            shape2, dtype, dtype, device1, device2, False, None, (), note, "both")

    def call(self, step: int, j: int, base: int) -> CallResult:
        """Call ``j``'s entry at ``step`` when it has no differing value; ``base``: the execution
        position of the step's first call."""
        module, call, _start, _end, tensors = self.calls[j]
        return CallResult(CallKey(self.rank, step, module, call), "both",
                          STATS_ONLY_MATCH if tensors else "no_tensors", None, base + self.ranks[j], tensors, 0)

    def key(self, step: int, j: int) -> TensorKey:
        """Pair ``j``'s key at ``step``."""
        module, call, kind, path = self.pairs[j][:4]
        return TensorKey(step, module, call, kind, path, self.rank)


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


class _Group:
    """The steps of one template decided in arrays, with what each of their pairs and calls came to.

    Attributes:
        template: the steps' template.
        steps, starts1, starts2: each step, and its first row in each run's table.
        failed: per step and pair, whether the pair fails (``stats_only_mismatch``).
        mismatched: per step and call, its pairs that fail.
        origin: per step and call, 0 (its outputs do not differ), :data:`_INHERITED` or
            :data:`_INTRODUCED` (see :func:`analyse`; all 0 before).
        outcome: per step, a number shared by the steps whose calls came to the same (verdicts,
            origins, counts), so that their calls' rows in a report are equal.
    """

    __slots__ = ("template", "table", "options", "steps", "starts1", "starts2", "failed", "mismatched", "out_bad",
                 "in_bad", "origin", "outcome")

    def __init__(self, template: StepTemplate, table: TableComparison, options: CompareOptions, steps: np.ndarray,
                 starts1: np.ndarray, starts2: np.ndarray, failed: np.ndarray) -> None:
        self.template, self.table, self.options = template, table, options
        self.steps, self.starts1, self.starts2 = steps, starts1, starts2
        lo, hi = template.first_pair[:-1], template.first_pair[1:]
        shape = (len(steps), len(template.calls))
        if not failed.any():  # every pair passes (two identical runs): read-only zeros that take no memory
            self.failed = np.broadcast_to(np.zeros(1, dtype=bool), failed.shape)
            self.mismatched = np.broadcast_to(np.zeros(1, dtype=np.uint8), shape)
            self.out_bad = self.in_bad = np.broadcast_to(np.zeros(1, dtype=bool), shape)
            self.origin = np.broadcast_to(np.zeros(1, dtype=np.int8), shape)
            self.outcome = np.broadcast_to(np.zeros(1, dtype=np.int64), shape[:1])
            return
        self.failed = failed
        # the smallest unsigned type that counts a call's pairs
        self.mismatched = _sums(failed, lo, hi, dtype=np.min_scalar_type(max(int((hi - lo).max(initial=0)), 1)))
        self.out_bad = _sums(failed, lo, hi, template.outputs) > 0
        self.in_bad = _sums(failed, lo, hi, template.inputs) > 0
        self.origin = np.zeros(shape, dtype=np.int8)
        self.outcome = self._outcomes()

    def _outcomes(self) -> np.ndarray:
        """Consecutive steps whose calls came to the same share a number (a step's differs from
        the one before when it came to something else)."""
        changed = np.zeros(len(self.steps), dtype=np.int64)
        for first in range(1, len(self.steps), _CHUNK_STEPS):
            last = min(first + _CHUNK_STEPS, len(self.steps))
            now, before = slice(first, last), slice(first - 1, last - 1)
            changed[now] = ((self.mismatched[now] != self.mismatched[before])
                            | (self.origin[now] != self.origin[before])).any(axis=1)
        return changed.cumsum()

    def analyse(self, bad_from: int | None) -> None:
        """Each call's origin, by :func:`~.divergence.analyse_calls`' rules, vectorised over the
        steps; ``bad_from``: the first step of the comparison at which some call's outputs differ."""
        t = self.template
        if not self.out_bad.any():
            return
        calls = len(t.calls)
        inside = np.asarray(t.inside, dtype=np.int64)
        for first in range(0, len(self.steps), _CHUNK_STEPS):
            now = slice(first, first + _CHUNK_STEPS)
            out_bad, in_bad = self.out_bad[now], self.in_bad[now]
            # nested: a call nested in it (the calls after it, up to ``inside``) has differing outputs
            nested = _sums(out_bad, np.arange(1, calls + 1), inside) > 0
            # upstream: an earlier step, an earlier call of the step (execution order) or the
            # inputs of a call it is nested in
            ordered = out_bad[:, t.by_end]
            upstream = np.empty_like(out_bad)
            upstream[:, t.by_end] = ordered.cumsum(axis=1) - ordered > 0
            if bad_from is not None:
                upstream |= (self.steps[now] > bad_from)[:, None]
            for j, around in enumerate(t.around):
                if around:
                    upstream[:, j] |= in_bad[:, around].any(axis=1)
            inherited = in_bad | nested | (~t.has_inputs[None, :] & upstream)
            self.origin[now] = np.where(out_bad, np.where(inherited, _INHERITED, _INTRODUCED), 0)
        self.outcome = self._outcomes()

    def tensor(self, k: int, j: int) -> TensorResult:
        """Pair ``j``'s entry at the group's ``k``-th step."""
        step = int(self.steps[k])
        if not self.failed[k, j]:
            return self.template.tensor(step, j)
        t, o = self.template, self.options
        table = self.table
        s1 = table.stats(1, int(self.starts1[k] + t.rows1[j]))
        s2 = table.stats(2, int(self.starts2[k] + t.rows2[j]))
        check = compare_stats(s1, s2, numel=int(t.numel[j]), is_float=True, rtol=o.rtol, atol=o.atol, exact=o.exact,
                              equal_nan=o.equal_nan)
        if check.matched:  # checked under python -O too: never a mismatch without a failing statistic
            raise RuntimeError(f"{t.key(step, j)}: the vectorised statistics check and compare_stats disagree")
        _module, _call, _kind, _path, shape1, shape2, dtype, device1, device2, note = t.pairs[j]
        return TensorResult(t.key(step, j), STATS_ONLY_MISMATCH, None, shape1, shape2, dtype, dtype, device1, device2,
                            False, None, check.failed, note, "both")

    def call(self, k: int, j: int, base: int) -> CallResult:
        """Call ``j``'s entry at the group's ``k``-th step; ``base`` as for :meth:`StepTemplate.call`."""
        mismatched = int(self.mismatched[k, j])
        t = self.template
        if not mismatched:
            return t.call(int(self.steps[k]), j, base)
        module, call, _start, _end, tensors = t.calls[j]
        return CallResult(CallKey(t.rank, int(self.steps[k]), module, call), "both", "mismatch",
                          _ORIGINS[self.origin[k, j]], base + t.ranks[j], tensors, mismatched)

    def divergence(self, k: int, j: int) -> Divergence:
        """Call ``j`` at the group's ``k``-th step as a divergence (its outputs differ)."""
        t = self.template
        module, call = t.calls[j][:2]
        step = int(self.steps[k])
        bad = tuple(t.key(step, p).display() for p in range(t.first_pair[j], t.first_pair[j + 1])
                    if t.outputs[p] and self.failed[k, p])
        return Divergence(step=step, module=module, call=call, rank=t.rank, origin=_ORIGINS[self.origin[k, j]] or "",
                          output_rel_l2=None, input_rel_l2=None, growth=None, tensors=bad)


def _sums(mask: np.ndarray, lo: np.ndarray, hi: np.ndarray, select: np.ndarray | None = None,
          dtype: Any = np.int32) -> np.ndarray:
    """Per row of ``mask`` (steps x columns), how many of its columns ``lo[i]:hi[i]`` are set (and
    set in ``select``), for each ``i``, as ``dtype``; a few thousand rows at a time (bounded temporaries)."""
    out = np.empty((len(mask), len(lo)), dtype=dtype)
    for first in range(0, len(mask), _CHUNK_STEPS):
        part = mask[first:first + _CHUNK_STEPS]
        if select is not None:
            part = part & select
        counts = np.zeros((len(part), part.shape[1] + 1), dtype=np.int32)
        np.cumsum(part, axis=1, dtype=np.int32, out=counts[:, 1:])
        out[first:first + len(part)] = counts[:, hi] - counts[:, lo]
    return out


#: Steps at a time in :class:`_Group`'s arithmetic (its temporaries stay a few MB).
_CHUNK_STEPS = 4096
_INHERITED, _INTRODUCED = 1, 2
_ORIGINS: tuple[str | None, ...] = (None, INHERITED, INTRODUCED)


@dataclasses.dataclass
class PlainSteps:
    """The steps of a comparison decided in arrays: step -> its template (``templates``), and
    step -> its group and position in it (``at``); ``groups``: the groups. ``failing``: some of
    them have a pair that fails. :meth:`of` makes them from the groups, in arrays (no object per step)."""

    templates: Mapping[int, StepTemplate]
    at: Mapping[int, tuple[_Group, int]] = dataclasses.field(default_factory=dict)
    failing: bool = False
    groups: list[_Group] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, groups: Sequence[_Group]) -> PlainSteps:
        """The steps of ``groups`` (each step in one)."""
        sizes = [len(g.steps) for g in groups]
        steps = np.concatenate([g.steps for g in groups] + [np.empty(0, dtype=np.int64)])
        order = np.argsort(steps, kind="stable")
        which = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)[order]
        k = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes] + [np.empty(0, dtype=np.int64)])[order]
        # per step in order: its group and its position there (Python arrays: quick to index one by one)
        group_of, ks = array("i", which.tobytes()), array("q", k.tobytes())
        index = StepIndex(steps[order])
        kept = list(groups)

        def template(i: int) -> StepTemplate:
            return kept[group_of[i]].template

        def at(i: int) -> tuple[_Group, int]:
            return kept[group_of[i]], ks[i]

        return cls(StepMap(index, template), StepMap(index, at), any(bool(g.failed.any()) for g in kept), kept)


def plain_steps(table: TableComparison, o: CompareOptions, modules: list[re.Pattern[str]] | None, *,
                failing: bool = False) -> PlainSteps:
    """Find the plain steps of the comparison (see the module's docstring) and decide them.

    Args:
        table: the two runs' tables.
        o: the options (the steps asked for, the tolerances).
        modules: the ``modules`` filter, compiled.
        failing: also steps in which some pairs fail (their entries ``stats_only_mismatch``):
            then the calls must be analysed by :func:`analyse`, not :func:`~.divergence.analyse_calls`.
    """
    run1, run2 = table.run1, table.run2
    blocks1, blocks2 = run1.blocks, run2.blocks
    steps = blocks1.index.steps if o.steps is None else \
        np.unique(np.asarray([s for s in o.steps if -2**63 <= s < 2**63], dtype=np.int64))
    both = np.intersect1d(np.intersect1d(steps, blocks1.index.steps), blocks2.index.steps)
    if not len(both):
        return PlainSteps({})
    at1 = np.searchsorted(blocks1.index.steps, both)
    at2 = np.searchsorted(blocks2.index.steps, both)
    layouts1, starts1, layouts2, starts2 = blocks1.layouts[at1], blocks1.starts[at1], blocks2.layouts[at2], \
        blocks2.starts[at2]
    orders1, orders2 = call_orders(run1.reader, map(int, both)), call_orders(run2.reader, map(int, both))
    signatures: dict[tuple[int, int, int, int], int] = {}  # -> the template's number, -1: not plain
    made: list[StepTemplate] = []
    template_of = np.full(len(both), -1, dtype=np.int32)
    for first in range(0, len(both), _CHUNK_STEPS):  # a chunk at a time: no Python object per step stays
        now = slice(first, first + _CHUNK_STEPS)
        numbers: list[int] = []
        for step, layout1, layout2 in zip(both[now].tolist(), layouts1[now].tolist(), layouts2[now].tolist(),
                                          strict=True):
            order1, order2 = orders1.get(step), orders2.get(step)
            if order1 is None or order2 is None:
                numbers.append(-1)
                continue
            signature = (layout1, layout2, id(order1), id(order2))
            number = signatures.get(signature)
            if number is None:
                template = _template(run1, run2, layout1, layout2, order1, order2, modules)
                number = signatures[signature] = -1 if template is None else len(made)
                if template is not None:
                    made.append(template)
            numbers.append(number)
        template_of[now] = numbers
    groups: list[_Group] = []
    for number in np.unique(template_of[template_of >= 0]).tolist():  # in order of their first steps
        template, where = made[number], np.flatnonzero(template_of == number)
        s1, s2 = starts1[where], starts2[where]
        plain, failed = table.pair_check(s1, s2, template.rows1, template.rows2, template.numel, o)
        keep = plain if failing else plain & ~failed.any(axis=1)
        if keep.any():
            groups.append(_Group(template, table, o, both[where][keep], s1[keep], s2[keep], failed[keep]))
    return PlainSteps.of(groups)


class _TensorBlock:
    """The entries of consecutive steps of one group whose calls came to the same; the entries of
    its calls with a differing value are singled out (:class:`.entries.Singled`)."""

    rest_status = STATS_ONLY_MATCH
    __slots__ = ("group", "ks", "steps", "status", "width", "positions")

    def __init__(self, group: _Group, k: int) -> None:
        self.group, self.ks, self.steps = group, array("q", (k,)), array("q", (int(group.steps[k]),))
        t = group.template
        self.width = len(t.pairs)
        bad = np.flatnonzero(group.mismatched[k])
        self.positions = [p for j in bad.tolist() for p in range(t.first_pair[j], t.first_pair[j + 1])]
        self.status: str | None = None if self.positions else STATS_ONLY_MATCH

    def __len__(self) -> int:
        return len(self.ks) * self.width

    def item(self, i: int) -> TensorResult:
        k, j = divmod(i, self.width)
        return self.group.tensor(self.ks[k], j)

    def tally(self, attribute: str) -> dict[str, int] | None:
        """How many entries have each status (:func:`.entries.tally`); every step of the block has
        the same number of failing pairs."""
        if attribute != "status":
            return None
        failing = len(self.ks) * int(self.group.mismatched[self.ks[0]].sum())
        return {STATS_ONLY_MISMATCH: failing, STATS_ONLY_MATCH: len(self) - failing}


class _CallBlock:
    """The calls of consecutive steps of one group whose calls came to the same; the mismatched
    ones are singled out (:class:`.entries.Singled`)."""

    status: str | None = None
    rest_status = None
    __slots__ = ("group", "ks", "steps", "bases", "width", "positions")

    def __init__(self, group: _Group, k: int, base: int) -> None:
        self.group, self.ks, self.steps, self.bases = group, array("q", (k,)), array("q", (int(group.steps[k]),)), \
            array("q", (base,))
        self.width = len(group.template.calls)
        self.positions = np.flatnonzero(group.mismatched[k]).tolist()

    def __len__(self) -> int:
        return len(self.ks) * self.width

    def item(self, i: int) -> CallResult:
        k, j = divmod(i, self.width)
        return self.group.call(self.ks[k], j, self.bases[k])

    def tally(self, attribute: str) -> dict[str, int] | None:
        """How many calls have each verdict (:func:`.entries.tally`); every step of the block has
        the same verdicts."""
        if attribute != "verdict":
            return None
        mismatched = self.group.mismatched[self.ks[0]] > 0
        empty = ~mismatched & (self.group.template.first_pair[1:] == self.group.template.first_pair[:-1])
        return {"mismatch": len(self.ks) * int(mismatched.sum()), "no_tensors": len(self.ks) * int(empty.sum()),
                STATS_ONLY_MATCH: len(self.ks) * int((~mismatched & ~empty).sum())}

    def step_calls(self, k: int) -> list[CallResult]:
        """The calls of the block's ``k``-th step (``self.steps[k]``). Every step's calls differ
        from another's only in their step and execution position (``order``)."""
        return [self.group.call(self.ks[k], j, self.bases[k]) for j in range(self.width)]


def assemble(plan: Plan, plain: PlainSteps, tensors: Sequence[TensorResult], calls: Sequence[CallResult]
             ) -> tuple[Entries[TensorResult], Entries[CallResult]]:
    """Every entry and call in the general path's order: the plain steps' blocks between the
    other steps' entries (``tensors``, ``calls``: those of ``plan``, which left the plain steps
    out, as the engine and :func:`~.divergence.analyse_calls` gave them).

    A call's ``order`` counts every call of the comparison; :func:`~.divergence.analyse_calls`
    counted only the calls of the plan, so theirs are moved up by the plain steps' calls before
    them (steps come first in execution order, so no other order changes).

    Raises:
        ValueError: ``plain`` has steps with failing pairs: their calls' origins and the first
            divergence need :func:`analyse`.
    """
    if plain.failing:
        raise ValueError("steps with failing pairs were decided in arrays: use columnar.analyse")
    return _assemble(plan, plain, tensors, calls)


def analyse(plan: Plan, plain: PlainSteps, tensors: Sequence[TensorResult]
            ) -> tuple[Entries[TensorResult], Entries[CallResult], Divergence | None, list[Divergence]]:
    """:func:`~.divergence.analyse_calls` and :func:`assemble` for a comparison some of whose
    steps ``plain`` decided (their pairs may fail): every call, the first divergence and the
    introduced-error calls, as the general path finds them over all the steps.

    Args:
        plan: the plan of the other steps.
        plain: the steps decided in arrays.
        tensors: the plan's entries, as the engine gave them.

    Returns:
        ``(tensors, calls, first_divergence, introduced)``, as :func:`~.divergence.analyse_calls`
        and :func:`assemble` give them.
    """
    groups = plain.groups or list({id(g): g for g, _k in plain.at.values()}.values())
    # the first step at which an output differs, here and in the plan (execution order is step order
    # between steps; a step is either decided here or planned)
    bad_here = [int(g.steps[g.out_bad.any(axis=1)].min()) for g in groups if g.out_bad.any()]
    first_here = min(bad_here, default=None)
    calls, first, introduced = analyse_calls(plan.calls, tensors, bad_from=first_here)
    bad_from = min((s for s in (first_here, first.step if first is not None else None) if s is not None),
                   default=None)
    candidates: list[tuple[int, int, _Group, int, int]] = []  # (step, rank, group, k, j) of introduced calls
    for g in groups:
        g.analyse(bad_from)
        ks, js = np.nonzero(g.origin == _INTRODUCED)
        if len(ks):
            ranks = np.asarray(g.template.ranks, dtype=np.int64)[js]
            order = np.lexsort((ranks, g.steps[ks]))[:TOP_INTRODUCED]
            candidates += [(int(g.steps[ks[i]]), int(ranks[i]), g, int(ks[i]), int(js[i])) for i in order]
    if first_here is not None and (first is None or first_here < first.step):
        g, k = plain.at[first_here]
        j = int(g.template.by_end[np.flatnonzero(g.out_bad[k, g.template.by_end])[0]])
        first = g.divergence(k, j)
    candidates.sort(key=lambda c: c[:2])
    here = [g.divergence(k, j) for _s, _r, g, k, j in candidates[:TOP_INTRODUCED]]
    tensors_out, calls_out = _assemble(plan, plain, tensors, calls)
    return tensors_out, calls_out, first, merge_introduced(introduced, here)


def _assemble(plan: Plan, plain: PlainSteps, tensors: Sequence[TensorResult], calls: Sequence[CallResult]
              ) -> tuple[Entries[TensorResult], Entries[CallResult]]:
    tensor_parts: list[tuple[TensorResult, ...] | Block[TensorResult]] = []
    call_parts: list[tuple[CallResult, ...] | Block[CallResult]] = []
    t_at = c_at = 0  # next entry and call of the plan
    before = 0  # calls of every step so far
    planned_before = 0  # calls of the plan's steps so far
    block: tuple[_TensorBlock, _CallBlock] | None = None
    for step in plan.steps:
        where = plain.at.get(step)
        if where is not None:
            group, k = where
            if block is None or block[0].group is not group or group.outcome[block[0].ks[-1]] != group.outcome[k]:
                block = (_TensorBlock(group, k), _CallBlock(group, k, before))
                tensor_parts.append(block[0])
                call_parts.append(block[1])
            else:
                block[0].ks.append(k)
                block[0].steps.append(step)
                block[1].ks.append(k)
                block[1].steps.append(step)
                block[1].bases.append(before)
            before += len(group.template.calls)
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
