"""The ranking of local errors: every call's entry, largest local error first (issue 18).

:func:`rank` orders one list of :class:`~.result.LocalError` entries. A comparison measured a
window of steps at a time (:class:`~.local.LocalWindows`) ranks each window as it comes
(:class:`Ranking`), keeps the windows after the first in a temporary file
(:class:`~.spill.Spill`) and gives a :class:`Ranked`: the ranking of every entry, merged from
the windows' ranked runs when iterated, equal to :func:`rank` of them all.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import Any, overload

from .entries import Held
from .result import LocalError, Unreadable
from .spill import Spill

__all__ = ["rank", "Ranked", "Ranking"]


def rank(entries: Iterable[LocalError]) -> list[LocalError]:
    """Measured entries by ``rel_l2`` (largest first; at equal error leaves before containers, then in
    execution order), then unmeasured ones in execution order."""
    def key(e: LocalError) -> tuple[int, float, bool, int]:
        if e.compared and e.rel_l2 is not None:
            return (0, -e.rel_l2, e.container, e.order)
        return (1, 0.0, False, e.order)

    return sorted(entries, key=key)


def _measured_key(e: LocalError) -> tuple[float, bool, int]:
    assert e.rel_l2 is not None
    return (-e.rel_l2, e.container, e.order)


def _order_key(e: LocalError) -> int:
    return e.order


#: Entries a record of a ranked run holds (:class:`Ranked`): a merge holds one record per window.
_CHUNK = 128


class Ranked(Sequence[LocalError]):
    """Local errors in :func:`rank`'s order, merged from windows each ranked (issue 18).

    A comparison measured a window of steps at a time (:class:`~.local.LocalWindows`) ranks each
    window's entries and keeps them in runs: the measured entries, the unmeasured ones, and the
    calls the replay lacks (those :func:`~.local.local_errors` lists last, before ranking). A run is a
    list of records (tuples, or tuples kept in a temporary file, :class:`~.spill.Stored`, of
    :data:`_CHUNK` entries each); iterating merges the runs (``heapq.merge`` is stable: at equal
    keys, the earlier window first), holding one record of each run. To a caller it is the tuple
    :func:`~.local.local_errors` returns: same length, same items in the same order, equal to it.

    Args:
        measured: the runs of measured entries, window by window.
        unmeasured: the runs of unmeasured entries window by window, then those of the calls the
            replay lacks window by window.
    """

    __slots__ = ("_measured", "_unmeasured", "_len")

    def __init__(self, measured: Sequence[Sequence[Held[LocalError]]],
                 unmeasured: Sequence[Sequence[Held[LocalError]]]) -> None:
        self._measured, self._unmeasured = list(measured), list(unmeasured)
        self._len = sum(len(part) for run in self._measured + self._unmeasured for part in run)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[LocalError]:
        yield from heapq.merge(*(_run(r) for r in self._measured), key=_measured_key)
        yield from self.unmeasured()

    def records(self) -> Iterator[Held[LocalError]]:
        """Every run's records (tuples, and tuples kept in the temporary file), run by run."""
        return (record for run in self._measured + self._unmeasured for record in run)

    def unmeasured(self) -> Iterator[LocalError]:
        """The entries not measured (``compared`` false), in order: the last of the sequence."""
        return heapq.merge(*(_run(r) for r in self._unmeasured), key=_order_key)

    @overload
    def __getitem__(self, index: int) -> LocalError: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[LocalError, ...]: ...

    def __getitem__(self, index: int | slice) -> LocalError | tuple[LocalError, ...]:
        if isinstance(index, slice):
            wanted = range(*index.indices(self._len))
            picked = tuple(e for i, e in enumerate(self) if i in wanted)
            return picked if wanted.step > 0 else picked[::-1]
        i = operator.index(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError("tuple index out of range")
        return next(islice(iter(self), i, None))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (tuple, Ranked)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __reduce__(self) -> tuple[Any, ...]:
        return (tuple, (tuple(self),))

    def __repr__(self) -> str:
        return repr(tuple(self))


def _run(records: Sequence[Held[LocalError]]) -> Iterator[LocalError]:
    for record in records:
        yield from record  # a Stored record is read back here, and let go after its last entry


class Ranking:
    """The entries of the windows, ranked as :func:`rank` ranks them all (see :class:`Ranked`); the
    first call crossing the tolerance and the unreadable bodies are found as the windows come.

    Args:
        keep: keep the entries (False: only :attr:`first` and :attr:`lost`).
    """

    def __init__(self, keep: bool = True) -> None:
        self._keep = keep
        self._windows = 0
        self._held: tuple[list[LocalError], list[LocalError]] | None = None  # the first window's, until a second
        self._measured: list[list[Held[LocalError]]] = []
        self._unmeasured: list[list[Held[LocalError]]] = []
        self._extra: list[list[Held[LocalError]]] = []
        self._spill: Spill | None = None
        self._first: tuple[tuple[int, float, bool], LocalError] | None = None
        self._lost: list[tuple[tuple[int, int, int], tuple[Unreadable, ...]]] = []

    def add(self, entries: list[LocalError], extra: list[LocalError]) -> list[LocalError]:
        """Take a window's entries and its calls the replay lacks (:meth:`~.local.Measurer.window`); the
        window's entries ranked."""
        window = self._windows
        self._windows += 1
        ranked = rank(entries)
        measured = [e for e in ranked if e.compared]
        unmeasured = [e for e in ranked if not e.compared]
        for e in measured:  # rank order: at equal order, the first of the ranking (first_exceeding's min)
            if e.exceeds:
                key = _measured_key(e)
                at = (key[2], key[0], key[1])
                if self._first is None or at < self._first[0]:
                    self._first = (at, e)
        self._lost += [((e.order, window, i), e.unreadable) for i, e in enumerate(unmeasured) if e.unreadable]
        if self._keep:
            if window == 0:
                self._held = (entries, extra)
            else:
                if self._held is not None:  # the first window: held as it is
                    first = rank(self._held[0])
                    self._add_runs([e for e in first if e.compared], [e for e in first if not e.compared],
                                   self._held[1], None)
                    self._held = None
                self._spill = self._spill or Spill()
                self._add_runs(measured, unmeasured, extra, self._spill)
        return measured + unmeasured if not extra else rank(entries + extra)

    def _add_runs(self, measured: list[LocalError], unmeasured: list[LocalError], extra: list[LocalError],
                  spill: Spill | None) -> None:
        for into, run in ((self._measured, measured), (self._unmeasured, unmeasured), (self._extra, extra)):
            if spill is None:
                into.append([tuple(run)])
                continue
            records: list[Held[LocalError]] = []
            for at in range(0, len(run), _CHUNK):
                chunk = tuple(run[at:at + _CHUNK])
                steps = [e.call.step for e in chunk]
                records.append(spill.add(chunk, first_step=min(steps), last_step=max(steps)))
            into.append(records)

    @property
    def first(self) -> LocalError | None:
        """:func:`~.local.first_exceeding` of every entry so far."""
        return self._first[1] if self._first is not None else None

    @property
    def lost(self) -> list[Unreadable]:
        """The unreadable bodies of the entries, in the order of the ranking."""
        return [u for _, found in sorted(self._lost, key=lambda item: item[0]) for u in found]

    def errors(self) -> Sequence[LocalError]:
        """Every entry, ranked: a tuple when there was one window, else a :class:`Ranked`."""
        if self._held is not None:
            return tuple(rank(self._held[0] + self._held[1]))
        if not self._windows:
            return ()
        return Ranked(self._measured, self._unmeasured + self._extra)
