"""The ``hdf5`` backend: one HDF5 file per step (SPEC §4.4).

::

    <run_dir>/ilstore.json              the manifest (as for every backend)
    <run_dir>/step_<N>.h5               a completed step
    <run_dir>/step_<N>.h5.partial       the step being written, or one cut by a crash

    step_<N>.h5
      attrs: format="ilstore-hdf5", format_version, step, rank, calls, call_ends (JSON text)
      /<module>#<call>                  one group per module call (module %-encoded: no '/')
          attrs: module, call, step, rank, and per captured side the structure as JSON text
                 ("inputs", "outputs", "post_fwd_inputs")
          <kind>[:<path elem>...]       one dataset per stored tensor, e.g. "outputs", "inputs:0",
                                        "inputs:attention_mask" (path elements %-encoded)
              attrs: dtype="torch.bfloat16", encoding="bits"|"real" (only when re-encoded)

Types numpy (and so HDF5) lacks — bfloat16, the float8 variants, complex32 — are stored as
their raw bits (``uint16``/``uint8`` views, see :mod:`._encode`) with the true dtype in the
``dtype`` attribute; everything comes back bit-exact. Complex and bool use h5py's native types.

Crash safety: a step is written into ``step_<N>.h5.partial``, flushed after every record, and
renamed to ``step_<N>.h5`` at the end of the step, after the file was closed. A process that
dies mid-step therefore never touches a completed step's file, and the cut step's file stays
readable (with ``h5py``) up to its last completed record. ``libver="latest"`` is not used, so
files open with any HDF5 1.8+ tool without ``h5clear``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CorruptFileError, StoreError
from ..keys import KINDS, CallKey, TensorKey, decode_part, encode_part
from ..manifest import calls_from_json, calls_to_json
from ..records import Record, dtype_from_str
from ._encode import decode, encode
from ._pread import AVAILABLE as pread_ok
from ._pread import byte_tensor, pread_into
from .base import StepInfo, StoreReader, StoreWriter, step_dir_name

__all__ = ["Hdf5Writer", "Hdf5Reader", "FILE_FORMAT", "group_name", "parse_group_name", "dataset_name",
           "parse_dataset_name", "writer", "reader"]

FILE_FORMAT = "ilstore-hdf5"
FILE_VERSION = 1
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


def _msg(exc: BaseException) -> str:
    """HDF5's messages span lines; one line reads better in a log or an error."""
    return " ".join(str(exc).split())


class Hdf5Writer(StoreWriter):
    """Writes ``step_<N>.h5.partial``, flushing after each record, and renames it at step end.

    Options (``backend_options``): ``compression`` (``"gzip"`` or ``"lzf"``),
    ``compression_opts`` (gzip level 0-9), ``shuffle`` (bool). Compression is opt-in: it saves
    little on activations and costs much write time (docs/format-hdf5.md).
    """

    name = "hdf5"

    def __init__(self, run_dir: str | Path, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(run_dir, options)
        self._filters: dict[str, Any] = {k: self.options[k] for k in ("compression", "compression_opts", "shuffle")
                                         if self.options.get(k) is not None}
        self._file: Any = None
        self._path: Path | None = None  # kept apart: touching a failed h5py file object can crash HDF5
        self._step: int | None = None
        # Within the open step: the groups and datasets written so far (h5py's lookups by name
        # cost ~80 us each; a de-duplicated tensor links to the dataset object directly).
        self._groups: dict[str, Any] = {}
        self._datasets: dict[str, Any] = {}

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
            else:
                problems.append(f"backend_options.{key}: unknown option for the 'hdf5' backend "
                                "(it takes: compression, compression_opts, shuffle)")
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
            self._file = h5py.File(partial, "w", track_order=True)
            self._file.attrs.update({"format": FILE_FORMAT, "format_version": FILE_VERSION, "step": step,
                                     "rank": int(self.manifest.get("rank", 0))})
            self._file.flush()
        except Exception as exc:  # OSError, or RuntimeError from HDF5 on a full disk
            self._drop()
            raise StoreError(f"{partial}: cannot create the step file: {_msg(exc)}") from exc
        self._step, self._groups, self._datasets = step, {}, {}
        return self._file

    def _drop(self) -> None:
        """After an I/O error: close the file at once, ignoring errors. An HDF5 file object left
        open after a failed write can crash the interpreter when it is finally deallocated."""
        f, self._file, self._step = self._file, None, None
        self._groups, self._datasets = {}, {}
        if f is not None:
            try:
                f.close()
            except Exception as exc:
                _log.debug("closing %s after a write error failed too: %s", self._path, _msg(exc))

    def _abandon(self) -> None:
        """A step that never ended: close its file, which stays ``.partial``."""
        f, path, self._file, self._step = self._file, self._path, None, None
        self._groups, self._datasets = {}, {}
        if f is not None:
            try:
                f.close()
            except Exception as exc:
                raise StoreError(f"{path}: cannot close the unfinished step file: {_msg(exc)}") from exc

    def _write(self, record: Record) -> None:
        f = self._begin(record.call.step)
        try:
            self._write_record(f, record)
            f.flush()  # a killed process keeps every record flushed before it died
        except StoreError:
            raise
        except Exception as exc:  # h5py raises OSError/RuntimeError/ValueError for I/O failures
            self._drop()
            raise StoreError(f"{self._path}: cannot write {record.call.tensor(record.kind)}: {_msg(exc)}") from exc

    def _write_record(self, f: Any, record: Record) -> None:
        call = record.call
        gname = group_name(call.module, call.call)
        group = self._groups.get(gname)  # the step file is new: every group in it is here
        if group is None:
            group = self._groups[gname] = f.create_group(gname)
            for name, value in (("module", call.module), ("call", call.call), ("step", call.step),
                                ("rank", call.rank)):
                _set_attr(group, name, value)
        for path, node, tensor in self._stored_bodies(record):
            dname = dataset_name(record.kind, path)
            if tensor is None:
                original = self._datasets.get(node["same_as"])
                if original is not None:  # an HDF5 hard link: plain h5py readers see the tensor too
                    group[dname] = original
                continue
            key = str(record.key(path))
            self._datasets[key] = self._create_dataset(group, dname, tensor, key)
        try:
            text = json.dumps(record.structure, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{call.tensor(record.kind)}: structure is not valid JSON: {exc}") from None
        _set_attr(group, record.kind, text)

    def _create_dataset(self, group: Any, name: str, tensor: torch.Tensor, key: str) -> Any:
        tensor = tensor.detach().resolve_conj().resolve_neg().cpu().contiguous()
        try:
            data, encoding = encode(tensor, _NUMPY_DTYPES.__contains__)
        except TypeError as exc:
            raise StoreError(f"{key}: {exc}") from None
        array = data.numpy()
        flat = array.ndim > _MAX_RANK
        if flat:
            array = array.reshape(-1)
        filters = self._filters if array.ndim > 0 and array.size > 0 else {}
        ds = group.create_dataset(name, data=array, **filters)
        _set_attr(ds, "dtype", str(tensor.dtype))
        if encoding:
            _set_attr(ds, "encoding", encoding)
        if flat:
            _set_attr(ds, "shape", json.dumps(list(data.shape)))
        return ds

    def _end_step(self, info: StepInfo) -> None:
        f = self._begin(info.step)
        final, partial = self._paths(info.step)
        try:
            f.attrs["calls"] = json.dumps(calls_to_json(info.calls))
            f.attrs["call_ends"] = json.dumps(calls_to_json(info.call_ends))
            self._file, self._step, self._groups, self._datasets = None, None, {}, {}
            f.close()
            os.replace(partial, final)
        except Exception as exc:
            self._file = f
            self._drop()
            raise StoreError(f"{partial}: cannot finish step {info.step}: {_msg(exc)}") from exc

    def _close(self) -> None:
        try:
            self._abandon()
        except StoreError as exc:  # the step is incomplete anyway; closing must still finish
            _log.warning("ilstore: %s", exc)


@functools.cache
def _attr_api() -> tuple[Any, Any, Any, Any, Any]:
    """(h5py's ``h5a`` module, variable-length UTF-8 string type, int64 type, scalar dataspace,
    numpy dtype of h5py strings): what ``attrs[name] = value`` creates for a ``str``/``int``."""
    import h5py
    from h5py import h5a, h5s, h5t

    return (h5a, h5t.py_create(h5py.string_dtype(), logical=True), h5t.py_create(np.dtype("<i8")),
            h5s.create(h5s.SCALAR), h5py.string_dtype())


def _set_attr(obj: Any, name: str, value: str | int) -> None:
    """``obj.attrs[name] = value`` for a new ``str`` or ``int`` attribute, the same HDF5 type
    and layout, through h5py's low-level API: the high-level one writes a temporary attribute
    and renames it (to allow overwriting), about twice the time; it took a fifth of a full
    capture's writer time. An attribute that already exists goes the high-level way."""
    h5a, vlen_str, i64, scalar, str_dtype = _attr_api()
    is_str = isinstance(value, str)
    try:
        attr = h5a.create(obj.id, name.encode("utf-8"), vlen_str if is_str else i64, scalar)
    except (OSError, RuntimeError, ValueError):  # it exists (never, as the writer uses it)
        obj.attrs[name] = value
        return
    attr.write(np.array(value, dtype=str_dtype if is_str else "<i8"))


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
    try:
        return json.loads(str(text))
    except json.JSONDecodeError as exc:
        raise CorruptFileError(path, f"attribute {name!r} is not valid JSON: {exc}") from None


def _raised_in_h5py(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "h5py" in tb.tb_frame.f_code.co_filename


def _guarded(method: Any) -> Any:
    """Turn h5py's own errors on a damaged file (KeyError "bad object header", OSError,
    RuntimeError...) into a CorruptFileError naming the step file; our own KeyErrors pass."""

    @functools.wraps(method)
    def wrapper(self: Hdf5Reader, first: Any, *args: Any) -> Any:
        try:
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


class Hdf5Reader(StoreReader):
    """Reads a run written by :class:`Hdf5Writer`; each step file is opened once, when first needed."""

    name = "hdf5"

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__(run_dir)
        self._files: dict[int, Any] = {}
        self._paths: dict[int, Path] = {}
        self._raw_fds: dict[int, int] = {}  # step -> its file's descriptor, for raw reads of contiguous datasets
        self._last_group: tuple[CallKey, Any] | None = None  # the group looked up last (h5py: ~0.1 ms a lookup)

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
            return f
        path = self.run_dir / f"{step_dir_name(step)}.h5"
        if not path.is_file():
            partial = path.with_name(path.name + ".partial")
            if not partial.is_file():
                raise KeyError(f"no step {step} in {self.run_dir}")
            path = partial
        import h5py

        try:
            f = h5py.File(path, "r")
        except Exception as exc:  # OSError: truncated, not HDF5, locked
            raise CorruptFileError(path, f"cannot open the HDF5 file (truncated or corrupt?): {_msg(exc)}") from None
        fmt = f.attrs.get("format")
        if (fmt.decode() if isinstance(fmt, bytes) else fmt) != FILE_FORMAT:
            f.close()
            raise CorruptFileError(path, f"not an ilstore HDF5 step file (no format=\"{FILE_FORMAT}\" attribute)")
        self._files[step], self._paths[step] = f, path
        if pread_ok and f.userblock_size == 0 and f.driver == "sec2":  # addresses are file offsets: raw reads work
            try:  # HDF5's own descriptor (pread leaves its position alone): no second one per step
                self._raw_fds[step] = int(f.id.get_vfd_handle())
            except (OSError, RuntimeError, ValueError, TypeError):
                pass
        return f

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
            # a cut step has no call list yet: groups come back in creation (call-start) order
            out = []
            for name in f.keys():
                module, call = parse_group_name(name)
                out.append(CallKey(rank, step, module, call))
            return out
        except ValueError as exc:
            raise CorruptFileError(path, f"bad module call list: {exc}") from None

    def _list_call_ends(self, step: int) -> list[CallKey] | None:
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

    @_guarded
    def _read_structure(self, call: CallKey, kind: str) -> Any | None:
        group = self._group(call)
        path = self._paths[call.step]
        try:
            return _json_attr(path, group.attrs, kind)
        except CorruptFileError:
            raise
        except Exception as exc:
            raise CorruptFileError(path, f"cannot read the {kind} of {call.module}#{call.call}: {_msg(exc)}") from None

    @_guarded
    def _load(self, key: TensorKey, node: dict[str, Any]) -> torch.Tensor:
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
        try:
            shape = attrs.get("shape")
            if shape is not None:
                stored = stored.reshape(json.loads(str(shape)))
            encoding = attrs.get("encoding", "")
            dtype = dtype_from_str(str(attrs.get("dtype", node.get("dtype", str(stored.dtype)))))
            tensor = decode(stored, str(encoding), dtype)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise CorruptFileError(path, f"{key}: cannot decode dataset {group.name}/{dname}: {exc}") from None
        return tensor

    def _read_contiguous(self, step: int, ds: Any) -> torch.Tensor | None:
        """The dataset's values as ``ds[()]`` gives them, read with one ``pread`` (GIL released)
        where HDF5 would only copy the bytes: a contiguous dataset, no filters or external
        storage, all its bytes allocated, a file type equal to the in-memory type of its numpy
        dtype (so HDF5 converts nothing), the native byte order. None for everything else (and
        where the file ends early), which h5py then reads as before, with its errors."""
        fd = self._raw_fds.get(step)
        if fd is None:
            return None
        from h5py import h5d, h5t

        dtype = ds.dtype
        tdtype = _RAW_DTYPES.get(dtype)
        shape = ds.shape
        if tdtype is None or shape is None or len(shape) > _MAX_RANK:
            return None
        dcpl = ds.id.get_create_plist()
        if dcpl.get_layout() != h5d.CONTIGUOUS or dcpl.get_external_count() or dcpl.get_nfilters():
            return None
        nbytes = math.prod(shape) * dtype.itemsize
        offset = ds.id.get_offset()
        if not nbytes or offset is None or ds.id.get_storage_size() != nbytes:
            return None
        if not ds.id.get_type().equal(h5t.py_create(dtype)):
            return None
        body, view = byte_tensor(nbytes)
        try:
            if pread_into(fd, (view,), offset) != nbytes:
                return None
        except OSError:
            return None
        return body.view(tdtype).reshape(shape)

    def _step_path(self, step: int) -> Path:
        """The file of ``step`` this reader opened (``.h5`` or ``.h5.partial``), else its ``.h5``."""
        return self._paths.get(step, self.run_dir / f"{step_dir_name(step)}.h5")

    def _body_path(self, key: TensorKey, node: dict[str, Any]) -> Path:
        return self._step_path(key.step)

    def close(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except Exception:  # closing a read-only file cannot lose data
                pass
        self._files.clear()
        self._last_group = None
        self._raw_fds.clear()  # HDF5's descriptors, closed with the files
        super().close()


#: What the registry loads (as for any backend: see :mod:`ilstore.store.registry`).
writer, reader = Hdf5Writer, Hdf5Reader
