"""The default ``pt`` backend: the documented ``.pt`` + ``.json`` directory tree (SPEC §4.2).

::

    <run_dir>/step_<N>/<module.name>[_<k>]/      k = call index, omitted for call 0
        inputs.json   inputs_<path>_<device>.pt
        outputs.json  outputs[_<path>]_<device>.pt
        post_fwd_inputs.json  post_fwd_inputs_<path>_<device>.pt   (if enabled)
    <run_dir>/step_<N>/structures.jsonl            one line per side without a stored body
    <run_dir>/step_<N>/module_calls.txt            directory names in call-start order

Every ``.pt`` holds one tensor and loads with ``torch.load(path, weights_only=True)``. A side
none of whose tensors has a stored body (``mode: "stats"``, a side without tensors) is not a
file of its own: its JSON document is one line of the step's ``structures.jsonl``, and a call
all of whose sides are such lines has no directory. The reader also opens dumps of the earlier
vLLM implementation (no manifest, no ``ilstore`` metadata), recovering module names, call
indices, paths and devices from the tree, and runs written before the structure list existed.
"""

from __future__ import annotations

import errno
import functools
import io
import itertools
import json
import os
import re
import stat
import struct
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CorruptFileError, StoreError
from ..keys import KINDS, CallKey, TensorKey, encode_part
from ..manifest import MANIFEST_NAME, dumps, dumps_tree, json_str
from ..records import Record, iter_tensor_nodes
from ._pread import AVAILABLE as pread_ok
from ._pread import O_NOFOLLOW, O_RDONLY, byte_tensor, pread_into
from .base import STEP_DIR, Body, StepInfo, StoreReader, StoreWriter, check_inside, parent_gone, step_dir_name

__all__ = ["PtWriter", "PtReader", "module_dir_name", "tensor_file_name", "writer", "reader", "STRUCTURES_NAME"]

#: A step's list of the structures of its sides without a stored body, one JSON document a line.
STRUCTURES_NAME = "structures.jsonl"

_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_DEVICE_SUFFIX = re.compile(r"^[a-z][a-z0-9]*(?:_\d+)?$")
_MAX_NAME = 200
_SEPS = ("/", os.sep, os.altsep)


@functools.lru_cache(maxsize=8192)  # module names, path elements and devices repeat every step
def _safe_component(text: str) -> str:
    """A file-name-safe form of free text: '/', '\\', NUL and other odd bytes are %-encoded,
    and leading dots too, so no name is ever '.', '..' or hidden."""
    out = _SAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), text)
    stripped = out.lstrip(".")
    out = "%2E" * (len(out) - len(stripped)) + stripped
    if len(out) > _MAX_NAME:
        import hashlib

        out = out[:_MAX_NAME - 17] + "~" + hashlib.sha1(text.encode()).hexdigest()[:16]
    return out or "%"


def _scan(path: Path) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return list(it)


def module_dir_name(module: str, call: int) -> str:
    """``model.layers.0`` call 0 → ``model.layers.0``; call 2 → ``model.layers.0_2``."""
    base = _safe_component(module)
    return base if call == 0 else f"{base}_{call}"


def tensor_file_name(kind: str, path: tuple[str, ...], device: str) -> str:
    """``outputs`` + ``("0",)`` + ``cuda:0`` → ``outputs_0_cuda_0.pt``."""
    parts = [kind, *(_safe_component(p) for p in path), _safe_component(device.replace(":", "_"))]
    return "_".join(parts) + ".pt"


#: :func:`tensor_file_name` for the writer, whose paths are tuples: the same sides, paths and
#: devices come back every step.
_file_name = functools.lru_cache(maxsize=8192)(tensor_file_name)


class PtWriter(StoreWriter):
    """Writes the documented tree: one ``torch.save`` per tensor, one JSON per captured side that
    holds a stored body, one line of the step's ``structures.jsonl`` per side that holds none."""

    name = "pt"
    borrows_bodies = True  # every body is written (or hard-linked) before write returns

    #: Whether sides without a stored body go to the step's structure list (format 3, ilstore
    #: 0.2.0), the default of ``backend_options.structure_list``; False writes each as
    #: ``<kind>.json`` in its call's directory, as earlier versions did (SPEC §4.2's tree).
    _list_sides = True
    #: How many lines of the structure list are appended with one ``write``.
    _lines_per_write = 32

    @classmethod
    def validate_options(cls, options: Any) -> list[str]:
        problems = []
        for key, value in options.items():
            if key == "structure_list":
                if not isinstance(value, bool):
                    problems.append(f"backend_options.structure_list: must be true or false, got {value!r}")
            else:
                problems.append(f"backend_options.{key}: unknown option for the 'pt' backend "
                                "(it takes: structure_list)")
        return problems

    def _open(self) -> None:
        self._list_sides = bool(self.options.get("structure_list", type(self)._list_sides))
        self._root = os.fspath(self.run_dir)
        # Calls are keyed here by (rank, module, call) within the current step (see _write): hashing a
        # CallKey runs its dataclass __hash__ in Python, several times per record.
        self._dirs: dict[tuple[int, str, int], str] = {}  # each call's directory name, given at its first record
        self._made: dict[tuple[int, str, int], str] = {}  # calls whose directory exists (made in this step): its path
        self._used: set[str] = set()
        self._files: dict[str, str] = {}
        self._step: int | None = None
        self._step_dir = ""  # the directory of ``_step``, made when the step's first record came
        self._highest: int | None = None  # the highest step begun, to notice a step written again
        self._list_fd: int | None = None  # the step's structure list, open for appending
        self._list_size = 0  # its bytes, all complete lines
        self._listed: set[tuple[int, str, int, str]] = set()  # the sides it holds: (rank, module, call, kind)
        self._pending: list[bytes] = []  # its lines not appended yet
        self._lost: str | None = None  # why lines of the step's structure list could not be appended

    def _begin_step(self, step: int) -> None:
        """Start writing ``step``: its directory, and an empty structure list if the step was
        written before (only a hand-driven writer goes back): each side then has one entry,
        the latest."""
        self._close_list()
        self._step, self._dirs, self._made, self._used, self._files = step, {}, {}, set(), {}
        self._listed, self._lost = set(), None
        self._step_dir = os.path.join(self._root, step_dir_name(step))
        _mkdir(self._step_dir)
        if self._highest is not None and step <= self._highest:
            try:
                os.unlink(f"{self._step_dir}{os.sep}{STRUCTURES_NAME}")
            except FileNotFoundError:
                pass
        else:
            self._highest = step

    def _call_name(self, call: CallKey, ident: tuple[int, str, int]) -> str:
        """The call's directory name in its step (the current one), given when its first record
        comes, whether or not the directory is ever made, so names and ``~<n>`` suffixes do not
        depend on the layout. It comes from :func:`module_dir_name`, which %-encodes separators
        and leading dots, so it cannot leave the step directory; no path resolution is needed on
        this per-record path. ``ident``: the call's (rank, module, call)."""
        name = self._dirs.get(ident)
        if name is None:
            name = base = module_dir_name(call.module, call.call)
            n = 1
            while name in self._used:  # e.g. call 1 of "fc" and module "fc_1" in one step
                n += 1
                name = f"{base}~{n}"
            self._dirs[ident] = name
            self._used.add(name)
        return name

    def _call_dir(self, call: CallKey, ident: tuple[int, str, int]) -> str:
        """The call's directory, made when a side with a stored body first needs it.

        Per record this costs what the format needs and little more: one ``mkdir`` per new step
        and per call directory (no ``stat`` of the parents first: a missing parent is made
        only when ``mkdir`` says so), strings rather than :class:`~pathlib.Path` objects."""
        path = self._made.get(ident)
        if path is None:
            path = f"{self._step_dir}{os.sep}{self._call_name(call, ident)}"
            _mkdir(path)
            self._made[ident] = path
        return path

    def _write(self, record: Record) -> None:
        call, kind = record.call, record.kind
        if self._step != call.step:
            self._begin_step(call.step)
        ident = (call.rank, call.module, call.call)
        side = (*ident, kind)
        listed = self._listed
        if listed and side in listed:  # the same side written again in this step: the latest counts
            self._unlist(side)
        bodies = self._stored_bodies(record)
        first = next(bodies, None)
        if first is None and self._list_sides:
            if ident not in self._dirs:
                self._call_name(call, ident)
            # One line appended with one os.write (_append_line).
            self._append_line(self._text(record, "\n"))
            listed.add(side)
            return
        call_dir = self._made.get(ident) or self._call_dir(call, ident)
        if first is not None:
            self._write_bodies(record, call_dir, itertools.chain((first,), bodies))
        # One file written with one os.write (_write_file).
        target = f"{call_dir}{os.sep}{kind}.json"
        text = self._text(record, "")
        try:
            _write_file(target, text)
        except OSError as exc:
            raise StoreError(f"{target}: cannot write the structure file: {exc}") from exc

    @staticmethod
    def _text(record: Record, end: str) -> bytes:
        """The bytes of ``record``'s side document (:func:`_document`) + ``end``; a structure that
        is not JSON (a NaN, a type JSON lacks, a loop) is a StoreError naming the side."""
        try:
            return _document(record.structure, record.call, record.kind, end).encode("utf-8")
        except (TypeError, ValueError, RecursionError) as exc:
            raise StoreError(f"{record.call.tensor(record.kind)}: structure is not valid JSON: {exc}") from None

    def _write_bodies(self, record: Record, call_dir: str,
                      bodies: Iterator[tuple[tuple[str, ...], dict[str, Any], torch.Tensor | None]]) -> None:
        """Each stored body of ``record`` as a file of ``call_dir`` (a de-duplicated one as a hard
        link to its first file), its name set as the node's ``file``."""
        call, kind, files = record.call, record.kind, self._files
        # str(record.key(path)) (what a later node's "same_as" names), from a prefix made once
        prefix = f"r{call.rank}/s{call.step}/{encode_part(call.module)}/{call.call}/{kind}"
        used: set[str] = set()
        for path, node, tensor in bodies:
            fname = base = _file_name(kind, path, node["device"])
            n = 1
            while fname in used:
                n += 1
                fname = f"{base[:-3]}~{n}.pt"
            used.add(fname)
            node["file"] = fname
            target = f"{call_dir}{os.sep}{fname}"
            try:
                if tensor is None:
                    # A de-duplicated tensor: a hard link keeps the tree valid for plain torch.load.
                    _link_or_copy(files[node["same_as"]], target)
                else:
                    _save_tensor(tensor, target)
            except OSError as exc:  # disk full, file too large...: the message names the file
                raise StoreError(f"{target}: cannot write the tensor file: {exc}") from exc
            files[prefix + "".join(["/" + encode_part(p) for p in path]) if path else prefix] = target

    def _append_line(self, line: bytes) -> None:
        """Queue one complete line for the step's structure list; every :attr:`_lines_per_write`
        lines, and when the step ends, they are appended (:meth:`_flush_lines`)."""
        pending = self._pending
        pending.append(line)
        if len(pending) >= self._lines_per_write:
            self._flush_lines()

    def _flush_lines(self) -> None:
        """Append the queued lines to the step's structure list: one ``write`` to a descriptor
        opened (``O_APPEND``) at the step's first lines and kept open until the step ends. A
        write that fails partway (ENOSPC) is cut back, so the file holds only complete lines
        (the queued lines are dropped with the error)."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        fd = self._list_fd
        if fd is None:  # the step's first line: a new list (a stale one, e.g. of a cut writing, is emptied)
            fd = self._list_fd = os.open(f"{self._step_dir}{os.sep}{STRUCTURES_NAME}", _APPEND_FLAGS | os.O_TRUNC,
                                         0o666)
            self._list_size = 0
        try:
            _write_all(fd, data)
        except BaseException as exc:
            try:
                os.ftruncate(fd, self._list_size)
            except OSError:
                pass  # the torn line has no newline: readers ignore it
            # the batch held sides whose write() had returned: the step cannot be complete
            self._lost = f"{self._step_dir}{os.sep}{STRUCTURES_NAME}: {len(pending)} line(s) not appended: {exc}"
            raise
        self._list_size += len(data)

    def _unlist(self, side: tuple[int, str, int, str]) -> None:
        """Drop ``side``'s line from the step's structure list (a side written twice in one step:
        only a hand-driven writer does that), rewriting the list whole (temporary file + rename)."""
        self._close_list()
        path = f"{self._step_dir}{os.sep}{STRUCTURES_NAME}"
        _rank, module, number, kind = side
        with open(path, "rb") as fh:
            lines = fh.read().split(b"\n")[:-1]
        keep = []
        for line in lines:
            head = json.loads(line).get("ilstore", {})
            if (head.get("module"), head.get("call"), head.get("kind")) != (module, number, kind):
                keep.append(line + b"\n")
        tmp = f"{path}.partial"
        data = b"".join(keep)
        _write_file(tmp, data)
        os.replace(tmp, path)
        self._listed.discard(side)
        self._list_fd, self._list_size = os.open(path, _APPEND_FLAGS, 0o666), len(data)

    def _close_list(self) -> None:
        """Append the queued lines and close the step's list."""
        try:
            self._flush_lines()
        finally:
            fd, self._list_fd = self._list_fd, None
            if fd is not None:
                os.close(fd)

    def _end_step(self, info: StepInfo) -> None:
        if self._step == info.step:
            step_dir, dirs = self._step_dir, self._dirs
            self._close_list()  # every line of the step is written
            if self._lost is not None:  # sides written earlier are missing from the list
                raise StoreError(f"step {info.step} is incomplete, it is not ended: {self._lost}")
        else:  # a step without records
            step_dir, dirs = os.path.join(self._root, step_dir_name(info.step)), {}
            _mkdir(step_dir)
        lines = [dirs.get((c.rank, c.module, c.call)) or module_dir_name(c.module, c.call) for c in info.calls]
        tmp = f"{step_dir}{os.sep}.module_calls.txt.partial"
        _write_file(tmp, "".join(f"{line}\n" for line in lines).encode("utf-8"))
        os.replace(tmp, f"{step_dir}{os.sep}module_calls.txt")

    def _close(self) -> None:
        self._close_list()


def _mkdir(path: str) -> None:
    """``os.mkdir(path)``, at ease when it exists; a missing parent is a :class:`StoreError`."""
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
    except FileNotFoundError:  # never made again: the run's other files went with it
        raise parent_gone(path) from None


#: The system calls this module writes its files with, bound here: the run's other files (the
#: step journal, the statistics table) are written by other modules, whose tests simulate a full
#: disk by replacing ``os.write`` there; pt's files are not theirs.
_os_write, _os_writev = os.write, os.writev
#: Flags of a file written whole (as ``open(path, "w")``: created or truncated).
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
#: Flags of the step's structure list, appended to line by line.
_APPEND_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)


def _write_file(path: str, data: bytes) -> None:
    """Write ``data`` as the whole content of ``path`` (created, or truncated): ``open``, one
    ``write`` (more only where the system writes less), ``close``. ``open(path, "w")`` made
    four more system calls (``fstat``, ``ioctl``, two ``lseek``) and Python objects per file."""
    fd = os.open(path, _WRITE_FLAGS, 0o666)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """``data`` to ``fd``: one ``write``, more only where the system writes less."""
    done = _os_write(fd, data)
    if done < len(data):
        view = memoryview(data)
        while done < len(data):
            done += _os_write(fd, view[done:])


#: ``json.dumps(doc, allow_nan=False)``, the same text, with the C encoder made once (shared by
#: every backend: :func:`ilstore.manifest.dumps`); a side's document is encoded without the check
#: for circular references (:func:`ilstore.manifest.dumps_tree`: a structure is a tree; one that
#: loops raises RecursionError, which ``write`` reports as the StoreError of any structure that
#: is not JSON).
_dumps, _dumps_tree = dumps, dumps_tree


def _document(structure: dict[str, Any], call: CallKey, kind: str, end: str) -> str:
    """The text of a side's JSON document (its structure, ``"ilstore"`` header last) + ``end``:
    ``json.dumps(dict(structure, ilstore={"module": ..., "call": ..., "step": ..., "rank": ...,
    "kind": ...}), allow_nan=False)``, the same text, with the header formatted here after the structure's
    text instead of a copy of the structure and a header dict encoded per record."""
    module, number, step, rank = call.module, call.call, call.step, call.rank
    if (type(structure) is not dict or type(module) is not str or type(kind) is not str or type(number) is not int
            or type(step) is not int or type(rank) is not int or "ilstore" in structure):
        doc = dict(structure)
        doc["ilstore"] = {"module": module, "call": number, "step": step, "rank": rank, "kind": kind}
        return _dumps_tree(doc) + end
    text = _dumps_tree(structure)
    return (f'{text[:-1]}{", " if len(text) > 2 else ""}"ilstore": {{"module": {_json_str(module)}, '
            f'"call": {number}, "step": {step}, "rank": {rank}, "kind": {_json_str(kind)}}}}}{end}')


#: A string as the JSON encoder writes it (``ensure_ascii``: what _dumps writes).
_json_str = json_str


# dtypes the legacy (non-zip) torch.save format can hold; others (float8, uint16+) need the zip one.
_LEGACY_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
                            torch.complex128, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
                            torch.bool})


def _save_tensor(tensor: torch.Tensor, path: str) -> None:
    """One tensor to one ``.pt`` file, loadable with ``torch.load(path, weights_only=True)``.

    The legacy (non-zip) format is used where the dtype allows: ``torch.load`` reads it the
    same way, and it skips the zip container's CRC32 pass over the bytes (a third of the cost
    of writing them). ``torch.save`` writes through :class:`_PlainWriter`, so torch hands the
    tensor's bytes to ``write`` without an intermediate copy. For a plain contiguous tensor the
    bytes before its data depend only on (dtype, shape, strides): the writer records them while
    ``torch.save`` writes the first such tensor and writes later ones itself as those bytes +
    the element count + the data (:data:`_HEADERS`), with ``open``, ``writev`` and ``close``
    (:func:`_write_body`; a small tensor is one ``writev``). Either way a full disk or a file-size
    limit fails with a clear ``OSError`` (ENOSPC, EFBIG) rather than torch's "write(): fd 3
    failed". Other dtypes (float8, uint16+) use the zip format, built in memory and written once.
    """
    sig = header = None
    dtype = tensor.dtype
    if dtype in _LEGACY_DTYPES:
        sig = (dtype, tuple(tensor.shape), tensor.stride()) if _plain_contiguous(tensor) else None
        header = _HEADERS.get(sig, False) if sig is not None else None
        if isinstance(header, bytes) and header:
            numel = tensor.numel()
            _write_body(path, header + _SIZE.pack(numel), _bytes_of(tensor) if numel else b"")
            return
    with open(path, "wb") as fh:
        if tensor.dtype not in _LEGACY_DTYPES:
            buf = io.BytesIO()
            torch.save(tensor, buf)
            _write_chunked(fh.write, buf.getbuffer())
            return
        writer = _PlainWriter(fh, record_head=header is False)
        torch.save(tensor, writer, _use_new_zipfile_serialization=False)  # type: ignore[arg-type]  # write-only
        if header is False and sig is not None:
            if len(_HEADERS) >= _MAX_HEADERS:
                _HEADERS.clear()
            _HEADERS[sig] = writer.header(tensor)


#: Bytes per ``write`` system call. Measured on this project's VM (ext4, 2 cores): writing a
#: 64 MB file in one call took 0.100 s, in 1 MiB calls 0.015 s; files of 2 MiB and more written
#: in one call were 4-7x slower than in 1 MiB calls, 512 KiB ones equally fast. (One large
#: write makes the kernel allocate large page-cache folios, which there come from memory the
#: guest had handed back to its host.) Elsewhere the extra calls cost microseconds.
_CHUNK = 1 << 20


def _write_chunked(write: Any, data: Any) -> None:
    """``write(data)`` in pieces of at most :data:`_CHUNK` bytes, without copying."""
    view = memoryview(data)
    if view.nbytes <= _CHUNK:
        write(view)
        return
    view = view.cast("B")
    for start in range(0, view.nbytes, _CHUNK):
        write(view[start:start + _CHUNK])


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a non-empty plain contiguous CPU tensor (:func:`_plain_contiguous`), as a view
    of its own memory (numpy's buffer; bfloat16, which numpy lacks, as its 16 bits): one torch
    call where ``reshape(-1).view(torch.uint8).numpy()`` made three."""
    array = (tensor.view(torch.int16) if tensor.dtype is torch.bfloat16 else tensor).numpy()
    return array.data.cast("B")


def _write_body(path: str, head: bytes, data: Any) -> None:
    """A file of ``head`` + ``data`` (created or truncated): ``open``, one ``writev`` of the head
    and the data's first :data:`_CHUNK` bytes, a ``write`` per further chunk, ``close`` -- where
    ``open(path, "wb")`` added ``fstat``, ``ioctl`` and ``lseek`` calls and a buffered writer."""
    view = memoryview(data).cast("B")
    first = view[:_CHUNK]
    fd = os.open(path, _WRITE_FLAGS, 0o666)
    try:
        done = _os_writev(fd, (head, first))
        if done != len(head) + first.nbytes:  # the system wrote less: the rest after
            _writev_all(fd, [memoryview(head), first], done)
        for start in range(_CHUNK, view.nbytes, _CHUNK):
            _writev_all(fd, [view[start:start + _CHUNK]])
    finally:
        os.close(fd)


def _writev_all(fd: int, parts: list[memoryview], done: int = 0) -> None:
    """Write every byte of ``parts`` but the first ``done`` (written already; where the system
    writes less, the rest after; an error, e.g. ENOSPC or EFBIG, raises ``OSError``)."""
    parts = [p for p in parts if p.nbytes]
    while parts and done >= parts[0].nbytes:
        done -= parts.pop(0).nbytes
    if parts and done:
        parts[0] = parts[0][done:]
    while parts:
        done = _os_writev(fd, parts)
        if done <= 0:
            raise OSError(errno.EIO, "write returned no progress")
        while parts and done >= parts[0].nbytes:
            done -= parts[0].nbytes
            parts.pop(0)
        if parts and done:
            parts[0] = parts[0][done:]


_SIZE = struct.Struct("<q")  # the storage's element count, as legacy torch.save writes it here
#: (dtype, shape, strides) → legacy torch.save's bytes before a plain contiguous tensor's
#: element count and data: the magic number, protocol and system-info pickles, the tensor's
#: pickle and the storage-key list. Pickling them took a third of the pt writer's time; they
#: are recorded from the first ``torch.save`` of each signature. The storage key inside is that
#: first tensor's (torch uses the storage's address, an arbitrary name). None: the recorded
#: output did not have the expected layout (another torch version or byte order), so
#: ``torch.save`` writes every tensor of that signature.
_HEADERS: dict[tuple[Any, ...], bytes | None] = {}
_MAX_HEADERS = 4096


def _plain_contiguous(tensor: torch.Tensor) -> bool:
    """A plain CPU tensor that owns exactly its contiguous storage (what capture's snapshots are)."""
    return (type(tensor) is torch.Tensor and tensor.device.type == "cpu" and not tensor.requires_grad
            and not tensor.is_conj() and not tensor.is_neg() and tensor.is_contiguous()
            and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size() and not tensor.__dict__)


class _PlainWriter:
    """A file seen by torch only through ``write``: no ``fileno``, so torch does not write to the
    descriptor itself (its errors would lose the errno) but passes memoryviews to ``write``,
    which go to the file in :data:`_CHUNK` pieces. With ``record_head`` it also keeps copies of
    the small writes (the pickles), from which :meth:`header` takes the cacheable prefix."""

    __slots__ = ("_write", "_head", "_recording", "_written")
    _SMALL = 1 << 16

    def __init__(self, fh: Any, record_head: bool = False) -> None:
        self._write = fh.write
        self._head: list[bytes] = []
        self._recording = record_head  # until the first large write (the data)
        self._written = 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._recording = self._recording and view.nbytes <= self._SMALL
        if self._recording:
            self._head.append(bytes(view))
        _write_chunked(self._write, view)
        self._written += view.nbytes
        return view.nbytes

    def header(self, tensor: torch.Tensor) -> bytes | None:
        """The bytes before ``tensor``'s element count, if what was written is exactly those
        bytes + the count + the tensor's data; otherwise None."""
        head = b"".join(self._head)
        cut = self._written - tensor.numel() * tensor.element_size() - _SIZE.size
        if cut <= 0 or len(head) < cut + _SIZE.size or head[cut:cut + _SIZE.size] != _SIZE.pack(tensor.numel()):
            return None
        return head[:cut]

    def flush(self) -> None:
        """Nothing buffered here; the file is flushed when it is closed."""


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        import shutil

        shutil.copyfile(src, dst)


class PtReader(StoreReader):
    """Reads the tree written by :class:`PtWriter` or by the earlier vLLM implementation."""

    name = "pt"
    locator_keys = frozenset({"file"})

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__(run_dir)
        #: step → its calls' directories (the most recently used steps, at most
        #: :data:`_CACHED_STEPS` and :data:`_CACHED_CALLS` calls, so a reader streaming a long run
        #: keeps memory flat)
        self._call_dirs: OrderedDict[int, dict[CallKey, Path]] = OrderedDict()
        self._dir_calls = 0  # the calls in _call_dirs
        #: call → its directory as a string ending in the separator (the per-tensor path is built
        #: from it by one concatenation instead of Path arithmetic); dropped with its step's entry
        self._dir_strs: dict[CallKey, str] = {}
        self._root: Path | None = None  # run_dir resolved (see _resolved_step)
        #: step → its directory, resolved and checked (the most recent steps)
        self._step_roots: OrderedDict[int, Path] = OrderedDict()
        #: step → its structure list, read (the most recent steps)
        self._lists: OrderedDict[int, _StructureList] = OrderedDict()

    @classmethod
    def can_open(cls, run_dir: Path) -> bool:
        try:
            for entry in _scan(run_dir):
                if entry.is_dir() and STEP_DIR.match(entry.name):
                    step = Path(entry.path)
                    if (step / "module_calls.txt").is_file() or (step / STRUCTURES_NAME).is_file():
                        return True
                    return any((Path(e.path) / f"{k}.json").is_file()
                               for e in _scan(step) if e.is_dir() for k in KINDS)
        except OSError:
            return False
        return False

    def _list_calls(self, step: int) -> list[CallKey]:
        return list(self._dirs_of(step))

    def _child(self, call_dir: Path, name: str) -> Path:
        """``call_dir / name`` for a plain file name in an already resolved call directory: it can
        only lead outside the run through a symbolic link, so only a link is resolved and
        checked (a full resolution per file cost ~8 % of a compare)."""
        path = call_dir / name
        return check_inside(self.run_dir, path) if path.is_symlink() else path

    def _entry(self, resolved_dir: Path, step_dir: Path, name: str) -> Path:
        """``check_inside(run_dir, step_dir / name)`` for a directory name read from the call order
        file, ``step_dir`` resolving to ``resolved_dir`` inside the run: a plain name that is not a
        symbolic link is ``resolved_dir / name`` without resolving each component again (that
        was ~40 % of planning a compare of two pt runs); anything else is checked in full."""
        if name not in ("", ".", "..") and "\0" not in name and not any(sep and sep in name for sep in _SEPS):
            path = resolved_dir / name
            if not path.is_symlink():
                return path
        return check_inside(self.run_dir, step_dir / name)

    def _resolved_step(self, step_dir: Path) -> Path:
        """``check_inside(run_dir, step_dir)`` for ``run_dir / step_<N>``: the run directory is
        resolved once per reader, and a step directory that is no symbolic link is that + its
        name (one ``lstat`` rather than one per component of both paths, per step)."""
        root = self._root
        if root is None:
            root = self._root = check_inside(self.run_dir, self.run_dir)
        if step_dir.parent == self.run_dir and STEP_DIR.match(step_dir.name) and not _is_link(str(step_dir)):
            return root / step_dir.name
        return check_inside(self.run_dir, step_dir)

    def _step_root(self, step: int) -> Path:
        """``step``'s directory, resolved and checked inside the run (:meth:`_resolved_step`), once
        per step while it is among the most recently asked."""
        roots = self._step_roots
        root = roots.get(step)
        if root is None:
            root = roots[step] = self._resolved_step(self.run_dir / step_dir_name(step))
            if len(roots) > _CACHED_LISTS * 4:
                roots.popitem(last=False)
        return root

    def _structure_list(self, step: int) -> _StructureList:
        """``step``'s structure list (``structures.jsonl``), read with one ``open``/``read``/``close``
        the first time the step is asked (a run written before the list existed: one failed
        ``open``), kept for the most recently read steps."""
        lists = self._lists
        found = lists.get(step)
        if found is not None:
            lists.move_to_end(step)
            return found
        root = self._step_root(step)
        path = root / STRUCTURES_NAME
        data = _read_plain(os.fspath(path)) if _DIRECT else None
        if data is None:  # a link, a directory, an error: the checked path and its errors
            path = self._child(root, STRUCTURES_NAME)
            if path.is_file():
                try:
                    data = path.read_bytes()
                except OSError as exc:
                    raise CorruptFileError(path, f"unreadable structure list: {exc}") from None
            else:
                data = _ABSENT
        found = lists[step] = _StructureList(path, step, data if isinstance(data, bytes) else b"")
        if found.has_lines():
            # Which call directories the step has, in one listing: a call whose every side is a
            # line has none, and its other sides (say post_fwd_inputs) are then absent without an
            # ``open`` per call and side.
            try:
                found.dirs = frozenset(os.listdir(root))
            except OSError:
                found.dirs = None  # ask each file, as without a list
        if len(lists) > _CACHED_LISTS:
            lists.popitem(last=False)
        return found

    def _read_json(self, path: Path) -> Any:
        check_inside(self.run_dir, path)
        return self._parse_json(path)

    def _parse_json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptFileError(path, f"unreadable metadata JSON: {exc}") from None

    def _dir_meta(self, call_dir: Path) -> dict[str, Any] | None:
        for kind in KINDS:
            path = call_dir / f"{kind}.json"
            if path.is_file():
                doc = self._read_json(path)
                meta = doc.get("ilstore") if isinstance(doc, dict) else None
                if isinstance(meta, dict) and isinstance(meta.get("module"), str) and isinstance(meta.get("call"), int):
                    return meta
                return None
        return None

    def _dirs_of(self, step: int) -> dict[CallKey, Path]:
        """Map each call of a step to its directory, in start order.

        With a manifest and a ``module_calls.txt`` of the same length the two line up; else
        each directory's ``ilstore`` metadata names its call; else (earlier vLLM dumps) a
        directory ``X_k`` is call k of ``X`` when a directory ``X`` exists beside it.
        """
        known = self._call_dirs.get(step)
        if known is not None:
            try:
                self._call_dirs.move_to_end(step)
            except KeyError:  # dropped by another thread meanwhile: still the right mapping
                pass
            return known
        step_dir = self.run_dir / step_dir_name(step)
        order_file = step_dir / "module_calls.txt"
        names: list[str] | None = None
        if order_file.is_file():
            try:
                names = [n for n in order_file.read_text(encoding="utf-8").splitlines() if n]
            except (OSError, UnicodeDecodeError) as exc:
                raise CorruptFileError(order_file, f"unreadable call order: {exc}") from None
        rank = (self.manifest or {}).get("rank", 0)
        mapping: dict[CallKey, Path] = {}
        # the recorded call order (the journal, or a format-1 manifest) lines up with the order file
        recorded = self._manifest_calls("calls", step) if names is not None else None
        if recorded is not None and names is not None:
            calls = recorded
            if len(calls) == len(names):
                resolved = self._step_root(step)
                prefix = os.path.join(resolved, "")
                strs = self._dir_strs
                for call, name in zip(calls, names, strict=True):
                    if _plain_name(name) and not _is_link(prefix + name):  # _entry's test, on strings
                        mapping[call] = resolved / name
                        strs[call] = f"{prefix}{name}{os.sep}"
                    else:
                        mapping[call] = self._entry(resolved, step_dir, name)
                return self._remember(step, mapping)
        try:
            on_disk = sorted(e.name for e in _scan(step_dir) if e.is_dir())
        except OSError as exc:
            raise StoreError(f"{step_dir}: cannot list the step directory: {exc.strerror}") from None
        if names is not None:
            listed = [n for n in names if n in on_disk]
            on_disk = listed + [n for n in on_disk if n not in set(listed)]
        dir_set = set(on_disk)
        for name in on_disk:
            path = check_inside(self.run_dir, step_dir / name)
            meta = self._dir_meta(path)
            if meta is not None:
                call = CallKey(int(meta.get("rank", rank)), step, meta["module"], meta["call"])
            else:
                m = re.match(r"^(.*)_(\d+)$", name)
                if m and m.group(1) in dir_set:
                    call = CallKey(rank, step, m.group(1), int(m.group(2)))
                else:
                    call = CallKey(rank, step, name, 0)
            mapping[call] = path
        listed_calls = [c for c in self._structure_list(step).calls(rank) if c not in mapping]
        if listed_calls:
            mapping = self._with_listed_calls(step, mapping, listed_calls, names or [], dir_set)
        return self._remember(step, mapping)

    def _remember(self, step: int, mapping: dict[CallKey, Path]) -> dict[CallKey, Path]:
        """Keep ``step``'s call directories, dropping the least recently used step's (and its
        calls' directory strings) beyond :data:`_CACHED_STEPS` steps or :data:`_CACHED_CALLS` calls."""
        dirs = self._call_dirs
        again = dirs.pop(step, None)  # (another thread listed it meanwhile)
        dirs[step] = mapping
        self._dir_calls += len(mapping) - (len(again) if again is not None else 0)
        while len(dirs) > _CACHED_STEPS or (self._dir_calls > _CACHED_CALLS and len(dirs) > 1):
            try:
                _old_step, old = dirs.popitem(last=False)
            except KeyError:  # emptied by another thread
                break
            self._dir_calls -= len(old)
            for call in old:
                self._dir_strs.pop(call, None)
        return mapping

    def _with_listed_calls(self, step: int, mapping: dict[CallKey, Path], listed: list[CallKey],
                           names: list[str], dir_set: set[str]) -> dict[CallKey, Path]:
        """``mapping`` (calls with a directory, in order) and the calls only the structure list
        names, in the order ``module_calls.txt`` lists their directory names (a call's name is
        :func:`module_dir_name`, ``~<n>`` suffixes matched in turn), the unlisted after, by name."""
        waiting: dict[str, list[CallKey]] = {}
        for call in listed:
            waiting.setdefault(module_dir_name(call.module, call.call), []).append(call)
        named: dict[CallKey, str] = {}
        for name in names:
            if name not in dir_set:
                queue = waiting.get(re.sub(r"~\d+$", "", name))
                if queue:
                    named[queue.pop(0)] = name
        for call in listed:
            named.setdefault(call, module_dir_name(call.module, call.call))
        entries = [(path.name, call, path) for call, path in mapping.items()]
        root = self._step_root(step)
        entries += [(name, call, root / name) for call, name in named.items()]
        position: dict[str, int] = {}
        for i, name in enumerate(names):
            position.setdefault(name, i)
        entries.sort(key=lambda e: (position.get(e[0], len(names)), e[0] if e[0] not in position else ""))
        return {call: path for _name, call, path in entries}

    def _call_dir(self, call: CallKey) -> Path:
        try:
            return self._dirs_of(call.step)[call]
        except KeyError:
            if self.manifest is not None and call in self.calls(call.step):
                raise CorruptFileError(self.run_dir / MANIFEST_NAME,
                                       f"lists module call {call.module}#{call.call} of step {call.step}, but the run "
                                       "has no data for it (the manifest and the files disagree)") from None
            raise KeyError(f"no module call {call.module}#{call.call} in step {call.step} of {self.run_dir}") from None

    def _read_structure(self, call: CallKey, kind: str) -> Any | None:
        call_dir = self._call_dir(call)  # a KeyError for a call the step does not have, whatever the layout
        listed = self._structure_list(call.step)
        doc = listed.take(call.module, call.call, kind)
        if doc is not None:
            doc.pop("ilstore", None)
            for _tpath, node in iter_tensor_nodes(doc):
                if "file" in node:
                    node.setdefault("stored", True)
                elif "stored" not in node:  # what the directory layout answers (no tensor file there)
                    node["stored"] = False
                    node.setdefault("reason", "no tensor file in the dump")
            return doc
        dirs = listed.dirs
        if dirs is not None and call_dir.name not in dirs and call_dir.parent == self._step_root(call.step):
            doc = None  # no such directory in the step (of a link, resolved: its target's name is asked)
        else:
            doc = self._read_side_file(call, kind)
        if doc is None:
            listed.check()  # the side may be on a damaged line
        return doc

    def _read_side_file(self, call: CallKey, kind: str) -> Any | None:
        """The structure of a side written as ``<kind>.json`` in the call's directory."""
        call_dir = self._call_dir(call)
        text = _read_plain(self._dir_str(call) + kind + ".json") if _DIRECT else None
        path: Path | None = None  # the checked path; else built for a message only
        if text is None:  # a link, another kind of file, an error: the checked path and its errors
            path = self._child(call_dir, f"{kind}.json")
            if not path.is_file():
                return None
            doc = self._parse_json(path)
        elif not isinstance(text, bytes):  # _ABSENT: not captured
            return None
        else:
            try:
                doc = json.loads(text.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CorruptFileError(call_dir / f"{kind}.json", f"unreadable metadata JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise CorruptFileError(path or call_dir / f"{kind}.json",
                                   "expected a JSON object describing the captured structure")
        doc.pop("ilstore", None)
        files = None
        for tpath, node in iter_tensor_nodes(doc):
            if "file" in node:
                node.setdefault("stored", True)
                continue
            # Earlier vLLM dumps: find <kind>[_<path>]_<device>.pt and recover the device.
            if files is None:
                files = [e.name for e in _scan(call_dir) if e.name.endswith(".pt")]
            prefix = "_".join([kind, *tpath]) + "_"
            found = [f for f in files if f.startswith(prefix) and _DEVICE_SUFFIX.match(f[len(prefix):-3])]
            if found:
                node["file"] = found[0]
                node.setdefault("device", found[0][len(prefix):-3].replace("_", ":"))
                node.setdefault("stored", True)
            else:
                node.setdefault("stored", False)
                node.setdefault("reason", "no tensor file in the dump")
        return doc

    def _dir_str(self, call: CallKey) -> str:
        """The call's directory as a string ending in the separator (cached)."""
        text = self._dir_strs.get(call)
        if text is None:
            text = self._dir_strs[call] = os.path.join(self._call_dir(call), "")
        return text

    def _load(self, key: TensorKey, node: dict[str, Any]) -> torch.Tensor:
        """One tensor. A plain file name whose header is known is read by :func:`_read_known`
        without following a final symbolic link (``O_NOFOLLOW``): the call directory is already
        checked, so no ``lstat`` or path resolution is needed first; a link, or anything the fast
        read does not take, goes the checked way (:meth:`_body_path`, :func:`load_pt_file`)."""
        fname = node.get("file")
        dtype, shape = node.get("dtype"), node.get("shape")
        expected = _expected(dtype, shape) if pread_ok else None
        if _DIRECT and expected is not None and type(fname) is str and _plain_name(fname):
            call = key.call_key
            dir_str = self._dir_strs.get(call) or self._dir_str(call)
            tensor = _read_known(dir_str + fname, expected, _NOFOLLOW)
            if tensor is _LINK:
                return load_pt_file(self._body_path(key, node), dtype, shape)
            if tensor is not None:
                return tensor  # type: ignore[return-value]
            return _load_unknown(self._body_path(key, node), expected)
        return load_pt_file(self._body_path(key, node), dtype, shape)

    def _open_body(self, key: TensorKey, node: dict[str, Any]) -> Body | None:
        """A file in the legacy layout whose header torch.load has read before in this process
        for this dtype and shape (as :func:`_read_known` takes it: the same header, the element
        count, exactly the body after it), opened without following a final symbolic link."""
        fname = node.get("file")
        expected = _expected(node.get("dtype"), node.get("shape")) if pread_ok else None
        if not (_DIRECT and expected is not None and type(fname) is str and _plain_name(fname)):
            return None
        dtype, shape, nbytes = expected
        by_len = _signatures().get((dtype, shape))
        if by_len is None:
            return None
        call = key.call_key
        path = (self._dir_strs.get(call) or self._dir_str(call)) + fname
        fd = os.open(path, _NOFOLLOW)
        try:
            cut = os.fstat(fd).st_size - nbytes - _SIZE.size
            if cut not in by_len:
                return None
            head = os.pread(fd, cut + _SIZE.size, 0)
            if len(head) != cut + _SIZE.size or _SIZE.unpack_from(head, cut)[0] != nbytes // dtype.itemsize:
                return None
            strides = _contiguous(shape)
            if not any(head.startswith(header) and known == strides for header, known in by_len[cut]):
                return None
            body, fd = Body(fd, cut + _SIZE.size, dtype, shape, path), -1
            return body
        finally:
            if fd >= 0:
                os.close(fd)

    def _body_path(self, key: TensorKey, node: dict[str, Any]) -> Path:
        fname = node.get("file")
        if not isinstance(fname, str) or "/" in fname or "\\" in fname or fname in (".", ".."):
            raise CorruptFileError(self._call_dir(key.call_key), f"bad file reference {fname!r} for {key}")
        return self._child(self._call_dir(key.call_key), fname)


#: How many steps' structure lists a reader keeps (the most recently read ones).
_CACHED_LISTS = 8
#: How many steps' call directories a reader keeps at most (the most recently used ones)...
_CACHED_STEPS = 1024
#: ... and how many calls' in all (the last step's always): a comparer plans a window of ~1,024
#: pairs, then loads them, and a window of small steps spans many steps (they were listed twice).
_CACHED_CALLS = 4096


class _StructureList:
    """One step's ``structures.jsonl`` as read: each side's line, by ``(module, call, kind)``
    from the line's ``ilstore`` header.

    Only complete lines count: text after the last newline is a line a killed writer did not
    finish, and is ignored. A line that is not a JSON object with a valid header for this step,
    or a side named on two lines, is reported (:class:`CorruptFileError` naming the file and
    line) when a side it could hold is asked for; the other sides stay readable.
    """

    __slots__ = ("path", "step", "dirs", "_sides", "_twice", "_bad")

    def __init__(self, path: Path, step: int, data: bytes) -> None:
        self.path, self.step = path, step
        #: the names in the step's directory, when listed (see :meth:`dirless`)
        self.dirs: frozenset[str] | None = None
        #: (module, call, kind) → [line number, line, its document until handed out, rank]
        self._sides: dict[tuple[str, int, str], list[Any]] = {}
        self._twice: dict[tuple[str, int, str], tuple[int, int]] = {}
        self._bad: list[tuple[int, str]] = []
        if not data:
            return
        lines = data.split(b"\n")
        lines.pop()  # after the last newline: empty, or a line not finished
        sides, loads = self._sides, json.loads
        for number, raw in enumerate(lines, 1):
            try:
                doc = loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                self._bad.append((number, f"not a JSON document: {exc}"))
                continue
            head = doc.get("ilstore") if type(doc) is dict else None
            problem = _header_problem(head, step)
            if problem is not None:
                self._bad.append((number, "expected a JSON object describing a captured structure" if type(doc)
                                  is not dict else problem))
                continue
            assert isinstance(head, dict)
            key = (head["module"], head["call"], head["kind"])
            if key in sides:
                self._twice.setdefault(key, (sides[key][0], number))
                continue
            rank = head.get("rank")
            sides[key] = [number, raw, doc, rank if type(rank) is int else None]

    def take(self, module: str, call: int, kind: str) -> dict[str, Any] | None:
        """The document of one side (a new object each time), None if the list has no such line.

        Raises:
            CorruptFileError: two lines name the side.
        """
        key = (module, call, kind)
        twice = self._twice.get(key)
        if twice is not None:
            raise CorruptFileError(self.path, f"lines {twice[0]} and {twice[1]} both hold {kind} of module call "
                                   f"{module}#{call}")
        entry = self._sides.get(key)
        if entry is None:
            return None
        doc = entry[2]
        if doc is None:
            return json.loads(entry[1].decode("utf-8"))
        entry[2] = None  # handed out: the caller may keep and change it
        return doc

    def has_lines(self) -> bool:
        """Whether the list holds any line (good or damaged)."""
        return bool(self._sides or self._twice or self._bad)

    def check(self) -> None:
        """Raise the first damaged line's :class:`CorruptFileError`, if there is one."""
        if self._bad:
            number, problem = self._bad[0]
            raise CorruptFileError(self.path, f"line {number}: {problem}")

    def calls(self, rank: int) -> list[CallKey]:
        """The calls the lines name, in line order, each once (``rank``: where a line has none)."""
        seen: dict[tuple[str, int], CallKey] = {}
        for (module, call, _kind), entry in self._sides.items():
            if (module, call) not in seen:
                seen[(module, call)] = CallKey(rank if entry[3] is None else entry[3], self.step, module, call)
        return list(seen.values())


def _header_problem(head: Any, step: int) -> str | None:
    """What is wrong with a structure line's ``ilstore`` header for ``step``, None if nothing."""
    if not isinstance(head, dict):
        return "no \"ilstore\" header naming the module call"
    module, call, kind = head.get("module"), head.get("call"), head.get("kind")
    if type(module) is not str or type(call) is not int or call < 0 or kind not in KINDS:
        return (f"bad \"ilstore\" header {json.dumps(head)[:200]}: needs a module name, a call index >= 0 and "
                f"a kind ({', '.join(KINDS)})")
    if head.get("step") != step:
        return f"the \"ilstore\" header names step {head.get('step')!r}, in the list of step {step}"
    return None


#: What the registry loads (as for any backend: see :mod:`ilstore.store.registry`).
writer, reader = PtWriter, PtReader


def load_pt_file(path: Path, dtype: Any = None, shape: Any = None) -> torch.Tensor:
    """``torch.load(weights_only=True)`` one tensor, with errors that name the file.

    Given the ``dtype`` (``"torch.float32"``) and ``shape`` the metadata declares, a file laid
    out as legacy ``torch.save`` lays out a plain contiguous tensor -- a header (five pickles),
    the element count, the bytes -- whose header torch.load already read in this process (the
    same bytes: the writer reuses one header per dtype, shape and strides) is read with one
    ``pread`` instead (:func:`_read_known`): the same tensor, bit for bit, without the Python
    unpickler (~1 ms a file, holding the GIL). Anything else -- another header, count or size,
    a zip file, a damaged one -- goes to torch.load as before, with its errors.
    """
    expected = _expected(dtype, shape) if pread_ok else None
    if expected is not None:
        tensor = _read_known(str(path), expected, O_RDONLY)
        if tensor is not None:
            return tensor  # type: ignore[return-value]  # never _LINK without O_NOFOLLOW
    return _load_unknown(path, expected)


def _load_unknown(path: Path, expected: tuple[torch.dtype, tuple[int, ...], int] | None) -> torch.Tensor:
    """torch.load ``path``, learning its header for :func:`_read_known` where it qualifies."""
    head = _read_head(path, expected[2]) if expected is not None and len(_KNOWN) < _MAX_KNOWN else None
    tensor = _torch_load(path)
    if head is not None and expected is not None:
        _learn(path, tensor, head, expected)
    return tensor


def _is_link(path: str) -> bool:
    """``Path(path).is_symlink()`` on a string (False where there is nothing)."""
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except (OSError, ValueError):
        return False


def _plain_name(name: str) -> bool:
    """Whether ``name`` is a plain file name (no separator, NUL, '.' or '..', not empty)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: :func:`_read_plain`: no such file. :func:`_read_known`: the name is a symbolic link.
_ABSENT, _LINK = _Marker("_ABSENT"), _Marker("_LINK")
_NOFOLLOW = O_RDONLY | O_NOFOLLOW
#: Whether the reader may open a file in a checked call directory without an ``lstat`` first: only
#: where ``open`` can refuse a final symbolic link (which must be checked: :meth:`PtReader._child`).
_DIRECT = pread_ok and O_NOFOLLOW != 0
_READ_SIZE = 1 << 16


def _read_plain(path: str) -> bytes | _Marker | None:
    """The bytes of the regular file ``path`` whose last component is no symbolic link, read with
    a few system calls (``open``, ``read`` until it returns nothing, ``close``; no ``stat`` or
    ``lstat`` first); :data:`_ABSENT` if there is no such file; None for anything else (a link,
    a directory, an error), which the caller handles the checked way."""
    try:
        fd = os.open(path, _NOFOLLOW)
    except FileNotFoundError:
        return _ABSENT
    except OSError:
        return None
    try:
        chunks = []
        while True:
            chunk = os.read(fd, _READ_SIZE)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:  # a directory (EISDIR), an I/O error: the checked path says what it is
        return None
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


#: A terminal's escape sequences (colours, bold), cut out of torch's messages before they are quoted.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _torch_load(path: Path) -> torch.Tensor:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CorruptFileError(path, "tensor file is missing") from None
    except Exception as exc:  # torch raises many types for truncated/corrupt/hostile files
        text = _ANSI.sub("", str(exc)).strip()  # (torch's weights_only message is in terminal bold)
        text = text.splitlines()[0] if text else type(exc).__name__
        if "weights_only" in str(exc).lower() or "unpickl" in str(exc).lower():
            raise CorruptFileError(path, "refused to load: the file needs unpickling arbitrary objects, "
                                   f"which ilstore never does (weights_only=True): {text}") from None
        raise CorruptFileError(path, f"cannot load tensor (truncated or corrupt?): {type(exc).__name__}: "
                               f"{text}") from None
    if not isinstance(obj, torch.Tensor):
        raise CorruptFileError(path, f"expected one tensor, found {type(obj).__name__}")
    return obj


#: Legacy-format headers (the bytes before the element count) that torch.load has read in this
#: process, each checked to end exactly where its count begins, mapped to the (dtype, shape,
#: strides) of the plain contiguous tensor torch.load made of it. A file with the same header,
#: the count of that shape and exactly its bytes after it is the same tensor to torch.load.
_KNOWN: dict[bytes, tuple[torch.dtype, tuple[int, ...], tuple[int, ...]]] = {}
_MAX_KNOWN = 4096
_MAX_HEAD = 1 << 16  # a header is ~330 bytes; anything longer goes to torch.load
_DTYPES = {str(d): d for d in _LEGACY_DTYPES}


def _expected(dtype: Any, shape: Any) -> tuple[torch.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, bytes) of a body the metadata declares, if the legacy layout can hold it."""
    dt = _DTYPES.get(dtype) if isinstance(dtype, str) else None
    if dt is None or not isinstance(shape, list) or len(shape) > 64:
        return None
    if not all(type(d) is int and d >= 0 for d in shape):
        return None
    dims = tuple(shape)
    numel = 1
    for d in dims:
        numel *= d
    return dt, dims, numel * dt.itemsize


#: numpy's dtype for each legacy dtype (bfloat16 as its 16 bits, viewed as bfloat16 after)
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
          torch.bfloat16: np.uint16, torch.complex64: np.complex64, torch.complex128: np.complex128,
          torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64,
          torch.uint8: np.uint8, torch.bool: np.bool_}
#: ``_KNOWN`` grouped for :func:`_read_known`: (dtype, shape) → header length → [(header, strides)],
#: with the ``_KNOWN`` dict and size it was built from (rebuilt when either changes).
_BY_SIG: tuple[Any, int, dict[tuple[torch.dtype, tuple[int, ...]], dict[int, list[tuple[bytes, tuple[int, ...]]]]]] = \
    (None, -1, {})


def _signatures() -> dict[tuple[torch.dtype, tuple[int, ...]], dict[int, list[tuple[bytes, tuple[int, ...]]]]]:
    global _BY_SIG
    known, size, index = _BY_SIG
    if known is _KNOWN and size == len(_KNOWN):
        return index
    table = _KNOWN
    entries = list(table.items())  # one C call: a concurrent _learn cannot change it midway
    index = {}
    for header, (dtype, shape, strides) in entries:
        index.setdefault((dtype, shape), {}).setdefault(len(header), []).append((header, strides))
    _BY_SIG = (table, len(entries), index)
    return index


def _buffer(dtype: torch.dtype, shape: tuple[int, ...], nbytes: int) -> tuple[torch.Tensor, memoryview]:
    """An uninitialised tensor of ``dtype`` and ``shape`` (contiguous, owning exactly ``nbytes``)
    and a writable byte view of its memory: numpy's (see :func:`byte_tensor`), typed at once, so
    no ``view``/``reshape`` is needed after."""
    if not nbytes:
        body, view = byte_tensor(0)
        return body.view(dtype).reshape(shape), view
    array: np.ndarray[Any, Any] = np.empty(shape, dtype=_NUMPY[dtype])
    tensor = torch.from_numpy(array)
    if dtype is torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    return tensor, array.reshape(-1).view(np.uint8).data.cast("B")


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape`` (as ``torch.empty(shape).stride()``)."""
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def _read_known(path: str, expected: tuple[torch.dtype, tuple[int, ...], int],
                flags: int) -> torch.Tensor | _Marker | None:
    """The tensor, if ``path`` is a header torch.load read before for this dtype and shape (see
    :data:`_KNOWN`) + the element count + exactly its bytes; :data:`_LINK` if ``flags`` has
    ``O_NOFOLLOW`` and ``path`` is a symbolic link; else None (torch.load's business).

    Only (dtype, shape)s with a known header are tried. Where all of those have one length (the
    usual case) the file is read with one ``preadv`` into the header, the tensor's own memory and
    one byte more, with no ``stat`` (the GIL is released for each system call, and with several
    compare workers each release can wait for the other thread's Python: ``open``, ``preadv``,
    ``close`` per file, where there were seven calls); the read must end exactly after the body.
    Otherwise ``fstat`` gives the header's length first. A file that is not what the header says
    (another header, count or size) is read in full once more by torch.load: this costs only for
    a header not learned yet whose length equals a learned one of the same dtype and shape."""
    dtype, shape, nbytes = expected
    by_len = _signatures().get((dtype, shape))
    if by_len is None:
        return None
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        return _LINK if exc.errno == errno.ELOOP and flags & O_NOFOLLOW else None
    try:
        if len(by_len) == 1:
            cut = next(iter(by_len))
        else:
            cut = os.fstat(fd).st_size - nbytes - _SIZE.size
            if cut not in by_len:
                return None
        head = bytearray(cut + _SIZE.size)
        tensor, view = _buffer(dtype, shape, nbytes)
        want = cut + _SIZE.size + nbytes
        got = pread_into(fd, (head, view, bytearray(1)), 0, stop=want)
    except OSError:
        return None
    finally:
        os.close(fd)
    if got != want or _SIZE.unpack_from(head, cut)[0] != nbytes // dtype.itemsize:
        return None
    for header, strides in by_len[cut]:
        if head.startswith(header):
            return tensor if tensor.stride() == strides else None
    return None


def _read_head(path: Path, nbytes: int) -> bytes | None:
    """The bytes before the element count and the count, if the file could hold ``nbytes`` after them."""
    try:
        with open(path, "rb") as fh:
            cut = os.fstat(fh.fileno()).st_size - nbytes - _SIZE.size
            if not _TAR_CHECKSUM.stop <= cut <= _MAX_HEAD:
                return None
            head = fh.read(cut + _SIZE.size)
    except OSError:
        return None
    return head if len(head) == cut + _SIZE.size else None


_TAR_CHECKSUM = slice(148, 156)  # where a tar header's checksum field lies


def _learn(path: Path, tensor: torch.Tensor, head: bytes, expected: tuple[torch.dtype, tuple[int, ...], int]) -> None:
    """Remember the header in ``head`` (read before torch.load made ``tensor`` of the file) for
    :func:`_read_known`, if: ``tensor`` is a plain contiguous tensor of the ``expected`` dtype
    and shape the header was cut for; the header is five whole pickles and nothing more; the
    count after it is ``tensor``'s; and the file still starts with ``head`` (it could have
    changed while torch.load read it)."""
    dtype, shape, nbytes = expected
    if len(_KNOWN) >= _MAX_KNOWN or not _plain_contiguous(tensor):
        return
    if tensor.dtype is not dtype or tuple(tensor.shape) != shape:
        return
    cut = len(head) - _SIZE.size
    header = head[:cut]
    if _SIZE.unpack_from(head, cut)[0] != tensor.numel() or header in _KNOWN:
        return
    if not _five_pickles(header) or _maybe_tar(header) or _read_head(path, nbytes) != head:
        return
    _KNOWN[header] = (dtype, shape, tensor.stride())


def _five_pickles(header: bytes) -> bool:
    """Whether ``header`` is exactly five pickles (legacy torch.save's magic number, protocol,
    system info, tensor and storage keys), so torch.load reads the count right after it."""
    import pickletools

    stream = io.BytesIO(header)
    try:
        for _ in range(5):
            last = None
            for opcode, _arg, _pos in pickletools.genops(stream):
                last = opcode.name
            if last != "STOP":
                return False
    except ValueError:
        return False
    return stream.tell() == len(header)


def _maybe_tar(header: bytes) -> bool:
    """Whether torch.load could take a file starting with ``header`` for a tar archive (it tries
    that first): only if the checksum field of a tar header parses as a number, as ``tarfile``
    parses it (base-256, or octal text up to the first NUL; anything else is not a tar header)."""
    field = header[_TAR_CHECKSUM]
    if field[:1] in (b"\x80", b"\xff"):
        return True
    try:
        int(field.split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)
    except (UnicodeDecodeError, ValueError):
        return False
    return True
