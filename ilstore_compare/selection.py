"""Step and module selections of a comparison: parsing only, importable without torch.

``ilstore-compare --help`` and option checking use these before any run is opened.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import OptionError

__all__ = ["parse_steps", "parse_step_selection", "step_ranges", "split_patterns", "compile_patterns"]


def parse_steps(text: str) -> tuple[int, ...]:
    """``"0,2,5-7"`` → ``(0, 2, 5, 6, 7)``.

    Raises:
        OptionError: anything but non-negative integers and ranges (option ``steps``).
    """
    return parse_step_selection(text)[0]


def parse_step_selection(text: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The steps ``text`` selects, and those it names one by one (not through a range): a step
    asked for by itself must be in a run, a range only filters (docs/compare.md).

    >>> parse_step_selection("0,2,5-7,6")
    ((0, 2, 5, 6, 7), (0, 2, 6))

    Raises:
        OptionError: anything but non-negative integers and ranges (option ``steps``).
    """
    steps: list[int] = []
    single: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise OptionError("steps", f"{part!r} is not a step number or a range like 2-5 (in {text!r})")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise OptionError("steps", f"empty range {part!r}")
        if m.group(2) is None:
            single.add(lo)
        steps.extend(range(lo, hi + 1))
    return tuple(sorted(set(steps))), tuple(sorted(single))


def step_ranges(steps: Iterable[int]) -> str:
    """Sorted step numbers with runs of consecutive ones as ranges: ``0–3, 5, 7–8``.

    >>> step_ranges([0, 1, 2, 3, 5, 7, 8])
    '0–3, 5, 7–8'
    """
    parts: list[str] = []
    start = prev = None
    for step in steps:
        if prev is not None and step == prev + 1:
            prev = step
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}–{prev}")
        start = prev = step
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}–{prev}")
    return ", ".join(parts)


def split_patterns(text: str) -> list[str]:
    """Split a comma-separated regex list at top-level commas only (``a{1,3},b`` → two)."""
    out, depth, cur, escaped = [], 0, [], False
    for ch in text:
        if escaped:
            cur.append(ch)
            escaped = False
            continue
        if ch == "\\":
            escaped = True
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    return [p for p in out if p]


def compile_patterns(patterns: Iterable[str]) -> list[re.Pattern[str]]:
    """Compile module regexes; an :class:`OptionError` (option ``modules``) names a bad one."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, OverflowError, RecursionError, ValueError) as exc:  # not only re.error: a{99999999999}
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            shown = repr(pattern) if len(pattern) <= 80 else f"{pattern[:60]!r}... ({len(pattern)} characters)"
            raise OptionError("modules", f"bad regex {shown}: {why}") from None
    return compiled
