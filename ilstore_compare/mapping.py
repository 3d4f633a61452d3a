"""The map file (``--map FILE``): align two runs whose module names and tensor layouts differ.

A map file is a JSON object::

    {
      "architectures": ["LlamaForCausalLM"],
      "engines": {"dir1": "vllm", "dir2": "transformers"},
      "apply_to": "dir1",
      "rules": [["^logits_processor$", "lm_head"]],
      "path_rules": [
        {"module": "^model\\\\.layers\\\\.\\\\d+$", "sum": ["outputs/0", "outputs/1"], "to": "outputs"},
        {"module": "\\\\.o_proj$", "path": "outputs/0", "to": "outputs"},
        {"module": "^lm_head$", "side": "dir2", "path": "outputs", "select": {"dim": -2, "index": -1}}
      ],
      "squeeze_shapes": true,
      "unaligned": [
        {"module": "\\\\.qkv_proj$", "side": "dir1", "reason": "fused q, k, v projection"}
      ],
      "comment": "free text, ignored"
    }

* ``rules`` rename **module names** of one run (``apply_to``: ``"dir2"``, the default, or
  ``"dir1"``) into the other run's naming: ``[pattern, replacement]`` pairs (or
  ``{"pattern", "replacement"}`` objects) applied in order, each to the result of the previous
  one, with :func:`re.sub`. A name no rule matches stays as it is.
* ``path_rules`` rewrite **tensors inside a module call** (after the renames): move a tensor to
  another path (``path`` + ``to``), take one index along a dimension (``select``), or add
  several tensors of the call into one (``sum`` + ``to``). See :class:`PathRule`.
* ``squeeze_shapes`` compares shapes that differ only by size-1 dimensions after squeezing.
* ``unaligned`` declares tensors that cannot be aligned, with the reason; they are reported
  with status ``unaligned`` and counted, never dropped. See :class:`UnalignedRule`.
* ``architectures`` and ``engines`` (given together, both optional) say which runs the map is
  for, so the comparer can pick it without ``--map``: the model architectures it aligns (the
  manifest's ``model.architecture``, e.g. ``LlamaForCausalLM``) and the engine of each run (the
  top-level package of the manifest's ``model.class``: ``vllm``, ``transformers``). See
  :meth:`NameMap.applies_to` and :mod:`ilstore_compare.maps`.

Tensor paths are written ``kind/elem/...`` (``"outputs/0"``, ``"inputs/hidden_states"``,
``"outputs"``) or as the reports show them (``"outputs[0]"``).

Example:
    >>> m = NameMap.from_dict({"rules": [["\\\\.self_attn", ".attn"]]})
    >>> m.rename("model.layers.0.self_attn.q_proj")
    'model.layers.0.attn.q_proj'
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ilstore.keys import KINDS, decode_part, encode_part

from .errors import NameMapError

__all__ = ["NameMap", "Rule", "PathRule", "UnalignedRule", "TensorPath", "parse_tensor_path", "format_tensor_path",
           "display_tensor_path", "model_engine"]

_KEYS = ("rules", "apply_to", "path_rules", "squeeze_shapes", "unaligned", "architectures", "engines", "comment")
_SIDES = ("dir1", "dir2")
_PATH_RULE_KEYS = ("module", "path", "sum", "to", "select", "side", "comment")
_UNALIGNED_KEYS = ("module", "tensor", "side", "reason", "comment")
_UNALIGNED_SIDES = ("any", "dir1", "dir2", "both")

#: A tensor's place in a module call: ``(kind, path)``, e.g. ``("outputs", ("0",))``.
TensorPath = tuple[str, tuple[str, ...]]

_BRACKETS = re.compile(r"^([A-Za-z_]+)((?:\[[^\[\]]*\])*)$")


def parse_tensor_path(text: Any, where: str) -> TensorPath:
    """``"outputs/0"`` or ``"outputs[0]"`` → ``("outputs", ("0",))``.

    In the slash form each element is percent-decoded like a record key's (``%2F`` for a ``/``).

    Raises:
        NameMapError: not a string, empty, or an unknown kind (with a "did you mean").
    """
    if not isinstance(text, str) or not text:
        raise NameMapError(f"{where}: expected a tensor path such as \"outputs/0\" or \"inputs/hidden_states\", "
                           f"got {text!r}")
    m = _BRACKETS.match(text)
    if m and "/" not in text:
        kind, path = m.group(1), tuple(re.findall(r"\[([^\[\]]*)\]", m.group(2)))
    else:
        kind, *rest = text.split("/")
        path = tuple(decode_part(p) for p in rest)
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; a path starts with one of {', '.join(KINDS)}"
        raise NameMapError(f"{where}: {text!r} is not a tensor path: unknown kind {kind!r}{hint}")
    return kind, path


def model_engine(model: Mapping[str, Any] | None) -> str | None:
    """The engine a run's model comes from: the top-level package of its manifest ``model.class``.

    Example:
        >>> model_engine({"class": "vllm.model_executor.models.llama.LlamaForCausalLM"})
        'vllm'
        >>> model_engine(None) is None
        True
    """
    cls = model.get("class") if isinstance(model, Mapping) else None
    return cls.split(".", 1)[0] if isinstance(cls, str) and cls else None


def format_tensor_path(tp: TensorPath) -> str:
    """The slash form, as a map file writes it: ``outputs/0``."""
    return "/".join([tp[0], *(encode_part(p) for p in tp[1])])


def display_tensor_path(tp: TensorPath) -> str:
    """The report form: ``outputs[0]``."""
    return tp[0] + "".join(f"[{p}]" for p in tp[1])


@dataclass(frozen=True)
class Rule:
    """One module rename rule: every match of ``pattern`` is replaced by ``replacement``."""

    pattern: re.Pattern[str]
    replacement: str

    def apply(self, name: str) -> str:
        return self.pattern.sub(self.replacement, name)


@dataclass(frozen=True)
class PathRule:
    """One tensor rule, applied to the calls of one run whose (renamed) module matches.

    Three forms:

    * move: ``{"module", "path", "to"}`` — the tensor at ``path`` is compared as ``to``;
    * select: ``{"module", "path", "select": {"dim": d, "index": i}}`` (``to`` optional) — only
      ``tensor.select(d, i)`` is compared (negative ``d``/``i`` count from the end), e.g. the
      last position of Hugging Face's ``[1, T, V]`` logits;
    * sum: ``{"module", "sum": [p1, p2, ...], "to"}`` — the elementwise sum of the listed
      tensors (same shape; added in order with PyTorch's type promotion: one dtype stays that
      dtype, mixed ones are promoted, fp16 + fp32 in fp32) is compared as ``to``; the summands
      are not listed separately.

    A rule applies to a call when ``module`` matches (``re.search``) and every tensor it names
    exists there; each tensor is taken by the first rule that applies (no chaining).

    Attributes:
        index: position in ``path_rules`` (for messages).
        module: regex on the module name, after the renames.
        side: the run whose tensors it rewrites (default: the map's ``apply_to``).
        sources: the tensors it takes (one, or several for a sum).
        target: the path they are compared as.
        select: ``(dim, index)`` or None.
    """

    index: int
    module: re.Pattern[str]
    side: str
    sources: tuple[TensorPath, ...]
    target: TensorPath
    select: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        return f"path_rules[{self.index}]"

    @property
    def is_sum(self) -> bool:
        return len(self.sources) > 1

    def describe(self) -> str:
        """What the rule did to one side, for the report: ``dir1 outputs[0] + outputs[1] (path_rules[3])``."""
        what = " + ".join(display_tensor_path(s) for s in self.sources)
        if self.select is not None:
            what += f" at index {self.select[1]} of dim {self.select[0]}"
        if self.target != self.sources[0] or self.is_sum:
            what += f" as {display_tensor_path(self.target)}"
        return f"{self.side} {what} ({self.label})"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"module": self.module.pattern, "side": self.side}
        if self.is_sum:
            out["sum"] = [format_tensor_path(s) for s in self.sources]
        else:
            out["path"] = format_tensor_path(self.sources[0])
        out["to"] = format_tensor_path(self.target)
        if self.select is not None:
            out["select"] = {"dim": self.select[0], "index": self.select[1]}
        return out


@dataclass(frozen=True)
class UnalignedRule:
    """Tensors declared impossible to align, with the reason.

    A tensor matches when ``module`` (if given) matches its module name (``re.search``, after
    the renames), ``tensor`` (if given) matches its path in the slash form (``re.fullmatch``,
    after the path rules, e.g. ``outputs/1`` or ``inputs/position_embeddings/.*``; at least one
    of the two is required), and ``side`` fits:
    ``dir1``/``dir2`` — the tensor is in that run only; ``both`` — it is in both runs (same name,
    different computation); ``any`` (default) — in one run or both (a pair present in both
    runs is then not compared).

    Attributes:
        index: position in ``unaligned`` (for messages).
        module: regex on the module name, or None for every module.
        tensor: regex on the tensor path, or None for every tensor of the call.
        side: ``any``, ``dir1``, ``dir2`` or ``both``.
        reason: why it cannot be aligned (shown in the report).
    """

    index: int
    module: re.Pattern[str] | None
    tensor: re.Pattern[str] | None
    side: str
    reason: str

    @property
    def label(self) -> str:
        return f"unaligned[{self.index}]"

    def matches(self, module: str, tp: TensorPath, presence: str) -> bool:
        """Whether a tensor (``presence``: ``both``, ``dir1`` or ``dir2``) is declared by this rule."""
        if self.side != "any" and self.side != presence:
            return False
        if self.module is not None and not self.module.search(module):
            return False
        return self.tensor is None or self.tensor.fullmatch(format_tensor_path(tp)) is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"module": self.module.pattern} if self.module is not None else {}
        if self.tensor is not None:
            out["tensor"] = self.tensor.pattern
        out.update(side=self.side, reason=self.reason)
        return out


@dataclass(frozen=True)
class NameMap:
    """How one run's module names and tensors line up with the other's.

    Attributes:
        rules: module rename rules, applied in order, each to the previous result.
        apply_to: ``"dir2"`` (default) or ``"dir1"``: whose module names are rewritten (and
            the default side of the path rules).
        source: the file the map came from, for messages.
        path_rules: tensor rules (move, select, sum), in priority order.
        squeeze_shapes: compare shapes that differ only by size-1 dimensions.
        unaligned: declarations of tensors that cannot be aligned.
        architectures: the model architectures the map is for (empty: not picked by itself).
        engines: ``{"dir1": engine, "dir2": engine}`` the map is for (empty with
            ``architectures``).
    """

    rules: tuple[Rule, ...] = ()
    apply_to: str = "dir2"
    source: str | None = None
    path_rules: tuple[PathRule, ...] = ()
    squeeze_shapes: bool = False
    unaligned: tuple[UnalignedRule, ...] = ()
    architectures: tuple[str, ...] = ()
    engines: Mapping[str, str] = field(default_factory=dict, hash=False)

    def applies_to(self, model1: Mapping[str, Any] | None, model2: Mapping[str, Any] | None) -> bool:
        """Whether the map is declared for runs of these models (the manifests' ``model`` entries).

        True when the map declares ``architectures`` and ``engines``, both runs' architectures
        are among the map's, and each run's engine (:func:`model_engine`) is the one the map
        names for its side. A run without a ``model`` entry (captured before ilstore recorded
        it) matches nothing.
        """
        if not self.architectures:
            return False
        for side, model in (("dir1", model1), ("dir2", model2)):
            if not isinstance(model, Mapping) or model.get("architecture") not in self.architectures:
                return False
            if model_engine(model) != self.engines.get(side):
                return False
        return True

    def rename(self, module: str) -> str:
        """Rewrite one module name through every rule, in order."""
        for rule in self.rules:
            module = rule.apply(module)
        return module

    def side_rules(self, side: str) -> tuple[PathRule, ...]:
        """The path rules that rewrite ``side``'s tensors (``"dir1"`` or ``"dir2"``)."""
        return tuple(r for r in self.path_rules if r.side == side)

    def unaligned_reason(self, module: str, tp: TensorPath, presence: str) -> str | None:
        """``"unaligned[i]: reason"`` for the first declaration matching a tensor, else None."""
        for rule in self.unaligned:
            if rule.matches(module, tp, presence):
                return f"{rule.label}: {rule.reason}"
        return None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (as a map file would hold it, comments dropped)."""
        out: dict[str, Any] = {"apply_to": self.apply_to,
                               "rules": [[r.pattern.pattern, r.replacement] for r in self.rules]}
        if self.path_rules:
            out["path_rules"] = [r.to_dict() for r in self.path_rules]
        if self.squeeze_shapes:
            out["squeeze_shapes"] = True
        if self.unaligned:
            out["unaligned"] = [r.to_dict() for r in self.unaligned]
        if self.architectures:
            out["architectures"] = list(self.architectures)
            out["engines"] = dict(self.engines)
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> NameMap:
        """Validate and build a map from its parsed JSON form.

        Raises:
            NameMapError: one message naming the file, the key or rule index, and the problem.
        """
        where = source or "name map"
        if not isinstance(data, Mapping):
            raise NameMapError(f"{where}: expected a JSON object with a \"rules\" list, got {type(data).__name__}")
        _check_keys(data, _KEYS, where)
        apply_to = data.get("apply_to", "dir2")
        if apply_to not in _SIDES:
            raise NameMapError(f"{where}: apply_to must be \"dir1\" or \"dir2\", got {apply_to!r}")
        if not any(key in data for key in ("rules", "path_rules", "unaligned", "squeeze_shapes")):
            raise NameMapError(f"{where}: the map says nothing: give \"rules\" (a list of [pattern, replacement] "
                               "pairs), \"path_rules\", \"unaligned\" or \"squeeze_shapes\"")
        raw = data.get("rules", [])
        if not isinstance(raw, list):
            raise NameMapError(f"{where}: \"rules\" must be a list of [pattern, replacement] pairs")
        rules = tuple(_rule(item, f"{where}: rules[{i}]") for i, item in enumerate(raw))
        path_rules = tuple(_path_rule(item, i, apply_to, f"{where}: path_rules[{i}]")
                           for i, item in enumerate(_list(data, "path_rules", where)))
        unaligned = tuple(_unaligned(item, i, f"{where}: unaligned[{i}]")
                          for i, item in enumerate(_list(data, "unaligned", where)))
        squeeze = data.get("squeeze_shapes", False)
        if not isinstance(squeeze, bool):
            raise NameMapError(f"{where}: squeeze_shapes must be true or false, got {squeeze!r}")
        architectures, engines = _applies(data, where)
        return cls(rules, apply_to, source, path_rules, squeeze, unaligned, architectures, engines)

    @classmethod
    def load(cls, path: str | Path) -> NameMap:
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
    def coerce(cls, value: NameMap | Mapping[str, Any] | str | Path | None) -> NameMap | None:
        """Accept a map, its dict form, or a file path (None stays None)."""
        if value is None or isinstance(value, NameMap):
            return value
        if isinstance(value, (str, Path)):
            return cls.load(value)
        return cls.from_dict(value)


# -- validation -------------------------------------------------------------------------------
def _check_keys(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; allowed keys: {', '.join(allowed)}"
            raise NameMapError(f"{where}: unknown key {key!r}{hint}")


def _applies(data: Mapping[str, Any], where: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """``architectures`` and ``engines``: both or neither."""
    if ("architectures" in data) != ("engines" in data):
        given, missing = ("architectures", "engines") if "architectures" in data else ("engines", "architectures")
        raise NameMapError(f"{where}: \"{given}\" needs \"{missing}\" too: a map says which runs it is for with "
                           "both (e.g. \"architectures\": [\"LlamaForCausalLM\"], \"engines\": "
                           "{\"dir1\": \"vllm\", \"dir2\": \"transformers\"})")
    if "architectures" not in data:
        return (), {}
    archs = data["architectures"]
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) and a for a in archs):
        raise NameMapError(f"{where}: \"architectures\" must be a non-empty list of architecture names "
                           f"(a manifest's model.architecture, e.g. \"LlamaForCausalLM\"), got {archs!r}")
    engines = data["engines"]
    if not isinstance(engines, Mapping):
        raise NameMapError(f"{where}: \"engines\" must be an object {{\"dir1\": engine, \"dir2\": engine}}, "
                           f"got {engines!r}")
    _check_keys(engines, _SIDES, f"{where}: engines")
    for side in _SIDES:
        value = engines.get(side)
        if not isinstance(value, str) or not value or "." in value:
            raise NameMapError(f"{where}: engines.{side} must be the top-level package of the model class of "
                               f"that run (e.g. \"vllm\", \"transformers\"), got {value!r}")
    return tuple(archs), {side: str(engines[side]) for side in _SIDES}


def _list(data: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise NameMapError(f"{where}: \"{key}\" must be a list of objects, got {type(value).__name__}")
    return value


# what re.compile raises for a bad pattern: re.error, and for patterns it cannot build,
# OverflowError (a{99999999999}), RecursionError (thousands of nested groups) or ValueError
_REGEX_ERRORS = (re.error, OverflowError, RecursionError, ValueError)


def _shown(pattern: str) -> str:
    """A pattern for a message: long ones cut (a 4,000-character pattern would drown it)."""
    return repr(pattern) if len(pattern) <= 80 else f"{pattern[:60]!r}... ({len(pattern)} characters)"


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    """``re.compile``, every failure a :class:`NameMapError` that starts with ``what``."""
    try:
        return re.compile(pattern)
    except _REGEX_ERRORS as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise NameMapError(f"{what}: {why}") from None


def _regex(pattern: Any, where: str, what: str) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern:
        raise NameMapError(f"{where}: {what} must be a non-empty regex string, got {pattern!r}")
    return _compile(pattern, f"{where}: bad regex {_shown(pattern)} in {what}")


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
    compiled = _compile(pattern, f"{where}: bad regex {_shown(pattern)}")
    try:
        compiled.sub(replacement, "")  # validates group references in the replacement
    except (re.error, IndexError) as exc:
        raise NameMapError(f"{where}: bad replacement {replacement!r} for {pattern!r}: {exc}") from None
    return Rule(compiled, replacement)


def _select(value: Any, where: str) -> tuple[int, int]:
    if not isinstance(value, Mapping) or set(value) != {"dim", "index"} or not all(
            isinstance(value[k], int) and not isinstance(value[k], bool) for k in ("dim", "index")):
        raise NameMapError(f"{where}: select must be {{\"dim\": <int>, \"index\": <int>}} "
                           f"(e.g. {{\"dim\": -2, \"index\": -1}} for the last position), got {value!r}")
    return int(value["dim"]), int(value["index"])


def _path_rule(item: Any, index: int, default_side: str, where: str) -> PathRule:
    if not isinstance(item, Mapping):
        raise NameMapError(f"{where}: expected an object such as {{\"module\": \"\\\\.o_proj$\", "
                           f"\"path\": \"outputs/0\", \"to\": \"outputs\"}}, got {item!r}")
    _check_keys(item, _PATH_RULE_KEYS, where)
    module = _regex(item.get("module"), where, "\"module\"")
    side = item.get("side", default_side)
    if side not in _SIDES:
        raise NameMapError(f"{where}: side must be \"dir1\" or \"dir2\", got {side!r}")
    if ("path" in item) == ("sum" in item):
        raise NameMapError(f"{where}: give either \"path\" (one tensor to move or select from) or \"sum\" "
                           "(a list of tensors to add), not " + ("both" if "path" in item else "neither"))
    select = _select(item["select"], where) if "select" in item else None
    if "sum" in item:
        raw = item["sum"]
        if not isinstance(raw, list) or len(raw) < 2:
            raise NameMapError(f"{where}: \"sum\" must list at least two tensor paths, got {raw!r}")
        sources = tuple(parse_tensor_path(p, f"{where}: sum[{i}]") for i, p in enumerate(raw))
        if len(set(sources)) != len(sources):
            raise NameMapError(f"{where}: \"sum\" lists a tensor twice: {raw!r}")
        if "to" not in item:
            raise NameMapError(f"{where}: a \"sum\" rule needs \"to\", the path the sum is compared as")
        if select is not None:
            raise NameMapError(f"{where}: \"select\" applies to a single \"path\", not to a \"sum\"")
    else:
        sources = (parse_tensor_path(item["path"], f"{where}: path"),)
    target = parse_tensor_path(item["to"], f"{where}: to") if "to" in item else sources[0]
    if len(sources) == 1 and target == sources[0] and select is None:
        raise NameMapError(f"{where}: the rule changes nothing: give \"to\" (a different path) or \"select\"")
    return PathRule(index, module, side, sources, target, select)


def _unaligned(item: Any, index: int, where: str) -> UnalignedRule:
    if not isinstance(item, Mapping):
        raise NameMapError(f"{where}: expected an object such as {{\"module\": \"\\\\.qkv_proj$\", \"side\": \"dir1\", "
                           f"\"reason\": \"fused projection\"}}, got {item!r}")
    _check_keys(item, _UNALIGNED_KEYS, where)
    if "module" not in item and "tensor" not in item:
        raise NameMapError(f"{where}: give \"module\" (a regex on module names), \"tensor\" (a regex on tensor "
                           "paths such as \"outputs/1\"), or both")
    module = _regex(item["module"], where, "\"module\"") if "module" in item else None
    tensor = _regex(item["tensor"], where, "\"tensor\"") if "tensor" in item else None
    side = item.get("side", "any")
    if side not in _UNALIGNED_SIDES:
        raise NameMapError(f"{where}: side must be one of {', '.join(_UNALIGNED_SIDES)}, got {side!r}")
    reason = item.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise NameMapError(f"{where}: \"reason\" is required: say why these tensors cannot be aligned "
                           "(it is shown in the report)")
    return UnalignedRule(index, module, tensor, side, reason.strip())
