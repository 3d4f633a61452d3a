"""The two storage interfaces every backend implements: :class:`StoreWriter` and :class:`StoreReader`.

Capture, convert and compare use only these, so a backend is one module that subclasses both
and exposes them as its ``writer`` and ``reader`` attributes (see :mod:`ilstore.store.registry`).
What every backend needs — the manifest, options checking, the on-disk form of a structure,
bodies a structure promises, completed steps and call order, shape and dtype checks after a
load — lives here; a backend module implements only its file format, through the private
hooks each class lists.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import re
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import BackendError, CorruptFileError, StoreError, UnsafePathError
from ..keys import KINDS, CallKey, TensorKey
from ..manifest import (
    FORMAT_VERSION,
    JOURNAL_NAME,
    MANIFEST_NAME,
    UNORDERED_KEY,
    CallOrder,
    JournalReader,
    JournalWriter,
    calls_from_json,
    calls_to_json,
    read_manifest,
    warnings_of,
    write_json_atomic,
)
from ..records import Record, dtype_from_str, iter_tensor_nodes
from .stats_table import KEYS_NAME, ROWS_NAME, StatsTableReader, StatsTableWriter, table_of

__all__ = ["StoreWriter", "StoreReader", "StepInfo", "Body", "read_manifest", "check_inside", "STEP_DIR",
           "step_dir_name", "node_nbytes"]

#: The name of a step's directory (``step_<N>``), as the ``pt`` and ``safetensors`` layouts use it.
STEP_DIR = re.compile(r"^step_(\d+)$")
#: A file of :data:`RESERVE_BYTES` a writer keeps in the run directory while the run is open and
#: deletes at close: on a full disk the final manifest (``"status": "failed"`` and the error) is
#: written into its room, where the run would otherwise stay ``running`` (read as killed). Hidden:
#: readers never look at it; a killed run may keep it.
RESERVE_NAME = ".ilstore.reserve"
RESERVE_BYTES = 64 * 1024


def step_dir_name(step: int) -> str:
    """The directory (or file stem) of one step.

    Example:
        >>> step_dir_name(7), bool(STEP_DIR.match(step_dir_name(7)))
        ('step_7', True)
    """
    return f"step_{step}"


# Manifest keys of format 1 (ilstore 0.1), which kept the steps in the manifest itself.
_V1_KEYS = ("steps", "current_step", "calls", "call_ends")


@functools.lru_cache(maxsize=64)  # bounded: a damaged run may name any dtype
def _itemsize(dtype: str) -> int:
    try:
        return torch.empty((), dtype=dtype_from_str(dtype)).element_size()
    except (ValueError, TypeError):
        return 0


def node_nbytes(node: dict[str, Any]) -> int:
    """The bytes of a tensor node's body: ``numel`` times its dtype's item size (0 if either is unknown).

    What ``ilstore ls`` counts per stored tensor, whether the step journal's totals or the
    structures are asked.

    Example:
        >>> node_nbytes({"type": "tensor", "dtype": "torch.bfloat16", "numel": 6}), node_nbytes({"dtype": "?"})
        (12, 0)
    """
    numel = node.get("numel")
    return int(numel) * _itemsize(str(node.get("dtype"))) if isinstance(numel, int) else 0


@dataclass(frozen=True)
class StepInfo:
    """What a writer learns at the end of a step: its index and the module call order.

    Attributes:
        step: the step index.
        calls: module calls in the order they started (parents before children).
        call_ends: the same calls in the order they finished (children before parents).
    """

    step: int
    calls: list[CallKey]
    call_ends: list[CallKey]


class StoreWriter(ABC):
    """Writes one run (one rank) into a run directory.

    The framework calls, in this order::

        w = Writer(run_dir, options)   # may not touch the disk
        w.open(manifest)               # once; creates the run directory
        for each step:
            w.write(record)            # zero or more records of that step, in call order
            w.end_step(info)           # makes the step durable and readable
        w.close(status, error)         # once, also after an error ("failed", with a message)

    The base class owns the run's own metadata. The manifest (``ilstore.json``) is written
    atomically at ``open`` and at ``close`` only. After every ``end_step``, once the backend's
    ``_end_step`` made the step durable, the base appends the step's line to the step journal
    (``steps.jsonl``, :class:`~ilstore.manifest.JournalWriter`): its call order and its totals
    (module calls, tensors, stored tensors, bytes), counted here from the records ``write``
    was handed. So a step exists for readers only once the backend has finished it, and a step
    end costs what the step wrote, however long the run. The manifest's ``"backend"`` field is
    the name the backend is registered under, which the caller puts in the manifest it passes
    to ``open`` (:func:`~ilstore.manifest.new_manifest`). The constructor rejects invalid options
    (:meth:`validate_options`) with a :class:`~ilstore.errors.BackendError`; ``write`` hands
    ``_write`` a record whose structure is always a JSON object (a plain value is wrapped as
    ``{"type": "value", "value": ...}``). Implementers provide ``_open``, ``_write``,
    ``_end_step`` and ``_close`` (``_stored_bodies`` walks a record's bodies) and must
    guarantee that every tensor comes back bit-identical, with its dtype, shape and the
    record's structure.
    """

    #: The name the backend declares for itself; only a default: the manifest's ``"backend"``
    #: field, set by whoever registered and opened the backend, is authoritative.
    name: ClassVar[str] = ""
    #: True for a writer that has written every tensor body of a record (or copied what it
    #: keeps) before :meth:`write` returns. With ``async_writes: false`` capture then hands it a
    #: CPU tensor's own memory instead of a copy (the copy was a fifth of a capture's cost); the
    #: writer must only read it. False (the default, and any plug-in that does not say) keeps
    #: the copy: a writer that holds bodies until later would otherwise write what the model
    #: changed in place meanwhile (the safetensors one, which holds bodies for its shards, writes
    #: or copies them before ``write`` returns when it is :attr:`lent` them).
    borrows_bodies: ClassVar[bool] = False
    #: Set True by a capture that lends this writer the model's own tensors (``async_writes:
    #: false`` and :attr:`borrows_bodies`). A writer that keeps some bodies until later writes or
    #: copies them before :meth:`write` returns only then: the copies an asynchronous capture
    #: hands it are its own to keep.
    lent: bool = False

    def __init__(self, run_dir: str | Path, options: Mapping[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.options = dict(options or {})
        problems = self.validate_options(self.options)
        if problems:
            raise BackendError("invalid backend_options: " + "; ".join(problems))
        self.manifest: dict[str, Any] = {}
        self._closed = False
        self._journal: JournalWriter | None = None
        self._counted_step: int | None = None  # the step whose records _counts counts
        self._counts = [0, 0, 0]  # tensors, stored tensors, stored bytes
        self._table: StatsTableWriter | None = None  # the statistics table, from open on
        self._last_step: int | None = None  # the step of the journal's last line
        # (record, its tensor nodes) while write() hands that record to _write
        self._nodes: tuple[Record, list[tuple[tuple[str, ...], dict[str, Any]]]] | None = None

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> list[str]:
        """Return one message per problem in ``backend_options`` (empty when valid).

        The default accepts no option at all.
        """
        backend = f"the {cls.name!r} backend" if cls.name else "this backend"
        return [f"backend_options.{k}: unknown option for {backend} (it takes none)" for k in options]

    def open(self, manifest: dict[str, Any]) -> None:
        """Create the run directory, the backend's files, an empty step journal, then the manifest.

        The manifest is made a current-format one (:data:`FORMAT_VERSION`) whatever the caller
        passed: ``format_version`` and ``journal`` are set, and the format-1 keys (``steps``, ``calls``, ``call_ends``,
        ``current_step``) dropped.
        """
        self.manifest = manifest
        self.manifest.setdefault("backend", self.name)
        for key in _V1_KEYS:
            self.manifest.pop(key, None)
        self.manifest.update(format_version=FORMAT_VERSION, journal=JOURNAL_NAME)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _reserve(self.run_dir / RESERVE_NAME)
        self._open()
        path = self.run_dir / JOURNAL_NAME
        try:
            self._journal = JournalWriter(path)
            self._table = StatsTableWriter(self.run_dir)
        except OSError as exc:
            raise StoreError(f"{path}: cannot create the step journal or the statistics table: {exc}") from exc
        self.manifest["stats_table"] = {"keys": KEYS_NAME, "rows": ROWS_NAME}
        self._save_manifest()

    def write(self, record: Record) -> None:
        if not isinstance(record.structure, dict):  # a plain value: no tensor node
            record = dataclasses.replace(record, structure={"type": "value", "value": record.structure}, nodes=[])
        # The structure is walked once (or not at all: build_record collected its tensor nodes):
        # _write's _stored_bodies, the totals and the table use the same list.
        nodes = record.tensor_nodes()
        self._nodes = (record, nodes)
        try:
            self._write(record)
        finally:
            self._nodes = None
        table = self._table
        if self._counted_step != record.call.step:  # a new step (also after one that was cut)
            self._counted_step, self._counts = record.call.step, [0, 0, 0]
            if table is not None:
                table.discard()
        counts = self._counts
        counts[0] += len(nodes)
        for _path, node in nodes:
            if node.get("stored", True):
                counts[1] += 1
                counts[2] += node_nbytes(node)
        if table is not None:
            call = record.call
            table.add_nodes(call.module, call.call, record.kind, nodes)

    def end_step(self, info: StepInfo) -> None:
        self._end_step(info)
        tensors, stored, nbytes = self._counts if self._counted_step == info.step else (0, 0, 0)
        if self._counted_step != info.step and self._table is not None:
            self._table.discard()  # the rows collected belong to another (cut) step
        self._counted_step, self._counts = None, [0, 0, 0]
        if self._journal is None:
            raise StoreError(f"{self.run_dir}: end_step before open")
        if self._last_step is not None and info.step <= self._last_step and not self.manifest.get(UNORDERED_KEY):
            self.manifest[UNORDERED_KEY] = True  # once, before the line that breaks the order
            self._save_manifest()
        self._last_step = info.step
        if self._table is not None:
            try:  # the rows go first: a step's rows count only once its journal line exists
                self._table.end_step(info.step)
            except OSError as exc:
                raise StoreError(f"{self._table.rows_path}: cannot append step {info.step} to the statistics "
                                 f"table: {exc}") from exc
        try:
            self._journal.append(info.step, calls_to_json(info.calls), calls_to_json(info.call_ends),
                                 {"module_calls": len(info.calls), "tensors": tensors, "stored": stored,
                                  "bytes": nbytes}, self._journal_fields(info.step))
        except OSError as exc:
            raise StoreError(f"{self._journal.path}: cannot append step {info.step} to the step journal: "
                             f"{exc}") from exc

    def _journal_fields(self, step: int) -> dict[str, Any]:
        """Backend fields of ``step``'s journal line, asked once ``_end_step`` finished it
        (JSON values; none by default)."""
        return {}

    def forked(self) -> None:
        """Called in a process forked from the writing one, which writes nothing to the run: make
        sure nothing of this writer reaches the run's files when that process ends. Nothing to do
        for writers that keep only plain descriptors; a writer with a library's open file (hdf5)
        overrides it."""
        return None

    def close(self, status: str = "complete", error: str | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._close()
        finally:
            if self._journal is not None:
                self._journal.close()
            if self._table is not None:
                self._table.close()
            self.manifest["status"] = status
            if error:
                self.manifest["error"] = error
            self._save_final_manifest()

    def _save_manifest(self) -> None:
        write_json_atomic(self.run_dir / MANIFEST_NAME, self.manifest)

    def _save_final_manifest(self) -> None:
        """The manifest at close, into the reserve's room when the disk is full; the reserve goes.

        Raises:
            StoreError: the manifest could not be written (naming it).
        """
        reserve = self.run_dir / RESERVE_NAME
        try:
            try:
                self._save_manifest()
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not _unlink(reserve):
                    raise
                self._save_manifest()
        except OSError as exc:
            raise StoreError(f"{self.run_dir / MANIFEST_NAME}: cannot write the run's manifest: {exc}") from exc
        finally:
            _unlink(reserve)

    def _open(self) -> None:  # noqa: B027 - an optional hook, empty on purpose
        """Prepare backend files (optional)."""

    @abstractmethod
    def _write(self, record: Record) -> None:
        """Store one record (its structure, always a JSON object here, and its tensor bodies)."""

    def _stored_bodies(self, record: Record) -> Iterator[tuple[tuple[str, ...], dict[str, Any], torch.Tensor | None]]:
        """``(path, node, tensor)`` for each tensor node of ``record`` whose body is stored.

        ``tensor`` is None for a de-duplicated node (``same_as``): its body is the earlier
        tensor's. Raises StoreError when the structure promises a body the record lacks.
        """
        walked = self._nodes
        nodes = walked[1] if walked is not None and walked[0] is record else iter_tensor_nodes(record.structure)
        for path, node in nodes:
            if not node.get("stored"):
                continue
            if node.get("same_as") is not None:
                yield path, node, None
                continue
            tensor = record.tensors.get(path)
            if tensor is None:
                raise StoreError(f"{record.key(path)}: the structure says the body is stored but the record has no "
                                 "tensor for it")
            yield path, node, tensor

    @abstractmethod
    def _end_step(self, info: StepInfo) -> None:
        """Finish the step's files; after this they must survive a crash."""

    def _close(self) -> None:  # noqa: B027 - an optional hook, empty on purpose
        """Release backend resources (optional)."""


def parent_gone(path: str | Path) -> StoreError:
    """The error for a step's directory that cannot be made because the run directory is gone:
    writers never make it again (the run's journal and table went with it)."""
    return StoreError(f"{path}: cannot create the directory: its parent is gone (was the run directory removed "
                      "while the run was written?)")


def _reserve(path: Path) -> None:
    """Make the reserve file (:data:`RESERVE_NAME`); nothing when the file system refuses."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError:
        return
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, RESERVE_BYTES)  # blocks allocated, not a sparse file
        else:
            os.write(fd, bytes(RESERVE_BYTES))
    except OSError:
        os.close(fd)
        _unlink(path)  # a reserve without its room holds nothing back
        return
    os.close(fd)


def _unlink(path: Path) -> bool:
    """Remove ``path``; whether it was there to remove."""
    try:
        os.unlink(path)
    except OSError:
        return False
    return True


#: How many steps' structures a reader keeps at least (the most recently read ones).
_CACHED_STEPS = 4
#: Beyond those, a reader whose loads look nodes up again (:attr:`StoreReader.window_nodes`)
#: keeps more recent steps' structures while their tensor nodes total at most this (and at most
#: as many steps): a comparer plans a window of ~1,024 pairs, then loads them, and a window of
#: small steps spans more than a few steps. Kept structures cost memory (~2.5 KB a node of the
#: long-run workload, ~10 MB a reader at this bound), so only readers that need them keep them.
_CACHED_NODES = 4608


def _weight_of(structure: Any) -> int:
    """A cached side's weight: its tensor nodes, at least 1 (weighed when it is read, whoever
    reads it: convert and replay only ask for structures, and a side weighed only once its nodes
    were walked let a reader keep up to :data:`_CACHED_NODES` steps of them)."""
    return max(1, sum(1 for _ in iter_tensor_nodes(structure)))


class _Side:
    """One cached side of a call: its structure and, once asked for, its tensor nodes with
    their keys (and, once looked up by key, the same by key)."""

    __slots__ = ("structure", "nodes", "by_key")

    def __init__(self, structure: Any) -> None:
        self.structure = structure
        self.nodes: list[tuple[TensorKey, dict[str, Any]]] | None = None
        self.by_key: dict[TensorKey, dict[str, Any]] | None = None


class _StepSides(dict[tuple[CallKey, str], _Side]):
    """A step's cached sides, ``(call, kind) -> _Side``, and their weight (see :data:`_CACHED_NODES`)."""

    __slots__ = ("weight",)

    def __init__(self) -> None:
        super().__init__()
        self.weight = 0


class Body:
    """Where a stored tensor's elements lie in a file, byte for byte as a contiguous tensor of
    :attr:`dtype` and :attr:`shape` holds them in memory (C order, native byte order, nothing to
    decode): what :meth:`StoreReader.open_body` gives a comparer, which then reads the elements a
    piece at a time (``os.preadv`` on :attr:`fd` from :attr:`offset`) instead of loading the
    tensor. The file was checked as a load checks it when the body was opened; a read that ends
    early means the file changed since (the comparer then loads the tensor, with its errors).

    Close it (or use it as a context manager) when done: it may hold a descriptor of its own.
    """

    __slots__ = ("fd", "offset", "dtype", "shape", "numel", "path", "_own", "_keep")

    def __init__(self, fd: int, offset: int, dtype: torch.dtype, shape: tuple[int, ...], path: str | Path,
                 own: bool = True, keep: object = None) -> None:
        self.fd, self.offset, self.dtype, self.shape, self.path = fd, offset, dtype, tuple(shape), path
        numel = 1
        for d in self.shape:
            numel *= d
        self.numel = numel
        self._own = own  # the descriptor is this body's: closed by close()
        self._keep = keep  # what must stay alive while the descriptor is read (a reader's open shard)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if self._own and fd >= 0:
            os.close(fd)
        self._keep = None

    def __enter__(self) -> Body:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Body({self.path}, offset={self.offset}, {self.dtype}, {list(self.shape)})"


class StoreReader(ABC):
    """Reads one run directory.

    Usage order: construct (cheap), query any number of times, ``close()`` (or use it as a
    context manager). A backend's reader implements ``can_open``, ``_list_calls``,
    ``_read_structure`` and ``_load``, and where its layout differs from the defaults
    ``_list_steps`` (default: the ``step_<N>`` directories), ``_completed_steps`` (default:
    every step on disk), ``_list_call_ends`` (default: none recorded) and ``_body_path`` (for
    error messages). Everything public is built on those here: the manifest, when there is one,
    is the authority on completed steps and call order; the files are asked otherwise. So every
    backend orders, names, de-duplicates and checks records the same way. A reader must give
    back each record's structure exactly as it was written (plus, at most, the keys it declares
    in :attr:`locator_keys`).

    A reader of a run made of several runs (the multi-rank layout, :mod:`.ranks`) composes
    their readers: it overrides the public queries and :meth:`parts`.
    """

    #: The name of the backend that wrote the run. A class declares its default; the registry
    #: sets the name a backend is registered under on each reader it opens.
    name: str = ""

    #: Keys this reader adds to tensor nodes only to find their bodies (``pt``: ``file``). They
    #: are not part of the backend-neutral metadata: convert drops them before writing a node
    #: into another backend, and comparisons of metadata ignore them.
    locator_keys: frozenset[str] = frozenset()

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.manifest = read_manifest(self.run_dir)
        # Structures of the most recently read steps only (step -> (call, kind) -> _Side), so
        # streaming a long run (compare, convert, replay) keeps memory flat.
        self._structures: OrderedDict[int, _StepSides] = OrderedDict()
        self._journal = _journal_of(self.run_dir, self.manifest)

    @classmethod
    @abstractmethod
    def can_open(cls, run_dir: Path) -> bool:
        """Cheap check (a few stats) whether this backend wrote ``run_dir``."""

    # -- what a backend implements -------------------------------------------------------
    def _list_steps(self) -> list[int]:
        """Steps present on disk (completed or not), ascending.

        The default lists the run's ``step_<N>`` directories.
        """
        try:
            with os.scandir(self.run_dir) as it:
                return sorted(int(m.group(1)) for e in it if (m := STEP_DIR.match(e.name)) and e.is_dir())
        except OSError as exc:
            raise StoreError(f"{self.run_dir}: cannot list the run directory: {exc.strerror}") from None

    def _completed_steps(self) -> list[int]:
        """Steps the files show as completed, ascending; asked only when there is no manifest.

        The default: every step on disk (a layout that cannot tell).
        """
        return self._list_steps()

    @abstractmethod
    def _list_calls(self, step: int) -> list[CallKey]:
        """Module calls of a step in start order, from the files (used without a manifest)."""

    def _list_call_ends(self, step: int) -> list[CallKey] | None:
        """Module calls of a step in end order, from the files (used when the manifest lacks
        them); None when the files do not record it (it is then derived from the nesting)."""
        return None

    @abstractmethod
    def _read_structure(self, call: CallKey, kind: str) -> Any | None:
        """The JSON structure of one side of a call, None if that side was not captured."""

    @abstractmethod
    def _load(self, key: TensorKey, node: dict[str, Any]) -> torch.Tensor:
        """Load one stored tensor body, bit-exact, on the CPU (its shape and dtype are checked
        against ``node`` by :meth:`load`)."""

    def _body_path(self, key: TensorKey, node: dict[str, Any]) -> Path:
        """The file that holds ``key``'s body, named in errors; the run directory by default."""
        return self.run_dir

    def _open_body(self, key: TensorKey, node: dict[str, Any]) -> Body | None:
        """Where ``key``'s elements lie in a file, checked as :meth:`_load` would check it, when
        they lie there as the tensor's memory (see :class:`Body`); None where they do not, where
        this reader cannot tell cheaply, or where anything about the file is off (a load then
        reads it, with its errors). The default: None (the comparer loads every tensor)."""
        return None

    def _original_node(self, original: TensorKey) -> dict[str, Any]:
        """The node of a de-duplicated tensor's original (for :meth:`open_body`)."""
        return self.meta(original)

    # -- the public reader API ------------------------------------------------------------
    @property
    def status(self) -> str:
        """``complete``, ``running`` (still running or killed), ``failed``, or ``unknown``."""
        return str(self.manifest.get("status", "unknown")) if self.manifest else "unknown"

    @property
    def capture_warnings(self) -> list[str]:
        """What the capture warned about that bears on what the run holds (the manifest's
        ``"warnings"``, :func:`~ilstore.manifest.warnings_of`); empty when it said nothing."""
        return warnings_of(self.manifest)

    def steps(self) -> list[int]:
        """Readable steps, ascending: the completed ones."""
        if self._journal is not None:
            return self._journal.steps()
        if self.manifest is not None:
            done = self.manifest.get("steps", [])
            return sorted(s for s in done if isinstance(s, int))
        return self._completed_steps()

    def incomplete_steps(self) -> list[int]:
        """Steps with files on disk that never completed (a run killed mid-step)."""
        done = set(self.steps())
        return [s for s in self._list_steps() if s not in done]

    def calls(self, step: int) -> list[CallKey]:
        """Module calls of ``step`` in start order (parents before their children)."""
        calls = self._manifest_calls("calls", step)
        return self._list_calls(step) if calls is None else calls

    def call_ends(self, step: int) -> list[CallKey]:
        """Module calls of ``step`` in the order they finished (children before parents).

        Dumps without a manifest or a backend record of it do not have it; it is then derived
        from the start order and the dotted-name nesting (a call ends after the calls of its
        submodules).
        """
        ends = self._manifest_calls("call_ends", step)
        if ends is None:
            ends = self._list_call_ends(step)
        return _ends_from_nesting(self.calls(step)) if ends is None else ends

    def call_orders(self) -> Mapping[int, CallOrder] | None:
        """Every completed step's calls in start and end order, read in one pass.

        What comparing a long run wants: ``(rank, (module, call) in start order, (module, call)
        in end order)`` per step, with no :class:`CallKey` per call and step; steps with the same
        orders share one tuple (a caller may recognise them by identity).

        The mapping is read-only and holds no Python object per step (the step journal's
        :class:`~ilstore._stepmap.SharedValues`: ``get``, ``[]``, ``in``, ``len``, iteration and
        ``values()``/``items()`` in step order; ``distinct()`` gives each distinct orders tuple once).

        Returns:
            Step -> orders; None when this reader cannot answer so (no step journal, or a reader
            that answers :meth:`calls` itself): ask :meth:`calls` and :meth:`call_ends` then.

        Raises:
            CorruptFileError: the step journal is damaged (names the line).
        """
        cls = type(self)
        if (self._journal is None or cls.calls is not StoreReader.calls or cls.call_ends is not StoreReader.call_ends
                or cls._manifest_calls is not StoreReader._manifest_calls):
            return None
        return self._journal.call_orders()

    def step_totals(self, step: int) -> dict[str, int] | None:
        """What ``ilstore ls`` prints for ``step``, as the writer counted it, without reading a structure.

        Returns:
            ``{"module_calls": .., "tensors": .., "stored": .., "bytes": ..}`` (bytes of the
            stored bodies, :func:`node_nbytes`) from the step journal; None when the run does
            not record them (runs of format 1, dumps without a manifest) or ``step`` is not a
            completed step. Then count them from the structures.

        Raises:
            CorruptFileError: the step's journal line is damaged (names the file and line).
        """
        return self._journal.totals(step) if self._journal is not None else None

    def all_step_totals(self) -> dict[int, dict[str, int] | None] | None:
        """:meth:`step_totals` of every completed step, read in one pass over the step journal.

        Returns:
            Step number -> totals (None for a step whose line has none); None when the run does
            not record totals at all (format 1, dumps).

        Raises:
            CorruptFileError: a journal line is damaged (names the file and line).
        """
        return self._journal.all_totals() if self._journal is not None else None

    def stats_table(self) -> StatsTableReader | None:
        """The run's statistics table (:mod:`.stats_table`), None when the run has none.

        Every tensor node's statistics, one row per node and step, written by the capture next
        to the structures (which stay the authority); only rows of steps the step journal lists
        count, so a reader without a journal (format 1, dumps, views that copy a run's manifest
        but not its steps) has no table.

        Raises:
            CorruptFileError: the manifest names the table badly.
        """
        return table_of(self.run_dir, self.manifest) if self._journal is not None else None

    def _manifest_calls(self, field: str, step: int) -> list[CallKey] | None:
        """``calls`` or ``call_ends`` of ``step`` as the step journal (format 2) or the manifest
        (format 1) records them, None if neither does."""
        if self._journal is not None:
            return self._journal.calls(step, field)
        if self.manifest is None or str(step) not in self.manifest.get(field, {}):
            return None
        try:
            return calls_from_json(self.manifest[field][str(step)], step, self.manifest.get("rank", 0))
        except ValueError as exc:
            raise CorruptFileError(self.run_dir / MANIFEST_NAME, f"{field} of step {step}: {exc}") from None

    def structure(self, call: CallKey, kind: str) -> Any | None:
        """The JSON structure of one captured side of a call (None if not captured).

        Raises:
            KeyError: the step has no such call.
            CorruptFileError: the step journal (or manifest) lists the call but the backend's
                files have no data for it; names the journal (or manifest).
        """
        return self._structure_entry(call, kind).structure

    #: Sum of the cached steps' weights (a class default: views that skip ``__init__`` start at 0).
    _cached_weight: int = 0
    #: Whether the reader keeps a comparer's window of structures (:data:`_CACHED_NODES` nodes), not
    #: only :data:`_CACHED_STEPS` steps': a reader whose loads look nodes up by key (``same_as``
    #: bodies without a locator key) sets it; the others would only pay memory. A reader told the
    #: nodes of what it will load (the hdf5 reader's ``prepare_loads``) needs no window either.
    window_nodes: bool = False

    def _structure_entry(self, call: CallKey, kind: str) -> _Side:
        """The cached side (read, and the cache trimmed, on a miss)."""
        cache = self._structures
        step_cache = cache.get(call.step)
        if step_cache is None:
            if not cache:  # emptied (close, or a view's own clear): nothing is weighed any more
                self._cached_weight = 0
            step_cache = cache[call.step] = _StepSides()
        else:
            try:
                cache.move_to_end(call.step)
            except KeyError:  # dropped by another thread meanwhile: still the right sides
                pass
        side = step_cache.get((call, kind))
        if side is None:
            try:
                structure = self._read_structure(call, kind)
            except KeyError:
                recorded = self._manifest_calls("calls", call.step)
                if recorded is None or call not in recorded:
                    raise
                source = self._journal.path if self._journal is not None else self.run_dir / MANIFEST_NAME
                raise CorruptFileError(source, f"lists module call {call.module}#{call.call} of step {call.step}, "
                                       "but the run has no data for it (the files disagree)") from None
            side = step_cache[(call, kind)] = _Side(structure)
            self._weigh_structures(step_cache, _weight_of(structure))
        return side

    def _weigh_structures(self, step_cache: _StepSides, weight: int) -> None:
        """Add ``weight`` to a cached step's, and drop the least recently used steps beyond
        :data:`_CACHED_STEPS` while they or their weight pass :data:`_CACHED_NODES` (0 for a
        reader without :attr:`window_nodes`)."""
        step_cache.weight += weight
        self._cached_weight += weight
        cache = self._structures
        bound = _CACHED_NODES if self.window_nodes else 0
        while len(cache) > _CACHED_STEPS and (self._cached_weight > bound or len(cache) > bound):
            try:
                _step, old = cache.popitem(last=False)
            except KeyError:  # emptied by another thread
                break
            self._cached_weight -= old.weight
        if not cache:
            self._cached_weight = 0

    def _structure_nodes(self, call: CallKey, kind: str) -> tuple[_Side, list[tuple[TensorKey, dict[str, Any]]]]:
        """The cached side and its tensor nodes with their keys (walked once per cached side)."""
        side = self._structure_entry(call, kind)
        nodes = side.nodes
        if nodes is None:
            nodes = side.nodes = [(call.tensor(kind, path), node) for path, node in iter_tensor_nodes(side.structure)]
        return side, nodes

    def _answers_from_cache(self) -> bool:
        """Whether :meth:`tensor_nodes` and :meth:`meta` may answer from the cached sides: a
        reader that answers :meth:`structure` or :meth:`tensor_nodes` itself is asked instead."""
        cls = type(self)
        return cls.structure is StoreReader.structure and cls.tensor_nodes is StoreReader.tensor_nodes

    def tensor_nodes(self, call: CallKey, kind: str) -> Iterator[tuple[TensorKey, dict[str, Any]]]:
        if type(self).structure is not StoreReader.structure:
            for path, node in iter_tensor_nodes(self.structure(call, kind)):
                yield call.tensor(kind, path), node
            return
        yield from self._structure_nodes(call, kind)[1]

    def keys(self, step: int | None = None) -> list[TensorKey]:
        """Tensor keys in execution order (calls in start order; inputs, outputs, post-forward)."""
        steps = self.steps() if step is None else [step]
        return [key for s in steps for call in self.calls(s) for kind in KINDS
                for key, _node in self.tensor_nodes(call, kind)]

    def meta(self, key: TensorKey) -> dict[str, Any]:
        """Metadata of one tensor (shape, dtype, device, stats, stored...) without loading it."""
        if self._answers_from_cache():  # a lookup by key in the cached side (a side may hold many tensors)
            side, nodes = self._structure_nodes(key.call_key, key.kind)
            by_key = side.by_key
            if by_key is None:
                by_key = {}
                for k, node in nodes:
                    by_key.setdefault(k, node)  # the first, as a walk finds it
                side.by_key = by_key
            found = by_key.get(key)
            if found is not None:
                return found
        else:
            for k, node in self.tensor_nodes(key.call_key, key.kind):
                if k == key:
                    return node
        raise KeyError(f"no tensor {key} in {self.run_dir}")

    def load(self, key: TensorKey) -> torch.Tensor:
        """Load a stored tensor (CPU, bit-exact).

        Raises:
            KeyError: no such key, or its body was not stored (``stored`` is false).
            CorruptFileError: the file is truncated, corrupt or unsafe, or holds another shape
                or dtype than the metadata says; names the file.
        """
        return self.load_node(key, self.meta(key))

    def open_body(self, key: TensorKey, node: dict[str, Any]) -> Body | None:
        """Where the elements of the stored tensor ``key`` (its ``node``, as for
        :meth:`load_node`) lie in a file, for a caller that reads them a piece at a time
        (the comparer: its memory then does not grow with the tensor); None where the reader
        cannot say, or the body is not stored as the tensor's memory, or the file is not what
        the metadata says -- :meth:`load_node` then loads it, with its errors. Never raises
        for a damaged run. The caller closes the body.
        """
        if node.get("stored") is False:
            return None
        nodes = [node]  # the body must be what each says (a de-duplicated tensor's and its original's)
        try:
            same_as = node.get("same_as")
            if same_as is not None and not self.locator_keys & node.keys():
                original = TensorKey.parse(same_as)
                if original.step != key.step or original == key:
                    return None
                key, node = original, self._original_node(original)
                if node.get("stored") is False or node.get("same_as") is not None:
                    return None
                nodes.append(node)
            body = self._open_body(key, node)
        except Exception:  # noqa: BLE001 -- whatever is wrong, load_node() reports it
            return None
        if body is not None and any(list(body.shape) != n.get("shape") or str(body.dtype) != n.get("dtype")
                                    for n in nodes):
            body.close()
            return None
        return body

    def load_node(self, key: TensorKey, node: dict[str, Any]) -> torch.Tensor:
        """:meth:`load` for a caller that holds ``key``'s metadata already (the node
        :meth:`tensor_nodes` gave for it, unchanged): no lookup of it. A comparer that planned
        a window of steps loads their tensors so, without parsing the steps' structures again.

        Raises:
            KeyError, CorruptFileError: as :meth:`load`.
        """
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
            return self._load_original(original)
        tensor = self._load(key, node)
        shape, dtype = node.get("shape"), node.get("dtype")
        if shape is not None and list(tensor.shape) != list(shape) or dtype is not None and str(tensor.dtype) != dtype:
            raise CorruptFileError(self._body_path(key, node), f"{key}: holds {tensor.dtype} {list(tensor.shape)} "
                                   f"but its metadata says {dtype} {shape}")
        return tensor

    def _load_original(self, original: TensorKey) -> torch.Tensor:
        """The body of a de-duplicated tensor: its original's, :meth:`load` of it. A reader that
        was told the original's node beforehand (the hdf5 reader's planned loads) overrides this
        to load it without looking the node up in the structures again."""
        return self.load(original)

    def parts(self) -> list[tuple[str, StoreReader]]:
        """The single runs this reader reads, as ``(directory relative to run_dir, reader)``.

        A plain run is one part, itself at ``"."``; a multi-rank run has one per rank.
        """
        return [(".", self)]

    def layout_manifest(self, backend: str) -> dict[str, Any] | None:
        """The top-level manifest a copy of this run written by ``backend`` needs above its
        :meth:`parts`; None for a plain run (its writer writes its own)."""
        return None

    def close(self) -> None:
        self._structures.clear()
        self._cached_weight = 0
        if self._journal is not None:
            self._journal.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.run_dir}>"


def _journal_of(run_dir: Path, manifest: dict[str, Any] | None) -> JournalReader | None:
    """The step journal a format-2 manifest names (None for format 1, dumps and multi-rank tops)."""
    if manifest is None or "journal" not in manifest:
        return None
    name = manifest["journal"]
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise CorruptFileError(run_dir / MANIFEST_NAME, f"\"journal\" must name a file in the run directory, "
                               f"got {name!r}")
    rank = manifest.get("rank", 0)
    return JournalReader(run_dir / name, rank if isinstance(rank, int) and not isinstance(rank, bool) else 0,
                         ordered=manifest.get(UNORDERED_KEY) is not True)


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
    """Resolve ``path`` and make sure it stays inside ``run_dir`` (no ``..``, no symlink escape).

    A name read back from a damaged file may not be a path at all (a NUL byte, a symlink loop):
    that is an UnsafePathError too, not a ValueError.
    """
    root = run_dir.resolve()
    try:
        resolved = path.resolve()
    except (ValueError, OSError, RuntimeError) as exc:
        raise UnsafePathError(f"{path!r}: not a usable path inside the run directory {run_dir}: {exc}") from None
    if resolved != root and root not in resolved.parents:
        raise UnsafePathError(f"{path}: resolves outside the run directory {run_dir}")
    return resolved

