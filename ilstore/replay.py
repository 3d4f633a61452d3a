"""Replay: feed selected module calls the inputs a reference run recorded (config ``replay_from``).

Before each selected call, :class:`ReplaySource` replaces the call's tensor inputs (positional,
keyword, nested) with the tensors the reference recorded for the same (rank, step, module, call,
path), cast to the live tensor's dtype and device. Everything it cannot replace stays live, and
the reason is kept for the call's metadata; so does each tensor input of the reference the live
call lacks (``UNFED``), since the call was then not fed the reference's inputs either. The
capture then records the outputs as usual, so the difference between a replay run's outputs and
the reference's outputs is the error that call itself introduces (its *local error*; see
``docs/replay.md``).

The per-call metadata is a ``"replay"`` object on the top level of the call's ``outputs``
structure::

    {"replayed": true,            # every tensor input was fed, and every one of the reference
     "replaced": ["0", "hidden_states"],   # input paths fed from the reference ('.'-joined)
     "kept": {"position_ids": "not in the reference"},   # inputs not fed, with the reason
     "reason": null,              # why the call is not (fully) replayed
     "random": false,             # the call drew random numbers (the RNG state moved)
     "container": false}          # another selected call ran inside this one
"""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import IlstoreError, RunNotFoundError, StoreError
from .keys import CallKey, TensorKey
from .records import _item_name, iter_tensor_nodes, kwarg_names, node_at, rebuild_tensor
from .store.base import StoreReader, read_manifest
from .store.registry import find_run

__all__ = ["ReplaySource", "CallReplay", "resolve_reference", "rng_marker"]

_log = logging.getLogger(__name__)
_MAX_DEPTH = 32  # the same nesting limit as records._walk: deeper values are not tensors there
#: The ``kept`` reason of a reference tensor input the live call did not have at its path.
UNFED = "in the reference, absent or not a tensor in the live call"


def resolve_reference(path: str | Path) -> Path:
    """The run ``replay_from`` names: the directory itself, or the one run inside an output_dir.

    Raises:
        RunNotFoundError: no such directory, or neither a run nor a directory holding one.
        StoreError: the directory holds several runs (they are named).
    """
    try:
        return find_run(path)
    except RunNotFoundError as exc:
        raise RunNotFoundError(f"replay_from: {exc}") from None
    except StoreError as exc:
        raise StoreError(f"replay_from: {exc}") from None


def rng_marker(devices: set[torch.device]) -> tuple[Any, ...]:
    """Something that changes when a call draws random numbers on the CPU or those devices."""
    parts: list[Any] = [torch.random.default_generator.get_state()]
    for dev in devices:
        if dev.type == "cuda" and torch.cuda.is_initialized():
            gen = torch.cuda.default_generators[dev.index if dev.index is not None else torch.cuda.current_device()]
            offset = getattr(gen, "get_offset", None)
            parts.append(offset() if offset is not None else gen.get_state())
    return tuple(parts)


def _same_marker(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


@dataclasses.dataclass
class CallReplay:
    """What replay did to one call; :meth:`metadata` is what the call's outputs record carries."""

    replaced: list[str] = dataclasses.field(default_factory=list)
    kept: dict[str, str] = dataclasses.field(default_factory=dict)
    reason: str | None = None
    random: bool = False
    container: bool = False
    marker: tuple[Any, ...] | None = None  # RNG marker taken before the call ran

    @property
    def replayed(self) -> bool:
        return self.reason is None and bool(self.replaced) and not self.kept

    def finish(self, devices: set[torch.device]) -> None:
        """After the call: note whether it drew random numbers."""
        if self.marker is not None:
            self.random = not _same_marker(self.marker, rng_marker(devices))
            self.marker = None

    def metadata(self) -> dict[str, Any]:
        reason = self.reason
        if reason is None and self.kept:
            reason = "; ".join(f"input {p or '(whole)'} kept live: {why}" for p, why in self.kept.items())
        elif reason is None and not self.replaced:
            reason = "the call has no tensor inputs"
        if self.random:
            note = "the call drew random numbers (e.g. dropout in training mode); its local error includes them"
            reason = note if reason is None else f"{reason}; {note}"
        return {"replayed": self.replayed, "replaced": list(self.replaced), "kept": dict(self.kept),
                "reason": reason, "random": self.random, "container": self.container}


def _why_no_body(node: Mapping[str, Any]) -> str:
    why = str(node.get("reason") or "")
    if "mode=stats" in why:
        return "the reference kept only statistics (mode=stats)"
    if "max_tensor_size" in why:
        return f"the reference skipped the body ({why})"
    return f"the reference stored no body ({why or 'not stored'})"


class ReplaySource:
    """The reference run, read call by call for a capture with ``replay_from``.

    Args:
        run_dir: the reference run (any backend, single or multi-rank).
        reader: an open reader of it (the registry's ``open_run``), owned from now on.
    """

    def __init__(self, run_dir: Path, reader: StoreReader) -> None:
        self.run_dir = run_dir
        self.reader = reader
        manifest = read_manifest(run_dir) or {}
        config = manifest.get("config")
        run_id = config.get("run_id") if isinstance(config, dict) else None
        self.run_id = str(run_id or manifest.get("run_id") or run_dir.name)
        self._steps = set(reader.steps())
        self._calls: dict[tuple[int, int], set[tuple[str, int]]] = {}  # (rank, step) -> calls
        # Within a step: (reference body, dtype, device, fed with autograd) -> the tensor fed from
        # it and its version when fed, so calls the reference fed the same tensor get the same
        # object again while it is alive and unmodified (one read, and capture's de-duplication
        # sees one tensor, as in the reference). One modified in place is never fed again.
        self._fed: dict[tuple[TensorKey, torch.dtype, torch.device, bool], tuple[weakref.ref[torch.Tensor], int]] = {}
        # id(fed tensor) -> (weak reference, its version when fed, the reference's statistics):
        # the statistics hold while the version is unchanged (the bits are still the reference's)
        self._stats: dict[int, tuple[weakref.ref[torch.Tensor], int, dict[str, Any]]] = {}

    def end_step(self) -> None:
        """Forget the step's fed tensors and call lists (a long replay keeps memory flat)."""
        self._fed.clear()
        self._stats.clear()
        self._calls.clear()

    def known_stats(self, t: torch.Tensor) -> dict[str, Any] | None:
        """The reference's statistics of ``t`` if ``t`` was fed from the reference and is unchanged.

        Unchanged means ``t``'s version counter is the one it had when it was fed: a module that
        modified it in place (``ReLU(inplace=True)``) makes its outputs, its post-forward inputs
        and every later call computing their own statistics. An inference-mode tensor has no
        version counter, so nothing is known of it.
        """
        hit = self._stats.get(id(t))
        if hit is None or hit[0]() is not t or _version(t) != hit[1]:
            return None
        return hit[2]

    def load_fed(self, key: TensorKey, node: Mapping[str, Any], live: torch.Tensor) -> torch.Tensor:
        """The reference tensor at ``key`` as ``live``'s dtype and device (a tensor of its own).

        When ``live`` requires grad, so does the tensor fed, and it is made by an autograd
        operation (not a leaf), so the module may still modify it in place, as it may modify
        ``live``; the model's backward reaches no further back than the fed tensor.
        """
        source = _resolve_same_as(key, node)
        grad = live.requires_grad and _differentiable(live.dtype)
        cache_key = (source, live.dtype, live.device, grad)
        hit = self._fed.get(cache_key)
        if hit is not None:
            fed = hit[0]()
            if fed is not None and _version(fed) == hit[1]:
                return fed
        ref = self.reader.load(key)
        fed = _fed_copy(ref, live, grad)
        version = _version(fed)
        try:
            ref_weak = weakref.ref(fed)
        except TypeError:
            return fed
        if version is None:  # an inference-mode tensor: its changes cannot be seen, so it is fed once
            return fed
        self._fed[cache_key] = (ref_weak, version)
        stats = node.get("stats")
        if ref.dtype == fed.dtype and isinstance(stats, dict) and stats:
            self._stats[id(fed)] = (ref_weak, version, stats)
        return fed

    def describe(self) -> dict[str, str]:
        """What the replay run's manifest records as ``replayed_from``: the reference's absolute path
        (what the comparer checks while it is there) and its run id."""
        return {"path": os.path.abspath(self.run_dir), "run_id": self.run_id}

    def _has_call(self, call: CallKey) -> bool:
        key = (call.rank, call.step)
        calls = self._calls.get(key)
        if calls is None:
            calls = self._calls[key] = {(c.module, c.call) for c in self.reader.calls(call.step) if c.rank == call.rank}
        return (call.module, call.call) in calls

    def feed(self, call: CallKey, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[
            tuple[Any, ...], dict[str, Any], CallReplay]:
        """The call's arguments with every replaceable tensor taken from the reference.

        Returns the new ``(args, kwargs)`` (the same objects when nothing was replaced) and what
        was done. Never raises for a mismatch: each one becomes a reason.
        """
        info = CallReplay()
        if call.step not in self._steps:
            info.reason = f"step {call.step} is not in the reference (stepping mismatch)"
            return args, kwargs, info
        if not self._has_call(call):
            info.reason = (f"call {call.call} of {call.module} is not in the reference's step {call.step} "
                           "(stepping mismatch)")
            return args, kwargs, info
        try:
            structure = self.reader.structure(call, "inputs")
        except IlstoreError as exc:
            info.reason = f"the reference's inputs cannot be read: {exc}"
            return args, kwargs, info
        if structure is None:
            info.reason = "the reference recorded no inputs for this call"
            return args, kwargs, info
        nodes = {path: node for path, node in iter_tensor_nodes(structure)}
        swap = _Swap(self, call, nodes, info, structure)
        new_args = swap.walk(args, (), 0)
        if kwargs and not isinstance(structure.get("kwargs") if isinstance(structure, dict) else None, dict):
            swap.missing = "keyword input not in the reference (it recorded no keyword inputs)"
        names = kwarg_names(kwargs, len(args))
        if names is None:
            new_kwargs = {k: swap.walk(v, (k,), 1) for k, v in kwargs.items()}
        else:  # recorded under other names (records.build_record)
            new_kwargs = {k: swap.walk(v, (name,), 1) for name, (k, v) in zip(names, kwargs.items(), strict=True)}
        swap.unfed()
        if not swap.changed:
            return args, kwargs, info
        return new_args, new_kwargs, info

    def close(self) -> None:
        self.reader.close()


class _Swap:
    """One call's walk over its live arguments, replacing tensors by the reference's."""

    def __init__(self, source: ReplaySource, call: CallKey, nodes: dict[tuple[str, ...], Any],
                 info: CallReplay, structure: Any) -> None:
        self.source, self.call, self.nodes, self.info, self.structure = source, call, nodes, info, structure
        self.changed = False
        self.missing = "not in the reference"  # the reason for a live tensor the reference lacks
        self.seen: set[tuple[str, ...]] = set()  # the paths of the live tensors

    def unfed(self) -> None:
        """After the walk: each reference tensor at no live tensor's path is an input the call was
        not fed (the live call passed ``None``, a plain value or nothing there), so the call is
        not replayed: it is kept, under the reference's path. The parts of a sparse or quantized
        reference tensor are its path's."""
        for path in self.nodes:
            if not any(path[:n] in self.seen for n in range(len(path) + 1)):
                self.info.kept.setdefault(".".join(path), UNFED)

    def tensor(self, live: torch.Tensor, path: tuple[str, ...]) -> torch.Tensor:
        self.seen.add(path)
        name = ".".join(path)
        node = self.nodes.get(path)
        if node is None:
            encoded = self._encoded(path)
            if encoded is not None:  # a sparse or quantized tensor, stored as its parts
                return self.rebuilt(live, path, encoded)
            self.info.kept[name] = self.missing
            return live
        if not node.get("stored", True) or node.get("type") != "tensor":
            self.info.kept[name] = _why_no_body(node)
            return live
        ref_shape = [int(d) for d in node.get("shape", [])]
        if ref_shape != list(live.shape):
            self.info.kept[name] = f"shape differs: live {list(live.shape)}, reference {ref_shape}"
            return live
        key = TensorKey(self.call.step, self.call.module, self.call.call, "inputs", path, self.call.rank)
        try:
            fed = self.source.load_fed(key, node, live)
        except (IlstoreError, OSError, RuntimeError, KeyError) as exc:
            self.info.kept[name] = f"the reference body cannot be read: {exc}"
            return live
        if list(fed.shape) != list(live.shape):
            self.info.kept[name] = f"shape differs: live {list(live.shape)}, reference {list(fed.shape)}"
            return live
        self.info.replaced.append(name)
        self.changed = True
        return fed

    def _encoded(self, path: tuple[str, ...]) -> dict[str, Any] | None:
        try:
            node = node_at(self.structure, path)
        except KeyError:
            return None
        return node if isinstance(node, dict) and node.get("encoding") else None

    def rebuilt(self, live: torch.Tensor, path: tuple[str, ...], node: dict[str, Any]) -> torch.Tensor:
        """A sparse or quantized reference tensor, rebuilt from its parts, on the live device."""
        name = ".".join(path)
        ref_shape = node.get("shape")
        if ref_shape is not None and [int(d) for d in ref_shape] != list(live.shape):
            self.info.kept[name] = f"shape differs: live {list(live.shape)}, reference {list(ref_shape)}"
            return live
        call, reader = self.call, self.source.reader
        try:
            ref = rebuild_tensor(node, lambda p: reader.load(call.tensor("inputs", p)), path)
            fed = ref.to(device=live.device) if ref.is_quantized else ref.to(device=live.device, dtype=live.dtype)
            if fed is ref:
                fed = ref.clone()
        except KeyError as exc:
            self.info.kept[name] = _why_no_body({"reason": str(exc)})
            return live
        except (IlstoreError, OSError, RuntimeError) as exc:
            self.info.kept[name] = f"the reference body cannot be read: {exc}"
            return live
        if fed.layout != live.layout or fed.dtype != live.dtype:
            self.info.kept[name] = (f"layout or dtype differs: live {live.layout} {live.dtype}, "
                                    f"reference {fed.layout} {fed.dtype}")
            return live
        self.info.replaced.append(name)
        self.changed = True
        return fed

    def walk(self, value: Any, path: tuple[str, ...], depth: int) -> Any:
        """Mirror of records._walk: the same paths, the same containers, rebuilt only when changed."""
        if isinstance(value, torch.Tensor):
            return self.tensor(value, path)
        if depth >= _MAX_DEPTH:
            return value
        if isinstance(value, Mapping):
            try:  # asked first, as records._members does: one that cannot tell was recorded as a value
                pairs = [(str(k), k, v) for k, v in value.items()]
            except Exception:  # noqa: BLE001 - (no tensor of it in the reference: nothing to feed)
                return value
            names: dict[str, None] = {}
            items = {}
            for key, original, v in pairs:  # named as records._walk names them (colliding keys: "1~2")
                name = _item_name(key, names)
                names[name] = None
                items[original] = self.walk(v, path + (name,), depth + 1)
            if all(items[original] is v for _, original, v in pairs):
                return value
            return _rebuild_mapping(value, items)
        if isinstance(value, (tuple, list)):
            seq = [self.walk(v, path + (str(i),), depth + 1) for i, v in enumerate(value)]
            if all(a is b for a, b in zip(seq, value, strict=True)):
                return value
            if isinstance(value, list):
                return type(value)(seq) if type(value) is not list else seq
            make = getattr(type(value), "_make", None)  # namedtuple
            return make(seq) if make is not None else type(value)(seq)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            try:
                fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            except Exception:  # noqa: BLE001 - a field never set: recorded as a value, nothing to feed
                return value
            new = {k: self.walk(v, path + (k,), depth + 1) for k, v in fields.items()}
            changed = {k: v for k, v in new.items() if v is not fields[k]}
            if not changed:
                return value
            copy = dataclasses.replace(value) if all(f.init for f in dataclasses.fields(value)) else value
            if copy is value:
                copy = type(value).__new__(type(value))
                copy.__dict__.update(value.__dict__)
            for k, v in changed.items():
                object.__setattr__(copy, k, v)
            return copy
        return value


def _resolve_same_as(key: TensorKey, node: Mapping[str, Any]) -> TensorKey:
    same_as = node.get("same_as")
    if isinstance(same_as, str):
        try:
            return TensorKey.parse(same_as)
        except ValueError:
            return key
    return key


def _differentiable(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _fed_copy(ref: torch.Tensor, live: torch.Tensor, grad: bool) -> torch.Tensor:
    """``ref`` copied to ``live``'s device and dtype (never a read-only mmap); with ``grad``, a
    tensor that requires grad and has autograd history (an in-place change of it is legal, where
    one of a leaf that requires grad raises), whatever the grad mode of the caller."""
    if grad and _differentiable(ref.dtype):
        with torch.enable_grad():  # the copy is the autograd operation: no second copy
            return ref.detach().requires_grad_(True).to(device=live.device, dtype=live.dtype, copy=True)
    with torch.no_grad():
        fed = ref.to(device=live.device, dtype=live.dtype, copy=True)
    if grad:  # e.g. an integer reference fed to a floating-point input
        with torch.enable_grad():
            fed = fed.requires_grad_(True).clone()
    return fed


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # an inference-mode tensor tracks no version: never reused
        return None


def _rebuild_mapping(value: Mapping[Any, Any], items: dict[Any, Any]) -> Any:
    if type(value) is dict:
        return items
    try:
        copy = value.copy()  # type: ignore[attr-defined]
        for k, v in items.items():
            copy[k] = v
        return copy
    except Exception:  # an exotic mapping: a plain dict keeps the values the module reads
        _log.debug("ilstore replay: rebuilding %s as a dict", type(value).__name__)
        return dict(items)


def open_reference(path: str | Path, open_run: Any) -> ReplaySource:
    """Resolve ``replay_from`` and open it (``open_run`` is the registry's opener)."""
    run_dir = resolve_reference(path)
    try:
        reader = open_run(run_dir)
    except IlstoreError:
        raise
    except OSError as exc:
        raise StoreError(f"replay_from: {run_dir}: cannot open the run: {exc}") from None
    return ReplaySource(run_dir, reader)
