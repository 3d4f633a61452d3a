"""The ``safetensors`` backend: per step, size-capped shards plus one JSON index (SPEC §4.3).

::

    <run_dir>/ilstore.json                       the manifest (as for every backend)
    <run_dir>/step_<N>/shard_00000.safetensors   tensors, at most shard_size_mb each
    <run_dir>/step_<N>/shard_00001.safetensors
    <run_dir>/step_<N>/index.json                tensor -> shard map + every record's structure

Every tensor is stored under its canonical key (``str(TensorKey)``, e.g.
``r0/s0/model.layers.0/0/outputs``), so a shard is self-describing even without its index.
safetensors header metadata is string-to-string only, so the structures live in the index. A
dtype safetensors lacks (complex128, sub-byte types) is stored in a reversible encoding
(:mod:`._encode`) and the index records the true dtype. The index is written last, through a
temporary file and a rename: a step exists exactly when its ``index.json`` does. Shards are
written by this module (the library's ``save_file`` would need every body of a shard held until
the shard ends): large ones as their bodies arrive, the header last (:class:`_ShardFile`); the
library reads them as it reads its own. No pickle is used anywhere; readers read a shard only
when one of its tensors is loaded, and only that tensor's bytes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import torch

from ..errors import CorruptFileError, StoreError
from ..keys import KINDS, CallKey, TensorKey, encode_part
from ..manifest import calls_from_json, calls_to_json, dumps, dumps_tree, json_str, write_text_atomic
from ..records import Record, dtype_from_str
from ._encode import decode, encode
from ._pread import byte_tensor, pread_into
from .base import STEP_DIR, Body, StepInfo, StoreReader, StoreWriter, check_inside, parent_gone, step_dir_name

__all__ = ["SafetensorsWriter", "SafetensorsReader", "INDEX_NAME", "INDEX_FORMAT", "DEFAULT_SHARD_SIZE_MB", "writer",
           "reader"]

INDEX_NAME = "index.json"
INDEX_FORMAT = "ilstore-safetensors"
INDEX_VERSION = 1
DEFAULT_SHARD_SIZE_MB = 1024
_log = logging.getLogger(__name__)
_SUPPORTED: dict[torch.dtype, bool] = {}


def _supported(dtype: torch.dtype) -> bool:
    """Whether safetensors stores ``dtype`` as is: an empty tensor of it survives a round trip
    through the public ``save``/``load`` (tried once per dtype)."""
    ok = _SUPPORTED.get(dtype)
    if ok is None:
        from safetensors.torch import load, save

        try:
            with warnings.catch_warnings():  # e.g. torch's "ComplexHalf support is experimental"
                warnings.simplefilter("ignore")
                ok = load(save({"t": torch.empty(0, dtype=dtype)}))["t"].dtype == dtype
        except Exception:  # safetensors refuses the dtype on writing (or cannot read it back)
            ok = False
        _SUPPORTED[dtype] = ok
    return ok


#: safetensors' dtype codes (its format's ``"dtype"``) and the torch dtypes they hold.
_CODES: dict[str, torch.dtype] = {
    code: dtype for code, dtype in (
        ("F64", torch.float64), ("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16),
        ("I64", torch.int64), ("I32", torch.int32), ("I16", torch.int16), ("I8", torch.int8), ("U8", torch.uint8),
        ("BOOL", torch.bool), ("U16", getattr(torch, "uint16", None)), ("U32", getattr(torch, "uint32", None)),
        ("U64", getattr(torch, "uint64", None)), ("C64", torch.complex64),
        ("F8_E4M3", getattr(torch, "float8_e4m3fn", None)), ("F8_E5M2", getattr(torch, "float8_e5m2", None)),
        ("F8_E4M3FNUZ", getattr(torch, "float8_e4m3fnuz", None)),
        ("F8_E5M2FNUZ", getattr(torch, "float8_e5m2fnuz", None)))
    if isinstance(dtype, torch.dtype)}
_MAX_HEADER = 100_000_000  # the format's own limit on the header's length (the library refuses more)
#: And the other way, for writing shards.
_CODE_OF: dict[torch.dtype, str] = {dtype: code for code, dtype in _CODES.items()}


def _writable(dtype: torch.dtype) -> bool:
    """Whether a shard holds ``dtype`` as is: the library reads it back (:func:`_supported`) and
    this writer knows its code."""
    return dtype in _CODE_OF and _supported(dtype)


#: ``json.dumps(value, allow_nan=False)`` with the C encoder made once (shared by every backend), and
#: without the check for circular references (a structure is a tree; one that is not raises
#: RecursionError): the same text (:func:`ilstore.manifest.dumps_tree`).
_ENCODE = dumps_tree
#: A string as ``json.dumps`` spells it (ASCII, escaped).
_json_str = json_str


def _key_prefix(call: CallKey, kind: str) -> str:
    """``str(call.tensor(kind))``, the key of a record's tensors up to their path, without a
    :class:`~ilstore.keys.TensorKey` made per tensor (its checks: ``kind`` one of KINDS)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return f"r{call.rank}/s{call.step}/{encode_part(call.module)}/{call.call}/{kind}"


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


#: A shard whose held bodies reach this many bytes is streamed: its file is opened with room left
#: for the header, and the bodies are written there, straight from the snapshots' memory, in one
#: ``pwritev`` whenever this many bytes are held, so the snapshots are freed soon after (holding
#: a step's snapshots until its end made every forward fault in fresh pages for all of them:
#: ~0.3 x the forward's CPU time on the benchmark's workload; writing each body alone made the
#: writer thread take the GIL back after every body). A smaller shard is held until it ends and
#: written exactly, with no room to spare.
_STREAM_AT = 4 * 2**20
#: The least room a streamed shard reserves for its header (at most 1.6 % of its bodies).
_MIN_RESERVE = 64 * 2**10
#: Offsets are at most this many digits: a header entry whose offsets are not known yet is
#: counted at this length against the reserved room.
_OFFSET_DIGITS = 20
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
_IOV_MAX = 1024


def _round8(n: int) -> int:
    return (n + 7) & ~7


def _pwrite_all(fd: int, views: list[memoryview], offset: int) -> None:
    """Write every byte of ``views`` (byte-format memoryviews), in order, from ``offset``.

    ``pwritev`` may write less than asked; the rest follows. An error (ENOSPC, EFBIG) raises OSError.
    """
    left, i = [v for v in views if v.nbytes], 0
    while i < len(left):
        batch = left[i:i + _IOV_MAX]
        if hasattr(os, "pwritev"):
            done = os.pwritev(fd, batch, offset)
        else:  # no pwritev (Windows): one buffer at a time
            os.lseek(fd, offset, os.SEEK_SET)
            done = os.write(fd, batch[0])
        if done <= 0:
            raise OSError(f"the write at offset {offset} wrote nothing")
        offset += done
        while i < len(left) and done >= left[i].nbytes:
            done -= left[i].nbytes
            i += 1
        if done:
            left[i] = left[i][done:]


class _Body:
    """A body waiting for its place in a shard: its header entry without the offsets, its bytes."""

    __slots__ = ("head", "view", "nbytes", "itemsize", "most", "placed")

    def __init__(self, name: str, code: str, tensor: torch.Tensor) -> None:
        # '"<name>":{"dtype":"F32","shape":[2,3],"data_offsets":[' as the library spells it
        self.head = f'{_json_str(name)}:{{"dtype":"{code}","shape":[{",".join(map(str, tensor.shape))}],' \
                    '"data_offsets":['
        # the tensor's own memory (kept alive by the view), never a copy: through numpy's view
        # where numpy has the dtype (one torch call instead of three), else as bytes
        if not tensor.numel():
            self.view = memoryview(b"")
        elif _numpy_has(tensor.dtype):
            self.view = tensor.numpy().ravel().view(_U8).data
        else:
            self.view = tensor.reshape(-1).view(torch.uint8).numpy().data
        self.nbytes = self.view.nbytes
        self.itemsize = tensor.element_size()
        # the entry's length in the header at most (offsets of up to _OFFSET_DIGITS digits, a comma before it)
        self.most = len(self.head) + 2 * _OFFSET_DIGITS + 4
        self.placed = False  # given its offsets (written, or being written)

    def keep(self) -> None:
        """Hold a copy of the bytes instead of the tensor's memory, which the model may change
        once ``write`` returns (a body lent by a synchronous capture)."""
        if self.nbytes:
            self.view = memoryview(bytearray(self.view))


_U8 = numpy.uint8
_NUMPY_HAS: dict[torch.dtype, bool] = {}


def _numpy_has(dtype: torch.dtype) -> bool:
    """Whether ``Tensor.numpy()`` takes a tensor of ``dtype`` (not bfloat16, float8...; tried once per dtype)."""
    ok = _NUMPY_HAS.get(dtype)
    if ok is None:
        try:
            with warnings.catch_warnings():  # e.g. torch's "ComplexHalf support is experimental"
                warnings.simplefilter("ignore")
                torch.empty(1, dtype=dtype).numpy()
            ok = True
        except (TypeError, RuntimeError):  # "Got unsupported ScalarType ..." (a TypeError in torch 2.x)
            ok = False
        _NUMPY_HAS[dtype] = ok
    return ok


def _larger_first(body: _Body) -> int:
    return -body.itemsize


class _ShardFile:
    """One shard of a step being written (the safetensors format: an 8-byte little-endian header
    length, the JSON header, the bodies back to back with no gap).

    Bodies are held until the shard ends, or until those whose size is a multiple of 8 reach
    :data:`_STREAM_AT` bytes: the file is then opened with ``reserve`` bytes kept for the header,
    and those bodies written after the ones before them, in their order, again whenever they
    reach :data:`_STREAM_AT` bytes (lent the model's tensors: at every record, :meth:`write_early`).
    A body of another size is held
    to the end and written then, larger element sizes first, so that every body starts at a
    multiple of its element size (as the library lays them out: readers that map the file get
    aligned tensors). The header, padded with spaces to the room kept for it (JSON allows that;
    the library pads to a multiple of 8 the same way), is written last: until then the file has
    no valid header, and only then is the shard listed in the step's index.
    """

    def __init__(self, path: Path, name: str, metadata: Mapping[str, str]) -> None:
        self.path, self.name = path, name
        self.fd = -1
        self.reserve = 0  # bytes kept for the header once streaming; 0 while the bodies are held
        self.prefix = f'{{"__metadata__":{json.dumps(metadata, separators=(",", ":"))}'
        self.entries: list[str] = []  # header entries of the bodies written
        self.held: list[_Body] = []  # held bodies whose size is a multiple of 8, in their order
        self.odd: list[_Body] = []  # held bodies of another size (written when the shard ends)
        self.ready_bytes = 0  # bytes of ``held``, and of the bodies written early (write_early) since
        self.end = 0  # bytes of bodies written
        self.nbytes = 0  # bytes of all bodies, written or held
        # the header's length at most: exact for the bodies placed, at most for those held
        self.header_max = len(self.prefix) + 1
        # what the entries of the bodies written early (write_early) will take off header_max, at
        # the point where holding them would have written them (write_ready, finish)
        self.early = 0

    def fits(self, body: _Body) -> bool:
        """Whether ``body``'s header entry still fits the room kept for the header."""
        return not self.reserve or self.header_max + body.most <= self.reserve

    def add(self, body: _Body) -> None:
        self.nbytes += body.nbytes
        self.header_max += body.most
        if body.nbytes % 8:
            self.odd.append(body)
        else:
            self.held.append(body)
            self.ready_bytes += body.nbytes

    def stream(self, reserve: int) -> None:
        """Open the file and keep ``reserve`` bytes for the header (then :meth:`write_ready`)."""
        self.fd = os.open(self.path, _WRITE_FLAGS, 0o666)
        self.reserve = reserve

    def write_ready(self) -> None:
        """Write the held bodies whose size is a multiple of 8, with one ``pwritev``."""
        ready, self.held, self.ready_bytes = self.held, [], 0
        self._write(ready)
        self.header_max -= self.early
        self.early = 0

    def write_early(self) -> None:
        """Write the held bodies whose size is a multiple of 8 now (a writer lent the model's
        tensors may not keep them), in the order :meth:`write_ready` would, but go on counting
        them as held (:attr:`ready_bytes`, their header entries at their longest) until
        :meth:`write_ready` or :meth:`finish`: so the shard ends where holding them would have
        ended it, and its file is the same bytes."""
        ready, self.held = self.held, []
        _pwrite_all(self.fd, [b.view for b in ready], 8 + self.reserve + self.end)
        self._place(ready, early=True)

    def _write(self, bodies: list[_Body]) -> None:
        """Write ``bodies`` after the bodies written so far and place their header entries."""
        _pwrite_all(self.fd, [b.view for b in bodies], 8 + self.reserve + self.end)
        self._place(bodies)

    def _place(self, bodies: list[_Body], early: bool = False) -> None:
        """Give ``bodies`` the next offsets: their header entries, counted at their true length
        (``early``: once holding them would have written them)."""
        end, less = self.end, 0
        for body in bodies:
            body.placed = True
            entry = f"{body.head}{end},{end + body.nbytes}]}}"
            end += body.nbytes
            self.entries.append(entry)
            less += body.most - len(entry) - 1
        self.end = end
        if early:
            self.early += less
        else:
            self.header_max -= less

    def finish(self) -> None:
        """Write what is held and then the header; close the file."""
        # sizes that are multiples of 8 first, in their order (each starts at a multiple of 8), then
        # the others, larger element sizes first: each body starts aligned to its element size
        rest = self.held + sorted(self.odd, key=_larger_first)
        self.held, self.odd, self.ready_bytes = [], [], 0
        self.header_max -= self.early
        self.early = 0
        before = self.end
        self._place(rest)
        header = f'{self.prefix},{",".join(self.entries)}}}'.encode()
        if self.fd < 0:  # never streamed: the whole file in one go, the header padded as the library pads it
            header += b" " * (_round8(len(header)) - len(header))
            self.fd = os.open(self.path, _WRITE_FLAGS, 0o666)
            _pwrite_all(self.fd, [memoryview(len(header).to_bytes(8, "little") + header), *(b.view for b in rest)],
                        0)
        else:
            if len(header) > self.reserve:  # cannot happen: add() is asked fits() first
                raise OSError(f"the header ({len(header)} bytes) outgrew the {self.reserve} bytes kept for it")
            _pwrite_all(self.fd, [b.view for b in rest], 8 + self.reserve + before)
            header += b" " * (self.reserve - len(header))
            _pwrite_all(self.fd, [memoryview(self.reserve.to_bytes(8, "little") + header)], 0)
        self.close()

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class SafetensorsWriter(StoreWriter):
    """Writes a step's tensors into shards of at most ``shard_size_mb`` (a new one whenever the
    next tensor would overflow the current one) and the step's index at ``end_step``.

    A shard is written as its bodies arrive, :data:`_STREAM_AT` bytes at a time
    (:class:`_ShardFile`), so a snapshot is freed soon after it was taken.

    Memory: a shard holds less than :data:`_STREAM_AT` bytes of bodies whose size is a multiple
    of 8, and the others until it ends; at most ``shard_size_mb`` of snapshots in all (lower
    ``backend_options.shard_size_mb`` to bound it).
    """

    name = "safetensors"
    #: A synchronous capture lends the writer the model's own tensors instead of copies (see
    #: :attr:`StoreWriter.borrows_bodies`); lent them (:attr:`StoreWriter.lent`), the writer
    #: writes, or copies, every body before ``write`` returns (:meth:`_settle`). The files are the
    #: same bytes either way (:meth:`_settle`), lent for some records and not for others too.
    #: Measured on the capture benchmark (synchronous, CPU time): 0.89-0.95x the time of the
    #: copying capture.
    borrows_bodies = True

    def __init__(self, run_dir: str | Path, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(run_dir, options)
        self._shard_bytes = max(1, int(float(self.options.get("shard_size_mb", DEFAULT_SHARD_SIZE_MB)) * 2**20))
        # The room a streamed shard keeps for its header: learnt from the headers written so far
        # (a step is usually laid out like the one before), doubled whenever a header outgrew it.
        self._hint = _MIN_RESERVE
        self._step: int | None = None
        self._shard: _ShardFile | None = None
        self._reset(None)

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> list[str]:
        problems = []
        for key, value in options.items():
            if key == "shard_size_mb":
                if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                        or value <= 0):
                    problems.append(f"backend_options.shard_size_mb: must be a positive number of MiB, got {value!r}")
            else:
                problems.append(f"backend_options.{key}: unknown option for the 'safetensors' backend "
                                "(it takes: shard_size_mb)")
        return problems

    def _reset(self, step: int | None) -> None:
        self._drop_shard()
        self._step = step
        self._records: list[str] = []  # each record's entry of the index, as JSON
        self._tensors: dict[str, dict[str, Any]] = {}
        self._shards: list[str] = []
        self._lost: str | None = None  # why a shard of the step could not be written

    def _step_dir(self, step: int) -> Path:
        return self.run_dir / step_dir_name(step)

    def _begin(self, step: int) -> None:
        if self._step == step:
            return
        self._abandon()
        self._reset(step)
        # The directory exists from the first record on, so a step cut mid-way shows on disk.
        try:
            self._step_dir(step).mkdir(exist_ok=True)
        except FileNotFoundError:  # never made again: the run's other files went with it
            raise parent_gone(self._step_dir(step)) from None

    def _abandon(self) -> None:
        """A step that never ended (its forward raised): finish its shard, write no index."""
        if self._step is not None:
            self._finish_shard()

    def _write(self, record: Record) -> None:
        self._begin(record.call.step)
        call = record.call
        try:  # encoded now, once: later changes to the structure cannot reach the index
            structure = _ENCODE(record.structure)
        except (TypeError, ValueError, RecursionError) as exc:
            raise StoreError(f"{call.tensor(record.kind)}: structure is not valid JSON: {exc}") from None
        added: list[_Body] = []
        prefix = ""
        try:
            for path, _node, tensor in self._stored_bodies(record):
                if tensor is not None:
                    if not prefix:  # str(record.key(path)), from the record's prefix made once
                        prefix = _key_prefix(call, record.kind)
                    key = prefix + "".join(["/" + encode_part(p) for p in path]) if path else prefix
                    added.append(self._add(key, tensor))
        finally:
            if added and self.lent:
                self._settle(added)
        # {"module", "call", "rank", "step", "kind", "structure"}, spelled as json.dumps spells it
        self._records.append(f'{{"module": {_json_str(call.module)}, "call": {int.__repr__(call.call)}, "rank": '
                             f'{int.__repr__(call.rank)}, "step": {int.__repr__(call.step)}, "kind": '
                             f'{_json_str(record.kind)}, "structure": {structure}}}')

    def _settle(self, added: list[_Body]) -> None:
        """Before ``write`` returns, no body of the record may still point at the tensor it was
        given (a synchronous capture lends the model's own, which the model may change next): in
        a streamed shard, the bodies whose size is a multiple of 8 are written now, in the order
        they came, and any other body still held is copied. The tensors stored are those of holding
        the bodies, and so are the files, byte for byte: bodies whose size is a multiple of 8 are
        laid out in the order they came either way, and those written early count in the shard's
        header room at their longest until holding them would have written them
        (:meth:`_ShardFile.write_early`), so shards end at the same bodies."""
        shard = self._shard
        if shard is not None and shard.reserve and shard.held:
            try:
                shard.write_early()
            except OSError as exc:
                raise self._failed(shard, exc) from exc
        for body in added:
            if not body.placed:
                body.keep()

    def _add(self, key: str, tensor: torch.Tensor) -> _Body:
        if tensor.requires_grad:
            tensor = tensor.detach()
        if tensor.is_conj() or tensor.is_neg():
            tensor = tensor.resolve_conj().resolve_neg()
        if not tensor.is_cpu:
            tensor = tensor.cpu()
        if not tensor.is_contiguous():  # the bytes are written from the tensor's own memory
            tensor = tensor.contiguous()
        try:
            data, encoding = encode(tensor, _writable)
        except TypeError as exc:
            raise StoreError(f"{key}: {exc}") from None
        body = _Body(key, _CODE_OF[data.dtype], data)
        shard = self._shard
        # a new shard when this one would grow too large, when its header would outgrow its room,
        # or when it holds a body of this name already (a record written twice: the later body counts)
        if shard is not None and (shard.nbytes + body.nbytes > self._shard_bytes or not shard.fits(body)
                                  or (key in self._tensors and self._tensors[key]["shard"] == shard.name)):
            if not shard.fits(body):  # the header outgrew its room: the next shards keep more
                self._hint = max(self._hint, 2 * shard.reserve)
            self._finish_shard()
            shard = None
        if shard is None:
            name = _shard_name(len(self._shards))
            assert self._step is not None
            shard = self._shard = _ShardFile(self._step_dir(self._step) / name, name, {
                "format": "pt", "ilstore": INDEX_FORMAT, "step": str(self._step),
                "rank": str(self.manifest.get("rank", 0))})
        try:
            shard.add(body)
            if shard.ready_bytes >= _STREAM_AT:
                if not shard.reserve:
                    shard.stream(self._reserve(shard.header_max))
                shard.write_ready()
        except OSError as exc:
            raise self._failed(shard, exc) from exc
        entry: dict[str, Any] = {"shard": shard.name, "name": key, "dtype": str(tensor.dtype),
                                 "shape": list(tensor.shape)}
        if encoding:
            entry["encoding"] = encoding
        self._tensors[key] = entry
        return body

    def _reserve(self, header: int) -> int:
        """The room a shard that starts streaming keeps for its header, ``header`` bytes so far:
        twice that, or what the headers before needed (:attr:`_hint`), but no more than a
        sixteenth of a full shard (or twice ``header``) and the format's limit."""
        most = max(_MIN_RESERVE, self._shard_bytes // 16, 2 * header)
        return _round8(max(header, min(max(2 * header, self._hint), most, _MAX_HEADER)))

    def _finish_shard(self) -> None:
        shard = self._shard
        if shard is None:
            return
        try:
            shard.finish()
        except OSError as exc:  # disk full, file too large...
            raise self._failed(shard, exc) from exc
        self._shard = None
        self._shards.append(shard.name)
        if shard.reserve:  # its header, with a quarter and 4 KiB to spare, for the shards to come
            self._hint = max(self._hint, _round8(shard.header_max * 5 // 4 + 4096))

    def _failed(self, shard: _ShardFile, exc: OSError) -> StoreError:
        """The error for a shard that could not be written; the step keeps no index."""
        self._drop_shard()
        self._lost = f"{shard.path}: cannot write the shard: {exc}"
        return StoreError(self._lost)

    def _drop_shard(self) -> None:
        shard, self._shard = getattr(self, "_shard", None), None
        if shard is not None:
            shard.close()

    def _end_step(self, info: StepInfo) -> None:
        self._begin(info.step)
        self._finish_shard()
        if self._lost is not None:  # the index would name tensors no shard holds
            lost = self._lost
            self._reset(None)
            raise StoreError(f"step {info.step} is incomplete, its index is not written: {lost}")
        head = dumps({
            "format": INDEX_FORMAT,
            "format_version": INDEX_VERSION,
            "step": info.step,
            "rank": self.manifest.get("rank", 0),
            "shards": self._shards,
            "calls": calls_to_json(info.calls),
            "call_ends": calls_to_json(info.call_ends),
        })
        # The index is json.dumps of the whole object, byte for byte; the records' entries were
        # encoded as they were written, so it is assembled here rather than encoded again.
        text = (f'{head[:-1]}, "records": [{", ".join(self._records)}], '
                f'"tensors": {_ENCODE(self._tensors)}}}')
        path = self._step_dir(info.step) / INDEX_NAME
        try:
            write_text_atomic(path, text)
        except OSError as exc:
            raise StoreError(f"{path}: cannot write the step index: {exc}") from exc
        self._reset(None)

    def _close(self) -> None:
        try:
            self._abandon()
        except StoreError as exc:  # the step is incomplete anyway; closing must still finish
            _log.warning("ilstore: could not keep the tensors of the unfinished step %s: %s", self._step, exc)
        self._reset(None)


@dataclass
class _Index:
    """A parsed, validated ``index.json``."""

    path: Path
    rank: int
    calls: list[tuple[str, int]]
    call_ends: list[tuple[str, int]] | None
    structures: dict[tuple[str, int, str], Any] = field(default_factory=dict)
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    known: set[tuple[str, int]] = field(default_factory=set)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _parse_index(path: Path, step: int, data: Any) -> _Index:
    def bad(reason: str) -> CorruptFileError:
        return CorruptFileError(path, f"malformed step index: {reason}")

    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        raise bad(f"expected a JSON object with \"format\": \"{INDEX_FORMAT}\"")
    rank = data.get("rank", 0)
    if not _is_int(rank):
        raise bad(f"\"rank\" must be a non-negative integer, got {rank!r}")
    records, tensors = data.get("records"), data.get("tensors")
    if not isinstance(records, list) or not isinstance(tensors, dict):
        raise bad("\"records\" must be a list and \"tensors\" an object")
    index = _Index(path, rank, [], None)
    seen: dict[tuple[str, int], None] = {}
    for i, rec in enumerate(records):
        if (not isinstance(rec, dict) or not isinstance(rec.get("module"), str) or not _is_int(rec.get("call"))
                or rec.get("kind") not in KINDS):
            raise bad(f"records[{i}] needs \"module\" (string), \"call\" (integer) and \"kind\" (one of {KINDS})")
        index.structures[(rec["module"], rec["call"], rec["kind"])] = rec.get("structure")
        seen.setdefault((rec["module"], rec["call"]), None)
    for name, entry in tensors.items():
        if (not isinstance(entry, dict) or not isinstance(entry.get("shard"), str)
                or not isinstance(entry.get("dtype"), str) or not isinstance(entry.get("shape"), list)):
            raise bad(f"tensors[{name!r}] needs \"shard\", \"dtype\" and \"shape\"")
        shard = entry["shard"]
        if "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise bad(f"tensors[{name!r}]: shard {shard!r} must be a plain file name in the step directory")
    index.tensors = tensors
    try:
        if "calls" in data:
            index.calls = [(c.module, c.call) for c in calls_from_json(data["calls"], step, rank)]
        else:
            index.calls = list(seen)
        if "call_ends" in data:
            index.call_ends = [(c.module, c.call) for c in calls_from_json(data["call_ends"], step, rank)]
    except ValueError as exc:
        raise bad(str(exc)) from None
    index.known = set(index.calls) | set(seen)
    return index




#: How many steps' indexes, open shards and library readers a reader keeps (the least recently
#: used go): a compare of two 100,000-step runs must not hold 100,000 parsed indexes, nor run out
#: of file descriptors (1,024 by default on many systems) with one open shard per step.
_KEEP_INDEXES = 1024
#: ... and the kept indexes' records and tensors at most this many in all (the last index always): a comparer
#: plans a window of ~1,024 pairs, then loads them, and a window of small steps spans many steps
#: (their indexes were parsed twice).
_KEEP_INDEX_ENTRIES = 4608
_KEEP_SHARDS = 64
_KEEP_LIBRARY = 8


class _Recent(OrderedDict[Any, Any]):
    """A dict that keeps its ``limit`` most recently used items (callers hold a lock around it);
    with ``weigh``, fewer when their weights pass ``budget`` (the last one always)."""

    def __init__(self, limit: int, weigh: Callable[[Any], int] | None = None, budget: int = 0) -> None:
        super().__init__()
        self.limit = limit
        self.weigh, self.budget, self.weight = weigh, budget, 0

    def recent(self, key: Any) -> Any:
        """The item of ``key`` (now the most recently used), or None."""
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def keep(self, key: Any, value: Any) -> Any:
        """Add ``key``; drop the least recently used beyond ``limit`` (or ``budget``). Returns ``value``."""
        weigh = self.weigh
        if weigh is not None:
            old = self.get(key)
            self.weight += weigh(value) - (weigh(old) if old is not None else 0)
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit or (weigh is not None and self.weight > self.budget and len(self) > 1):
            _key, dropped = self.popitem(last=False)
            if weigh is not None:
                self.weight -= weigh(dropped)
        return value

    def clear(self) -> None:
        super().clear()
        self.weight = 0


class _Shard:
    """One shard read with plain ``pread`` calls into memory of the reader's own.

    The safetensors library memory-maps the whole shard: every page a compare touches then stays
    in the process's resident set until the shard is closed (a 1 GB shard adds 1 GB of RSS).
    Reading copies each tensor into a buffer that is freed with the tensor, as fast as the copy
    the library's reader makes out of its mapping. The format (8-byte little-endian header
    length, a JSON header of ``name -> {dtype, shape, data_offsets}``, then the bytes) is checked
    as the library checks it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise CorruptFileError(path, "shard file is missing") from None
        except OSError as exc:
            raise CorruptFileError(path, f"cannot open the shard: {exc}") from None
        try:
            self._size = os.fstat(self._fd).st_size
            head = os.pread(self._fd, 8, 0)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < length <= min(_MAX_HEADER, self._size - 8):
                raise ValueError(f"header length {length} does not fit a file of {self._size} bytes")
            header = json.loads(os.pread(self._fd, length, 8))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (OSError, ValueError) as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            self.close()
            raise CorruptFileError(path, f"cannot open the shard (truncated or corrupt?): {exc}") from None
        self._header: dict[str, Any] = header
        self._base = 8 + length

    def read(self, name: str) -> torch.Tensor | None:
        """The tensor ``name``; None when its dtype is not in :data:`_CODES`.

        Raises:
            CorruptFileError: no such tensor, a malformed entry, or the file is cut short.
        """
        placed = self.place(name)
        if placed is None:
            return None
        dtype, shape, offset = placed
        nbytes = math.prod(shape) * dtype.itemsize
        try:
            buf, view = byte_tensor(nbytes)
            if pread_into(self._fd, (view,), offset) != nbytes:
                raise ValueError("the file ends early")
        except (OSError, ValueError) as exc:
            raise CorruptFileError(self.path, f"cannot read tensor {name!r}: {exc}") from None
        return buf.view(dtype).reshape(shape)

    def place(self, name: str) -> tuple[torch.dtype, list[int], int] | None:
        """The dtype, shape and file offset of tensor ``name``, its entry checked as the library
        checks it; None when its dtype is not in :data:`_CODES`.

        Raises:
            CorruptFileError: no such tensor, or a malformed entry (bytes outside the file).
        """
        info = self._header.get(name)
        if name == "__metadata__" or not isinstance(info, dict):
            raise CorruptFileError(self.path, f"cannot read tensor {name!r}: not in the shard")
        code = info.get("dtype")
        dtype = _CODES.get(code) if isinstance(code, str) else None
        if dtype is None:
            return None
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(v, int) and v >= 0 for v in [*shape, *offsets])):
            raise CorruptFileError(self.path, f"cannot read tensor {name!r}: malformed entry in the header")
        begin, end = offsets
        if end - begin != math.prod(shape) * dtype.itemsize or self._base + end > self._size:
            raise CorruptFileError(self.path, f"cannot read tensor {name!r}: bytes {begin}..{end} do not hold "
                                   f"{shape} {code} inside the file")
        return dtype, shape, self._base + begin

    @property
    def fd(self) -> int:
        """The shard's descriptor (valid while this object is referenced: see :meth:`close`)."""
        return self._fd

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    # A shard the reader no longer keeps (:data:`_KEEP_SHARDS`) is closed when the last thread
    # reading from it lets it go, never under a read (which would read a closed or reused fd).
    __del__ = close


def _index_weight(index: _Index) -> int:
    """An index's weight in the cache: its records and its tensors (a statistics run's index has
    records and no tensor: it must weigh too)."""
    return 1 + len(index.structures) + len(index.tensors)


class SafetensorsReader(StoreReader):
    """Reads a run written by :class:`SafetensorsWriter`; shards are opened lazily, once each."""

    name = "safetensors"
    #: ``same_as`` bodies are loaded through their original's node: a compare window's
    #: structures are kept (see :attr:`StoreReader.window_nodes`).
    window_nodes = True

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__(run_dir)
        self._indexes = _Recent(_KEEP_INDEXES, _index_weight, _KEEP_INDEX_ENTRIES)  # step -> _Index
        self._handles = _Recent(_KEEP_SHARDS)  # path -> _Shard
        self._shard_paths = _Recent(4 * _KEEP_SHARDS)  # (step, shard name) -> checked path
        self._lib = _Recent(_KEEP_LIBRARY)  # path -> the library's reader (rare dtypes)
        self._lock = threading.Lock()

    @classmethod
    def can_open(cls, run_dir: Path) -> bool:
        try:
            with os.scandir(run_dir) as it:
                for entry in it:
                    if STEP_DIR.match(entry.name) and entry.is_dir():
                        index = Path(entry.path) / INDEX_NAME
                        if index.is_file():
                            with open(index, "rb") as fh:
                                return INDEX_FORMAT.encode() in fh.read(256)
        except OSError:
            return False
        return False

    def _completed_steps(self) -> list[int]:
        # A step is complete exactly when its index exists.
        return [s for s in self._list_steps() if (self.run_dir / step_dir_name(s) / INDEX_NAME).is_file()]

    def _index(self, step: int) -> _Index:
        with self._lock:
            known: _Index | None = self._indexes.recent(step)
        if known is not None:
            return known
        path = self.run_dir / step_dir_name(step) / INDEX_NAME
        if not path.is_file():
            if step in self._list_steps():
                raise CorruptFileError(path, f"step {step} has no index: it was cut before it finished")
            raise KeyError(f"no step {step} in {self.run_dir}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptFileError(path, f"unreadable step index JSON: {exc}") from None
        index = _parse_index(path, step, data)
        with self._lock:
            self._indexes.keep(step, index)
        return index

    def _list_calls(self, step: int) -> list[CallKey]:
        index = self._index(step)
        return [CallKey(index.rank, step, m, c) for m, c in index.calls]

    def _list_call_ends(self, step: int) -> list[CallKey] | None:
        index = self._index(step)
        return None if index.call_ends is None else [CallKey(index.rank, step, m, c) for m, c in index.call_ends]

    def _read_structure(self, call: CallKey, kind: str) -> Any | None:
        index = self._index(call.step)
        if (call.module, call.call) not in index.known:
            raise KeyError(f"no module call {call.module}#{call.call} in step {call.step} of {self.run_dir}")
        return index.structures.get((call.module, call.call, kind))

    def _shard(self, path: Path) -> _Shard:
        with self._lock:  # compare workers load from several threads
            shard: _Shard | None = self._handles.recent(path)
            if shard is None:
                shard = self._handles.keep(path, _Shard(path))
        return shard

    def _handle(self, path: Path) -> Any:
        """The safetensors library's own (memory-mapped) reader of a shard: only for a dtype
        :class:`_Shard` does not know."""
        with self._lock:
            handle = self._lib.recent(path)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = safe_open(str(path), framework="pt")
            except FileNotFoundError:
                raise CorruptFileError(path, "shard file is missing") from None
            except Exception as exc:  # SafetensorError: truncated, garbage, bad header
                raise CorruptFileError(path, f"cannot open the shard (truncated or corrupt?): {exc}") from None
            with self._lock:
                self._lib.keep(path, handle)
        return handle

    def _entry(self, key: TensorKey, name: str | None = None) -> tuple[dict[str, Any], Path]:
        """The index entry of a stored tensor (``name``: ``str(key)``, when the caller has it) and
        the path of its shard."""
        index = self._index(key.step)
        entry = index.tensors.get(str(key) if name is None else name)
        if entry is None:
            raise CorruptFileError(index.path, f"{key}: stored according to its metadata, but the index maps it "
                                   "to no shard")
        with self._lock:
            path: Path | None = self._shard_paths.recent((key.step, entry["shard"]))
        if path is None:  # resolved once per shard, not per tensor (a realpath walk costs ~0.2 ms)
            path = check_inside(self.run_dir, index.path.parent / entry["shard"])
            with self._lock:
                self._shard_paths.keep((key.step, entry["shard"]), path)
        return entry, path

    def _body_path(self, key: TensorKey, node: dict[str, Any]) -> Path:
        return self._entry(key)[1]

    def _load(self, key: TensorKey, node: dict[str, Any]) -> torch.Tensor:
        name = str(key)
        entry, path = self._entry(key, name)
        stored = self._shard(path).read(entry.get("name", name))
        if stored is None:  # a dtype _Shard does not know: the library's reader
            try:
                stored = self._handle(path).get_tensor(entry.get("name", name))
            except Exception as exc:  # SafetensorError: missing name, or a shard cut short
                raise CorruptFileError(path, f"cannot read tensor {entry.get('name', name)!r}: {exc}") from None
        try:
            return decode(stored, entry.get("encoding", ""), dtype_from_str(entry["dtype"]))
        except ValueError as exc:
            raise CorruptFileError(path, f"{name}: {exc}") from None

    def _open_body(self, key: TensorKey, node: dict[str, Any]) -> Body | None:
        """The tensor's bytes in its shard, when the shard holds them as they are (no encoding:
        see :func:`._encode.encode`). The body keeps the shard object alive, and with it the
        descriptor it reads (a shard the reader lets go is closed by the last holder)."""
        name = str(key)
        entry, path = self._entry(key, name)
        if entry.get("encoding", "") != "":  # (as decode() takes it: anything else is the load's error)
            return None
        shard = self._shard(path)
        placed = shard.place(entry.get("name", name))
        if placed is None or placed[0] != dtype_from_str(entry["dtype"]) or shard.fd < 0:
            return None
        dtype, shape, offset = placed
        return Body(shard.fd, offset, dtype, tuple(shape), path, own=False, keep=shard)

    def close(self) -> None:
        for shard in self._handles.values():
            shard.close()
        self._handles.clear()
        self._shard_paths.clear()
        for handle in self._lib.values():
            exit_ = getattr(handle, "__exit__", None)
            if exit_ is not None:
                try:
                    exit_(None, None, None)
                except Exception:  # closing a read-only mapping cannot lose data
                    pass
        self._lib.clear()
        self._indexes.clear()
        super().close()


#: What the registry loads (as for any backend: see :mod:`ilstore.store.registry`).
writer, reader = SafetensorsWriter, SafetensorsReader
