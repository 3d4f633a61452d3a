"""Backend registry: names → (writer, reader) classes, built-ins imported lazily.

Built-ins are dotted paths imported on first use (so ``import ilstore`` never imports h5py);
third-party backends come from the entry-point group ``ilstore.backends``, loaded once, on the
first lookup that needs them; a plug-in that fails to load is skipped with a warning. An entry
point must resolve to an object with ``writer`` and ``reader`` attributes (a module or class).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import BackendError, RunNotFoundError, StoreError
from .base import StoreReader, StoreWriter, read_manifest

__all__ = ["Backend", "ENTRY_POINT_GROUP", "get_backend", "backend_names", "register_backend", "detect_backend", "open_run"]

ENTRY_POINT_GROUP = "ilstore.backends"
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    """A registered backend: its name and its writer and reader classes."""

    name: str
    writer: type[StoreWriter]
    reader: type[StoreReader]


# name -> "module:attribute prefix" (module defines <Prefix>Writer and <Prefix>Reader), install hint
_BUILTIN: dict[str, tuple[str, str, str]] = {
    "pt": ("ilstore.store.pt", "Pt", "pip install torch"),
    "safetensors": ("ilstore.store.safetensors", "Safetensors", "pip install safetensors"),
    "hdf5": ("ilstore.store.hdf5", "Hdf5", "pip install h5py"),
}
_loaded: dict[str, Backend] = {}
_plugins: dict[str, Any] | None = None


def _entry_points() -> dict[str, Any]:
    global _plugins
    if _plugins is None:
        _plugins = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return _plugins


def _available() -> list[str]:
    return sorted({*_BUILTIN, *_loaded, *_entry_points()})


def backend_names() -> Mapping[str, str]:
    """Read-only view: every known backend name → where it comes from."""
    out = {n: "built-in" for n in _BUILTIN}
    out.update({n: "plug-in" for n in _entry_points() if n not in _BUILTIN})
    out.update({n: "registered" for n in _loaded if n not in out})
    return MappingProxyType(out)


def register_backend(name: str, writer: type[StoreWriter], reader: type[StoreReader], *, override: bool = False) -> Backend:
    """Register a backend under ``name``; a clash with an existing name is an error unless ``override``."""
    if not override and (name in _loaded or name in _BUILTIN or name in _entry_points()):
        raise BackendError(f"a backend named {name!r} is already registered; pass override=True to replace it")
    backend = Backend(name, writer, reader)
    writer.name = reader.name = name
    _loaded[name] = backend
    return backend


def get_backend(name: str) -> Backend:
    """Look a backend up by name.

    Raises:
        BackendError: unknown name (with "did you mean" and the installed names), or a
            backend that fails to import (with an install hint).
    """
    if name in _loaded:
        return _loaded[name]
    if name in _BUILTIN:
        module_name, prefix, hint = _BUILTIN[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise BackendError(f"backend {name!r} needs a missing package ({exc.name}): {hint}") from None
        backend = Backend(name, getattr(module, f"{prefix}Writer"), getattr(module, f"{prefix}Reader"))
    elif name in _entry_points():
        ep = _entry_points()[name]
        try:
            obj = ep.load()
            backend = Backend(name, obj.writer, obj.reader)
        except Exception as exc:  # a broken plug-in must not break ilstore
            warnings.warn(f"ilstore backend plug-in {name!r} ({ep.value}) failed to load: {exc}", stacklevel=2)
            raise BackendError(f"backend plug-in {name!r} ({ep.value}) failed to load: {exc}") from None
        backend.writer.name = backend.reader.name = name
    else:
        names = _available()
        hint = difflib.get_close_matches(name, names, n=1)
        did = f"did you mean {hint[0]!r}? " if hint else ""
        raise BackendError(f"unknown backend {name!r}; {did}installed backends: {', '.join(names)}")
    _loaded[name] = backend
    return backend


def detect_backend(run_dir: Path) -> Backend:
    """Which backend wrote ``run_dir``: the manifest says, else each reader's ``can_open``."""
    manifest = read_manifest(run_dir)
    if manifest is not None and isinstance(manifest.get("backend"), str):
        return get_backend(manifest["backend"])
    for name in _available():
        try:
            backend = get_backend(name)
        except BackendError:
            continue
        if backend.reader.can_open(run_dir):
            return backend
    raise RunNotFoundError(f"{run_dir}: not a run directory any backend can read "
                           f"(no {'ilstore.json'}, no step_<N> data; tried {', '.join(_available())})")


def open_run(path: str | Path) -> StoreReader:
    """Open a run directory written by any backend and return its reader.

    Example:
        >>> with open_run("/tmp/vllm_intermediates/my-run") as run:  # doctest: +SKIP
        ...     print(run.steps(), run.keys(0)[:3])
    """
    run_dir = Path(path)
    if not run_dir.exists():
        raise RunNotFoundError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise RunNotFoundError(f"{run_dir}: not a directory")
    from .ranks import RankedReader, is_ranked

    try:
        if is_ranked(read_manifest(run_dir)):
            return RankedReader(run_dir)
        return detect_backend(run_dir).reader(run_dir)
    except StoreError:
        raise
    except OSError as exc:
        raise StoreError(f"{run_dir}: cannot open run: {exc}") from None
