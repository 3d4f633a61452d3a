"""Rewrite a run in another backend, bit-exactly (SPEC §4.6).

Built only on the reader/writer interfaces: the source is opened with
:func:`~ilstore.store.registry.open_run` (any backend, with or without a manifest, single- or
multi-rank); each run it is made of (:meth:`StoreReader.parts`: the run itself, or one per
rank, kept in the same layout) is converted on its own, and every step is replayed into the
target backend's writer record by record, in the order capture wrote them (a call's inputs
when it starts, its outputs when it ends), so de-duplicated tensors (``same_as``) always
follow the tensor they point to. Structures, statistics, call order, call-end order and the
config are kept; only the keys the source reader uses to locate bodies
(:attr:`StoreReader.locator_keys`) are dropped. The target is always written in the current
format (2: its writer keeps its own step journal), also when the source is a format-1 run of
ilstore 0.1 or a dump without a manifest.

The target is built in a temporary directory beside ``dst`` and renamed into place at the
end, so a failed conversion leaves no half-written run and an existing ``dst`` (replaced only
with ``overwrite=True``) stays intact until the new run is complete. The source is only read.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import BackendError, StoreError
from .keys import CallKey
from .manifest import MANIFEST_NAME, new_manifest, process_umask, write_json_atomic
from .records import Record, iter_tensor_nodes, tensor_stats
from .store.base import StepInfo, StoreReader, read_manifest
from .store.registry import Backend, detect_backend, get_backend, open_run

__all__ = ["convert", "replay_order"]

_log = logging.getLogger(__name__)

# Manifest keys that describe the writing of a run, not the capture: the target sets its own
# (its writer keeps its own step journal; the steps and call orders of format 1 are not copied either).
_RUN_STATE = frozenset({"format", "format_version", "backend", "ilstore_version", "status", "journal", "error",
                        "converted_from", "steps", "current_step", "calls", "call_ends"})
_STATUSES = ("complete", "failed", "running")


def convert(src: str | Path, dst: str | Path, to: str = "pt", steps: list[int] | None = None,
            overwrite: bool = False, progress: bool | None = None,
            options: Mapping[str, Any] | None = None, unshard: bool = False) -> Path:
    """Convert the run ``src`` into a new run ``dst`` written by backend ``to``.

    Args:
        src: a run directory in any backend (also dumps without a manifest).
        dst: the new run directory; must not exist unless ``overwrite``.
        to: the target backend's registered name (``pt``, ``safetensors``, ``hdf5``, a plug-in).
        steps: only these steps (each must be a completed step of ``src``); None for all.
        overwrite: replace an existing ``dst`` that is an ilstore run (or an empty directory).
        progress: show a progress bar on stderr; None shows one when stderr is a terminal.
        options: the target backend's ``backend_options``.
        unshard: write the logical single-rank run that a multi-rank ``src`` stands for: every
            tensor assembled from the ranks by its recorded layout (:mod:`ilstore.unshard`),
            with statistics computed from the assembled tensor; replicas must agree.

    Returns:
        The path of the new run.

    Raises:
        BackendError: unknown backend or invalid options.
        StoreError: ``dst`` exists, is ``src`` or lies inside it; a requested step is missing;
            the source is unreadable (:class:`~ilstore.errors.CorruptFileError` names the file);
            with ``unshard``, replicas that disagree (:class:`~ilstore.unshard.ReplicaMismatchError`).

    Example:
        >>> convert("runs/fp32", "runs/fp32-h5", to="hdf5")  # doctest: +SKIP
        PosixPath('runs/fp32-h5')
    """
    src, dst = Path(src), Path(dst)
    backend = get_backend(to)
    options = dict(options or {})
    problems = backend.writer.validate_options(options)
    if problems:
        raise BackendError("invalid backend options for {!r}: {}".format(to, "; ".join(problems)))
    _check_paths(src, dst, overwrite)
    with _open_source(src, unshard) as reader:
        wanted = _wanted_steps(reader, src, steps)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
        os.chmod(tmp, 0o777 & ~process_umask())  # the run's directory, once renamed: as mkdir makes one
        unassembled: list[tuple[str, str]] = []
        try:
            bar = _progress_bar(reader, wanted, progress)
            try:
                _convert_reader(reader, tmp, backend, wanted, options, src, bar, unassembled)
            finally:
                bar.close()
            _move_into_place(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _log.info("converted %s (%s) into %s (%s)", src, reader.name, dst, backend.name)
    if unassembled:
        _warn_unassembled(dst, unassembled)
    return dst


def _warn_unassembled(dst: Path, unassembled: list[tuple[str, str]], shown: int = 5) -> None:
    """One warning for the tensors the logical view could not assemble (written as not stored)."""
    listed = "; ".join(f"{name}: {why}" for name, why in unassembled[:shown])
    more = f"; and {len(unassembled) - shown} more" if len(unassembled) > shown else ""
    _log.warning("%s: %d tensor(s) could not be assembled from the ranks and are written as not stored, without a "
                 "shape (a comparison with this run fails on them): %s%s", dst, len(unassembled), listed, more)


def _open_source(src: Path, unshard: bool) -> StoreReader:
    if not unshard:
        return open_run(src)
    from .unshard import open_logical

    return open_logical(src)


def _is_inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    src_r, dst_r = src.resolve(), dst.resolve()
    if _is_inside(dst_r, src_r):
        raise StoreError(f"{dst}: the destination must not be the source run {src} or lie inside it")
    if not (dst.exists() or dst.is_symlink()):
        return
    if not overwrite:
        raise StoreError(f"{dst}: already exists; choose another destination or pass --overwrite "
                         "(overwrite=True) to replace it")
    if _is_inside(src_r, dst_r):
        raise StoreError(f"{dst}: replacing it would delete the source run {src}, which lies inside it")
    if dst.is_symlink() or not dst.is_dir():
        raise StoreError(f"{dst}: exists and is not a directory; refusing to replace it")
    if any(dst.iterdir()) and not _looks_like_run(dst):
        raise StoreError(f"{dst}: exists and is not an ilstore run; refusing to delete it (remove it yourself "
                         "or choose another destination)")


def _looks_like_run(path: Path) -> bool:
    try:
        if read_manifest(path) is not None:
            return True
        detect_backend(path)
        return True
    except StoreError:
        return False


def _move_into_place(tmp: Path, dst: Path) -> None:
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
        os.replace(dst, old / "run")
    try:
        os.replace(tmp, dst)
    except BaseException:
        if old is not None:
            os.replace(old / "run", dst)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old)


def _wanted_steps(reader: StoreReader, src: Path, steps: list[int] | None) -> list[int]:
    available = reader.steps()
    if steps is None:
        return available
    missing = [s for s in steps if s not in available]
    if missing:
        raise StoreError(f"{src}: no completed step {', '.join(map(str, missing))} (steps: "
                         f"{', '.join(map(str, available)) or 'none'})")
    return sorted(set(steps))


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(reader: StoreReader, steps: list[int], progress: bool | None) -> Any:
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    total = sum(1 for s in steps for c in reader.calls(s) for k in ("inputs", "outputs", "post_fwd_inputs")
                if _structure_or_none(reader, c, k) is not None)
    return tqdm(total=total, unit="record", desc="convert", file=sys.stderr, leave=False)


def _structure_or_none(reader: StoreReader, call: CallKey, kind: str) -> Any:
    try:
        return reader.structure(call, kind)
    except KeyError:
        return None


def _convert_reader(reader: StoreReader, out_dir: Path, backend: Backend, steps: list[int],
                    options: Mapping[str, Any], src: Path, bar: Any, unassembled: list[tuple[str, str]]) -> None:
    """Convert each part of the run (itself, or one per rank), then the layout's own manifest;
    ``unassembled`` collects the tensors a logical view could not assemble (name, reason)."""
    for rel, part in reader.parts():
        done = set(part.steps())
        _convert_part(part, out_dir / rel, backend, [s for s in steps if s in done], options, src / rel, bar,
                      unassembled)
    top = reader.layout_manifest(backend.name)
    if top is not None:
        write_json_atomic(out_dir / MANIFEST_NAME, top)


def _convert_part(reader: StoreReader, out_dir: Path, backend: Backend, steps: list[int],
                  options: Mapping[str, Any], src: Path, bar: Any, unassembled: list[tuple[str, str]]) -> None:
    source = reader.manifest or {}
    manifest = new_manifest(backend.name, dict(source.get("config", {})))
    manifest.update({k: v for k, v in source.items() if k not in _RUN_STATE})
    manifest["converted_from"] = {"path": str(src), "backend": reader.name}
    status = str(source["status"]) if source.get("status") in _STATUSES else "complete"
    writer = backend.writer(out_dir, options)
    writer.open(manifest)
    try:
        for step in steps:
            for record in _step_records(reader, step, unassembled):
                writer.write(record)
                bar.update(1)
            writer.end_step(StepInfo(step, reader.calls(step), reader.call_ends(step)))
    except BaseException as exc:
        try:
            writer.close("failed", f"conversion failed: {exc}")
        except Exception:  # noqa: S110 - (the disk may be full) the error that stopped the conversion is the one to report
            pass
        raise
    writer.close(status, source.get("error") if isinstance(source.get("error"), str) else None)


def replay_order(calls: list[CallKey], call_ends: list[CallKey]) -> Iterator[tuple[CallKey, bool]]:
    """Interleave call starts and ends the way they happened: ``(call, is_end)`` pairs.

    In a properly nested step, a call that has already started and is next in end order
    ended before the next call started (otherwise the next call would be nested in it and end
    first). Calls missing from ``call_ends`` end after everything else.

    Example:
        >>> a, b, c = (CallKey(0, 0, m, 0) for m in "abc")
        >>> [(k.module, end) for k, end in replay_order([a, b, c], [b, c, a])]
        [('a', False), ('b', False), ('b', True), ('c', False), ('c', True), ('a', True)]
    """
    known = set(calls)
    ends = [c for c in call_ends if c in known]
    started: set[CallKey] = set()
    ended: set[CallKey] = set()
    j = 0
    for call in calls:
        while j < len(ends) and ends[j] in started:
            ended.add(ends[j])
            yield ends[j], True
            j += 1
        started.add(call)
        yield call, False
    for call in ends[j:]:
        if call not in ended:
            ended.add(call)
            yield call, True
    for call in calls:
        if call not in ended:
            ended.add(call)
            yield call, True


def _step_records(reader: StoreReader, step: int, unassembled: list[tuple[str, str]] | None = None) -> Iterator[Record]:
    for call, is_end in replay_order(reader.calls(step), reader.call_ends(step)):
        for kind in (("outputs", "post_fwd_inputs") if is_end else ("inputs",)):
            record = _read_record(reader, call, kind, unassembled)
            if record is not None:
                yield record


def _read_record(reader: StoreReader, call: CallKey, kind: str,
                 unassembled: list[tuple[str, str]] | None = None) -> Record | None:
    """One captured side of a call, as a Record: neutral structure plus the stored bodies
    (``unassembled``: where to note the tensors a logical view could not assemble)."""
    structure = reader.structure(call, kind)
    if structure is None:
        return None
    doc = copy.deepcopy(structure)
    tensors = {}
    why_unassembled = getattr(reader, "unassembled_reason", None)
    for path, node in iter_tensor_nodes(doc):
        why = why_unassembled(node) if why_unassembled is not None else None
        if why is not None and unassembled is not None:
            unassembled.append((call.tensor(kind, path).display(), why))
        for key in reader.locator_keys:
            node.pop(key, None)
        if node.get("stored", True) is False:
            continue
        node.setdefault("stored", True)
        if "same_as" in node:
            continue  # written by reference, as captured; the target resolves it
        tensors[path] = reader.load(call.tensor(kind, path))
        if "stats" not in node and getattr(reader, "restat", False):  # an assembled logical tensor
            node["stats"] = tensor_stats(tensors[path])
    return Record(call, kind, doc, tensors)
