"""A read-only step -> value mapping held in arrays: no Python object per step.

What a long run's per-step answers want when most steps share a few values (the step journal's
call orders, :meth:`~ilstore.manifest.JournalReader.call_orders`): the steps as one sorted
``array('q')``, each step's value as a 4-byte number into a short list of distinct values. A
lookup is a bisection; iterating the values hands out the shared objects themselves, so steps
with equal values give the *same* object (what a caller that recognises them by identity needs).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import ItemsView, Iterator, Mapping, Sequence, ValuesView
from typing import Any, TypeVar

__all__ = ["SharedValues"]

_V = TypeVar("_V")


class SharedValues(Mapping[int, _V]):
    """Step -> value, for ascending unique steps, each value one of a few shared objects.

    Args:
        steps: the steps, ascending, each once (kept, not copied: the caller must not change it).
        numbers: per step (in ``steps``' order), its value's position in ``distinct``.
        distinct: the values; each should appear once (equal values: one object).

    Raises:
        ValueError: ``steps`` and ``numbers`` differ in length.

    Example:
        >>> m = SharedValues(array("q", [2, 5, 9]), array("i", [0, 1, 0]), ["x", "y"])
        >>> m[9], m.get(3), list(m), list(m.values()), m.distinct()
        ('x', None, [2, 5, 9], ['x', 'y', 'x'], ('x', 'y'))
    """

    __slots__ = ("_steps", "_numbers", "_distinct")

    def __init__(self, steps: array[int], numbers: array[int], distinct: Sequence[_V]) -> None:
        if len(steps) != len(numbers):
            raise ValueError(f"{len(steps)} steps but {len(numbers)} value numbers")
        self._steps, self._numbers, self._distinct = steps, numbers, tuple(distinct)

    def _position(self, step: object) -> int:
        if not isinstance(step, int) or isinstance(step, bool):
            return -1
        steps = self._steps
        i = bisect_left(steps, step)
        return i if i < len(steps) and steps[i] == step else -1

    def __getitem__(self, step: int) -> _V:
        i = self._position(step)
        if i < 0:
            raise KeyError(step)
        return self._distinct[self._numbers[i]]

    def get(self, step: int, default: Any = None) -> Any:  # Mapping.get, without raising and catching KeyError
        i = self._position(step)
        return self._distinct[self._numbers[i]] if i >= 0 else default

    def __contains__(self, step: object) -> bool:
        return self._position(step) >= 0

    def __iter__(self) -> Iterator[int]:
        return iter(self._steps)

    def __len__(self) -> int:
        return len(self._steps)

    def values(self) -> ValuesView[_V]:
        return _Values(self)

    def items(self) -> ItemsView[int, _V]:
        return _Items(self)

    def distinct(self) -> tuple[_V, ...]:
        """The distinct values (each object once), whatever the number of steps."""
        return self._distinct

    def _iter_values(self) -> Iterator[_V]:
        return map(self._distinct.__getitem__, self._numbers)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {len(self)} steps, {len(self._distinct)} distinct values>"


class _Values(ValuesView[_V]):
    """The values in step order, without looking each step up."""

    _mapping: SharedValues[_V]

    def __iter__(self) -> Iterator[_V]:
        return self._mapping._iter_values()


class _Items(ItemsView[int, _V]):
    """``(step, value)`` in step order, without looking each step up."""

    _mapping: SharedValues[_V]

    def __iter__(self) -> Iterator[tuple[int, _V]]:
        return zip(self._mapping._steps, self._mapping._iter_values(), strict=True)
