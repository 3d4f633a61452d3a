"""The statistics table: every tensor's recorded statistics, one fixed-size binary row each.

A capture in ``mode: "stats"`` writes little but statistics, and comparing two such runs from
their per-call structure files costs a file read and a JSON parse per module call. The table
keeps the same numbers in two append-only files of the run directory, so a comparer can read a
whole run's statistics at once and compare them with array operations
(:mod:`ilstore_compare.stats_table`):

* ``stats_keys.jsonl`` — one line per distinct step *layout*: the step's tensor nodes in the
  order the writer received them, each ``[module, call, kind, path, dtype, shape, numel,
  device, stored, reason]``. Consecutive steps of a monitoring run share one layout, so the
  file stays small: a new line is written only when a step's layout differs from every layout
  the writer still remembers (the last :data:`_REMEMBERED`).
* ``stats.f64`` — one row per tensor node per step: :data:`ROW_WIDTH` little-endian float64
  values, the columns of :data:`COLUMNS` (``step``, ``layout``, ``index`` into the layout's
  keys, then the statistics; a statistic the node lacks is NaN). A step's rows are written
  by one ``write`` when the step ends, before its line in the step journal.

The step journal stays the authority on which steps exist: a reader uses only the rows of
steps the journal lists as complete, ignores a partial last row, and, when a step has several
row blocks, uses the last. The manifest names both files (``"stats_table"``); a run without
that key (older runs, other writers) simply has no table. The format pages document it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptFileError
from ._pread import AVAILABLE as PREADV
from ._pread import pread_into

__all__ = ["KEYS_NAME", "ROWS_NAME", "COLUMNS", "ROW_WIDTH", "ROW_BYTES", "STAT_COLUMNS", "BLOCK_ROWS",
           "StatsTableWriter", "StatsTableReader", "StatsTableRows", "table_of"]

KEYS_NAME = "stats_keys.jsonl"
ROWS_NAME = "stats.f64"
#: The statistics, in row order after ``step``, ``layout`` and ``index``.
STAT_COLUMNS = ("nan_count", "inf_count", "min", "max", "mean", "std", "abs_max", "l2_norm")
COLUMNS = ("step", "layout", "index") + STAT_COLUMNS
ROW_WIDTH = len(COLUMNS)
#: Bytes of one row.
ROW_BYTES = 8 * ROW_WIDTH
#: Rows one read of :class:`StatsTableRows` covers at most in :meth:`StatsTableRows.windows` (1.4 MB):
#: a comparer holds a window of the table at a time, never the whole of a long run's.
BLOCK_ROWS = 1 << 14
#: How many layouts the writer remembers (a step whose layout is one of them reuses its number).
_REMEMBERED = 64
_NAN = math.nan
_NAN_ROW = (_NAN,) * len(STAT_COLUMNS)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _NAN
    return float(value)


class StatsTableWriter:
    """Collects one step's rows (:meth:`add`) and appends them at the step's end (:meth:`end_step`).

    Args:
        run_dir: the run directory; both files are created empty (truncating earlier ones).

    Raises:
        OSError: a file cannot be created.
    """

    def __init__(self, run_dir: Path) -> None:
        self.keys_path = run_dir / KEYS_NAME
        self.rows_path = run_dir / ROWS_NAME
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        self._keys_fd: int | None = os.open(self.keys_path, flags, 0o644)
        try:
            self._rows_fd: int | None = os.open(self.rows_path, flags, 0o644)
        except OSError:
            os.close(self._keys_fd)
            raise
        self._layouts: OrderedDict[tuple[Any, ...], int] = OrderedDict()
        self._next_layout = 0
        self._keys: list[tuple[Any, ...]] = []
        self._values = array("d")
        self._sizes = [0, 0]  # bytes of complete lines / rows in each file

    def add(self, module: str, call: int, kind: str, path: tuple[str, ...], node: Mapping[str, Any]) -> None:
        """Add one tensor node of the current step."""
        self.add_nodes(module, call, kind, [(path, node)])

    def add_nodes(self, module: str, call: int, kind: str,
                  nodes: Iterable[tuple[tuple[str, ...], Mapping[str, Any]]]) -> None:
        """Add the tensor nodes ``(path, node)`` of one record of the current step, in order."""
        keys, values = self._keys, self._values
        for path, node in nodes:
            get = node.get
            shape = get("shape")
            keys.append((module, call, kind, path, get("dtype"), tuple(shape) if isinstance(shape, list) else shape,
                         get("numel"), get("device"), get("stored", True) is not False, get("reason")))
            stats = get("stats")
            if isinstance(stats, dict):  # floats and ints converted inline, anything else through _number
                values.extend([v if type(v) is float else float(v) if type(v) is int else _number(v)
                               for v in map(stats.get, STAT_COLUMNS, _NAN_ROW)])
            else:
                values.extend(_NAN_ROW)

    def discard(self) -> None:
        """Forget the rows collected so far (a step that was cut)."""
        self._keys, self._values = [], array("d")

    def end_step(self, step: int) -> None:
        """Append the step's rows (and its layout, when new); then start the next step empty.

        Raises:
            OSError: a write failed.
        """
        keys, values = tuple(self._keys), self._values
        self.discard()
        if self._keys_fd is None or self._rows_fd is None:
            raise OSError(f"{self.rows_path}: the statistics table is closed")
        layout = self._layouts.get(keys)
        if layout is None:
            layout = self._next_layout
            # The key tuples as they are: JSON writes a tuple (the key, its path, its shape) as the
            # list it was given as, so no list is made per key (~0.1 ms per layout of 300 keys).
            line = {"layout": layout, "keys": keys}
            self._append(0, (json.dumps(line, allow_nan=False) + "\n").encode("utf-8"))
            self._next_layout += 1
            self._layouts[keys] = layout
            if len(self._layouts) > _REMEMBERED:
                self._layouts.popitem(last=False)
        else:
            self._layouts.move_to_end(keys)
        # The rows, a column at a time: (step, layout, index, the statistics) for each node in order.
        count, width = len(keys), len(STAT_COLUMNS)
        rows = array("d", bytes(8 * ROW_WIDTH * count))
        rows[0::ROW_WIDTH] = array("d", (float(step),)) * count
        rows[1::ROW_WIDTH] = array("d", (float(layout),)) * count
        rows[2::ROW_WIDTH] = array("d", range(count))
        for column in range(width):
            rows[3 + column::ROW_WIDTH] = values[column::width]
        self._append(1, rows.tobytes() if _LITTLE else _swapped(rows))

    def _append(self, which: int, data: bytes) -> None:
        """Append to the keys (0) or rows (1) file; after a failed write, cut the file back to its
        last complete line or row, so a later step's rows are not shifted by a partial one."""
        fd = self._keys_fd if which == 0 else self._rows_fd
        assert fd is not None
        try:
            done = os.write(fd, data)
            while done < len(data):  # a short write (a signal, a full disk): finish or fail
                done += os.write(fd, data[done:])
        except OSError:
            try:
                os.ftruncate(fd, self._sizes[which])
            except OSError:
                pass
            raise
        self._sizes[which] += len(data)

    def close(self) -> None:
        """Close both files (idempotent)."""
        for name in ("_keys_fd", "_rows_fd"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)


_LITTLE = sys.byteorder == "little"


def _swapped(rows: array[float]) -> bytes:
    copy = array("d", rows)
    copy.byteswap()
    return copy.tobytes()


class StatsTableReader:
    """Reads a run's statistics table (the files :class:`StatsTableWriter` wrote).

    Args:
        run_dir: the run directory.
        spec: the manifest's ``"stats_table"`` entry (``{"keys": ..., "rows": ...}``).
    """

    def __init__(self, run_dir: Path, spec: Mapping[str, Any]) -> None:
        self.keys_path = run_dir / _file_name(run_dir, spec, "keys")
        self.rows_path = run_dir / _file_name(run_dir, spec, "rows")

    def layouts(self) -> dict[int, list[tuple[str, int, str, tuple[str, ...], Any, Any, Any, Any, bool, Any]]]:
        """Layout number -> its keys ``(module, call, kind, path, dtype, shape, numel, device, stored, reason)``.

        Raises:
            CorruptFileError: the file is missing or a complete line is damaged (names the line).
        """
        out: dict[int, list[tuple[str, int, str, tuple[str, ...], Any, Any, Any, Any, bool, Any]]] = {}
        try:
            data = self.keys_path.read_bytes()
        except OSError as exc:
            raise CorruptFileError(self.keys_path, f"unreadable statistics table: {exc}") from None
        for number, raw in enumerate(data.split(b"\n")[:-1], 1):  # the part after the last newline is cut
            try:
                doc = json.loads(raw)
                out[int(doc["layout"])] = [(str(m), int(c), str(k), tuple(str(p) for p in path), dt, sh, n, dev,
                                            bool(st), why) for m, c, k, path, dt, sh, n, dev, st, why in doc["keys"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise CorruptFileError(self.keys_path, f"line {number}: damaged layout: {exc}") from None
        return out

    def rows(self) -> bytes:
        """Every complete row, as little-endian float64 bytes (``ROW_WIDTH`` values a row): the
        whole file in memory (a comparer reads it a window at a time instead: :meth:`open_rows`).

        Raises:
            CorruptFileError: the file is missing or unreadable.
        """
        try:
            data = self.rows_path.read_bytes()
        except OSError as exc:
            raise CorruptFileError(self.rows_path, f"unreadable statistics table: {exc}") from None
        return data[:len(data) - len(data) % ROW_BYTES]  # a row cut by a crash is ignored

    def open_rows(self) -> StatsTableRows:
        """The complete rows, to read a window at a time (:class:`StatsTableRows`).

        Raises:
            CorruptFileError: the file is missing or unreadable.
        """
        return StatsTableRows(self.rows_path)


class StatsTableRows:
    """The complete rows of a statistics table's rows file, as many as there were when it was
    opened (the writer only appends), read a few at a time.

    No file stays open between reads (a comparison's result may read rows long after the
    comparison, and keeps no file open for it). A row cut by a crash (the file's last, when its
    size is not a whole number of rows) is not one of them.

    Args:
        path: the rows file.

    Raises:
        CorruptFileError: the file is missing or unreadable.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            #: the number of complete rows
            self.count = os.stat(path).st_size // ROW_BYTES
        except OSError as exc:
            raise CorruptFileError(path, f"unreadable statistics table: {exc}") from None

    def read(self, first: int, count: int) -> np.ndarray:
        """Rows ``first`` to ``first + count`` (exclusive) as a new ``(count, ROW_WIDTH)`` little-endian float64 array.

        Raises:
            IndexError: the rows are not all among the complete rows.
            CorruptFileError: the file cannot be read, or is shorter than when it was opened.
        """
        with self._open() as fd:
            return self._read(fd, first, count)

    def windows(self) -> Iterator[tuple[int, np.ndarray]]:
        """Every complete row, in order, :data:`BLOCK_ROWS` rows at a time: ``(first row, rows)``.

        Raises:
            CorruptFileError: as :meth:`read`.
        """
        with self._open() as fd:
            for first in range(0, self.count, BLOCK_ROWS):
                yield first, self._read(fd, first, min(BLOCK_ROWS, self.count - first))

    @contextlib.contextmanager
    def _open(self) -> Iterator[int]:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise CorruptFileError(self.path, f"cannot read the statistics table, which was there when it was first "
                                   f"opened: {exc} (a comparison's result reads its runs' statistics tables until its "
                                   "report is made: was the run moved, removed or rewritten since?)") from None
        try:
            yield fd
        finally:
            os.close(fd)

    def _read(self, fd: int, first: int, count: int) -> np.ndarray:
        if first < 0 or count < 0 or first + count > self.count:
            raise IndexError(f"{self.path}: rows {first} to {first + count} of {self.count}")
        out = np.empty((count, ROW_WIDTH), dtype="<f8")
        if not count:
            return out
        view = out.data.cast("B")
        offset = first * ROW_BYTES
        try:
            done = pread_into(fd, [view], offset) if PREADV else _read_at(fd, view, offset)
        except OSError as exc:
            raise CorruptFileError(self.path, f"unreadable statistics table: {exc}") from None
        if done < len(view):
            raise CorruptFileError(self.path, f"the statistics table is shorter than when it was opened "
                                   f"({offset + done} of {self.count * ROW_BYTES} bytes)")
        return out


def _read_at(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``fd`` at ``offset`` where the platform has no ``os.preadv``; the bytes read."""
    os.lseek(fd, offset, os.SEEK_SET)
    done = 0
    while done < len(view):
        data = os.read(fd, len(view) - done)
        if not data:
            break
        view[done:done + len(data)] = data
        done += len(data)
    return done


def _file_name(run_dir: Path, spec: Mapping[str, Any], field: str) -> str:
    name = spec.get(field)
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise CorruptFileError(run_dir / "ilstore.json", f"\"stats_table.{field}\" must name a file in the run "
                               f"directory, got {name!r}")
    return name


def table_of(run_dir: Path, manifest: Mapping[str, Any] | None) -> StatsTableReader | None:
    """The statistics table a manifest names, None when it names none."""
    spec = manifest.get("stats_table") if manifest is not None else None
    return StatsTableReader(run_dir, spec) if isinstance(spec, Mapping) else None
