"""Backend registry: names → (writer, reader) classes, every backend resolved the same way.

A backend is declared by an object with ``writer`` and ``reader`` attributes — a module or a
class — named by a dotted path (``"package.module"`` or ``"package.module:attribute"``).
Built-ins are such paths in :data:`BUILTIN_BACKENDS` (each backend module sets ``writer`` and
``reader``), imported on first use, so ``import ilstore`` never imports h5py; third-party
backends come from the entry-point group ``ilstore.backends``, whose values are the same kind
of path, listed once, on the first lookup that needs them. A plug-in that fails to load is
skipped with a warning. The registered name lives in the :class:`Backend` record only: the
classes are never changed; readers opened here carry the name, and writers get it through the
manifest (:func:`~ilstore.manifest.new_manifest`).
"""

from __future__ import annotations

import difflib
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..errors import AmbiguousRunError, BackendError, RunNotFoundError, StoreError
from ..manifest import MANIFEST_NAME

if TYPE_CHECKING:
    from .base import StoreReader, StoreWriter

__all__ = ["Backend", "ENTRY_POINT_GROUP", "BUILTIN_BACKENDS", "get_backend", "backend_names", "register_backend",
           "detect_backend", "open_run", "find_run", "find_run_early"]

ENTRY_POINT_GROUP = "ilstore.backends"

#: name → (dotted path of the object with ``writer`` and ``reader``, install hint).
BUILTIN_BACKENDS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "pt": ("ilstore.store.pt", "pip install torch"),
    "safetensors": ("ilstore.store.safetensors", "pip install safetensors"),
    "hdf5": ("ilstore.store.hdf5", "pip install h5py"),
})


@dataclass(frozen=True)
class Backend:
    """A registered backend: its name and its writer and reader classes."""

    name: str
    writer: type[StoreWriter]
    reader: type[StoreReader]

    def open_reader(self, run_dir: str | Path) -> StoreReader:
        """A reader of ``run_dir`` that carries this backend's registered name."""
        reader = self.reader(run_dir)
        reader.name = self.name
        return reader


_loaded: dict[str, Backend] = {}
_plugins: dict[str, Any] | None = None


def _entry_points() -> dict[str, Any]:
    global _plugins
    if _plugins is None:
        _plugins = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return _plugins


def _available() -> list[str]:
    return sorted({*BUILTIN_BACKENDS, *_loaded, *_entry_points()})


def _resolve(name: str, path: str) -> Backend:
    """Import ``path`` (``"module[:attribute]"``, as an entry point's value) and take its
    ``writer`` and ``reader``: the one way built-ins and plug-ins are loaded."""
    obj = metadata.EntryPoint(name, path, ENTRY_POINT_GROUP).load()
    return Backend(name, obj.writer, obj.reader)


def backend_names() -> Mapping[str, str]:
    """Read-only view: every known backend name → where it comes from."""
    out = {n: "built-in" for n in BUILTIN_BACKENDS}
    out.update({n: "plug-in" for n in _entry_points() if n not in BUILTIN_BACKENDS})
    out.update({n: "registered" for n in _loaded if n not in out})
    return MappingProxyType(out)


def register_backend(name: str, writer: type[StoreWriter], reader: type[StoreReader], *,
                     override: bool = False) -> Backend:
    """Register a backend under ``name``; a clash with an existing name is an error unless ``override``.

    The classes are not modified: readers opened through the registry carry ``name``, and a
    run's manifest records it (``new_manifest(backend.name, ...)``).
    """
    if not override and (name in _loaded or name in BUILTIN_BACKENDS or name in _entry_points()):
        raise BackendError(f"a backend named {name!r} is already registered; pass override=True to replace it")
    backend = _loaded[name] = Backend(name, writer, reader)
    return backend


def get_backend(name: str) -> Backend:
    """Look a backend up by name.

    Raises:
        BackendError: unknown name (with "did you mean" and the installed names), or a
            backend that fails to import (with an install hint).
    """
    if name in _loaded:
        return _loaded[name]
    if name in BUILTIN_BACKENDS:
        path, hint = BUILTIN_BACKENDS[name]
        try:
            backend = _resolve(name, path)
        except ImportError as exc:
            raise BackendError(f"backend {name!r} needs a missing package ({exc.name}): {hint}") from None
    elif name in _entry_points():
        ep = _entry_points()[name]
        try:
            backend = _resolve(name, ep.value)
        except Exception as exc:  # a broken plug-in must not break ilstore
            warnings.warn(f"ilstore backend plug-in {name!r} ({ep.value}) failed to load: {exc}", stacklevel=2)
            raise BackendError(f"backend plug-in {name!r} ({ep.value}) failed to load: {exc}") from None
    else:
        names = _available()
        close = difflib.get_close_matches(name, names, n=1)
        did = f"did you mean {close[0]!r}? " if close else ""
        raise BackendError(f"unknown backend {name!r}; {did}installed backends: {', '.join(names)}")
    _loaded[name] = backend
    return backend


def detect_backend(run_dir: Path) -> Backend:
    """Which backend wrote ``run_dir``: the manifest says, else each reader's ``can_open``."""
    from .base import read_manifest

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
    raise _unreadable(run_dir)


def _unreadable(run_dir: Path) -> RunNotFoundError:
    """The error of a directory no backend reads as a run."""
    return RunNotFoundError(f"{run_dir}: not a run directory any backend can read "
                            f"(no {MANIFEST_NAME}, no step_<N> data; tried {', '.join(_available())})")


def open_run(path: str | Path) -> StoreReader:
    """Open a run directory written by any backend, single- or multi-rank, and return its reader.

    Example:
        >>> with open_run("/tmp/vllm_intermediates/my-run") as run:  # doctest: +SKIP
        ...     print(run.steps(), run.keys(0)[:3])
    """
    run_dir = Path(path)
    if not run_dir.exists():  # answered before torch is imported (with the multi-rank reader)
        raise RunNotFoundError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise RunNotFoundError(f"{run_dir}: not a directory")
    if _empty(run_dir):  # no backend reads it: answered before the backends (and torch) are imported
        raise _unreadable(run_dir)
    from .ranks import RankedReader

    try:
        if RankedReader.can_open(run_dir):
            return RankedReader(run_dir, open_run)
        return detect_backend(run_dir).open_reader(run_dir)
    except StoreError:
        raise
    except OSError as exc:
        raise StoreError(f"{run_dir}: cannot open run: {exc}") from None


_log = logging.getLogger(__name__)


def _is_run(path: Path) -> bool:
    if (path / MANIFEST_NAME).is_file():
        return True
    try:
        detect_backend(path)
    except RunNotFoundError:
        return False
    return True


def _empty(path: Path) -> bool:
    """``path`` (a directory) holds nothing; False when it cannot be listed (the reader says why)."""
    try:
        with os.scandir(path) as it:
            return next(it, None) is None
    except OSError:
        return False


def find_run_early(path: str | Path) -> None:
    """Raise what :func:`find_run` would for ``path`` where that is known without the backends
    (importing them imports torch): a missing path or a file, an empty directory, and a directory
    without a manifest whose subdirectories are all runs with one, two or more of them. Otherwise
    return: :func:`find_run` decides.

    Raises:
        RunNotFoundError: ``path`` is missing, not a directory, or empty.
        AmbiguousRunError: ``path`` holds several runs, each with its manifest, and nothing else.
    """
    p = Path(path)
    if not p.exists():
        raise RunNotFoundError(f"{p}: no such run directory")
    if not p.is_dir():
        raise RunNotFoundError(f"{p}: not a directory")
    if (p / MANIFEST_NAME).is_file():
        return
    try:
        entries = [e for e in p.iterdir() if not e.name.startswith(".")]
    except OSError:
        return  # find_run says why
    if not entries:
        raise _no_run(p)
    if any(not e.is_dir() or e.name.startswith(("step_", "rank_")) for e in entries):
        return
    runs = sorted(e for e in entries if (e / MANIFEST_NAME).is_file())
    if len(runs) > 1 and len(runs) == len(entries):
        raise AmbiguousRunError(p, [str(r) for r in runs])


def find_run(path: str | Path) -> Path:
    """The run directory ``path`` stands for: itself, or the one run inside an ``output_dir``.

    Raises:
        RunNotFoundError: ``path`` is missing, not a directory, or neither a run nor a
            directory holding one.
        AmbiguousRunError: ``path`` holds several runs (they are listed).
    """
    p = Path(path)
    find_run_early(p)
    if _is_run(p):
        return p
    try:
        children = sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
    except OSError as exc:
        raise RunNotFoundError(f"{p}: cannot list the directory: {exc.strerror}") from None
    runs = [c for c in children if _is_run(c)]
    if len(runs) == 1:
        _log.info("%s holds one run; using %s", p, runs[0])
        return runs[0]
    if runs:
        raise AmbiguousRunError(p, [str(r) for r in runs])
    raise _no_run(p)


def _no_run(p: Path) -> RunNotFoundError:
    """The error of a directory that is neither a run nor holds one."""
    return RunNotFoundError(f"{p}: not a run directory (no {MANIFEST_NAME}, no step_<N> data) and no run inside it")
