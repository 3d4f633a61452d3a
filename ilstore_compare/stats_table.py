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

The engine uses it only without a name map, replay or oracle (:func:`attach`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

import numpy as np

from ilstore.keys import CallKey, TensorKey
from ilstore.store.base import StoreReader
from ilstore.store.stats_table import COLUMNS, ROW_WIDTH, STAT_COLUMNS, StatsTableReader

from .metrics import _FLOAT_STATS
from .options import CompareOptions
from .pairing import Pair
from .result import STATS_ONLY_MATCH, TensorResult

__all__ = ["TableRun", "TableComparison", "attach", "CHECKED"]

_STEP, _LAYOUT, _INDEX = (COLUMNS.index(c) for c in ("step", "layout", "index"))
_FIRST_STAT = COLUMNS.index(STAT_COLUMNS[0])
_COUNTS = ("nan_count", "inf_count")
#: What a passing pair's note lists, in :func:`~.metrics.compare_stats`' order.
CHECKED = ", ".join(_COUNTS + _FLOAT_STATS)
_COL = {name: COLUMNS.index(name) for name in STAT_COLUMNS}
#: Pairs :meth:`TableComparison.pair_check` checks at once.
_CHUNK_PAIRS = 1 << 16


def _float_dtype(dtype: Any) -> bool:
    """A real floating dtype (complex tensors have no min/max/mean/std: not in the table's fast part)."""
    return isinstance(dtype, str) and dtype.removeprefix("torch.").startswith(("float", "bfloat", "half", "double"))


class TableRun:
    """A reader whose :meth:`tensor_nodes` come from the statistics table where they can.

    Everything else is the wrapped reader's. Nodes made here carry what the comparison reads
    (``type``, ``shape``, ``dtype``, ``numel``, ``device``, ``path``, ``stored``, ``reason``,
    ``stats``) and are remembered with their row, for :class:`TableComparison`.

    Args:
        reader: the run.
        table: its statistics table.
    """

    def __init__(self, reader: StoreReader, table: StatsTableReader) -> None:
        self.reader = reader
        self.layouts = table.layouts()
        raw = table.rows()
        self.rows = np.frombuffer(raw, dtype="<f8").reshape(-1, ROW_WIDTH)
        stats = self.rows[:, _FIRST_STAT:]
        counts_zero = (stats[:, 0] == 0) & (stats[:, 1] == 0)
        #: per row: every statistic finite and no NaN/Inf in the tensor (the table's fast part)
        self.plain = counts_zero & np.isfinite(stats[:, 2:]).all(axis=1)
        self.blocks = self._index_blocks(set(reader.steps()))
        # per layout: (module, call, kind) -> [(index in the layout, key entry)], and whether
        # every entry of that group may come from the table
        self._groups: dict[int, dict[tuple[str, int, str], tuple[list[int], bool]]] = {}
        #: id(node) -> row, for the nodes made here
        self.row_of: dict[int, int] = {}
        self._kept: list[dict[str, Any]] = []  # the nodes made here stay alive, so their ids stay theirs
        self._cached_step: int | None = None
        self._cached_values: list[list[Any]] = []

    def _index_blocks(self, steps: set[int]) -> dict[int, tuple[int, int]]:
        """Step -> (layout, first row) of its last complete block, for the steps the journal lists.

        A block is the rows ``index`` 0, 1, ... of its layout's length, all with its step and
        layout; anything else (a block cut short, rows out of place, a step or layout that is not
        a whole number) is not one, and its step is then read from the run's files.
        """
        rows = self.rows
        total = len(rows)
        index, step_col, layout_col = rows[:, _INDEX], rows[:, _STEP], rows[:, _LAYOUT]
        starts = np.flatnonzero(index == 0)
        if not len(starts):
            return {}
        # each row's block: the last start at or before it; a row fits when its index counts from
        # there and its step and layout are the start's
        at = np.searchsorted(starts, np.arange(total), side="right") - 1
        owner = np.where(at >= 0, starts[np.maximum(at, 0)], -1)  # rows before the first start: no block
        safe = np.maximum(owner, 0)
        fits = (owner >= 0) & (index == np.arange(total) - owner) & (step_col == step_col[safe]) \
            & (layout_col == layout_col[safe])
        misfits = np.concatenate(([0], np.cumsum(~fits)))
        lengths = np.full(len(starts), -1, dtype=np.int64)
        layout_at, step_at = layout_col[starts], step_col[starts]
        whole = np.isfinite(layout_at) & np.isfinite(step_at) & (layout_at == np.round(layout_at)) \
            & (step_at == np.round(step_at))
        for number, keys in self.layouts.items():
            lengths[whole & (layout_at == number)] = len(keys)
        ends = starts + lengths
        # whole, not cut short, and no other block starting inside it
        good = (lengths > 0) & (ends <= total) & (np.searchsorted(starts, ends) - np.arange(len(starts)) == 1)
        good[good] &= misfits[ends[good]] == misfits[starts[good]]
        out: dict[int, tuple[int, int]] = {}
        for start, step, layout in zip(starts[good].tolist(), step_at[good].tolist(), layout_at[good].tolist(),
                                       strict=True):
            if int(step) in steps:
                out[int(step)] = (int(layout), start)  # a later block of the same step wins
        return out

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
        block = self.blocks.get(call.step)
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
            stats = self.rows[start:start + count, _FIRST_STAT:].tolist()
            for row, plain in zip(stats, self.plain[start:start + count].tolist(), strict=True):
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
        passed = self._check(np.asarray(rows1, dtype=np.int64), np.asarray(rows2, dtype=np.int64),
                             np.asarray(numel, dtype=np.float64), o)
        for pair, ok in zip(chosen, passed.tolist(), strict=True):
            if ok:
                self._done[id(pair)] = _entry(pair)

    def _check(self, rows1: np.ndarray, rows2: np.ndarray, numel: np.ndarray, o: CompareOptions) -> np.ndarray:
        """:func:`~.metrics.compare_stats` for plain float rows (no NaN/Inf, every statistic finite), vectorised.

        The answer for a row that is not plain means nothing (the caller leaves such rows out).
        """
        a, b = self.run1.rows[rows1], self.run2.rows[rows2]
        rtol, atol = (0.0, 0.0) if o.exact else (o.rtol, o.atol)
        ok = np.ones(len(rows1), dtype=bool)  # NaN/Inf counts are 0 on both sides here: they agree
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
        step), and which pairs fail :meth:`_check` (steps x pairs; meaningful for plain steps only)."""
        plain = np.ones(len(starts1), dtype=bool)
        failed = np.zeros((len(starts1), len(rows1)), dtype=bool)
        if len(rows1) == 0:
            return plain, failed
        step = max(1, _CHUNK_PAIRS // len(rows1))  # steps at a time: the temporaries stay a few MB
        for first in range(0, len(starts1), step):
            s1, s2 = starts1[first:first + step], starts2[first:first + step]
            at1 = (s1[:, None] + rows1[None, :]).ravel()
            at2 = (s2[:, None] + rows2[None, :]).ravel()
            ok = (self.run1.plain[at1] & self.run2.plain[at2]).reshape(len(s1), len(rows1))
            plain[first:first + step] = ok.all(axis=1)
            failed[first:first + step] = ~self._check(at1, at2, np.tile(numel, len(s1)), o).reshape(len(s1), -1)
        return plain, failed

    def stats(self, side: int, row: int) -> dict[str, Any]:
        """The statistics of run ``side``'s (1 or 2) ``row`` as its table-backed node has them."""
        return _stats((self.run1 if side == 1 else self.run2).rows[row, _FIRST_STAT:].tolist())

    def result(self, pair: Pair) -> TensorResult | None:
        """The entry :meth:`results` made for ``pair``, None when the engine must compare it."""
        return self._done.pop(id(pair), None)


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

