"""Comparing statistics-only tensors from the runs' statistics tables, a whole run at a time.

Two runs captured with ``mode: "stats"`` hold little but statistics, and the general path
reads one structure file per module call to reach them (about 100 steps a second). When both
runs carry a statistics table (:mod:`ilstore.store.stats_table`) the comparison takes these
instead:

* pairing: the plan is built by :func:`~.pairing.build_plan` as always, but the tensor nodes of
  a call come from the table (:class:`TableRun`) when every node of that side is a
  statistics-only float tensor with all of its statistics finite; any other side (a stored
  body, an integer tensor, NaN/Inf, a step missing from the table) is read from the run's
  files as before. So the plan, its notes and its order are the general path's.
* verdicts: the pairs whose two nodes came from the table, with equal shapes and dtypes, are
  checked at once with array arithmetic (:meth:`TableComparison.results`), bound for bound the
  arithmetic of :func:`~.metrics.compare_stats` in float64, so the verdict is the same bit for
  bit. A pair that passes gets its ``stats_only_match`` entry here; every other pair (one that
  fails, and every pair of the general kind) goes through the engine's own pair comparison, so
  what it reports about a difference is unchanged.

Whole steps in which every pair is in the tables' fast part (*plain steps*, passing, or also
failing with ``columnar.plain_steps(..., failing=True)``) do not reach the plan at all:
:mod:`.columnar` plans and decides them a step template at a time, with this module's tables,
block index and check (:meth:`TableComparison.pair_check`); the pairing above is for the others.

Memory (issue 18): a table is never held whole (a 100,000-step run's is 280 MB). Its rows are
read a window of at most :data:`~ilstore.store.stats_table.BLOCK_ROWS` rows at a time: once in
order to find each step's block (:class:`BlockIndex`), then the rows of a chunk of steps for
each check. What stays for the whole comparison is, per step and run, its block's layout and
first row (about 20 bytes, in arrays: :class:`StepIndex`, :class:`StepMap`).

The engine uses it only without a name map, replay or oracle (:func:`attach`).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence, ValuesView
from typing import Any, TypeVar, cast

import numpy as np

from ilstore.keys import CallKey, TensorKey
from ilstore.store import stats_table as _store_table
from ilstore.store.base import StoreReader
from ilstore.store.stats_table import COLUMNS, ROW_WIDTH, STAT_COLUMNS, StatsTableReader

from .metrics import _FLOAT_STATS
from .options import CompareOptions
from .pairing import Pair
from .result import STATS_ONLY_MATCH, TensorResult

__all__ = ["StepIndex", "StepMap", "BlockIndex", "TableRun", "TableComparison", "attach", "CHECKED"]

_V = TypeVar("_V")
_STEP, _LAYOUT, _INDEX = (COLUMNS.index(c) for c in ("step", "layout", "index"))
_FIRST_STAT = COLUMNS.index(STAT_COLUMNS[0])
_COUNTS = ("nan_count", "inf_count")
#: What a passing pair's note lists, in :func:`~.metrics.compare_stats`' order.
CHECKED = ", ".join(_COUNTS + _FLOAT_STATS)
#: Each statistic's column in :meth:`TableRun.stat_rows`' arrays.
_COL = {name: i for i, name in enumerate(STAT_COLUMNS)}
#: Pairs :meth:`TableComparison.pair_check` checks at once.
_CHUNK_PAIRS = 1 << 14
#: Rows :meth:`TableRun.stat_values` reads at once (and keeps until a row outside them is asked for).
_ROW_WINDOW = 1024


def _float_dtype(dtype: Any) -> bool:
    """A real floating dtype (complex tensors have no min/max/mean/std: not in the table's fast part)."""
    return isinstance(dtype, str) and dtype.removeprefix("torch.").startswith(("float", "bfloat", "half", "double"))


class StepIndex:
    """The positions of a sorted set of step numbers, found without an object per step.

    Where the steps fill most of their range (a run's steps usually do) a slot per number of the
    range holds the position (4 bytes each); otherwise the position is found by bisection.

    Args:
        steps: the step numbers, sorted, each once (int64).
    """

    __slots__ = ("steps", "_low", "_slot", "_sorted")

    def __init__(self, steps: np.ndarray) -> None:
        #: the step numbers (int64, sorted)
        self.steps = np.ascontiguousarray(steps, dtype=np.int64)
        count = len(self.steps)
        self._low = int(self.steps[0]) if count else 0
        span = int(self.steps[-1]) - self._low + 1 if count else 0
        self._slot: array[int] | None = None
        self._sorted: array[int] | None = None
        if span <= 4 * count + 4096 and count < 2**31:
            slot = np.full(span, -1, dtype=np.int32)
            slot[self.steps - self._low] = np.arange(count, dtype=np.int32)
            self._slot = array("i", slot.tobytes())
        else:
            self._sorted = array("q", self.steps.tobytes())

    def position(self, step: int) -> int:
        """``step``'s position in :attr:`steps`, -1 when it is not there."""
        if self._slot is not None:
            i = step - self._low
            return self._slot[i] if 0 <= i < len(self._slot) else -1
        assert self._sorted is not None
        i = bisect_left(self._sorted, step)
        return i if i < len(self._sorted) and self._sorted[i] == step else -1

    def __len__(self) -> int:
        return len(self.steps)


class StepMap(Mapping[int, _V]):
    """Step -> a value, for the steps of a :class:`StepIndex`, with no object per step.

    Args:
        index: the steps.
        value: makes the value of the ``i``-th step (in :attr:`StepIndex.steps`' order) from ``i``.
    """

    def __init__(self, index: StepIndex, value: Callable[[int], _V]) -> None:
        self.index, self._value = index, value

    def get(self, step: int, default: Any = None) -> Any:  # Mapping.get, without the exception
        i = self.index.position(step) if isinstance(step, int) else -1
        return self._value(i) if i >= 0 else default

    def __getitem__(self, step: int) -> _V:
        i = self.index.position(step) if isinstance(step, int) else -1
        if i < 0:
            raise KeyError(step)
        return self._value(i)

    def __contains__(self, step: object) -> bool:
        return isinstance(step, int) and self.index.position(step) >= 0

    def __iter__(self) -> Iterator[int]:
        return iter(self.index.steps.tolist())

    def __len__(self) -> int:
        return len(self.index)

    def values(self) -> ValuesView[_V]:
        return _StepValues(self)


class _StepValues(ValuesView[_V]):
    """A :class:`StepMap`'s values in step order, made without looking each step up."""

    _mapping: StepMap[_V]

    def __iter__(self) -> Iterator[_V]:
        return map(self._mapping._value, range(len(self._mapping)))


class BlockIndex(StepMap[tuple[int, int]]):
    """Step -> ``(layout, first row)`` of its block in a statistics table, held in arrays.

    Args:
        steps: the steps, sorted, each once.
        layouts, starts: each step's layout number and first row.
    """

    def __init__(self, steps: np.ndarray, layouts: np.ndarray, starts: np.ndarray) -> None:
        self.layouts, self.starts = layouts, starts
        super().__init__(StepIndex(steps), self._block)

    def _block(self, i: int) -> tuple[int, int]:
        return int(self.layouts[i]), int(self.starts[i])


class TableRun:
    """A reader whose :meth:`tensor_nodes` come from the statistics table where they can.

    Everything else is the wrapped reader's. Nodes made here carry what the comparison reads
    (``type``, ``shape``, ``dtype``, ``numel``, ``device``, ``path``, ``stored``, ``reason``,
    ``stats``) and are remembered with their row, for :class:`TableComparison`.

    The table's rows are read a window at a time (at most :data:`~ilstore.store.stats_table.BLOCK_ROWS`
    rows, :meth:`stat_rows`), never whole: what stays in memory for the whole comparison is the
    layouts and, per step, where its block starts (:attr:`blocks`).

    Args:
        reader: the run.
        table: its statistics table.

    Raises:
        CorruptFileError: the table's files are missing or damaged.
    """

    def __init__(self, reader: StoreReader, table: StatsTableReader) -> None:
        self.reader = reader
        self.layouts = table.layouts()
        #: the table's complete rows, read a window at a time
        self.rows = table.open_rows()
        #: step -> (layout, first row) of its block, for the steps whose rows can be used
        self.blocks = self._index_blocks(reader.steps())
        # per layout: (module, call, kind) -> [(index in the layout, key entry)], and whether
        # every entry of that group may come from the table
        self._groups: dict[int, dict[tuple[str, int, str], tuple[list[int], bool]]] = {}
        #: id(node) -> row, for the nodes made here
        self.row_of: dict[int, int] = {}
        self._kept: list[dict[str, Any]] = []  # the nodes made here stay alive, so their ids stay theirs
        self._cached_step: int | None = None
        self._cached_values: list[list[Any]] = []
        self._block_step: int | None = None
        self._block: tuple[int, int] | None = None  # blocks.get(_block_step)
        self._window: tuple[int, np.ndarray] = (0, np.empty((0, ROW_WIDTH)))  # the rows :meth:`stat_values` read last

    def _index_blocks(self, steps: list[int]) -> BlockIndex:
        """Step -> (layout, first row) of its last complete block, for the steps the journal lists.

        A block is the rows ``index`` 0, 1, ... of its layout's length, all with its step and
        layout; anything else (a block cut short, rows out of place, a step or layout that is not
        a whole number) is not one, and its step is then read from the run's files.

        The rows are read a window at a time. A block starts at a row with ``index`` 0 and is
        whole when the next row that is a start or does not fit it (its ``index`` is not its
        distance from the start, or its step or layout is not the start's) comes no earlier than
        the layout's length after it (the end of the table counts as such a row); only the last
        start of the rows read so far can still be waiting for that row.
        """
        numbers = sorted(n for n in self.layouts if -2**63 <= n < 2**63)
        known = np.asarray(numbers, dtype=np.float64)
        known_numbers = np.asarray(numbers, dtype=np.int64)
        known_lengths = np.asarray([len(self.layouts[n]) for n in numbers], dtype=np.int64)
        listed = np.unique(np.asarray([s for s in steps if -2**63 <= s < 2**63], dtype=np.int64))
        found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (step, layout, first row) of good blocks

        def close(first: np.ndarray, step: np.ndarray, layout: np.ndarray, until: np.ndarray) -> None:
            """Keep the blocks starting at rows ``first`` whose next break is at ``until``, when whole."""
            if not len(known):
                return
            whole = np.isfinite(layout) & np.isfinite(step) & (layout == np.round(layout)) & (step == np.round(step))
            whole &= np.abs(step) < 2.0**63  # (a step the journal can list)
            at = np.minimum(np.searchsorted(known, layout), len(known) - 1)
            lengths = np.where(whole & (known[at] == layout), known_lengths[at], -1)
            good = (lengths > 0) & (until - first >= lengths)
            number = step[good].astype(np.int64)
            listed_here = np.isin(number, listed)
            found.append((number[listed_here], known_numbers[at[good][listed_here]], first[good][listed_here]))

        # the last start read so far, whose break has not come yet: (row, step, layout); row -1: none
        open_row, open_step, open_layout = -1, np.nan, np.nan
        for first, window in self.rows.windows():
            index, step_col, layout_col = window[:, _INDEX], window[:, _STEP], window[:, _LAYOUT]
            position = np.arange(first, first + len(window))
            is_start = index == 0
            # each row's start: the last at or before it (rows before the window's first: the open one)
            owner = np.maximum.accumulate(np.where(is_start, position, -1))
            inherited = owner < 0
            local = np.maximum(owner - first, 0)
            owner_step = np.where(inherited, open_step, step_col[local])
            owner_layout = np.where(inherited, open_layout, layout_col[local])
            owner[inherited] = open_row
            fits = (owner >= 0) & (index == position - owner) & (step_col == owner_step) \
                & (layout_col == owner_layout)
            breaks = position[is_start | ~fits]
            starts = position[is_start]
            if open_row >= 0 and len(breaks):
                close(np.asarray([open_row]), np.asarray([open_step]), np.asarray([open_layout]), breaks[:1])
                open_row = -1
            if len(starts):
                after = np.searchsorted(breaks, starts, side="right")
                closed = after < len(breaks)  # all but maybe the last: the next start is a break
                rel = starts - first
                close(starts[closed], step_col[rel[closed]], layout_col[rel[closed]], breaks[after[closed]])
                if not closed[-1]:
                    open_row, open_step, open_layout = int(starts[-1]), float(step_col[rel[-1]]), \
                        float(layout_col[rel[-1]])
        if open_row >= 0:  # the table's end is its break
            close(np.asarray([open_row]), np.asarray([open_step]), np.asarray([open_layout]),
                  np.asarray([self.rows.count]))
        if found:
            step, layout, start = (np.concatenate(column) for column in zip(*found, strict=True))
        else:
            step = layout = start = np.empty(0, dtype=np.int64)
        # a later block of the same step wins: the first of each step in the reversed order
        unique, last = np.unique(step[::-1], return_index=True)
        last = len(step) - 1 - last
        return BlockIndex(unique, layout[last], start[last])

    def stat_rows(self, at: np.ndarray) -> np.ndarray:
        """The statistics columns (:data:`STAT_COLUMNS`) of rows ``at`` (any order, repeats allowed),
        as float64; the table is read a window of at most ``BLOCK_ROWS`` rows at a time."""
        if not len(at):
            return np.empty((0, len(STAT_COLUMNS)), dtype=np.float64)
        limit = _store_table.BLOCK_ROWS
        low, high = int(at.min()), int(at.max()) + 1
        if high - low <= limit:  # the usual case: neighbouring steps' blocks
            return self.rows.read(low, high - low)[at - low, _FIRST_STAT:]
        out = np.empty((len(at), len(STAT_COLUMNS)), dtype=np.float64)
        order = np.argsort(at, kind="stable")
        ordered = at[order]
        i = 0
        while i < len(ordered):
            low = int(ordered[i])
            j = int(np.searchsorted(ordered, low + limit))
            part = ordered[i:j]
            out[order[i:j]] = self.rows.read(low, int(part[-1]) + 1 - low)[part - low, _FIRST_STAT:]
            i = j
        return out

    def stat_values(self, row: int) -> list[Any]:
        """The statistics columns of one row, as a list (the rows around it are read and kept for the next)."""
        first, window = self._window
        if not first <= row < first + len(window):
            size = min(_ROW_WINDOW, _store_table.BLOCK_ROWS)
            first = row - row % size
            window = self.rows.read(first, min(size, self.rows.count - first))
            self._window = (first, window)
        return cast(list[Any], window[row - first, _FIRST_STAT:].tolist())

    def groups(self, layout: int) -> dict[tuple[str, int, str], tuple[list[int], bool]]:
        groups = self._groups.get(layout)
        if groups is None:
            groups = {}
            for i, entry in enumerate(self.layouts[layout]):
                module, call, kind, _path, dtype, shape, numel, _dev, stored, _why = entry
                indices, ok = groups.get((module, call, kind), ([], True))
                indices.append(i)
                ok = ok and not stored and _float_dtype(dtype) and isinstance(shape, list) and isinstance(numel, int)
                groups[(module, call, kind)] = (indices, ok)
            self._groups[layout] = groups
        return groups

    def tensor_nodes(self, call: CallKey, kind: str) -> Iterator[tuple[TensorKey, dict[str, Any]]]:
        """Like :meth:`StoreReader.tensor_nodes`; from the table when the whole side is in its fast part."""
        if self._block_step != call.step:  # a step's calls are asked for one after another
            self._block_step, self._block = call.step, self.blocks.get(call.step)
        block = self._block
        if block is not None:
            layout, start = block
            indices, ok = self.groups(layout).get((call.module, call.call, kind), ([], True))
            if not indices:  # the writer saw no tensor node on that side
                return iter(())
            if ok:
                values = self._step_values(call.step, start, len(self.layouts[layout]))
                if all(values[i][-1] for i in indices):
                    return iter(self._nodes(call, kind, layout, start, indices, values))
        return self.reader.tensor_nodes(call, kind)

    def _step_values(self, step: int, start: int, count: int) -> list[list[Any]]:
        """The statistics of one step's rows as Python lists, each ending with its row's plain flag (cached)."""
        if self._cached_step != step:
            rows = self.rows.read(start, count)[:, _FIRST_STAT:]
            stats = rows.tolist()
            for row, plain in zip(stats, _plain(rows).tolist(), strict=True):
                row.append(plain)
            self._cached_step, self._cached_values = step, stats
        return self._cached_values

    def _nodes(self, call: CallKey, kind: str, layout: int, start: int, indices: list[int],
               values: list[list[Any]]) -> list[tuple[TensorKey, dict[str, Any]]]:
        keys = self.layouts[layout]
        out = []
        for i in indices:
            _module, _call, _kind, path, dtype, shape, numel, device, _stored, reason = keys[i]
            stats = _stats(values[i])
            node = {"type": "tensor", "shape": shape, "dtype": dtype, "numel": numel, "device": device,
                    "path": list(path), "stats": stats, "stored": False, "reason": reason}
            self.row_of[id(node)] = start + i
            self._kept.append(node)
            out.append((call.tensor(kind, path), node))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reader, name)


class TableComparison:
    """The two table-backed runs of one comparison; :meth:`results` checks their pairs at once."""

    def __init__(self, run1: TableRun, run2: TableRun) -> None:
        self.run1, self.run2 = run1, run2
        self._done: dict[int, TensorResult] = {}

    def forget(self) -> None:
        """Let go of the nodes made so far and of their entries not yet taken (the engine plans
        and compares a window of steps at a time: the next window's nodes are made anew, so what
        the comparison holds stays one window's)."""
        for run in (self.run1, self.run2):
            run.row_of.clear()  # together with the nodes: an id is not reused while it is a key
            run._kept.clear()
        self._done.clear()

    @property
    def readers(self) -> tuple[StoreReader, StoreReader]:
        """The two runs as readers, for :func:`~.pairing.build_plan`."""
        return cast(StoreReader, self.run1), cast(StoreReader, self.run2)

    def results(self, pairs: Sequence[Pair], o: CompareOptions) -> None:
        """Decide every pair whose two nodes came from the tables; keep the entries of those that pass."""
        chosen: list[Pair] = []
        rows1: list[int] = []
        rows2: list[int] = []
        numel: list[int] = []
        of1, of2 = self.run1.row_of, self.run2.row_of
        for pair in pairs:
            if pair.side1 is None or pair.side2 is None or pair.unaligned is not None:
                continue
            s1, s2 = pair.side1, pair.side2
            r1, r2 = of1.get(id(s1.node)), of2.get(id(s2.node))
            if (r1 is None or r2 is None or s1.rule or s2.rule or s1.problem or s2.problem
                    or s1.node["shape"] != s2.node["shape"] or s1.node["dtype"] != s2.node["dtype"]):
                continue
            chosen.append(pair)
            rows1.append(r1)
            rows2.append(r2)
            numel.append(s2.node["numel"])
        if not chosen:
            return
        passed = self._check(self.run1.stat_rows(np.asarray(rows1, dtype=np.int64)),
                             self.run2.stat_rows(np.asarray(rows2, dtype=np.int64)),
                             np.asarray(numel, dtype=np.float64), o)
        for pair, ok in zip(chosen, passed.tolist(), strict=True):
            if ok:
                self._done[id(pair)] = _entry(pair)

    @staticmethod
    def _check(a: np.ndarray, b: np.ndarray, numel: np.ndarray, o: CompareOptions) -> np.ndarray:
        """:func:`~.metrics.compare_stats` for plain float rows (no NaN/Inf, every statistic finite), vectorised;
        ``a``, ``b``: the two sides' statistics columns (:meth:`TableRun.stat_rows`), a pair per row.

        The answer for a row that is not plain means nothing (the caller leaves such rows out).
        """
        rtol, atol = (0.0, 0.0) if o.exact else (o.rtol, o.atol)
        ok = np.ones(len(a), dtype=bool)  # NaN/Inf counts are 0 on both sides here: they agree
        with np.errstate(invalid="ignore", over="ignore"):  # rows that are not plain: inf - inf
            tol = atol + rtol * b[:, _COL["abs_max"]]
            for name in _FLOAT_STATS:
                v1, v2 = a[:, _COL[name]], b[:, _COL[name]]
                bound = atol * np.sqrt(np.maximum(numel, 0.0)) + rtol * np.abs(v2) if name == "l2_norm" else tol
                ok &= (v1 == v2) | (np.abs(v1 - v2) <= bound)
        return ok

    def pair_check(self, starts1: np.ndarray, starts2: np.ndarray, rows1: np.ndarray, rows2: np.ndarray,
                   numel: np.ndarray, o: CompareOptions) -> tuple[np.ndarray, np.ndarray]:
        """For steps whose blocks start at ``starts1``/``starts2``, with the pairs of rows
        ``starts + rows``: whether each step's rows are all plain on both sides (one flag per
        step), and which pairs fail :meth:`_check` (steps x pairs; meaningful for plain steps only).

        The steps are checked a chunk at a time: at most ``_CHUNK_PAIRS`` pairs, and as many
        steps as a window of the tables (``BLOCK_ROWS`` rows) holds, so both the temporaries and
        the rows read stay a few MB.
        """
        plain = np.ones(len(starts1), dtype=bool)
        failed = np.zeros((len(starts1), len(rows1)), dtype=bool)
        if len(rows1) == 0:
            return plain, failed
        span = int(max(rows1.max(), rows2.max())) + 1  # rows of a step's block, at least
        step = max(1, min(_CHUNK_PAIRS // len(rows1), _store_table.BLOCK_ROWS // span))
        for first in range(0, len(starts1), step):
            s1, s2 = starts1[first:first + step], starts2[first:first + step]
            a = self.run1.stat_rows((s1[:, None] + rows1[None, :]).ravel())
            b = self.run2.stat_rows((s2[:, None] + rows2[None, :]).ravel())
            ok = (_plain(a) & _plain(b)).reshape(len(s1), len(rows1))
            plain[first:first + step] = ok.all(axis=1)
            failed[first:first + step] = ~self._check(a, b, np.tile(numel, len(s1)), o).reshape(len(s1), -1)
        return plain, failed

    def stats(self, side: int, row: int) -> dict[str, Any]:
        """The statistics of run ``side``'s (1 or 2) ``row`` as its table-backed node has them."""
        return _stats((self.run1 if side == 1 else self.run2).stat_values(row))

    def result(self, pair: Pair) -> TensorResult | None:
        """The entry :meth:`results` made for ``pair``, None when the engine must compare it."""
        return self._done.pop(id(pair), None)


def _plain(stats: np.ndarray) -> np.ndarray:
    """Per row of statistics columns: no NaN/Inf in the tensor and every statistic finite (the table's fast part)."""
    return (stats[:, 0] == 0) & (stats[:, 1] == 0) & np.isfinite(stats[:, 2:]).all(axis=1)


def _stats(row: list[Any]) -> dict[str, Any]:
    """A row's statistics (a list of its statistics columns, maybe with more after) as a node's ``stats``."""
    stats: dict[str, Any] = dict(zip(STAT_COLUMNS, row, strict=False))
    stats["nan_count"], stats["inf_count"] = int(row[0]), int(row[1])
    return stats


def _entry(pair: Pair) -> TensorResult:
    """The ``stats_only_match`` entry the engine's own comparison makes for a passing plain pair."""
    assert pair.side1 is not None and pair.side2 is not None
    n1, n2 = pair.side1.node, pair.side2.node
    note = f"dir1: {n1['reason'] or 'body not stored'}; dir2: {n2['reason'] or 'body not stored'}; " \
           f"compared by statistics: {CHECKED}"
    dtype = n1["dtype"]
    return TensorResult(pair.key, STATS_ONLY_MATCH, renamed_from=pair.renamed_from,
                        shape1=tuple(int(d) for d in n1["shape"]), shape2=tuple(int(d) for d in n2["shape"]),
                        dtype1=dtype, dtype2=dtype, device1=_text(n1["device"]), device2=_text(n2["device"]),
                        dtype_mismatch=False, note=note, presence="both")


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def attach(r1: StoreReader, r2: StoreReader, o: CompareOptions) -> TableComparison | None:
    """The table comparison of two runs, None when either lacks a table or a name map is in play.

    Raises:
        CorruptFileError: a table named by a manifest is missing or damaged.
    """
    if o.map is not None:
        return None
    t1, t2 = r1.stats_table(), r2.stats_table()
    if t1 is None or t2 is None:
        return None
    return TableComparison(TableRun(r1, t1), TableRun(r2, t2))

