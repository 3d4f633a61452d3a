"""Capture configuration: loading, schema validation and the resolved :class:`Config`.

A config is a JSON object validated against the packaged ``schemas/config.schema.json``.
It may be given as a dict, JSON text, a path to a JSON file, or through the environment
variable ``ILSTORE_CONFIG`` (JSON text or a path). Every problem is reported at once, each
with its key path (``module_call_match[2]``) and a "did you mean" for misspelled keys.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from .errors import ConfigError
from .schemas import load as load_schema

__all__ = ["Config", "ModuleSelector", "load_config", "ENV_VAR", "DEFAULTS"]

ENV_VAR = "ILSTORE_CONFIG"

DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "output_dir": "/tmp/vllm_intermediates",
    "run_id": None,
    "module_call_match": None,
    "log_step_ids": [0],
    "max_tensor_size": None,
    "device_names": [],
    "backend": "pt",
    "backend_options": {},
    "log_inputs": True,
    "log_outputs": True,
    "log_post_fwd_inputs": False,
    "mode": "tensors",
    "async_writes": True,
    "max_pending_mb": 1024,
    "dedup": True,
    "on_error": "warn",
    "replay_from": None,
    "capture_root": None,
    "calls_outside_forward": "next_step",
    "in_graph": False,
}

# A selector suffix: ":1", ":0,2", ":1-3", ":0,2-4". Only a suffix that parses like this is a
# selector, so regexes that contain ':' (e.g. "(?:a|b)") stay plain regexes.
_SELECTOR_RE = re.compile(r"^(?P<pattern>.+):(?P<calls>\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)$")


@dataclass(frozen=True)
class ModuleSelector:
    """One ``module_call_match`` entry: a regex and the call indices it selects.

    Attributes:
        pattern: the regex, applied with ``re.search`` to the dotted module name.
        calls: the selected zero-based call indices per step, or None for every call.
    """

    pattern: str
    calls: frozenset[int] | None = None
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern))

    def matches_module(self, name: str) -> bool:
        return self.regex.search(name) is not None


def _parse_calls(text: str) -> frozenset[int]:
    calls: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        start, stop = int(lo), int(hi) if hi else int(lo)
        if stop < start:
            raise ValueError(f"range {part!r} is empty (the end is before the start)")
        calls.update(range(start, stop + 1))
    return frozenset(calls)


def _parse_selector(entry: str | Mapping[str, Any]) -> ModuleSelector:
    if isinstance(entry, Mapping):
        calls = entry.get("calls")
        return ModuleSelector(entry["pattern"], None if calls is None else frozenset(calls))
    m = _SELECTOR_RE.match(entry)
    if m:
        try:
            re.compile(m["pattern"])
        except (re.error, OverflowError, RecursionError, ValueError):
            # "a:1" where "a" alone is not a regex: keep the whole text as the regex.
            return ModuleSelector(entry)
        return ModuleSelector(m["pattern"], _parse_calls(m["calls"]))
    return ModuleSelector(entry)


@dataclass(frozen=True)
class Config:
    """A validated, resolved capture configuration (see ``docs/config.md``).

    Build one with :func:`load_config`; the fields mirror the config keys.

    Example:
        >>> cfg = load_config({"module_call_match": "layers\\\\.0\\\\.mlp:1"})
        >>> cfg.selectors[0].calls
        frozenset({1})
    """

    enabled: bool
    output_dir: str
    run_id: str
    module_call_match: tuple[Any, ...] | None
    log_step_ids: tuple[int, ...]
    max_tensor_size: int | None
    device_names: tuple[str, ...]
    backend: str
    backend_options: Mapping[str, Any]
    log_inputs: bool
    log_outputs: bool
    log_post_fwd_inputs: bool
    mode: str
    async_writes: bool
    max_pending_mb: float
    dedup: bool
    on_error: str
    selectors: tuple[ModuleSelector, ...] | None = field(compare=False, repr=False)
    replay_from: str | None = None
    capture_root: bool | None = None
    calls_outside_forward: str = "next_step"
    in_graph: bool = False

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_id

    def logs_step(self, step: int) -> bool:
        return not self.log_step_ids or step in self.log_step_ids

    def module_may_match(self, name: str) -> bool:
        """Whether any selector can select some call of the module ``name``."""
        if self.selectors is None:
            return True
        for sel in self.selectors:  # asked for every module of the model at set-up: no generator
            if sel.regex.search(name) is not None:
                return True
        return False

    def selected_calls(self, name: str) -> frozenset[int] | None:
        """Union of the calls selected for ``name``: None means every call."""
        if self.selectors is None:
            return None
        calls: set[int] = set()
        for sel in self.selectors:
            if sel.matches_module(name):
                if sel.calls is None:
                    return None
                calls |= sel.calls
        return frozenset(calls)

    def logs_device(self, device: str) -> bool:
        if not self.device_names:
            return True
        return any(device == d or (d == "cuda" and device.startswith("cuda")) for d in self.device_names)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as JSON-ready data (what the manifest records)."""
        mcm = self.module_call_match
        return {
            "enabled": self.enabled,
            "output_dir": self.output_dir,
            "run_id": self.run_id,
            "module_call_match": None if mcm is None else list(mcm),
            "log_step_ids": list(self.log_step_ids),
            "max_tensor_size": self.max_tensor_size,
            "device_names": list(self.device_names),
            "backend": self.backend,
            "backend_options": dict(self.backend_options),
            "log_inputs": self.log_inputs,
            "log_outputs": self.log_outputs,
            "log_post_fwd_inputs": self.log_post_fwd_inputs,
            "mode": self.mode,
            "async_writes": self.async_writes,
            "max_pending_mb": self.max_pending_mb,
            "dedup": self.dedup,
            "on_error": self.on_error,
            "replay_from": self.replay_from,
            "capture_root": self.capture_root,
            "calls_outside_forward": self.calls_outside_forward,
            "in_graph": self.in_graph,
        }


def _key_path(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


_KIND = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
         int: "an integer", float: "a number", type(None): "null"}


def _describe(value: Any) -> str:
    return f"{_KIND.get(type(value), type(value).__name__)} ({json.dumps(value)[:60]})"


def _leaf_errors(err: jsonschema.ValidationError) -> list[jsonschema.ValidationError]:
    """For a failed ``oneOf``, the errors inside the branch that got furthest into the value."""
    if err.validator in ("oneOf", "anyOf") and err.context:
        deep = [e for e in err.context if e.relative_path]
        if deep:
            return [leaf for e in deep for leaf in _leaf_errors(e)]
    return [err]


def _is_bool(v: Any) -> bool:
    return type(v) is bool


def _is_text(v: Any) -> bool:
    return type(v) is str and v != ""


def _is_text_or_none(v: Any) -> bool:
    return v is None or (type(v) is str and v != "")


def _is_count(v: Any) -> bool:
    return type(v) is int and v >= 0


#: For each key of the schema, a test that accepts only values the schema accepts (a subset:
#: exact ``bool``/``int``/``str``/``list``/``dict`` types, no ``1.0`` for an integer, no pattern
#: objects). A config whose every value passes needs no schema walk (~0.2 ms, a third of a
#: capture's set-up); any other config is validated by the schema, which reports every problem.
#: tests/test_config.py checks that the keys are the schema's and that every value accepted here
#: is accepted by the schema.
_FAST_CHECKS: dict[str, Any] = {
    "enabled": _is_bool,
    "output_dir": _is_text,
    "run_id": _is_text_or_none,
    "module_call_match": lambda v: v is None or _is_text(v) or (type(v) is list and all(map(_is_text, v))),
    "log_step_ids": lambda v: type(v) is list and all(map(_is_count, v)),
    "max_tensor_size": lambda v: v is None or _is_count(v),
    "device_names": lambda v: type(v) is list and all(map(_is_text, v)),
    "backend": _is_text,
    "backend_options": lambda v: type(v) is dict,
    "log_inputs": _is_bool,
    "log_outputs": _is_bool,
    "log_post_fwd_inputs": _is_bool,
    "mode": lambda v: type(v) is str and v in ("tensors", "stats"),
    "async_writes": _is_bool,
    "max_pending_mb": lambda v: type(v) in (int, float) and v > 0,
    "dedup": _is_bool,
    "on_error": lambda v: type(v) is str and v in ("warn", "raise"),
    "replay_from": _is_text_or_none,
    "capture_root": lambda v: v is None or type(v) is bool,
    "calls_outside_forward": lambda v: type(v) is str and v in ("next_step", "ignore"),
    "in_graph": _is_bool,
}


def _plainly_valid(data: dict[str, Any]) -> bool:
    """Whether the fast checks alone show ``data`` valid against the schema (False: ask the schema)."""
    checks = _FAST_CHECKS
    for key, value in data.items():
        check = checks.get(key) if type(key) is str else None
        if check is None or not check(value):
            return False
    return True


_VALIDATOR: jsonschema.Draft202012Validator | None = None


def _schema_problems(data: Any) -> list[str]:
    if isinstance(data, dict) and _plainly_valid(data):
        return []
    global _VALIDATOR
    if _VALIDATOR is None:  # built once: the schema does not change
        _VALIDATOR = jsonschema.Draft202012Validator(load_schema("config"))
    validator = _VALIDATOR
    known = list(load_schema("config")["properties"])
    problems: list[str] = []
    errors = [leaf for e in validator.iter_errors(data) for leaf in _leaf_errors(e)]
    for err in sorted(errors, key=lambda e: list(map(str, e.absolute_path))):
        where = _key_path(err.absolute_path)
        instance: Any = err.instance  # jsonschema types it as possibly "unset"; a reported error has one
        if err.validator == "additionalProperties" and not err.absolute_path:
            for key in sorted(set(instance) - set(known)):
                hint = difflib.get_close_matches(key, known, n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(known)}"
                shown = key if re.fullmatch(r"[A-Za-z_]\w*", key) else json.dumps(key)
                problems.append(f"{shown}: unknown key{extra}")
        elif err.validator == "additionalProperties":
            problems.append(f"{where}: {err.message}")
        elif err.validator == "oneOf" and err.absolute_path and err.absolute_path[0] == "module_call_match":
            problems.append(
                f"{where}: expected null, a regex string, an object {{\"pattern\": ..., \"calls\": [...]}} "
                f"or an array of those, got {_describe(err.instance)}"
            )
        elif err.validator == "type":
            value: Any = err.validator_value
            want = value if isinstance(value, list) else [value]
            problems.append(f"{where}: expected {' or '.join(want)}, got {_describe(err.instance)}")
        else:
            problems.append(f"{where}: {err.message}")
    return problems


def _regex_problems(mcm: Any) -> list[str]:
    if mcm is None:
        return []
    entries = [mcm] if isinstance(mcm, (str, dict)) else list(mcm) if isinstance(mcm, list) else []
    problems = []
    for i, entry in enumerate(entries):
        where = "module_call_match" if isinstance(mcm, (str, dict)) else f"module_call_match[{i}]"
        text = entry.get("pattern") if isinstance(entry, dict) else entry
        if not isinstance(text, str) or not text:
            continue  # the schema reports it
        if isinstance(entry, dict):
            where += ".pattern"
        m = _SELECTOR_RE.match(text) if isinstance(entry, str) else None
        candidates = [text] + ([m["pattern"]] if m else [])
        errors = []
        for cand in candidates:
            try:
                re.compile(cand)
                break
            except (re.error, OverflowError, RecursionError, ValueError) as exc:  # a{99999999999}, deep nesting
                errors.append(exc)
        else:
            problems.append(f"{where}: {text!r} is not a valid regular expression: {errors[-1]}")
            continue
        if m:
            try:
                _parse_calls(m["calls"])
            except ValueError as exc:
                problems.append(f"{where}: bad call selector in {text!r}: {exc}")
    return problems


def _run_id_problems(run_id: Any) -> list[str]:
    """``run_id`` names one directory inside ``output_dir``: one path component, nothing else."""
    if not isinstance(run_id, str) or not run_id:
        return []  # the schema reports it
    if "/" in run_id or "\\" in run_id or "\x00" in run_id or run_id in (".", ".."):
        return [f"run_id: {run_id!r} is not one path component (it names the run directory inside output_dir: "
                "no '/', '\\', NUL, and not '.' or '..')"]
    return []


def _backend_problems(data: dict[str, Any]) -> list[str]:
    # The registry, not the schema, checks backend names, so plug-in backends validate too.
    # A built-in backend without options is valid as named, and is not imported for it: a
    # backend module imports torch, which `ilstore validate-config` need not wait for.
    from .errors import BackendError
    from .store.registry import BUILTIN_BACKENDS, get_backend

    name = data.get("backend", DEFAULTS["backend"])
    options = data.get("backend_options", {})
    if name in BUILTIN_BACKENDS and not options:
        return []
    try:
        backend = get_backend(name)
    except BackendError as exc:
        return [f"backend: {exc}"]
    return backend.writer.validate_options(options)


def _read_source(source: Any) -> tuple[Any, str | None]:
    """Turn a dict / JSON text / path into data, and name where it came from."""
    if isinstance(source, Mapping):
        return dict(source), None
    if isinstance(source, os.PathLike) or (isinstance(source, str) and not source.lstrip().startswith(("{", "["))):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError([f"config file not found: {path} (give JSON text or an existing file)"],
                              str(path)) from None
        except OSError as exc:
            raise ConfigError([f"cannot read config file {path}: {exc.strerror}"], str(path)) from None
        return _parse_json(text, str(path)), str(path)
    if isinstance(source, str):
        return _parse_json(source, "JSON text"), "JSON text"
    raise ConfigError([f"config must be a dict, JSON text or a path, got {type(source).__name__}"])


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"], where) from None


def load_config(source: Any = None, **overrides: Any) -> Config:
    """Validate a config and resolve its defaults.

    Args:
        source: a dict, JSON text, a path to a JSON file, a :class:`Config` (returned as is),
            or None to read ``ILSTORE_CONFIG`` (JSON text or a path), falling back to defaults.
        **overrides: keys applied on top of ``source`` before validation.

    Returns:
        The resolved :class:`Config`; ``run_id`` is a new UUID4 when not given.

    Raises:
        ConfigError: listing every problem, each with its key path.

    Example:
        >>> load_config('{"log_step_ids": []}').logs_step(7)
        True
    """
    if isinstance(source, Config) and not overrides:
        return source
    where: str | None = None
    if isinstance(source, Config):
        data: Any = source.to_dict()
    elif source is None:
        env = os.environ.get(ENV_VAR)
        data, where = _read_source(env) if env else ({}, None)
        if where:
            where = f"${ENV_VAR} ({where})"
    else:
        data, where = _read_source(source)
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): expected an object, got {_describe(data)}"], where)
    data = {**data, **overrides}
    problems = _schema_problems(data)
    problems += _regex_problems(data.get("module_call_match"))
    if isinstance(data.get("backend", ""), str) and isinstance(data.get("backend_options", {}), dict):
        problems += _backend_problems(data)
    problems += _run_id_problems(data.get("run_id"))
    if data.get("replay_from") is not None and data.get("log_outputs") is False:
        problems.append("replay_from: a replay run measures each call's outputs; it needs log_outputs: true")
    if data.get("replay_from") is not None and data.get("in_graph") is True:
        problems.append("in_graph: replay feeds a call its reference inputs from a Python hook, which compiled graphs "
                        "cannot run; capture a replay with in_graph: false")
    if problems:
        raise ConfigError(problems, where)
    merged = {**DEFAULTS, **data}
    mcm = merged["module_call_match"]
    entries = None if mcm is None else ([mcm] if isinstance(mcm, (str, dict)) else list(mcm))
    return Config(
        enabled=merged["enabled"],
        output_dir=str(merged["output_dir"]),
        run_id=merged["run_id"] or str(uuid.uuid4()),
        module_call_match=None if entries is None else tuple(entries),
        log_step_ids=tuple(merged["log_step_ids"]),
        max_tensor_size=merged["max_tensor_size"],
        device_names=tuple(merged["device_names"]),
        backend=merged["backend"],
        backend_options=dict(merged["backend_options"]),
        log_inputs=merged["log_inputs"],
        log_outputs=merged["log_outputs"],
        log_post_fwd_inputs=merged["log_post_fwd_inputs"],
        mode=merged["mode"],
        async_writes=merged["async_writes"],
        max_pending_mb=merged["max_pending_mb"],
        dedup=merged["dedup"],
        on_error=merged["on_error"],
        selectors=None if entries is None else tuple(_parse_selector(e) for e in entries),
        replay_from=None if merged["replay_from"] is None else str(merged["replay_from"]),
        capture_root=merged["capture_root"],
        calls_outside_forward=merged["calls_outside_forward"],
        in_graph=merged["in_graph"],
    )
