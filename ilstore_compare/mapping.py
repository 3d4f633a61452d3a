"""Module-name mapping: align two runs whose module names differ (``--map FILE``).

A map file is a JSON object::

    {
      "apply_to": "dir2",
      "rules": [
        ["^model\\\\.layers\\\\.(\\\\d+)\\\\.self_attn$", "model.layers.\\\\1.attn"],
        {"pattern": "^transformer\\\\.h\\\\.", "replacement": "model.layers."}
      ],
      "comment": "free text, ignored"
    }

Each rule is a ``[pattern, replacement]`` pair or a ``{"pattern", "replacement"}`` object.
The rules rewrite the module names of one run (``apply_to``: ``"dir2"``, the default, or
``"dir1"``) into the other run's naming. They are applied in order, each to the result of the
previous one (like a sed script), with :func:`re.sub`: every match is replaced and the
replacement may use ``\\1`` or ``\\g<name>``. A name no rule matches stays as it is.

Example:
    >>> m = NameMap.from_dict({"rules": [["\\\\.self_attn", ".attn"]]})
    >>> m.rename("model.layers.0.self_attn.q_proj")
    'model.layers.0.attn.q_proj'
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import NameMapError

__all__ = ["NameMap", "Rule"]

_KEYS = ("rules", "apply_to", "comment")
_SIDES = ("dir1", "dir2")


@dataclass(frozen=True)
class Rule:
    """One rename rule: every match of ``pattern`` is replaced by ``replacement``."""

    pattern: re.Pattern[str]
    replacement: str

    def apply(self, name: str) -> str:
        return self.pattern.sub(self.replacement, name)


@dataclass(frozen=True)
class NameMap:
    """Ordered rename rules for the module names of one side of a comparison.

    Attributes:
        rules: applied in order, each to the previous result.
        apply_to: ``"dir2"`` (default) or ``"dir1"``: whose module names are rewritten.
        source: the file the map came from, for messages.
    """

    rules: tuple[Rule, ...] = ()
    apply_to: str = "dir2"
    source: str | None = None

    def rename(self, module: str) -> str:
        """Rewrite one module name through every rule, in order."""
        for rule in self.rules:
            module = rule.apply(module)
        return module

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (as a map file would hold it)."""
        return {"apply_to": self.apply_to, "rules": [[r.pattern.pattern, r.replacement] for r in self.rules]}

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> "NameMap":
        """Validate and build a map from its parsed JSON form.

        Raises:
            NameMapError: one message naming the file, the key or rule index, and the problem.
        """
        where = source or "name map"
        if not isinstance(data, Mapping):
            raise NameMapError(f"{where}: expected a JSON object with a \"rules\" list, got {type(data).__name__}")
        for key in data:
            if key not in _KEYS:
                close = difflib.get_close_matches(str(key), _KEYS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; allowed keys: {', '.join(_KEYS)}"
                raise NameMapError(f"{where}: unknown key {key!r}{hint}")
        apply_to = data.get("apply_to", "dir2")
        if apply_to not in _SIDES:
            raise NameMapError(f"{where}: apply_to must be \"dir1\" or \"dir2\", got {apply_to!r}")
        raw = data.get("rules")
        if not isinstance(raw, list):
            raise NameMapError(f"{where}: \"rules\" must be a list of [pattern, replacement] pairs")
        rules = tuple(_rule(item, f"{where}: rules[{i}]") for i, item in enumerate(raw))
        return cls(rules, apply_to, source)

    @classmethod
    def load(cls, path: str | Path) -> "NameMap":
        """Read and validate a map file.

        Raises:
            NameMapError: the file is missing, unreadable, not JSON, or malformed.
        """
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise NameMapError(f"{p}: cannot read the name map file: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise NameMapError(f"{p}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
        return cls.from_dict(data, str(p))

    @classmethod
    def coerce(cls, value: "NameMap | Mapping[str, Any] | str | Path | None") -> "NameMap | None":
        """Accept a map, its dict form, or a file path (None stays None)."""
        if value is None or isinstance(value, NameMap):
            return value
        if isinstance(value, (str, Path)):
            return cls.load(value)
        return cls.from_dict(value)


def _rule(item: Any, where: str) -> Rule:
    if isinstance(item, Mapping):
        extra = set(item) - {"pattern", "replacement"}
        if extra:
            raise NameMapError(f"{where}: unknown key(s) {sorted(extra)}; a rule has \"pattern\" and \"replacement\"")
        pattern, replacement = item.get("pattern"), item.get("replacement")
    elif isinstance(item, list) and len(item) == 2:
        pattern, replacement = item
    else:
        raise NameMapError(f"{where}: expected [pattern, replacement] or "
                           f"{{\"pattern\", \"replacement\"}}, got {item!r}")
    if not isinstance(pattern, str) or not pattern or not isinstance(replacement, str):
        raise NameMapError(f"{where}: pattern must be a non-empty string and replacement a string")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise NameMapError(f"{where}: bad regex {pattern!r}: {exc}") from None
    try:
        compiled.sub(replacement, "")  # validates group references in the replacement
    except (re.error, IndexError) as exc:
        raise NameMapError(f"{where}: bad replacement {replacement!r} for {pattern!r}: {exc}") from None
    return Rule(compiled, replacement)
