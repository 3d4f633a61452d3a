"""The options of a comparison: one validated, frozen object from the caller to the report.

:class:`CompareOptions` is what :func:`ilstore_compare.compare` takes and what the result (and
the JSON report, through :func:`dataclasses.asdict`) records. Construction validates every
field and brings it to one canonical form; a bad value raises an
:class:`~ilstore_compare.errors.OptionError` naming the option (the command line maps option
names to its flags).

Example:
    >>> o = CompareOptions(rtol=1e-2, steps=[3, 1, 3], modules=r"layers\\.0\\.,lm_head")
    >>> o.steps, o.modules
    ((1, 3), ('layers\\\\.0\\\\.', 'lm_head'))
    >>> CompareOptions(workers=0)
    Traceback (most recent call last):
        ...
    ilstore_compare.errors.OptionError: workers: must be an integer >= 1, got 0
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OptionError
from .mapping import NameMap
from .maps import resolve_map
from .selection import compile_patterns, parse_step_selection, split_patterns

__all__ = ["CompareOptions", "reported_options"]


@dataclass(frozen=True)
class CompareOptions:
    """What to compare and how; validated and normalised on construction.

    Fields accept a few loose forms, stored canonically: ``steps`` any iterable of integers or
    the command line's string (``"0,2,5-7"``; stored sorted, without repeats; ``required_steps``
    follows from it unless given), ``modules`` a
    comma-separated string or a list of them (stored as one tuple of regexes), ``name_map`` a
    :class:`~ilstore_compare.mapping.NameMap`, its dict form, a JSON file path or a shipped map's
    name (stored as the map's JSON form),
    ``squeeze_shapes`` None (stored as what the map says, off without a map; it then follows
    the map the comparer picks by itself, see ``auto_map``).

    Attributes:
        rtol: relative tolerance (against the dir2 value): an element matches when
            ``|a - b| <= atol + rtol * |b|``.
        atol: absolute tolerance.
        steps: steps to compare (None: every step of either run).
        required_steps: the steps of ``steps`` asked for one by one: each that neither run has
            is a coverage gap (the comparison is incomplete, exit status 1), where a step
            selected only by a range (``"0-9"``, ``range(10)``) that neither run has is just
            not there. Given None, it follows ``steps``: the single steps of the string form,
            every step of a list or tuple, none of a ``range``; None when ``steps`` is None.
        modules: regexes, ``re.search`` on the module name (after the name map); None: all.
        exact: bitwise comparison instead of tolerances.
        equal_nan: NaN in the same place on both sides is equal.
        allow_stats_only: a stats-only pair whose statistics agree counts as a match for the
            exit status (by default coverage fails closed: it does not).
        name_map: the map (JSON form), if any: module renames, path rules, unaligned
            declarations.
        squeeze_shapes: shapes that differ only by size-1 dimensions are compared squeezed.
        auto_map: without ``name_map``, use the shipped map declared for the two runs'
            models and engines (their manifests' ``model``), if exactly one is
            (:func:`ilstore_compare.maps.pick_map`); the report's notes say which, and its
            options record the map as ``name_map``. Not recorded itself.
        allow_unaligned: tensors the map declares unaligned do not count against the exit
            status (by default they do: coverage fails closed); with ``align_tokens``, nor do
            tokens that could not be aligned.
        align_tokens: compare token by token runs that batch differently (vLLM's packed
            tokens against Hugging Face's padded batch or one prompt at a time): each run's
            per-step composition is read, requests matched by token ids, and the common tokens
            compared, one step per request and source step (:mod:`ilstore_compare.tokens`).
        workers: tensor pairs compared in parallel (threads); it does not change the result,
            so the report does not record it.
        replay: a replay of dir2 (a run captured with ``replay_from`` dir2): the report adds
            each call's local error (replay vs dir2) beside the propagated error (dir1 vs
            dir2). Stored as a string.
        oracle: the run dir1 and dir2 were both replayed from (e.g. float64): each call is
            flagged when dir1's local error against it exceeds ``oracle_factor`` times dir2's.
            Stored as a string; not with ``replay``.
        oracle_factor: K of the oracle verdict (> 0; default 2 with an oracle, None without).
        keep_going: a tensor body that cannot be read (file missing, truncated, corrupt) is
            reported (status ``unreadable``, :attr:`CompareResult.unreadable
            <ilstore_compare.result.CompareResult.unreadable>`, exit code 2) and the rest
            compared; off, the comparison stops with the store's error. ``ilstore-compare``
            always keeps going. Not recorded in the report (a report exists only with it).

    Raises:
        OptionError: a bad value (the message names the option).
        NameMapError: a bad map (the message names the file and the rule).
    """

    rtol: float = 1e-5
    atol: float = 1e-8
    steps: tuple[int, ...] | None = None
    required_steps: tuple[int, ...] | None = None
    modules: tuple[str, ...] | None = None
    exact: bool = False
    equal_nan: bool = False
    allow_stats_only: bool = False
    name_map: dict[str, Any] | NameMap | str | Path | None = None  # stored as the dict form
    squeeze_shapes: bool | None = None
    auto_map: bool = field(default=True, metadata={"reported": False})
    allow_unaligned: bool = False
    align_tokens: bool = False
    workers: int = field(default=1, metadata={"reported": False})
    replay: str | Path | None = None  # stored as a string
    oracle: str | Path | None = None  # stored as a string
    oracle_factor: float | None = None
    keep_going: bool = field(default=False, metadata={"reported": False})

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise OptionError(name, f"must be a finite number >= 0, got {value!r}")
            self._set(name, float(value))
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 1:
            raise OptionError("workers", f"must be an integer >= 1, got {self.workers!r}")
        self._check_steps()
        if self.modules is not None:
            raw: Any = self.modules
            parts = [raw] if isinstance(raw, str) else list(raw)
            patterns = tuple(p for part in parts for p in split_patterns(part))
            if not patterns:
                raise OptionError("modules", "no pattern given (pass None to compare every module)")
            compile_patterns(patterns)
            self._set("modules", patterns)
        nmap = resolve_map(self.name_map)
        self._set("name_map", nmap.to_dict() if nmap is not None else None)
        self.__dict__["map"] = nmap  # the parsed map, so the ``map`` property need not parse it again
        squeeze = self.squeeze_shapes
        self.__dict__["squeeze_follows_map"] = squeeze is None
        if squeeze is None:  # as the map says
            squeeze = nmap is not None and nmap.squeeze_shapes
        self._set("squeeze_shapes", bool(squeeze))
        for name in ("exact", "equal_nan", "allow_stats_only", "allow_unaligned", "keep_going", "auto_map",
                     "align_tokens"):
            self._set(name, bool(getattr(self, name)))
        self._check_replay()

    def _check_steps(self) -> None:
        single: tuple[int, ...] | None = None
        if isinstance(self.steps, str):  # the command line's form: "0,2,5-7"
            steps, single = parse_step_selection(self.steps)
            self._set("steps", steps)
        elif self.steps is not None:
            given = list(self.steps)
            if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in given):
                raise OptionError("steps", f"must be integers >= 0, got {given!r}")
            steps = tuple(sorted(set(given)))
            single = () if isinstance(self.steps, range) else steps  # a range filters, as "0-9" does
            self._set("steps", steps)
        if self.required_steps is None:
            self._set("required_steps", single)
            return
        if self.steps is None:
            raise OptionError("required_steps", "needs steps (the steps to compare)")
        required = list(self.required_steps)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in required) \
                or not set(required) <= set(self.steps):
            raise OptionError("required_steps", f"must be steps of steps, got {required!r}")
        self._set("required_steps", tuple(sorted(set(required))))

    def _check_replay(self) -> None:
        for name in ("replay", "oracle"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (str, Path)) or not str(value):
                raise OptionError(name, f"must be a run directory, got {value!r}")
            self._set(name, str(value))
        if self.replay is not None and self.oracle is not None:
            raise OptionError("oracle", "cannot be combined with replay: --replay measures the local error of one "
                              "run against dir2, --oracle compares two replays against a third run; run them "
                              "separately")
        factor = self.oracle_factor
        if factor is None:
            if self.oracle is not None:
                self._set("oracle_factor", 2.0)
            return
        if self.oracle is None:
            raise OptionError("oracle_factor", "needs an oracle run (--oracle RUN)")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not math.isfinite(factor) or factor <= 0:
            raise OptionError("oracle_factor", f"must be a finite number > 0, got {factor!r}")
        self._set("oracle_factor", float(factor))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # normalising a frozen instance while it is built

    @functools.cached_property
    def map(self) -> NameMap | None:
        """The name map as an object (None without one); parsed once."""
        return NameMap.from_dict(self.name_map) if self.name_map is not None else None

    @property
    def squeeze_follows_map(self) -> bool:
        """``squeeze_shapes`` was not given: it is what the map says (and follows a new map)."""
        return bool(self.__dict__.get("squeeze_follows_map", False))

    def with_map(self, name_map: NameMap) -> CompareOptions:
        """These options with ``name_map`` (``squeeze_shapes`` follows it unless it was given)."""
        return self.create(self, name_map=name_map)

    @classmethod
    def create(cls, base: CompareOptions | None = None, **changes: Any) -> CompareOptions:
        """Options by name, on top of ``base`` if given (validated like a new object).

        With a ``base``, ``squeeze_shapes`` stays as it was given: if the base's was given, its
        value is kept; if it followed the base's map, it follows the new options' map (pass
        a value to set it, None to follow the map). New ``steps`` without ``required_steps``
        bring their own (as a new object's).

        Raises:
            OptionError: an unknown option name (with a "did you mean") or a bad value.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        for name in changes:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"options are {', '.join(names)}"
                raise OptionError(name, f"unknown option; {hint}")
        if base is None:
            return cls(**changes)
        if not changes:
            return base
        if "squeeze_shapes" not in changes and base.squeeze_follows_map:
            changes["squeeze_shapes"] = None
        if "steps" in changes and "required_steps" not in changes:
            changes["required_steps"] = None  # as the new steps say
        return dataclasses.replace(base, **changes)


def reported_options(options: CompareOptions) -> dict[str, Any]:
    """The options the result depends on, as plain data (what the JSON report records)."""
    reported = {f.name for f in dataclasses.fields(options) if f.metadata.get("reported", True)}
    return {k: v for k, v in dataclasses.asdict(options).items() if k in reported}
