"""The ``hdf5`` backend: one HDF5 file per step (SPEC §4.4).

::

    <run_dir>/ilstore.json              the manifest (as for every backend)
    <run_dir>/step_<N>.h5               a completed step
    <run_dir>/step_<N>.h5.partial       the step being written, or one cut by a crash

    step_<N>.h5
      attrs: format="ilstore-hdf5", format_version=2, step, rank, calls, call_ends (JSON text)
      /<module>#<call>                  one group per module call with a stored body (module
                                        %-encoded: no '/')
          attrs: per side with a stored body its structure as JSON text ("inputs", "outputs",
                 "post_fwd_inputs"); the module and call are the name's, step and rank the root's
          <kind>[:<path elem>...]       one dataset per stored tensor, e.g. "outputs", "inputs:0",
                                        "inputs:attention_mask" (path elements %-encoded)
              attrs: dtype="torch.bfloat16", encoding="bits"|"real" (only when re-encoded)
      /structures                       the sides without a stored body (``mode: "stats"``, all
                                        bodies over ``max_tensor_size``, no tensor at all): one
                                        JSON line each, {"module", "kind", "call", "structure"},
                                        UTF-8 bytes (a 1-d uint8 dataset), written at step end

A call none of whose sides has a stored body has no group. Step files of format version 1
(ilstore 0.1, and runs of format 2 before ilstore 0.2.0) hold every side as a group attribute, no ``/structures``, and
``module``, ``call``, ``step`` and ``rank`` attributes on every group; the reader reads both
versions (it never used those four attributes), and refuses a newer one.

Types numpy (and so HDF5) lacks — bfloat16, the float8 variants, complex32 — are stored as
their raw bits (``uint16``/``uint8`` views, see :mod:`._encode`) with the true dtype in the
``dtype`` attribute; everything comes back bit-exact. Complex and bool use h5py's native types.

Crash safety: a step is written into ``step_<N>.h5.partial`` (flushed when created) and renamed
to ``step_<N>.h5`` at the end of the step, after the file was closed. A process that dies
mid-step therefore never touches a completed step's file, and the cut step keeps its
``.partial`` name: incomplete for every reader. While the step is written, the file is flushed
after a record once ``flush_interval`` seconds (``backend_options``, default 0.1; 0: after every
record) passed since its last flush, so a killed process's cut step is readable with ``h5py`` up
to about its last flush (the records with a stored body written before it); the ``/structures``
entries, held in memory until the step ends, are lost with the cut step. A process that ends
with an exception closes the file (everything written is in it). ``libver="latest"`` is not
used, so files open with any HDF5 1.8+ tool without ``h5clear``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import CorruptFileError, StoreError
from ..keys import KINDS, CallKey, TensorKey, decode_part, encode_part
from ..manifest import calls_from_json, calls_to_json, dumps, dumps_tree, json_str
from ..records import Record, dtype_from_str, iter_tensor_nodes
from ._encode import decode, encode
from ._pread import AVAILABLE as pread_ok
from ._pread import O_RDONLY, byte_tensor, pread_into
from .base import Body, StepInfo, StoreReader, StoreWriter, step_dir_name

__all__ = ["Hdf5Writer", "Hdf5Reader", "FILE_FORMAT", "group_name", "parse_group_name", "dataset_name",
           "parse_dataset_name", "writer", "reader"]

FILE_FORMAT = "ilstore-hdf5"
#: 2: sides without a stored body are entries of the root dataset ``structures``; 1 (ilstore 0.1
#: and until issue 13): every side is an attribute of its call's group. Readers read both.
FILE_VERSION = 2
#: The root dataset of a step file that holds the sides without a stored body (format version 2),
#: and, since 2026-12-02 (0.2.0 development), every other side too, with its :data:`LOCATIONS`.
STRUCTURES = "structures"
#: The key of a ``/structures`` entry of a side with stored bodies that says where the writer put
#: each body's bytes: ``{"<dataset name>": [offset, nbytes, numpy type, shape, attributes]}``. A
#: reader trusts it only while the step file is the one the writer finished (its size and
#: modification time as the step journal's :data:`FILE_KEY` recorded them); otherwise it asks HDF5.
LOCATIONS = "locations"
#: The step journal's key for a completed step file's ``[size, st_mtime_ns]``.
FILE_KEY = "file"
#: Seconds between flushes of the open step file (``backend_options.flush_interval``): HDF5's
#: metadata reaches the file then, and a killed process's cut step keeps, readable with h5py, the
#: records written before its last flush. 0 flushes after every record (~70 us each).
DEFAULT_FLUSH_INTERVAL = 0.1
#: How many attributes and links of the open step's groups and datasets the writer holds before
#: it writes them (it writes them all before each flush and at step end): HDF5 creates a group,
#: a link or an attribute in much less CPU time when it creates many in a row than one between
#: a dataset's creation and the next record's (the model's work in between evicts HDF5's code
#: and data from the CPU's caches: a group took ~78 us in the capture's rhythm, ~20 us in a row).
_PENDING_ATTRS = 512
#: The most file space the datasets created ahead of their tensors (:meth:`Hdf5Writer._take`)
#: hold for one dtype and shape at a time (at least one dataset).
_SPARE_BYTES = 4 << 20
_STEP_FILE = re.compile(r"^step_(\d+)\.h5(\.partial)?$")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MAX_RANK = 32  # HDF5's limit on dataset dimensions
_NUMPY_DTYPES = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
                           torch.uint32, torch.uint64, torch.float16, torch.float32, torch.float64, torch.complex64,
                           torch.complex128})
#: numpy dtypes (native byte order) read raw, and the torch dtype ``torch.from_numpy`` gives them.
_RAW_DTYPES = {np.dtype(t): d for t, d in ((np.bool_, torch.bool), (np.uint8, torch.uint8), (np.int8, torch.int8),
                                          (np.int16, torch.int16), (np.int32, torch.int32), (np.int64, torch.int64),
                                          (np.uint16, torch.uint16), (np.uint32, torch.uint32),
                                          (np.uint64, torch.uint64), (np.float16, torch.float16),
                                          (np.float32, torch.float32), (np.float64, torch.float64),
                                          (np.complex64, torch.complex64), (np.complex128, torch.complex128))}
_log = logging.getLogger(__name__)


def group_name(module: str, call: int) -> str:
    """The group of one module call: ``model.layers.0`` call 1 → ``model.layers.0#1``."""
    return f"{encode_part(module)}#{call}"


def parse_group_name(name: str) -> tuple[str, int]:
    """Inverse of :func:`group_name`; ValueError on anything else."""
    module, sep, call = name.rpartition("#")
    if not sep or not call.isdigit():
        raise ValueError(f"not a module call group: {name!r}")
    return decode_part(module), int(call)


def dataset_name(kind: str, path: tuple[str, ...]) -> str:
    """The dataset of one tensor inside its call's group: ``inputs`` + ``("0",)`` → ``inputs:0``."""
    return ":".join([kind, *(encode_part(p) for p in path)])


def parse_dataset_name(name: str) -> tuple[str, tuple[str, ...]]:
    """Inverse of :func:`dataset_name`; ValueError on anything else."""
    kind, *parts = name.split(":")
    if kind not in KINDS:
        raise ValueError(f"not a tensor dataset: {name!r}")
    return kind, tuple(decode_part(p) for p in parts)


#: ``json.dumps(value, allow_nan=False)`` without building an encoder per call, and without the
#: check for circular references (a structure is a tree; one that is not raises RecursionError).
_to_json = dumps_tree


def _msg(exc: BaseException) -> str:
    """HDF5's messages span lines; one line reads better in a log or an error."""
    return " ".join(str(exc).split())


class Hdf5Writer(StoreWriter):
    """Writes ``step_<N>.h5.partial``, flushing it every ``flush_interval`` s, and renames it at step end.

    Options (``backend_options``): ``compression`` (``"gzip"`` or ``"lzf"``),
    ``compression_opts`` (gzip level 0-9), ``shuffle`` (bool), ``flush_interval`` (seconds
    between flushes of the open step file, default 0.1; 0: after every record). Compression is
    opt-in: it saves little on activations and costs much write time (docs/format-hdf5.md).
    """

    name = "hdf5"
    borrows_bodies = True  # every body is in the step file (pwritten or through HDF5) before write returns
    #: Sides without a stored body become entries of the step's ``/structures`` dataset (format
    #: version 2), the default of ``backend_options.structure_list``; False writes every side as a
    #: group attribute, as version 1 did (SPEC §4.4's group per module call).
    _list_sides = True
    #: Sides with a stored body are listed in ``/structures`` too, with their :data:`LOCATIONS`
    #: (the default); False writes them only as group attributes, as the version-2 files written
    #: before 2026-12-02 had them (the tests of the readers of such files write them so).
    _list_bodied = True

    def __init__(self, run_dir: str | Path, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(run_dir, options)
        self._filters: dict[str, Any] = {k: self.options[k] for k in ("compression", "compression_opts", "shuffle")
                                         if self.options.get(k) is not None}
        self._file: Any = None
        self._path: Path | None = None  # kept apart: touching a failed h5py file object can crash HDF5
        self._step: int | None = None
        self._fd: int | None = None  # the open step file's descriptor (HDF5's own): raw data is pwritten
        # Within the open step: the groups and datasets written so far, as h5py's low-level
        # identifiers (lookups by name cost ~80 us each; a de-duplicated tensor links to the
        # dataset object directly). A group is None until it is created (with the held
        # attributes); a dataset is created anonymous, its bytes written at once, and linked
        # into its group then.
        self._groups: dict[str, Any] = {}
        self._datasets: dict[str, Any] = {}
        # Within the open step: the entries of /structures (one JSON line per side without a
        # stored body), written when the step ends.
        self._entries: list[str] = []
        # Within the open step: the sides written so far (module, call, kind): a side written
        # twice fails at its second write (its dataset names, group attribute or /structures
        # entry would clash, and with the links held that surfaced only at the next flush)
        self._written: set[tuple[str, int, str]] = set()
        # Within the open step: datasets created ahead, not holding a tensor yet (see _take), by
        # numpy dtype and shape, and how many datasets of each dtype and shape the step took
        self._spare: dict[tuple[np.dtype[Any], tuple[int, ...]], list[tuple[Any, int | None]]] = {}
        self._taken: dict[tuple[np.dtype[Any], tuple[int, ...]], int] = {}
        self._last_taken: dict[tuple[np.dtype[Any], tuple[int, ...]], int] = {}  # the last step's, when it ended
        # Within the open step: the attributes of its groups and datasets not written yet
        # (object, name, value), in the order they were set; see _PENDING_ATTRS.
        self._attrs: list[tuple[Any, str, str | int]] = []  # object: its identifier, or a group's name
        # Within the open step: the groups not created yet, in call-start order, and the links
        # not made yet (dataset, group name, link name), in the order of their records.
        self._new_groups: list[str] = []
        self._links: list[tuple[Any, str, bytes]] = []
        self._prefixes: dict[tuple[str, str], str] = {}  # (module, kind) -> the start of its entries
        # group_name and dataset_name of the calls and paths seen (bounded as _prefixes)
        self._gnames: dict[tuple[str, int], str] = {}
        self._dnames: dict[tuple[str, tuple[str, ...]], bytes] = {}
        self._ksuffixes: dict[tuple[str, ...], str] = {}  # a path's end of a tensor key's string
        self._flush_interval = float(self.options.get("flush_interval", DEFAULT_FLUSH_INTERVAL))
        self._flushed = 0.0  # time.monotonic() of the open step file's last flush
        self._list_sides = bool(self.options.get("structure_list", type(self)._list_sides))
        self._version = FILE_VERSION if self._list_sides else 1
        self._finished: tuple[int, list[int]] | None = None  # the last step file finished, [size, mtime]
        self._tails: dict[tuple[Any, ...], str] = {}  # the end of a LOCATIONS value, by type and shape

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> list[str]:
        problems = []
        compression = options.get("compression")
        for key, value in options.items():
            if key == "compression":
                if value not in (None, "gzip", "lzf"):
                    problems.append("backend_options.compression: must be \"gzip\" or \"lzf\" (or null), "
                                    f"got {value!r}")
            elif key == "compression_opts":
                if compression != "gzip":
                    problems.append("backend_options.compression_opts: only valid with \"compression\": \"gzip\"")
                elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 9:
                    problems.append("backend_options.compression_opts: gzip level must be an integer 0-9, "
                                    f"got {value!r}")
            elif key == "shuffle":
                if not isinstance(value, bool):
                    problems.append(f"backend_options.shuffle: must be true or false, got {value!r}")
            elif key == "structure_list":
                if not isinstance(value, bool):
                    problems.append(f"backend_options.structure_list: must be true or false, got {value!r}")
            elif key == "flush_interval":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                    problems.append("backend_options.flush_interval: must be a number of seconds >= 0, "
                                    f"got {value!r}")
            else:
                problems.append(f"backend_options.{key}: unknown option for the 'hdf5' backend "
                                "(it takes: compression, compression_opts, shuffle, flush_interval, "
                                "structure_list)")
        return problems

    def _paths(self, step: int) -> tuple[Path, Path]:
        final = self.run_dir / f"{step_dir_name(step)}.h5"
        return final, final.with_name(final.name + ".partial")

    def _begin(self, step: int) -> Any:
        if self._step == step and self._file is not None:
            return self._file
        self._abandon()
        import h5py

        partial = self._paths(step)[1]
        self._path = partial
        try:
            api = _api()
            self._file = h5py.File(api.h5f.create(os.fsencode(partial), api.h5f.ACC_TRUNC, fapl=api.fapl,
                                                  fcpl=api.fcpl))
            root = self._file.id
            for name, value in (("format", FILE_FORMAT), ("format_version", self._version), ("step", step),
                                ("rank", int(self.manifest.get("rank", 0)))):
                _set_attr(root, name, value)
            self._file.flush()
            self._flushed = time.monotonic()
            self._fd = _vfd_handle(root)
        except Exception as exc:  # OSError, or RuntimeError from HDF5 on a full disk
            self._drop()
            raise StoreError(f"{partial}: cannot create the step file: {_msg(exc)}") from exc
        self._step, self._groups, self._datasets, self._entries, self._attrs = step, {}, {}, [], []
        self._new_groups, self._links, self._written, self._spare, self._taken = [], [], set(), {}, {}
        return self._file

    def forked(self) -> None:
        """In a forked child: HDF5 would flush its copy of the open step file's metadata and cut
        the file to the length it knew at the fork when the child exits normally (its library
        closes every file at exit), undoing what the parent wrote since. The child's descriptor of
        that file is pointed at a throwaway in-memory file (``memfd_create``; ``/dev/null``
        elsewhere), so whatever HDF5 does there never reaches the run. No h5py call is made when
        the descriptor is known (the parent's writer thread may have been inside HDF5 at the fork)."""
        if self._file is None:
            return
        fd = self._fd
        if fd is None:
            try:
                fd = int(self._file.id.get_vfd_handle())
            except Exception as exc:  # not a descriptor-backed driver: nothing to redirect
                _log.debug("ilstore: no descriptor for %s in the forked child: %s", self._path, exc)
                return
        make = getattr(os, "memfd_create", None)
        spare = make("ilstore-forked") if make is not None else os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(spare, fd)
        finally:
            os.close(spare)

    def _drop(self) -> None:
        """After an I/O error: close the file at once, ignoring errors. An HDF5 file object left
        open after a failed write can crash the interpreter when it is finally deallocated."""
        f, self._file, self._step, self._fd = self._file, None, None, None
        self._groups, self._datasets, self._entries, self._attrs = {}, {}, [], []
        self._new_groups, self._links, self._written, self._spare, self._taken = [], [], set(), {}, {}
        if f is not None:
            try:
                f.close()
            except Exception as exc:
                _log.debug("closing %s after a write error failed too: %s", self._path, _msg(exc))

    def _abandon(self) -> None:
        """A step that never ended: close its file, which stays ``.partial``, with every record
        written into it (the groups, links and attributes not written yet too)."""
        if self._file is not None and (self._attrs or self._links or self._new_groups):
            try:
                self._set_attrs()
            except Exception as exc:
                path = self._path
                self._drop()
                raise StoreError(f"{path}: cannot finish the unfinished step file: {_msg(exc)}") from exc
        f, path, self._file, self._step, self._fd = self._file, self._path, None, None, None
        self._groups, self._datasets, self._entries, self._attrs = {}, {}, [], []
        self._new_groups, self._links, self._written, self._spare, self._taken = [], [], set(), {}, {}
        if f is not None:
            try:
                f.close()
            except Exception as exc:
                raise StoreError(f"{path}: cannot close the unfinished step file: {_msg(exc)}") from exc

    def _write(self, record: Record) -> None:
        f = self._begin(record.call.step)
        try:
            if self._write_record(f, record):
                now = time.monotonic()
                if now - self._flushed >= self._flush_interval:  # what a killed process keeps in the cut step
                    self._set_attrs()
                    f.flush()
                    self._flushed = now
                elif len(self._attrs) + len(self._links) >= _PENDING_ATTRS:
                    self._set_attrs()
        except StoreError:
            raise
        except Exception as exc:  # h5py raises OSError/RuntimeError/ValueError for I/O failures
            self._drop()
            raise StoreError(f"{self._path}: cannot write {record.call.tensor(record.kind)}: {_msg(exc)}") from exc

    def _write_record(self, f: Any, record: Record) -> bool:
        """Store ``record``; True when it went into the file (a group's datasets and attribute),
        False when it became an entry of ``/structures`` (no stored body), written at step end.
        The bodies are written before it returns (anonymous datasets); the group, the links to
        the datasets and the attributes are held until :meth:`_set_attrs`."""
        call = record.call
        side = (call.module, call.call, record.kind)
        if side in self._written:  # before anything of it reaches the file: the step keeps the first
            raise StoreError(f"{self.run_dir}: step {call.step}: {call.tensor(record.kind)} ({record.kind} of "
                             f"{call.module}#{call.call}) written a second time in the step; the first is kept")
        try:
            text = _to_json(record.structure)
        except (TypeError, ValueError, RecursionError) as exc:
            raise StoreError(f"{call.tensor(record.kind)}: structure is not valid JSON: {exc}") from None
        self._written.add(side)
        bodies = list(self._stored_bodies(record))
        if not bodies and self._list_sides:
            self._entries.append(f'{self._entry_prefix(call.module, record.kind)}{call.call},"structure":{text}}}\n')
            return False
        gname = self._gnames.get((call.module, call.call))
        if gname is None:
            gname = group_name(call.module, call.call)
            if len(self._gnames) < 65536:
                self._gnames[(call.module, call.call)] = gname
        if gname not in self._groups:  # the step file is new: every group in it is here
            self._groups[gname] = None
            self._new_groups.append(gname)
            if not self._list_sides:  # version 1 repeated the name's module and call, the root's step and rank
                self._attrs.extend((gname, name, value) for name, value in (
                    ("module", call.module), ("call", call.call), ("step", call.step), ("rank", call.rank)))
        links, dnames, kind, ksuffixes, kprefix = self._links, self._dnames, record.kind, self._ksuffixes, None
        located: list[str] | None = [] if self._list_sides and self._list_bodied else None
        for path, node, tensor in bodies:
            dname = dnames.get((kind, path))
            if dname is None:
                dname = dataset_name(kind, path).encode()
                if len(dnames) < 65536:
                    dnames[(kind, path)] = dname
            if tensor is None:
                original = self._datasets.get(node["same_as"])
                if original is not None:  # an HDF5 hard link: plain h5py readers see the tensor too
                    links.append((original, gname, dname))
                continue
            if kprefix is None:  # str(record.key(path)) (the form of "same_as") without a TensorKey each
                kprefix = f"r{call.rank}/s{call.step}/{gname[:gname.rindex('#')]}/{call.call}/{kind}"
            suffix = ksuffixes.get(path)
            if suffix is None:
                suffix = "".join(["/" + encode_part(p) for p in path])
                if len(ksuffixes) < 65536:
                    ksuffixes[path] = suffix
            key = kprefix + suffix
            self._datasets[key], where = self._create_dataset(gname, dname, tensor, key)
            if located is not None and where is not None:
                located.append(f"{json_str(dname.decode())}:{where}")
        self._attrs.append((gname, record.kind, text))
        if located is not None:  # the side in /structures too, with where its bodies lie (LOCATIONS)
            prefix = self._entry_prefix(call.module, record.kind)
            self._entries.append(f'{prefix}{call.call},"structure":{text},"{LOCATIONS}":{{{",".join(located)}}}}}\n')
        return True

    def _entry_prefix(self, module: str, kind: str) -> str:
        """The start of a ``/structures`` entry of ``module``'s ``kind`` side, up to its call number."""
        prefix = self._prefixes.get((module, kind))
        if prefix is None:
            prefix = f'{{"module":{json_str(module)},"kind":{json_str(kind)},"call":'
            if len(self._prefixes) < 65536:
                self._prefixes[(module, kind)] = prefix
        return prefix

    def _create_dataset(self, gname: str, name: bytes, tensor: torch.Tensor, key: str) -> tuple[Any, str | None]:
        """An anonymous dataset (low-level identifier) holding ``tensor``, to be linked as ``name``
        into the group ``gname`` with its attributes by :meth:`_set_attrs`, and where its bytes lie
        in the file as JSON text (a :data:`LOCATIONS` value: ``[offset, nbytes, numpy type, shape,
        attributes]``; offset 0 for no bytes), or None when HDF5 placed them (filters, no raw
        descriptor) or the type is not read raw.

        Without filters the dataset is contiguous with its space allocated at creation (no fill
        value written), and the bytes go from the tensor's memory to that space in the file with
        ``pwrite`` on HDF5's own descriptor, the GIL released: HDF5 would copy exactly these
        bytes there (the file type is the memory type: nothing to convert), through the same
        descriptor, holding the GIL. Raw data and metadata never share file space (HDF5 keeps
        them apart), so nothing HDF5 caches covers these bytes.
        """
        # detach().resolve_conj().resolve_neg().cpu().contiguous(), each only where it changes
        # something (the usual tensor needs none: five dispatched calls for nothing)
        if tensor.requires_grad:
            tensor = tensor.detach()
        if tensor.is_conj():
            tensor = tensor.resolve_conj()
        if tensor.is_neg():
            tensor = tensor.resolve_neg()
        if not tensor.is_cpu:
            tensor = tensor.cpu()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        try:
            data, encoding = encode(tensor, _NUMPY_DTYPES.__contains__)
        except TypeError as exc:
            raise StoreError(f"{key}: {exc}") from None
        array = data.numpy()
        flat = array.ndim > _MAX_RANK
        if flat:
            array = array.reshape(-1)
        if self._filters and array.ndim > 0 and array.size > 0:  # chunked, through h5py as it chooses the chunks
            import h5py

            ds, offset = h5py.Group(self._file.id).create_dataset(None, data=array, **self._filters).id, None
        else:
            ds, offset = self._contiguous(self._file.id, array, spares=True)
        self._links.append((ds, gname, name))
        attrs = self._attrs
        dtype_name = str(tensor.dtype)
        attrs.append((ds, "dtype", dtype_name))
        if encoding:
            attrs.append((ds, "encoding", encoding))
        if flat:
            attrs.append((ds, "shape", dumps(list(data.shape))))
        if offset is None and not array.nbytes:  # no bytes to find: an empty tensor is listed too
            offset = 0
        if offset is None or array.dtype not in _RAW_DTYPES:
            return ds, None
        # what follows the offset and size, the same for every dataset of this type and shape
        tails, tail_key = self._tails, (array.dtype, array.shape, dtype_name, encoding, flat and data.shape)
        tail = tails.get(tail_key)
        if tail is None:
            shown = {"dtype": dtype_name, **({"encoding": encoding} if encoding else {}),
                     **({"shape": dumps(list(data.shape))} if flat else {})}
            tail = dumps([array.dtype.str, list(array.shape), shown])[1:]
            if len(tails) < 4096:
                tails[tail_key] = tail
        return ds, f"[{offset},{array.nbytes},{tail}"

    def _set_attrs(self) -> None:
        """Create the groups held since the last call (in call-start order), link the datasets
        into them, then write the attributes (in the order they were set)."""
        new, links, attrs = self._new_groups, self._links, self._attrs
        self._new_groups, self._links, self._attrs = [], [], []
        api = _api()
        groups = self._groups
        if new:
            fid, create, gcpl = self._file.id, api.h5g.create, api.gcpl
            for gname in new:
                groups[gname] = create(fid, gname.encode(), gcpl=gcpl)
        link = api.h5o.link
        for oid, gname, dname in links:
            link(oid, groups[gname], dname)
        for target, name, value in attrs:
            _set_attr(groups[target] if isinstance(target, str) else target, name, value)

    def _contiguous(self, fid: Any, array: np.ndarray[Any, Any], spares: bool = False,
                    text: bool = False) -> tuple[Any, int | None]:
        """An anonymous contiguous dataset of the file ``fid`` holding ``array`` (with ``spares``,
        one created ahead where there is one: :meth:`_take`), and the offset in the file where
        this writer put the array's bytes (None where HDF5 wrote them). ``text``: a step's
        ``/structures`` bytes, whose length seldom repeats (its dataspace is not cached)."""
        api = _api()
        h5d = api.h5d
        if self._fd is None or not array.nbytes:  # HDF5 writes (no raw descriptor; nothing to write)
            ds = h5d.create(fid, None, api.type_of(array.dtype), api.space_of(array.shape, not text), dcpl=api.dcpl)
            if array.nbytes:
                ds.write(api.all_space, api.all_space, array)
            return ds, None
        if spares:
            ds, offset = self._take(fid, array)
        else:
            ds = h5d.create(fid, None, api.type_of(array.dtype), api.space_of(array.shape, not text),
                            dcpl=api.dcpl_direct)
            offset = ds.get_offset()
        if offset is None:  # HDF5 allocated nothing (never seen): it writes
            ds.write(api.all_space, api.all_space, array)
        else:
            # a C-contiguous array's buffer is its bytes: no flattened byte view to make first
            done = os.pwrite(self._fd, array.data, offset) if array.flags.c_contiguous else 0
            if done != array.nbytes:  # a short write (or none): the rest
                _pwrite_all(self._fd, array.reshape(-1).view(np.uint8).data[done:], offset + done)
        return ds, offset

    def _take(self, fid: Any, array: np.ndarray[Any, Any]) -> tuple[Any, int | None]:
        """A new anonymous contiguous dataset of ``array``'s type and shape, its space allocated,
        and that space's offset in the file: one created ahead by an earlier call, or a new one.

        Created one by one between the model's operations, a dataset took ~175-230 us of CPU
        time (HDF5's code and data evicted from the caches by the model's work in between),
        ~20-25 us when created in a row. So more are created at once: as many as the last
        completed step took of this dtype and shape after this one, else, when the step takes
        a dtype and shape again, as many as it took so far (1, 1, 2, 4, 8...: a layer's shapes
        repeat with each layer); at most :data:`_SPARE_BYTES` of space ahead (at least one
        dataset). The spares left when the step ends were never linked: HDF5 deletes them then
        and frees their space, which was never written (a hole, no data, where the file system
        keeps holes). Readers never see them: a dataset is reachable only once it is linked.
        """
        key = (array.dtype, array.shape)
        spare = self._spare.get(key)
        taken = self._taken[key] = self._taken.get(key, 0) + 1
        if spare:
            return spare.pop()
        last = self._last_taken.get(key, 0)
        want = last - taken + 1 if last >= taken else taken - 1  # this one included
        api = _api()
        create, tid, space, dcpl = api.h5d.create, api.type_of(array.dtype), api.space_of(array.shape), api.dcpl_direct
        ds = create(fid, None, tid, space, dcpl=dcpl)
        made = [(ds, ds.get_offset())]
        for _ in range(min(want, _SPARE_BYTES // array.nbytes) - 1):
            ahead = create(fid, None, tid, space, dcpl=dcpl)
            made.append((ahead, ahead.get_offset()))
        if len(made) > 1:
            self._spare[key] = made[:0:-1]  # popped from the end: in the order they were created
        return made[0]

    def _end_step(self, info: StepInfo) -> None:
        f = self._begin(info.step)
        final, partial = self._paths(info.step)
        try:
            self._set_attrs()
            # HDF5 deletes the spare datasets (never linked) and frees their space
            self._spare, self._taken, self._last_taken = {}, {}, self._taken
            if self._entries:
                text = "".join(self._entries).encode("utf-8")  # ASCII: json.dumps escapes the rest
                ds = self._contiguous(f.id, np.frombuffer(text, dtype=np.uint8), text=True)[0]
                _api().h5o.link(ds, f.id, STRUCTURES.encode())
            _set_attr(f.id, "calls", dumps(calls_to_json(info.calls)))
            _set_attr(f.id, "call_ends", dumps(calls_to_json(info.call_ends)))
            self._file, self._step, self._fd, self._groups, self._datasets, self._entries = None, None, None, {}, {}, []
            self._attrs, self._new_groups, self._links, self._written = [], [], [], set()
            f.close()
            os.replace(partial, final)
            stat = os.stat(final)
            self._finished = (info.step, [stat.st_size, stat.st_mtime_ns])
        except Exception as exc:
            self._file = f
            self._drop()
            raise StoreError(f"{partial}: cannot finish step {info.step}: {_msg(exc)}") from exc

    def _journal_fields(self, step: int) -> dict[str, Any]:
        """The completed step file's size and modification time (:data:`FILE_KEY`): a reader
        trusts the file's :data:`LOCATIONS` while they still hold."""
        finished, self._finished = self._finished, None
        return {FILE_KEY: finished[1]} if finished is not None and finished[0] == step else {}

    def _close(self) -> None:
        try:
            self._abandon()
        except StoreError as exc:  # the step is incomplete anyway; closing must still finish
            _log.warning("ilstore: %s", exc)


class _Api:
    """h5py's low-level modules and the property lists, types and dataspaces the writer reuses."""

    def __init__(self) -> None:
        import h5py
        from h5py import h5a, h5d, h5f, h5fd, h5g, h5o, h5p, h5s, h5t

        self.h5a, self.h5d, self.h5f, self.h5g, self.h5o, self.h5t, self.h5s = h5a, h5d, h5f, h5g, h5o, h5t, h5s
        # a step file as ``h5py.File(path, "w", track_order=True)`` creates it, except that the root
        # tracks the creation order of its links only (groups list in call-start order), not of
        # its attributes: indexing those costs ~20 % of a step file's fixed cost
        self.fapl = h5p.create(h5p.FILE_ACCESS)
        self.fapl.set_libver_bounds(h5f.LIBVER_EARLIEST, h5f.LIBVER_LATEST)
        self.fcpl = h5p.create(h5p.FILE_CREATE)
        self.fcpl.set_link_creation_order(h5p.CRT_ORDER_TRACKED | h5p.CRT_ORDER_INDEXED)
        self.fcpl.set_obj_track_times(False)
        # step files made with these have the sec2 driver and no user block (unless HDF5_DRIVER
        # says otherwise): HDF5's addresses are then file offsets, and raw data is pwritten
        self.offsets = self.fapl.get_driver() == h5fd.SEC2 and self.fcpl.get_userblock() == 0
        # what ``attrs[name] = value`` creates for a ``str``/``int``
        self.vlen_str = h5t.py_create(h5py.string_dtype(), logical=True)
        self.i64 = h5t.py_create(np.dtype("<i8"))
        # the memory types h5py's ``AttrID.write`` makes for each value written (``py_create`` of
        # the value's numpy dtype: h5py's object type for a str, which it converts), made once
        self.str_mem = h5t.py_create(h5py.string_dtype())
        self.i64_mem = self.i64
        self.scalar = h5s.create(h5s.SCALAR)
        self.all_space = h5s.ALL
        self.str_dtype = h5py.string_dtype()
        self.str_dtypes = {True: self.str_dtype, False: h5py.string_dtype("ascii")}  # by "is UTF-8"
        # groups without time stamps (as datasets have always been): HDF5 otherwise rewrites a
        # group's modification time with each attribute (-13 % of the stats mode's HDF5 time)
        self.gcpl = h5p.create(h5p.GROUP_CREATE)
        self.gcpl.set_obj_track_times(False)
        # as h5py's create_dataset makes them (no time stamps), contiguous, space allocated
        # at creation without writing a fill value (every byte is written right after)
        self.dcpl = h5p.create(h5p.DATASET_CREATE)
        self.dcpl.set_obj_track_times(False)
        self.dcpl_direct = h5p.create(h5p.DATASET_CREATE)
        self.dcpl_direct.set_obj_track_times(False)
        self.dcpl_direct.set_layout(h5d.CONTIGUOUS)
        self.dcpl_direct.set_alloc_time(h5d.ALLOC_TIME_EARLY)
        self.dcpl_direct.set_fill_time(h5d.FILL_TIME_NEVER)
        self._types: dict[np.dtype[Any], Any] = {}
        self._spaces: dict[tuple[int, ...], Any] = {}

    def type_of(self, dtype: np.dtype[Any]) -> Any:
        """The HDF5 type h5py gives ``dtype`` (``py_create(dtype, logical=True)``), cached."""
        tid = self._types.get(dtype)
        if tid is None:
            tid = self._types[dtype] = self.h5t.py_create(dtype, logical=True)
        return tid

    def space_of(self, shape: tuple[int, ...], cache: bool = True) -> Any:
        """The dataspace of ``shape`` (scalar for ``()``), cached (they are never modified) unless
        ``cache`` is false (a length that seldom repeats: a step's ``/structures`` text)."""
        space = self._spaces.get(shape)
        if space is None:
            space = self.scalar if not shape else self.h5s.create_simple(shape)
            if cache and len(self._spaces) < 4096:
                self._spaces[shape] = space
        return space


@functools.cache
def _api() -> _Api:
    return _Api()


def _vfd_handle(fid: Any) -> int | None:
    """The descriptor HDF5 writes the step file ``fid`` (created with the writer's property
    lists) through, where addresses in the file are file offsets (:attr:`_Api.offsets`; asked of
    each file through h5py's ``File.driver`` and ``userblock_size``, ~40 us of a step's ~360)."""
    if not pread_ok or not _api().offsets:
        return None
    try:
        return int(fid.get_vfd_handle())
    except (OSError, RuntimeError, ValueError, TypeError):
        return None


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked)."""
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    while view.nbytes:
        done = os.pwrite(fd, view, offset)
        if done <= 0:
            raise OSError(f"pwrite wrote nothing at offset {offset}")
        view, offset = view[done:], offset + done


def _set_attr(oid: Any, name: str, value: str | int) -> None:
    """``attrs[name] = value`` for a new ``str`` or ``int`` attribute of the object ``oid`` (a
    low-level identifier), the same HDF5 type and layout, through h5py's low-level API: the
    high-level one writes a temporary attribute and renames it (to allow overwriting), about
    twice the time; it took a fifth of a full capture's writer time. An attribute that already
    exists (never, as the writer uses it) is replaced."""
    api = _api()
    is_str = isinstance(value, str)
    key, tid = name.encode("utf-8"), api.vlen_str if is_str else api.i64
    try:
        attr = api.h5a.create(oid, key, tid, api.scalar)
    except (OSError, RuntimeError, ValueError):  # it exists
        api.h5a.delete(oid, key)
        attr = api.h5a.create(oid, key, tid, api.scalar)
    if is_str:
        attr.write(np.array(value, dtype=api.str_dtype), mtype=api.str_mem)
    else:
        attr.write(np.array(value, dtype="<i8"), mtype=api.i64_mem)


def _json_attr(path: Path, attrs: Any, name: str) -> Any:
    # Asked first: get() of a missing name raises and catches a KeyError built from HDF5's error
    # stack (~0.1 ms; two of a call's three kinds are usually missing: a third of planning).
    try:
        present = name in attrs
    except KeyError:
        present = False
    text = attrs.get(name) if present else None
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return _json_text(path, name, str(text))


def _json_text(path: Path, name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptFileError(path, f"attribute {name!r} is not valid JSON: {exc}") from None


#: HDF5 memory types of numpy dtypes (``h5t.py_create``, ~6 us a call), made once each.
_MEM_TYPES: dict[np.dtype[Any], Any] = {}


def _mem_type(dtype: np.dtype[Any]) -> Any:
    tid = _MEM_TYPES.get(dtype)
    if tid is None:
        from h5py import h5t

        tid = _MEM_TYPES[dtype] = h5t.py_create(dtype)
    return tid


def _vlen_text(attr: Any) -> str | None:
    """A scalar variable-length string attribute (h5py's low-level ``AttrID``) read as h5py's
    ``attrs[name]`` reads it (UTF-8, ``surrogateescape``); None for any other attribute. Told
    apart by its HDF5 type and dataspace: ``attr.dtype`` (the numpy dtype h5py builds anew for
    each attribute) took half of the time of a small pair's structure and dtype reads."""
    api = _api()  # h5py's modules without an import statement a call (~1 us each)
    h5t = api.h5t
    tid = attr.get_type()
    if (tid.get_class() != h5t.STRING or not tid.is_variable_str()
            or attr.get_space().get_simple_extent_type() != api.h5s.SCALAR):
        return None
    dtype = api.str_dtypes[tid.get_cset() == h5t.CSET_UTF8]  # as attr.dtype, made once
    value = np.zeros((), dtype=dtype)
    attr.read(value, mtype=_mem_type(dtype))
    raw: Any = value[()]
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else None


@functools.cache
def _read_fapl() -> Any:
    """The file access property list ``h5py.File(path, "r")`` makes for each file (h5py's
    ``make_fapl`` without arguments: no driver set, library versions from the earliest, no
    alignment, the default chunk cache), made once: HDF5 copies it at each open."""
    from h5py import h5f, h5p

    fapl = h5p.create(h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5f.LIBVER_EARLIEST, h5f.LIBVER_LATEST)
    fapl.set_alignment(1, 1)
    fapl.set_cache(*fapl.get_cache())
    return fapl


def _open_read(path: Path) -> Any:
    """``h5py.File(path, "r")``, the same file access properties and errors, without the
    property lists h5py makes anew for each file (a fifth of a step file's opening)."""
    import h5py
    from h5py import h5f

    try:
        fid = h5f.open(os.fsencode(os.fspath(path)), h5f.ACC_RDONLY, fapl=_read_fapl())
    except Exception as exc:  # OSError: truncated, not HDF5, locked
        raise CorruptFileError(path, f"cannot open the HDF5 file (truncated or corrupt?): {_msg(exc)}") from None
    try:
        return h5py.File(fid)
    finally:
        fid.close()  # the File holds an identifier of its own


def _attr_get(obj: Any, name: str, default: Any = None) -> Any:
    """``obj.attrs.get(name, default)`` of an h5py object: a scalar variable-length string or a
    scalar number that reads without conversion is read through the low-level API (~25 us
    instead of ~70-100 us); anything else, and any error, goes through h5py's attributes."""
    from h5py import h5a, h5s, h5t

    try:
        oid, key = obj.id, name.encode("utf-8")
        if not h5a.exists(oid, key):
            return default
        attr = h5a.open(oid, key)
        tid = attr.get_type()
        if tid.get_class() == h5t.STRING:
            text = _vlen_text(attr)
            if text is not None:
                return text
        else:
            raw = _raw_type(tid)
            if raw is not None and attr.get_space().get_simple_extent_type() == h5s.SCALAR:
                value = np.zeros((), dtype=raw[0])
                attr.read(value, mtype=_mem_type(raw[0]))
                return value[()]
    except Exception:  # noqa: BLE001 -- read again through h5py's attributes, which raise what they raise
        pass
    return obj.attrs.get(name, default)


def _group_texts(oid: Any) -> dict[str, str] | None:
    """Every attribute of a call's group (low-level identifier) by name, when each is a scalar
    variable-length string (what the writer gives a group: its sides' structures); None when
    one is not, or h5py fails (the caller then reads through h5py's attributes, with their
    errors). One pass over the group instead of a lookup per kind: ~half the time of planning's
    structure reads."""
    h5a = _api().h5a
    try:
        out: dict[str, str] = {}
        for index in range(h5a.get_num_attrs(oid)):
            attr = h5a.open(oid, index=index)
            text = _vlen_text(attr)
            if text is None:
                return None
            out[attr.name.decode("utf-8", "surrogateescape")] = text
        return out
    except Exception:  # noqa: BLE001 -- read again through h5py's attributes, which raise what they raise
        return None


def _raised_in_h5py(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "h5py" in tb.tb_frame.f_code.co_filename


def _guarded(method: Any) -> Any:
    """Run ``method`` holding the reader's lock (h5py serialises its calls anyway; the lock also
    keeps a file from being closed by :meth:`Hdf5Reader._close_unused` in one thread while
    another uses it), and turn h5py's own errors on a damaged file (KeyError "bad object
    header", OSError, RuntimeError...) into a CorruptFileError naming the step file; our own
    KeyErrors pass."""

    @functools.wraps(method)
    def wrapper(self: Hdf5Reader, first: Any, *args: Any) -> Any:
        try:
            with self._lock:
                return method(self, first, *args)
        except CorruptFileError:
            raise
        except KeyError as exc:
            if not _raised_in_h5py(exc):
                raise
            err: Exception = exc
        except (OSError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
            err = exc
        step = first if isinstance(first, int) else first.step
        raise CorruptFileError(self._step_path(step), f"damaged HDF5 data: {_msg(err)}") from None

    return wrapper


class _Located(NamedTuple):
    """Where a dataset's values lie and how they read (:meth:`Hdf5Reader.prepare_loads`)."""

    path: str  # the step file, opened for each planned load (not HDF5's descriptor: its file may be closed)
    offset: int
    nbytes: int
    tdtype: torch.dtype
    shape: tuple[int, ...]
    attrs: dict[str, Any]
    where: str  # /group/dataset, for messages


def _raw_layout(dsid: Any) -> tuple[int, int, torch.dtype, tuple[int, ...]] | None:
    """``(offset, nbytes, torch dtype, shape)`` of a dataset (h5py's low-level identifier) whose
    values ``ds[()]`` would give by copying the file's bytes: contiguous, no filters or external
    storage, all its bytes allocated, a file type equal to the in-memory type of its numpy dtype
    (so HDF5 converts nothing), the native byte order, not empty. None for anything else."""
    h5d = _api().h5d
    raw = _raw_type(dsid.get_type())
    shape = dsid.shape
    if raw is None or shape is None or len(shape) > _MAX_RANK:
        return None
    dtype, tdtype = raw
    dcpl = dsid.get_create_plist()
    if dcpl.get_layout() != h5d.CONTIGUOUS or dcpl.get_external_count() or dcpl.get_nfilters():
        return None
    nbytes = math.prod(shape) * dtype.itemsize
    offset = dsid.get_offset()
    if not nbytes or offset is None or dsid.get_storage_size() != nbytes:
        return None
    return offset, nbytes, tdtype, tuple(shape)


#: What :func:`_raw_type` found, by the HDF5 type's encoding (``H5Tencode``: the whole type).
_RAW_TYPES: dict[bytes, tuple[np.dtype[Any], torch.dtype] | None] = {}


def _raw_type(tid: Any) -> tuple[np.dtype[Any], torch.dtype] | None:
    """The numpy and torch dtypes of a dataset's HDF5 type (h5py's low-level ``TypeID``) when
    its values read raw: a numpy dtype of :data:`_RAW_DTYPES` whose in-memory HDF5 type equals
    the file's (nothing to convert); None otherwise. Looked up by the type's encoding (~1 us)
    instead of the numpy dtype h5py builds and a second type compared per dataset (~15 us)."""
    key = tid.encode()
    found = _RAW_TYPES.get(key, _MISSING)
    if found is _MISSING:
        dtype = tid.dtype
        tdtype = _RAW_DTYPES.get(dtype)
        found = (dtype, tdtype) if tdtype is not None and tid.equal(_mem_type(dtype)) else None
        if len(_RAW_TYPES) < 1024:
            _RAW_TYPES[key] = found
    return found  # type: ignore[return-value]


def _dataset_attrs(dsid: Any) -> dict[str, Any]:
    """``dict(ds.attrs)`` of a dataset (low-level identifier); a lone scalar variable-length
    string ``dtype`` (what the writer gives nearly every dataset) is read the way h5py's
    ``attrs[name]`` reads it, with 4 calls instead of ~12."""
    h5a = _api().h5a
    if h5a.get_num_attrs(dsid) == 1 and h5a.exists(dsid, b"dtype"):
        text = _vlen_text(h5a.open(dsid, b"dtype"))
        if text is not None:
            return {"dtype": text}
    import h5py

    return dict(h5py.Dataset(dsid).attrs)


def _read_raw(fd: int, offset: int, nbytes: int, tdtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
    """``nbytes`` at ``offset`` as a tensor of ``tdtype`` and ``shape``, one ``pread`` (GIL
    released); None where the read fails or the file ends early (h5py then reads, with its errors)."""
    body, view = byte_tensor(nbytes)
    try:
        if pread_into(fd, (view,), offset) != nbytes:
            return None
    except OSError:
        return None
    return body.view(tdtype).reshape(shape)


def _read_planned(located: _Located) -> torch.Tensor | None:
    """A planned load: open the step file, one ``pread``, close; None where any of it fails (the
    load then goes through h5py, with its errors)."""
    try:
        fd = os.open(located.path, O_RDONLY)
    except OSError:
        return None
    try:
        return _read_raw(fd, located.offset, located.nbytes, located.tdtype, located.shape)
    finally:
        os.close(fd)


def _decoded(path: Path | str, key: TensorKey, node: Mapping[str, Any], stored: torch.Tensor, attrs: Mapping[str, Any],
             where: str) -> torch.Tensor:
    """The tensor from a dataset's stored values and its attributes (``shape``, ``encoding``, ``dtype``)."""
    try:
        shape = attrs.get("shape")
        if shape is not None:
            stored = stored.reshape(json.loads(str(shape)))
        encoding = attrs.get("encoding", "")
        dtype = dtype_from_str(str(attrs.get("dtype", node.get("dtype", str(stored.dtype)))))
        return decode(stored, str(encoding), dtype)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise CorruptFileError(path, f"{key}: cannot decode dataset {where}: {exc}") from None


#: How many step files a reader keeps open (besides those its planned loads read). An open step
#: file costs ~0.7-1 MB (HDF5's and h5py's per-file state): with 64, the two readers of a
#: comparison of long tensors-mode runs held ~90 MB more (1,000 steps of 32 small tensors:
#: 394 MB peak, 300 MB with 4, 306 MB with 8, the CPU time the same within noise); reopening a
#: step file costs well under a millisecond.
_OPEN_FILES = 8
#: How many steps' ``/structures`` entries a reader keeps (the base class keeps as many steps' structures).
_CACHED_SIDES = 4
#: How many tensors a reader locates ahead, as it reads their sides' structures, for the next
#: ``prepare_loads`` (see :meth:`Hdf5Reader._locate_side`): a comparer's window is ~1,024 pairs;
#: ~0.5 KB each.
_PRELOCATED = 8192
_MISSING = object()


class _Sides(NamedTuple):
    """The entries of one step's ``/structures``: each side's structure, and the calls that have one."""

    structures: dict[tuple[str, int, str], Any]
    calls: dict[tuple[str, int], None]  # in entry order
    locations: dict[tuple[str, int, str], Any]  # the sides' LOCATIONS, where an entry has them


_NO_SIDES = _Sides({}, {}, {})


def parse_structures(data: bytes, path: Path, cut: bool = False) -> _Sides:
    """The entries of a ``/structures`` dataset: one JSON object per line,
    ``{"module": str, "call": int, "kind": "inputs"|"outputs"|"post_fwd_inputs", "structure": ...}``.

    A final line without its newline is a torn write and ignored (the writer ends every entry
    with one). In a cut step's file (``cut``, a ``.partial`` file, killed while its step ended)
    the entries stop at the first damaged line; in a completed step's file a damaged entry raises
    CorruptFileError naming the file and the line.
    """
    structures: dict[tuple[str, int, str], Any] = {}
    calls: dict[tuple[str, int], None] = {}
    locations: dict[tuple[str, int, str], Any] = {}
    lines = data.split(b"\n")
    for number, line in enumerate(lines[:-1], 1):  # lines[-1]: after the last newline (torn or empty)
        try:
            doc = json.loads(line)
            if not isinstance(doc, dict) or "structure" not in doc:
                raise ValueError("not an object with a \"structure\"")
            module, call, kind = doc.get("module"), doc.get("call"), doc.get("kind")
            if not isinstance(module, str) or not isinstance(call, int) or isinstance(call, bool) or call < 0:
                raise ValueError(f"bad module call {module!r}#{call!r}")
            if kind not in KINDS:
                raise ValueError(f"bad kind {kind!r}")
            if (module, call, kind) in structures:
                raise ValueError(f"a second entry for the {kind} of {module}#{call}")
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError included
            if cut:
                break
            raise CorruptFileError(path, f"/{STRUCTURES} line {number}: {exc}") from None
        structures[(module, call, kind)] = doc["structure"]
        calls[(module, call)] = None
        found = doc.get(LOCATIONS)
        if found is not None:
            locations[(module, call, kind)] = found
    return _Sides(structures, calls, locations)


class Hdf5Reader(StoreReader):
    """Reads a run written by :class:`Hdf5Writer`; each step file is opened once, when first needed."""

    name = "hdf5"

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__(run_dir)
        self._files: OrderedDict[int, Any] = OrderedDict()  # the open step files, least recently used first
        self._lock = threading.RLock()  # around every h5py use (see _guarded); planned loads do without
        self._paths: dict[int, Path] = {}
        self._raw_fds: dict[int, int] = {}  # step -> its file's descriptor, for raw reads of contiguous datasets
        self._last_group: tuple[CallKey, Any] | None = None  # the group looked up last (h5py: ~0.1 ms a lookup)
        self._last_texts: tuple[CallKey, Any] | None = None  # that group's attributes (_group_texts)
        # step -> its /structures entries (format version 2), of the few steps read last
        self._sides: OrderedDict[int, _Sides] = OrderedDict()
        # see prepare_loads: where the planned bodies lie, and the nodes of the originals of
        # the planned de-duplicated (``same_as``) tensors
        self._located: dict[TensorKey, _Located | None] = {}
        self._originals: dict[TensorKey, Mapping[str, Any]] = {}
        # see _locate_side: the tensors of the sides read since the last prepare_loads, located
        self._prelocate = False
        self._prelocated: dict[TensorKey, _Located | None] = {}
        self._trusted: dict[int, bool] = {}  # step -> whether its file's LOCATIONS may be used (_trusts)

    @classmethod
    def can_open(cls, run_dir: Path) -> bool:
        try:
            with os.scandir(run_dir) as it:
                for entry in it:
                    if _STEP_FILE.match(entry.name) and entry.is_file():
                        with open(entry.path, "rb") as fh:
                            return fh.read(8) == _HDF5_SIGNATURE
        except OSError:
            return False
        return False

    def _scan(self) -> dict[int, bool]:
        """Step → whether it is completed (``.h5``) rather than cut (``.h5.partial`` only)."""
        out: dict[int, bool] = {}
        try:
            with os.scandir(self.run_dir) as it:
                for entry in it:
                    m = _STEP_FILE.match(entry.name)
                    if m:
                        step = int(m.group(1))
                        out[step] = out.get(step, False) or m.group(2) is None
        except OSError as exc:
            raise StoreError(f"{self.run_dir}: cannot list the run directory: {exc.strerror}") from None
        return out

    def _list_steps(self) -> list[int]:
        return sorted(self._scan())

    def _completed_steps(self) -> list[int]:
        return sorted(s for s, done in self._scan().items() if done)

    def _file(self, step: int) -> Any:
        f = self._files.get(step)
        if f is not None:
            self._files.move_to_end(step)
            return f
        path = self.run_dir / f"{step_dir_name(step)}.h5"
        if not path.is_file():
            partial = path.with_name(path.name + ".partial")
            if not partial.is_file():
                raise KeyError(f"no step {step} in {self.run_dir}")
            path = partial
        f = _open_read(path)
        fmt = _attr_get(f, "format")
        if (fmt.decode() if isinstance(fmt, bytes) else fmt) != FILE_FORMAT:
            f.close()
            raise CorruptFileError(path, f"not an ilstore HDF5 step file (no format=\"{FILE_FORMAT}\" attribute)")
        version = _attr_get(f, "format_version", 1)
        if isinstance(version, (int, np.integer)) and version > FILE_VERSION:
            f.close()
            raise CorruptFileError(path, f"format_version {version}: written by a newer ilstore (this one reads "
                                   f"step files up to version {FILE_VERSION})")
        self._files[step], self._paths[step] = f, path
        self._close_unused(step)
        if pread_ok and f.userblock_size == 0 and f.driver == "sec2":  # addresses are file offsets: raw reads work
            try:  # HDF5's own descriptor (pread leaves its position alone): no second one per step
                self._raw_fds[step] = int(f.id.get_vfd_handle())
            except (OSError, RuntimeError, ValueError, TypeError):
                pass
        return f

    def _close_unused(self, keep: int) -> None:
        """Close the least recently used step files beyond :data:`_OPEN_FILES` (a long run's
        reader would otherwise hold one descriptor per step it read, and stop at the process's
        limit: 1,024 by default), never ``keep``. Called with the lock held (from :meth:`_file`),
        so no other thread is using a file it closes; planned loads use descriptors of their own."""
        if len(self._files) <= _OPEN_FILES:
            return
        for step in [s for s in self._files if s != keep]:
            f = self._files.pop(step)
            self._raw_fds.pop(step, None)
            if self._last_group is not None and self._last_group[0].step == step:
                self._last_group = self._last_texts = None
            try:
                f.close()
            except Exception:  # closing a read-only file cannot lose data
                pass
            if len(self._files) <= _OPEN_FILES:
                return

    def _rank(self, f: Any) -> int:
        rank = f.attrs.get("rank", 0)
        return int(rank) if isinstance(rank, (int, np.integer)) else 0

    @_guarded
    def _list_calls(self, step: int) -> list[CallKey]:
        f = self._file(step)
        path, rank = self._paths[step], self._rank(f)
        calls = _json_attr(path, f.attrs, "calls")
        try:
            if calls is not None:
                return calls_from_json(calls, step, rank)
            # a cut step has no call list yet: groups come back in creation order (the calls with
            # a stored body; the other sides' entries are written when the step ends)
            out, seen = [], set()
            for name in f.keys():
                if name == STRUCTURES:
                    continue
                module, call = parse_group_name(name)
                out.append(CallKey(rank, step, module, call))
                seen.add((module, call))
            out.extend(CallKey(rank, step, module, call) for module, call in self._step_sides(step).calls
                       if (module, call) not in seen)
            return out
        except ValueError as exc:
            raise CorruptFileError(path, f"bad module call list: {exc}") from None

    def _list_call_ends(self, step: int) -> list[CallKey] | None:
        with self._lock:
            f = self._file(step)
            ends = _json_attr(self._paths[step], f.attrs, "call_ends")
        if ends is None:
            return None
        try:
            return calls_from_json(ends, step, self._rank(f))
        except ValueError as exc:
            raise CorruptFileError(self._paths[step], f"bad call_ends: {exc}") from None

    def _group(self, call: CallKey) -> Any:
        last = self._last_group
        if last is not None and last[0] == call:  # the structure of each kind of one call, in a row
            return last[1]
        f = self._file(call.step)
        try:
            group = f.get(group_name(call.module, call.call))
        except Exception as exc:
            raise CorruptFileError(self._paths[call.step], f"cannot read group of {call.module}#{call.call}: "
                                   f"{_msg(exc)}") from None
        if group is None:
            raise KeyError(f"no module call {call.module}#{call.call} in step {call.step} of {self.run_dir}")
        self._last_group = (call, group)
        return group

    def _step_sides(self, step: int) -> _Sides:
        """The ``/structures`` entries of ``step`` (none in a version-1 file), read once."""
        sides = self._sides.get(step)
        if sides is not None:
            self._sides.move_to_end(step)
            return sides
        f = self._file(step)
        path = self._paths[step]
        sides = _NO_SIDES
        if STRUCTURES in f:
            try:
                data = np.asarray(f[STRUCTURES][()])
            except Exception as exc:
                raise CorruptFileError(path, f"cannot read the dataset /{STRUCTURES}: {_msg(exc)}") from None
            if data.dtype != np.uint8 or data.ndim != 1:
                raise CorruptFileError(path, f"/{STRUCTURES} is not a byte string (a 1-d uint8 dataset)")
            sides = parse_structures(data.tobytes(), path, cut=path.name.endswith(".partial"))
        self._sides[step] = sides
        while len(self._sides) > _CACHED_SIDES:
            self._sides.popitem(last=False)
        return sides

    @_guarded
    def _read_structure(self, call: CallKey, kind: str) -> Any | None:
        sides = self._step_sides(call.step)
        if sides.calls:
            found = sides.structures.get((call.module, call.call, kind), _MISSING)
            if found is not _MISSING:
                return found
            if (call.module, call.call) in sides.calls:  # a call with a side in the list: its group is optional
                f = self._file(call.step)
                if group_name(call.module, call.call) not in f:
                    return None
        group = self._group(call)
        path = self._paths[call.step]
        texts = self._last_texts[1] if self._last_texts is not None and self._last_texts[0] == call else _MISSING
        if texts is _MISSING:  # the call's kinds are asked for in a row: its attributes are read once
            texts = _group_texts(group.id)
            self._last_texts = (call, texts)
        if isinstance(texts, dict):
            text = texts.get(kind)
            structure = _json_text(path, kind, text) if text is not None else None
        else:
            try:
                structure = _json_attr(path, group.attrs, kind)
            except CorruptFileError:
                raise
            except Exception as exc:
                raise CorruptFileError(path, f"cannot read the {kind} of {call.module}#{call.call}: "
                                       f"{_msg(exc)}") from None
        if self._prelocate and structure is not None:
            self._locate_side(call, kind, group, structure)
        return structure

    def _locate_side(self, call: CallKey, kind: str, group: Any, structure: Any) -> None:
        """Locate the stored tensors of a side whose structure was just read, while its group is
        open and its file's metadata cached, for the next :meth:`prepare_loads`: a comparer
        plans a window of steps (reading their structures) before it prepares their loads, and
        with :data:`_OPEN_FILES` step files open at most, locating then reopened each step file
        and read its metadata again (~0.3 ms a file, ~0.1 ms a dataset). On only after a first
        :meth:`prepare_loads` (a comparison), and at most :data:`_PRELOCATED` tensors until the
        next one. A tensor that cannot be located here is located by :meth:`prepare_loads`."""
        from h5py import h5d

        if (call.module, call.call, kind) in self._step_sides(call.step).locations and self._trusts(call.step):
            return  # _locate finds them in the table
        found = self._prelocated
        fd = self._raw_fds.get(call.step)
        gname = group_name(call.module, call.call)
        for path, node in iter_tensor_nodes(structure):
            if len(found) >= _PRELOCATED:
                return
            if node.get("stored") is False or node.get("same_as") is not None:
                continue
            key = call.tensor(kind, path)
            if key in found:
                continue
            if fd is None:  # as _locate_locked: no raw reads of this file
                found[key] = None
                continue
            dname = dataset_name(kind, path)
            try:
                dsid = h5d.open(group.id, dname.encode())
                layout = _raw_layout(dsid)
                found[key] = None if layout is None else _Located(
                    os.fspath(self._paths[call.step]), *layout, _dataset_attrs(dsid), f"/{gname}/{dname}")
            except Exception:  # noqa: BLE001 -- prepare_loads locates it again, load() reports what is wrong
                continue

    def prepare_loads(self, keys: Iterable[TensorKey | tuple[TensorKey, Mapping[str, Any] | None]]) -> None:
        """Find, once and before any of them is loaded, where each key's values lie in its step
        file (offset, size, type, shape, the dataset's attributes): :meth:`load` of such a key
        is then an ``open``, one ``pread`` (GIL released) and a ``close``, and no h5py call, so
        compare workers overlap. Called by the comparer while it plans (one thread); a key that
        cannot be located here (missing, damaged, not stored raw) is loaded the usual way, with
        its errors. Planning opens the step files one after the other under the usual bound
        (:data:`_OPEN_FILES`), so a compare of runs of any length stays under the process's
        open-file limit. Each call replaces what the one before found (the comparer plans and
        compares a window of steps at a time: what it holds stays one window's).

        Args:
            keys: the keys to be loaded, each alone or as ``(key, node)`` with the node
                :meth:`tensor_nodes` gave for it (the comparer's plan holds them), which is then
                not looked up again: the structures of a window's early steps need not stay
                cached (a window of small steps spans hundreds of steps). A de-duplicated
                tensor's original is located instead, and its node kept (given among ``keys``,
                else looked up here) until the next call, for :meth:`load_node` of the tensor.
        """
        prelocated, self._prelocated = self._prelocated, {}
        self._prelocate = True
        self._located.clear()
        self._originals.clear()
        items = [(k, None) if isinstance(k, TensorKey) else k for k in keys]
        given = {key: node for key, node in items if node is not None}
        for key, node in items:
            try:
                if node is None:
                    node = self.meta(key)
                if node.get("stored") is False:
                    continue
                same_as = node.get("same_as")
                if same_as is not None and not self.locator_keys & node.keys():
                    original = TensorKey.parse(same_as)  # load_node() reads the original
                    if original.step != key.step or original == key:
                        continue  # load_node() reports it
                    if original not in self._originals:
                        found = given.get(original)
                        self._originals[original] = found if found is not None else self.meta(original)
                    key = original
                if key not in self._located:
                    located = prelocated.get(key, _MISSING)
                    self._located[key] = self._locate(key) if located is _MISSING else located  # type: ignore[assignment]
            except (KeyError, ValueError, TypeError, OSError, RuntimeError, StoreError):
                continue  # load() reports it

    def _load_original(self, original: TensorKey) -> torch.Tensor:
        node = self._originals.get(original)
        if node is None:
            return self.load(original)
        return self.load_node(original, node if isinstance(node, dict) else dict(node))

    def _original_node(self, original: TensorKey) -> dict[str, Any]:
        node = self._originals.get(original)
        if node is None:
            return self.meta(original)
        return node if isinstance(node, dict) else dict(node)

    def _open_body(self, key: TensorKey, node: dict[str, Any]) -> Body | None:
        """A dataset located (planned, or listed in the step file's :data:`LOCATIONS`) whose
        stored values are the tensor's own: no encoding, the dtype its attribute names, no shape
        attribute other than its own (see :func:`_decoded`)."""
        located = self._located.get(key)
        if located is None:
            located = self._listed(key)
        if located is None:
            return None
        attrs = located.attrs
        dtype = dtype_from_str(str(attrs.get("dtype", node.get("dtype"))))
        if attrs.get("encoding", "") != "" or dtype != located.tdtype:
            return None
        shape = attrs.get("shape")
        if shape is not None and tuple(json.loads(str(shape))) != located.shape:
            return None
        if located.nbytes != math.prod(located.shape) * located.tdtype.itemsize:
            return None
        fd = os.open(located.path, O_RDONLY)
        return Body(fd, located.offset, located.tdtype, located.shape, located.path)

    def _locate(self, key: TensorKey) -> _Located | None:
        with self._lock:
            return self._locate_locked(key)

    def _trusts(self, step: int) -> bool:
        """Whether the :data:`LOCATIONS` of ``step``'s file may be used: the file is a completed
        step's, and its size and modification time are those the step journal recorded when the
        writer finished it (:data:`FILE_KEY`). Anything that rewrote the file since (h5repack, an
        edit with h5py, a copy that did not keep the time) makes the reader ask HDF5 instead."""
        trusted = self._trusted.get(step)
        if trusted is None:
            trusted = False
            path = self._paths.get(step)
            if self._journal is not None and path is not None and not path.name.endswith(".partial"):
                try:  # a damaged line is reported where the step's calls are read, not here
                    recorded = self._journal.field(step, FILE_KEY)
                    stat = os.stat(path)
                except (OSError, CorruptFileError):
                    recorded = stat = None
                trusted = stat is not None and recorded == [stat.st_size, stat.st_mtime_ns]
            if len(self._trusted) >= 65536:
                self._trusted.clear()
            self._trusted[step] = trusted
        return trusted

    def _from_table(self, key: TensorKey) -> _Located | None | object:
        """Where ``key``'s bytes lie by its side's :data:`LOCATIONS` (``key``'s step file opened);
        ``_MISSING`` when the table does not say (none, not trusted, not listed, malformed): HDF5
        is asked then."""
        sides = self._step_sides(key.step)
        table = sides.locations.get((key.module, key.call, key.kind)) if sides.locations else None
        if not isinstance(table, dict) or not self._trusts(key.step):
            return _MISSING
        dname = dataset_name(key.kind, key.path)
        entry = table.get(dname)
        try:
            offset, nbytes, type_name, shape, attrs = entry  # type: ignore[misc]
            tdtype = _RAW_DTYPES.get(np.dtype(type_name)) if isinstance(type_name, str) else None
            if tdtype is None or not isinstance(attrs, dict) or not isinstance(shape, list) \
                    or not all(type(v) is int and v >= 0 for v in (offset, nbytes, *shape)) \
                    or math.prod(shape) * np.dtype(type_name).itemsize != nbytes \
                    or not all(isinstance(v, str) for v in attrs.values()):
                return _MISSING
        except (TypeError, ValueError):
            return _MISSING
        return _Located(os.fspath(self._paths[key.step]), offset, nbytes, tdtype, tuple(shape), attrs,
                        f"/{group_name(key.module, key.call)}/{dname}")

    def _listed(self, key: TensorKey) -> _Located | None:
        """A load not planned: where the step file's :data:`LOCATIONS` put ``key``'s bytes
        (:meth:`_from_table`), None when they do not say (h5py reads then, with its errors)."""
        with self._lock:
            try:
                found = self._from_table(key)
            except Exception:  # noqa: BLE001 -- the h5py read reports what is wrong
                return None
            if found is _MISSING or self._raw_fds.get(key.step) is None:
                return None
            return found  # type: ignore[return-value]

    def _locate_locked(self, key: TensorKey) -> _Located | None:
        f = self._file(key.step)
        fd = self._raw_fds.get(key.step)
        if fd is None:
            return None
        found = self._from_table(key)
        if found is not _MISSING:
            return found  # type: ignore[return-value]
        from h5py import h5d

        gname, dname = group_name(key.module, key.call), dataset_name(key.kind, key.path)
        dsid = h5d.open(f.id, f"{gname}/{dname}".encode())
        layout = _raw_layout(dsid)
        if layout is None:
            return None
        return _Located(os.fspath(self._paths[key.step]), *layout, _dataset_attrs(dsid), f"/{gname}/{dname}")

    def _load(self, key: TensorKey, node: dict[str, Any]) -> torch.Tensor:
        located = self._located.get(key)
        if located is None:
            located = self._listed(key)
        if located is not None:  # planned or listed: no h5py call, no lock, a descriptor of its own
            stored = _read_planned(located)
            if stored is not None:
                return _decoded(located.path, key, node, stored, located.attrs, located.where)  # no Path a load
        return self._load_h5py(key, node)

    @_guarded
    def _load_h5py(self, key: TensorKey, node: dict[str, Any]) -> torch.Tensor:
        group = self._group(key.call_key)
        path = self._paths[key.step]
        dname = dataset_name(key.kind, key.path)
        try:
            ds = group.get(dname)
            if ds is None:
                raise CorruptFileError(path, f"{key}: stored according to its metadata, but there is no dataset "
                                       f"{group.name}/{dname}")
            stored = self._read_contiguous(key.step, ds)
            if stored is None:
                array = np.asarray(ds[()])
            attrs = dict(ds.attrs)
        except CorruptFileError:
            raise
        except Exception as exc:  # truncated data, bad filter pipeline...
            raise CorruptFileError(path, f"cannot read dataset {group.name}/{dname}: {_msg(exc)}") from None
        if stored is None:
            if not array.flags.writeable or not array.flags.c_contiguous:
                array = np.array(array, copy=True, order="C")
            stored = torch.from_numpy(array)
            if stored.numel() == 0:  # numpy gives empty arrays zero strides; torch code expects the usual ones
                stored = torch.empty(stored.shape, dtype=stored.dtype)
        return _decoded(path, key, node, stored, attrs, f"{group.name}/{dname}")

    def _read_contiguous(self, step: int, ds: Any) -> torch.Tensor | None:
        """The dataset's values as ``ds[()]`` gives them, read with one ``pread`` (GIL released)
        where HDF5 would only copy the bytes (see :func:`_raw_layout`). None for everything
        else (and where the file ends early), which h5py then reads as before, with its errors."""
        fd = self._raw_fds.get(step)
        layout = _raw_layout(ds.id) if fd is not None else None
        if fd is None or layout is None:
            return None
        offset, nbytes, tdtype, shape = layout
        return _read_raw(fd, offset, nbytes, tdtype, shape)

    def _step_path(self, step: int) -> Path:
        """The file of ``step`` this reader opened (``.h5`` or ``.h5.partial``), else its ``.h5``."""
        return self._paths.get(step, self.run_dir / f"{step_dir_name(step)}.h5")

    def _body_path(self, key: TensorKey, node: dict[str, Any]) -> Path:
        return self._step_path(key.step)

    def close(self) -> None:
        with self._lock:
            self._close_files()
        super().close()

    def _close_files(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except Exception:  # closing a read-only file cannot lose data
                pass
        self._files.clear()
        self._last_group = self._last_texts = None
        self._sides.clear()
        self._located.clear()
        self._originals.clear()
        self._prelocated.clear()
        self._prelocate = False
        self._raw_fds.clear()  # HDF5's descriptors, closed with the files


#: What the registry loads (as for any backend: see :mod:`ilstore.store.registry`).
writer, reader = Hdf5Writer, Hdf5Reader
