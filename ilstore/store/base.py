"""The two storage interfaces every backend implements: :class:`StoreWriter` and :class:`StoreReader`.

Capture, convert and compare use only these, so a backend is one module that subclasses both
and registers a name (see :mod:`ilstore.store.registry`).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import CorruptFileError, UnsafePathError
from ..keys import KINDS, CallKey, TensorKey
from ..manifest import MANIFEST_NAME, calls_from_json, calls_to_json, write_json_atomic
from ..records import Record, iter_tensor_nodes

__all__ = ["StoreWriter", "StoreReader", "StepInfo", "read_manifest", "check_inside"]


class StepInfo:
    """What a writer learns at the end of a step: its index and the module call order.

    Attributes:
        step: the step index.
        calls: module calls in the order they started (parents before children).
        call_ends: the same calls in the order they finished (children before parents).
    """

    __slots__ = ("step", "calls", "call_ends")

    def __init__(self, step: int, calls: list[CallKey], call_ends: list[CallKey]) -> None:
        self.step, self.calls, self.call_ends = step, calls, call_ends


class StoreWriter(ABC):
    """Writes one run (one rank) into a run directory.

    The framework calls, in this order::

        w = Writer(run_dir, options)   # may not touch the disk
        w.open(manifest)               # once; creates the run directory
        for each step:
            w.write(record)            # zero or more records of that step, in call order
            w.end_step(info)           # makes the step durable and readable
        w.close(status, error)         # once, also after an error ("failed", with a message)

    The base class owns the manifest (``ilstore.json``): it is written atomically at
    ``open``, after every ``end_step`` and at ``close``, so a step exists for readers only
    once the backend has finished it. Implementers provide ``_open``, ``_write``,
    ``_end_step`` and ``_close`` and must guarantee that every tensor comes back
    bit-identical, with its dtype, shape and the record's structure.
    """

    #: Registry name of the backend (``pt``, ``safetensors``, ``hdf5``, ...).
    name: ClassVar[str] = ""

    def __init__(self, run_dir: str | Path, options: Mapping[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.options = dict(options or {})
        self.manifest: dict[str, Any] = {}
        self._closed = False

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> list[str]:
        """Return one message per problem in ``backend_options`` (empty when valid)."""
        return [f"backend_options.{k}: unknown option for the {cls.name!r} backend" for k in options]

    def open(self, manifest: dict[str, Any]) -> None:
        self.manifest = manifest
        self.manifest["backend"] = self.name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._open()
        self._save_manifest()

    def write(self, record: Record) -> None:
        if self.manifest.get("current_step") != record.call.step:
            self.manifest["current_step"] = record.call.step
            self._save_manifest()
        self._write(record)

    def end_step(self, info: StepInfo) -> None:
        self._end_step(info)
        key = str(info.step)
        self.manifest["calls"][key] = calls_to_json(info.calls)
        self.manifest["call_ends"][key] = calls_to_json(info.call_ends)
        if info.step not in self.manifest["steps"]:
            self.manifest["steps"].append(info.step)
        self.manifest["current_step"] = None
        self._save_manifest()

    def close(self, status: str = "complete", error: str | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._close()
        finally:
            self.manifest["status"] = status
            if error:
                self.manifest["error"] = error
            self._save_manifest()

    def _save_manifest(self) -> None:
        write_json_atomic(self.run_dir / MANIFEST_NAME, self.manifest)

    def _open(self) -> None:
        """Prepare backend files (optional)."""

    @abstractmethod
    def _write(self, record: Record) -> None:
        """Store one record (its structure and its tensor bodies)."""

    @abstractmethod
    def _end_step(self, info: StepInfo) -> None:
        """Finish the step's files; after this they must survive a crash."""

    def _close(self) -> None:
        """Release backend resources (optional)."""


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The run's manifest, None if there is none; CorruptFileError if it is unreadable."""
    path = run_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(path, f"unreadable manifest: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != "ilstore":
        raise CorruptFileError(path, "not an ilstore manifest (no \"format\": \"ilstore\")")
    return data


class StoreReader(ABC):
    """Reads one run directory written by one backend.

    Usage order: construct (cheap), query any number of times, ``close()`` (or use it as a
    context manager). Implementers provide ``can_open``, ``_list_steps``, ``_list_calls``,
    ``_read_structure`` and ``_load``; key listing, metadata lookup and execution order are
    built on those here, so every backend orders and names records the same way. A reader
    must give back each record's structure exactly as it was written (plus, at most, the
    keys it declares in :attr:`locator_keys`).
    """

    name: ClassVar[str] = ""

    #: Keys this reader adds to tensor nodes only to find their bodies (``pt``: ``file``). They
    #: are not part of the backend-neutral metadata: convert drops them before writing a node
    #: into another backend, and comparisons of metadata ignore them.
    locator_keys: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.manifest = read_manifest(self.run_dir)
        self._structures: dict[tuple[CallKey, str], Any] = {}

    @classmethod
    @abstractmethod
    def can_open(cls, run_dir: Path) -> bool:
        """Cheap check (a few stats) whether this backend wrote ``run_dir``."""

    # -- what a backend implements -------------------------------------------------------
    @abstractmethod
    def _list_steps(self) -> list[int]:
        """Steps present on disk (completed or not), ascending."""

    @abstractmethod
    def _list_calls(self, step: int) -> list[CallKey]:
        """Module calls of a step in start order, from the files (used without a manifest)."""

    @abstractmethod
    def _read_structure(self, call: CallKey, kind: str) -> Any | None:
        """The JSON structure of one side of a call, None if that side was not captured."""

    @abstractmethod
    def _load(self, key: TensorKey, node: dict[str, Any]) -> torch.Tensor:
        """Load one stored tensor body, bit-exact, on the CPU."""

    # -- the public reader API ------------------------------------------------------------
    @property
    def status(self) -> str:
        """``complete``, ``running`` (still running or killed), ``failed``, or ``unknown``."""
        return str(self.manifest.get("status", "unknown")) if self.manifest else "unknown"

    def steps(self) -> list[int]:
        """Readable steps, ascending: the completed ones when there is a manifest."""
        if self.manifest is not None:
            done = self.manifest.get("steps", [])
            return sorted(s for s in done if isinstance(s, int))
        return self._list_steps()

    def incomplete_steps(self) -> list[int]:
        """Steps with files on disk that never completed (a run killed mid-step)."""
        done = set(self.steps())
        return [s for s in self._list_steps() if s not in done]

    def calls(self, step: int) -> list[CallKey]:
        """Module calls of ``step`` in start order (parents before their children)."""
        if self.manifest is not None and str(step) in self.manifest.get("calls", {}):
            try:
                return calls_from_json(self.manifest["calls"][str(step)], step, self.manifest.get("rank", 0))
            except ValueError as exc:
                raise CorruptFileError(self.run_dir / MANIFEST_NAME, f"calls of step {step}: {exc}") from None
        return self._list_calls(step)

    def call_ends(self, step: int) -> list[CallKey]:
        """Module calls of ``step`` in the order they finished (children before parents).

        Dumps without a manifest do not record it; it is then derived from the start order
        and the dotted-name nesting (a call ends after the calls of its submodules).
        """
        if self.manifest is not None and str(step) in self.manifest.get("call_ends", {}):
            try:
                return calls_from_json(self.manifest["call_ends"][str(step)], step, self.manifest.get("rank", 0))
            except ValueError as exc:
                raise CorruptFileError(self.run_dir / MANIFEST_NAME, f"call_ends of step {step}: {exc}") from None
        return _ends_from_nesting(self.calls(step))

    def structure(self, call: CallKey, kind: str) -> Any | None:
        """The JSON structure of one captured side of a call (None if not captured)."""
        cache_key = (call, kind)
        if cache_key not in self._structures:
            self._structures[cache_key] = self._read_structure(call, kind)
        return self._structures[cache_key]

    def tensor_nodes(self, call: CallKey, kind: str) -> Iterator[tuple[TensorKey, dict[str, Any]]]:
        for path, node in iter_tensor_nodes(self.structure(call, kind)):
            yield call.tensor(kind, path), node

    def keys(self, step: int | None = None) -> list[TensorKey]:
        """Tensor keys in execution order (calls in start order; inputs, outputs, post-forward)."""
        steps = self.steps() if step is None else [step]
        return [key for s in steps for call in self.calls(s) for kind in KINDS
                for key, _node in self.tensor_nodes(call, kind)]

    def meta(self, key: TensorKey) -> dict[str, Any]:
        """Metadata of one tensor (shape, dtype, device, stats, stored...) without loading it."""
        for k, node in self.tensor_nodes(key.call_key, key.kind):
            if k == key:
                return node
        raise KeyError(f"no tensor {key} in {self.run_dir}")

    def load(self, key: TensorKey) -> torch.Tensor:
        """Load a stored tensor (CPU, bit-exact).

        Raises:
            KeyError: no such key, or its body was not stored (``stored`` is false).
            CorruptFileError: the file is truncated, corrupt or unsafe; names the file.
        """
        node = self.meta(key)
        if node.get("stored") is False:
            raise KeyError(f"{key}: body not stored ({node.get('reason', 'stats only')})")
        same_as = node.get("same_as")
        if same_as is not None and not self.locator_keys & node.keys():
            # de-duplicated: identical to an earlier tensor of the same step
            try:
                original = TensorKey.parse(same_as)
            except ValueError:
                raise CorruptFileError(self.run_dir, f"{key}: bad same_as reference {same_as!r}") from None
            if original.step != key.step or original == key:
                raise CorruptFileError(self.run_dir, f"{key}: same_as must name another tensor of step {key.step}")
            return self.load(original)
        return self._load(key, node)

    def close(self) -> None:
        self._structures.clear()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.run_dir}>"


def _ends_from_nesting(calls: list[CallKey]) -> list[CallKey]:
    """Post-order from pre-order: a call ends once the following calls nested in it ended."""
    ends: list[CallKey] = []
    stack: list[CallKey] = []
    for call in calls:
        while stack and not call.module.startswith(stack[-1].module + "."):
            ends.append(stack.pop())
        stack.append(call)
    ends.extend(reversed(stack))
    return ends


def check_inside(run_dir: Path, path: Path) -> Path:
    """Resolve ``path`` and make sure it stays inside ``run_dir`` (no ``..``, no symlink escape)."""
    root = run_dir.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise UnsafePathError(f"{path}: resolves outside the run directory {run_dir}")
    return resolved

