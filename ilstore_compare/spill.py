"""Entries of a long comparison kept in a temporary file, read back when they are wanted (issue 18).

A comparison of two long runs in ``tensors`` mode has an entry per tensor pair and one per module
call: 3.2 million entries for 100,000 steps of 32 tensors, ~1.6 KB each as objects. The engine
compares such runs a window of steps at a time (:mod:`.engine`); the entries of every window
after the first are pickled into one temporary file (:class:`Spill`), a window to a record, and
the result holds a :class:`Stored` sequence per window: its length, its steps, and how many
entries have each status or verdict, but not the entries. Iterating one (a report does) reads its
record back and unpickles it: one window's entries are in memory at a time. To a caller a
:class:`Stored` is the tuple it was made from (:class:`.entries.Entries` treats it as one).

The file is made with :func:`tempfile.TemporaryFile` (in ``TMPDIR``, else the system's temporary
directory), unlinked from the start: it is gone when the result is, or when the process ends.
Pickling a :class:`Stored` pickles its entries (a tuple).

Example:
    >>> from ilstore_compare.spill import Spill
    >>> spill = Spill()
    >>> part = spill.add((1, 2, 3), first_step=0, last_step=0)
    >>> len(part), part[1], tuple(part), list(part)[-1]
    (3, 2, (1, 2, 3), 3)
"""

from __future__ import annotations

import os
import pickle
import tempfile
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import IO, Any, Generic, TypeVar, overload

__all__ = ["Spill", "Stored"]

T = TypeVar("T")

#: The attributes whose counts a :class:`Stored` keeps (what :func:`.entries.tally` asks).
_COUNTED = ("status", "verdict")


class Spill:
    """A temporary file holding windows of entries, one pickled record each (see the module)."""

    def __init__(self) -> None:
        self._file: IO[bytes] | None = None
        self._size = 0
        self._lock = threading.Lock()
        # the last record read, unpickled: item access by index reads a record once
        self._last: tuple[int, tuple[Any, ...]] | None = None

    @property
    def nbytes(self) -> int:
        """The file's size."""
        return self._size

    def add(self, entries: tuple[T, ...], *, first_step: int | None, last_step: int | None) -> Stored[T]:
        """Write ``entries`` as one record; their sequence, read back when wanted.

        Args:
            entries: the entries (picklable objects).
            first_step, last_step: the smallest and largest step of the entries (None: unknown).
        """
        data = pickle.dumps(entries, protocol=pickle.HIGHEST_PROTOCOL)
        counts: dict[str, dict[Any, int]] = {}
        for attribute in _COUNTED:
            found: dict[Any, int] = {}
            for entry in entries:
                value = getattr(entry, attribute, _MISSING)
                if value is _MISSING:
                    found = {}
                    break
                found[value] = found.get(value, 0) + 1
            else:
                counts[attribute] = found
        with self._lock:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="ilstore-compare-")
                # closed when the spill is collected, with the result that holds it
                weakref.finalize(self, self._file.close)
            self._file.seek(self._size)
            self._file.write(data)
            self._file.flush()
            offset, self._size = self._size, self._size + len(data)
        return Stored(self, offset, len(data), len(entries), first_step, last_step, counts)

    def read(self, offset: int, length: int) -> tuple[Any, ...]:
        """The entries of the record at ``offset`` (``length`` bytes).

        Reads with ``os.pread`` where there is one: the file's position is shared with a forked
        child's copy of the descriptor (a result rendered in two processes), a ``pread`` has none.
        """
        with self._lock:
            last = self._last
            if last is not None and last[0] == offset:
                return last[1]
            assert self._file is not None
            self._file.flush()
            if hasattr(os, "pread"):
                data = os.pread(self._file.fileno(), length, offset)
            else:  # pragma: no cover - platforms without pread (Windows): no fork either
                self._file.seek(offset)
                data = self._file.read(length)
        if len(data) != length:
            raise OSError(f"the comparison's temporary file ends early: {len(data)} of {length} bytes at {offset}")
        entries: tuple[Any, ...] = pickle.loads(data)
        with self._lock:
            self._last = (offset, entries)
        return entries

    def close(self) -> None:
        """Remove the file (the :class:`Stored` sequences made from it are unreadable after this)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
            self._last = None


_MISSING = object()


class Stored(Sequence[T], Generic[T]):
    """The entries of one record of a :class:`Spill`: a read-only sequence, equal in items to
    the tuple it was made from; the record is read each time the entries are iterated.

    Attributes:
        first_step, last_step: the smallest and largest step of its entries (None: unknown).
    """

    __slots__ = ("_spill", "_offset", "_length", "_count", "first_step", "last_step", "_counts")

    def __init__(self, spill: Spill, offset: int, length: int, count: int, first_step: int | None,
                 last_step: int | None, counts: dict[str, dict[Any, int]]) -> None:
        self._spill, self._offset, self._length, self._count = spill, offset, length, count
        self.first_step, self.last_step, self._counts = first_step, last_step, counts

    def __len__(self) -> int:
        return self._count

    def entries(self) -> tuple[T, ...]:
        """Every entry, read back (a tuple)."""
        return self._spill.read(self._offset, self._length)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[T, ...]: ...

    def __getitem__(self, index: int | slice) -> T | tuple[T, ...]:
        return self.entries()[index]

    def __iter__(self) -> Iterator[T]:
        return iter(self.entries())

    def may_hold(self, step: int) -> bool:
        """Whether an entry of ``step`` may be here."""
        return (self.first_step is None or self.first_step <= step) and \
            (self.last_step is None or step <= self.last_step)

    def tally(self, attribute: str) -> dict[Any, int] | None:
        """How many entries have each value of ``attribute`` (``status``, ``verdict``), counted
        when they were written; None for another attribute."""
        counts = self._counts.get(attribute)
        return dict(counts) if counts is not None else None

    def __reduce__(self) -> tuple[Any, ...]:
        return (tuple, (self.entries(),))

    def __repr__(self) -> str:
        return f"Stored({self._count} entries, steps {self.first_step}..{self.last_step})"

