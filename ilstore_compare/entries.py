"""A read-only sequence of result entries, some held as objects and some made on demand.

Comparing two long statistics runs yields tens of thousands of entries that differ only in
their step (every pair of a step passes, and so does the same pair of the next step). The
statistics-table path (:mod:`.columnar`) keeps those as *blocks*: one template per step layout
and the array of steps that share it; an entry object is made only when someone reads it (a
report, a caller iterating :attr:`~.result.CompareResult.tensors`). When two runs differ, a
block's steps have failing pairs: the block *singles out* the entries of its differing calls
(:meth:`Entries.concrete` gives them, as a report wants them) and counts its entries without
making them (:func:`tally`). To a caller the sequence
is the tuple the general path returns: same length, same items in the same order, equal to
that tuple (``==`` either way), hashed like it; slicing gives a tuple.

Example:
    >>> from ilstore_compare.entries import Entries
    >>> class Squares:
    ...     status = None
    ...     def __len__(self): return 3
    ...     def item(self, i): return i * i
    >>> seq = Entries([(10, 11), Squares(), (12,)])
    >>> len(seq), seq[3], seq[-1], seq[1:4], seq == (10, 11, 0, 1, 4, 12)
    (6, 1, 12, (11, 0, 1), True)
"""

from __future__ import annotations

import operator
from bisect import bisect_left, bisect_right
from collections.abc import Collection, Iterator, Sequence
from itertools import accumulate
from typing import Any, Generic, Protocol, TypeVar, cast, overload

from .spill import Stored

__all__ = ["Block", "Singled", "Entries", "concrete", "blocks", "with_status", "singled", "rest", "objects", "tally"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
#: A part whose entries are all objects: a tuple, or a tuple kept in a temporary file (:mod:`.spill`).
Held = tuple[T, ...] | Stored[T]
_HELD = (tuple, Stored)


class Block(Protocol[T_co]):
    """Entries made on demand: ``len(block)`` of them, the i-th by :meth:`item`.

    ``status`` is every entry's status when they share one (tensor entries), else None.

    A block may also single out some of its entries (:class:`Singled`: the entries of its
    calls with a differing value, its mismatched calls): :meth:`Entries.concrete` then gives
    those, and :meth:`Entries.blocks` the block without them (:meth:`Singled.rest`).
    """

    @property
    def status(self) -> str | None: ...

    def __len__(self) -> int: ...

    def item(self, i: int) -> T_co: ...


class Singled(Protocol[T_co]):
    """A :class:`Block` that singles out the entries at ``positions`` of each of its ``width``-long
    runs (``len(block)`` is a multiple of ``width``; the same positions in every run)."""

    @property
    def width(self) -> int: ...

    @property
    def positions(self) -> Sequence[int]: ...

    @property
    def rest_status(self) -> str | None: ...

    def __len__(self) -> int: ...

    def item(self, i: int) -> T_co: ...


class _Subset(Generic[T]):
    """The entries of a :class:`Singled` block at ``keep`` (positions within each run), in order."""

    __slots__ = ("block", "keep", "status")

    def __init__(self, block: Singled[T], keep: Sequence[int], status: str | None) -> None:
        self.block, self.keep, self.status = block, keep, status

    def __len__(self) -> int:
        return len(self.block) // self.block.width * len(self.keep) if self.keep else 0

    def item(self, i: int) -> T:
        run, j = divmod(i, len(self.keep))
        return self.block.item(run * self.block.width + self.keep[j])

    def __iter__(self) -> Iterator[T]:
        return (self.item(i) for i in range(len(self)))


def singled(block: Singled[T]) -> _Subset[T]:
    """The entries ``block`` singles out, in order."""
    return _Subset(block, block.positions, None)


def rest(block: Singled[T]) -> _Subset[T]:
    """``block`` without the entries it singles out: a block of status ``block.rest_status``."""
    held = set(block.positions)
    return _Subset(block, [j for j in range(block.width) if j not in held], block.rest_status)


def _is_singled(part: object) -> bool:
    """A block that singles out at least one position (one that singles out none is a plain block)."""
    return bool(getattr(part, "positions", None))


class Entries(Sequence[T], Generic[T]):
    """The entries of ``parts`` in order: each part a tuple of entries, a :class:`~.spill.Stored`
    tuple (kept in a temporary file, read back when iterated: treated as a tuple everywhere) or a
    :class:`Block`.

    Args:
        parts: tuples and stored tuples (entries kept as they are) and blocks (entries made when read).
    """

    __slots__ = ("_parts", "_offsets")

    def __init__(self, parts: Sequence[Held[T] | Block[T]]) -> None:
        self._parts: list[Held[T] | Block[T]] = [p for p in parts if len(p)]
        self._offsets = list(accumulate((len(p) for p in self._parts), initial=0))

    def __len__(self) -> int:
        return self._offsets[-1]

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[T, ...]: ...

    def __getitem__(self, index: int | slice) -> T | tuple[T, ...]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("tuple index out of range")
        k = bisect_right(self._offsets, i) - 1
        part, j = self._parts[k], i - self._offsets[k]
        return part[j] if isinstance(part, _HELD) else part.item(j)

    def __iter__(self) -> Iterator[T]:
        for part in self._parts:
            if isinstance(part, _HELD):
                yield from part
            else:
                item = part.item
                for j in range(len(part)):
                    yield item(j)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (tuple, Entries)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __add__(self, other: object) -> tuple[Any, ...]:
        if not isinstance(other, (tuple, Entries)):
            return NotImplemented
        return tuple(self) + tuple(other)

    def __radd__(self, other: object) -> tuple[Any, ...]:
        if not isinstance(other, tuple):
            return NotImplemented
        return other + tuple(self)

    def __repr__(self) -> str:
        return repr(tuple(self))

    def concrete(self, step: int | None = None) -> Iterator[T]:
        """The entries held as objects and those the blocks single out (:class:`Singled`), in
        order; the blocks' other entries are left out (they are :meth:`blocks`).

        Args:
            step: only what may be of that step: of a block that lists its ``steps`` (in order,
                one run of ``width`` entries each), that step's run only (the held entries are
                all given, the caller picks).
        """
        for part in self._parts:
            if isinstance(part, Stored):
                if step is None or part.may_hold(step):
                    yield from part
            elif isinstance(part, tuple):
                yield from part
            elif _is_singled(part):
                block = cast(Singled[T], part)
                run = _run_of(part, step) if step is not None else None
                if run is None:
                    yield from singled(block)
                elif run >= 0:
                    yield from (block.item(run * block.width + j) for j in block.positions)

    def parts(self) -> Iterator[Held[T] | Block[T]]:
        """The parts, in order: tuples of entries held as objects, and blocks."""
        return iter(self._parts)

    def blocks(self) -> Iterator[Block[T]]:
        """The blocks, in order; a block that singles out entries without them (:func:`rest`).

        Every entry is in :meth:`concrete` or in one of these, never both."""
        for part in self._parts:
            if isinstance(part, _HELD):
                continue
            if _is_singled(part):
                remaining = rest(cast(Singled[T], part))
                if len(remaining):
                    yield remaining
            else:
                yield part

    def with_status(self, statuses: Collection[str]) -> Iterator[T]:
        """The entries whose ``status`` is one of ``statuses``, in order; a block whose entries all
        have another status (its ``status``, or its ``tally("status")``) is skipped without making them."""
        for part in self._parts:
            if isinstance(part, Stored):
                counts = part.tally("status")
                if counts is None or any(n and status in statuses for status, n in counts.items()):
                    yield from (e for e in part if getattr(e, "status", None) in statuses)
            elif isinstance(part, tuple):
                yield from (e for e in part if getattr(e, "status", None) in statuses)
            elif not _may_have(part, statuses):
                continue
            elif _is_singled(part) and cast(Singled[T], part).rest_status not in statuses:
                yield from (e for e in singled(cast(Singled[T], part)) if getattr(e, "status", None) in statuses)
            else:
                yield from (e for e in (part.item(j) for j in range(len(part)))
                            if getattr(e, "status", None) in statuses)


def _run_of(part: object, step: int) -> int | None:
    """The run of ``step`` in a block that lists its ``steps`` (-1: not one of them), None when it does not."""
    steps = getattr(part, "steps", None)
    if steps is None:
        return None
    at = bisect_left(steps, step)
    return at if at < len(steps) and steps[at] == step else -1


def _may_have(part: Block[Any], statuses: Collection[str]) -> bool:
    """Whether a block may hold an entry whose status is one of ``statuses``."""
    if part.status is not None:
        return part.status in statuses
    ask = getattr(part, "tally", None)
    counts = ask("status") if ask is not None else None
    return counts is None or any(n and status in statuses for status, n in counts.items())


def concrete(entries: Sequence[T], step: int | None = None) -> Iterator[T]:
    """The entries of ``entries`` held as objects: all of a tuple, or :meth:`Entries.concrete`
    (with ``step``: skipping the blocks that lack it)."""
    return entries.concrete(step) if isinstance(entries, Entries) else iter(entries)


def blocks(entries: Sequence[T]) -> Iterator[Block[T]]:
    """The blocks of ``entries``: none for a tuple, :meth:`Entries.blocks` otherwise."""
    return entries.blocks() if isinstance(entries, Entries) else iter(())


def with_status(entries: Sequence[T], statuses: Collection[str]) -> Iterator[T]:
    """The entries of ``entries`` whose status is one of ``statuses`` (blocks skipped where they can be)."""
    if isinstance(entries, Entries):
        return entries.with_status(statuses)
    return (e for e in entries if getattr(e, "status", None) in statuses)


def objects(entries: Sequence[T]) -> Iterator[T]:
    """The entries of ``entries`` held as objects (a tuple's; an :class:`Entries`' tuple parts), in
    order: not the blocks' (made on demand), singled out or not."""
    if not isinstance(entries, Entries):
        return iter(entries)
    return (e for part in entries.parts() if isinstance(part, _HELD) for e in part)


def tally(entries: Sequence[Any], attribute: str) -> dict[str, int]:
    """How many of ``entries`` have each value of ``attribute`` (``status``, ``verdict``).

    A block that can say so (a ``tally(attribute)`` method answering a dict, not None) is
    counted without making its entries; any other block's entries are made and counted.
    """
    counts: dict[str, int] = {}
    parts = entries.parts() if isinstance(entries, Entries) else iter((tuple(entries),))
    for part in parts:
        known = None
        if not isinstance(part, tuple):
            ask = getattr(part, "tally", None)
            known = ask(attribute) if ask is not None else None
        if known is None:
            values = (getattr(e, attribute) for e in (part if isinstance(part, _HELD) else
                                                        (part.item(j) for j in range(len(part)))))
            known = {}
            for value in values:
                known[value] = known.get(value, 0) + 1
        for value, n in known.items():
            if n:
                counts[value] = counts.get(value, 0) + n
    return counts
