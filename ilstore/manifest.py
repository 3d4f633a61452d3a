"""The run manifest ``ilstore.json``, the step journal ``steps.jsonl``, and atomic JSON writes.

A run directory's manifest (format version 2) records the format version, backend, resolved
config, library and torch versions, rank and world size, the run status (``running`` →
``complete``, or ``failed``) and the name of the run's step journal. It is written atomically
(temp file + ``os.replace``) only when the run opens and when it closes, so a reader never sees
a half-written manifest and its size does not depend on the length of the run.

The step journal (:data:`JOURNAL_NAME`) holds what grows with the run: one line per completed
step, appended once the step is durable, with the step's module call order and its totals
(:class:`JournalWriter`). Appending costs what the step wrote, whatever the step number; a
reader indexes the journal once and parses only the lines it needs (:class:`JournalReader`).
A run killed at any point keeps every step whose line is complete. Runs written by ilstore 0.1
(format version 1) keep the steps and call orders in the manifest itself (``steps``,
``calls``, ``call_ends``); readers read both.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import platform
import re
import tempfile
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from itertools import accumulate, islice
from pathlib import Path
from typing import Any

from ._stepmap import SharedValues
from ._version import __version__
from .errors import CorruptFileError, StoreError
from .keys import CallKey

__all__ = ["MANIFEST_NAME", "JOURNAL_NAME", "FORMAT_VERSION", "UNORDERED_KEY", "TOTALS_KEYS", "TotalCounts",
           "write_json_atomic", "write_text_atomic", "read_manifest", "new_manifest", "calls_to_json",
           "calls_from_json", "JournalWriter", "JournalReader", "CallOrder", "dumps", "dumps_tree", "json_str",
           "warnings_of"]

_log = logging.getLogger(__name__)

MANIFEST_NAME = "ilstore.json"
#: The step journal of a format-2 run, in its run directory (the manifest's ``"journal"``).
JOURNAL_NAME = "steps.jsonl"
#: 1: ilstore 0.1 (no journal; the manifest rewritten at each step end); 2: the step journal;
#: 3 (ilstore 0.2.0): pt's per-step structure list and hdf5's version-2 step files (sides without
#: a stored body are lines of one per-step list, not files or groups of their own). Readers read
#: every version up to this one and refuse a higher one (:func:`read_manifest`).
FORMAT_VERSION = 3
#: Set (true) in the manifest by a writer that appended a step not above the previous one: its
#: journal's steps do not ascend, and readers index the whole file to find a step's last line.
UNORDERED_KEY = "journal_unordered"
#: The keys of a journal line's ``"totals"``: what ``ilstore ls`` prints per step.
TOTALS_KEYS = ("module_calls", "tensors", "stored", "bytes")

# A line starts with its step number: the writer puts "step" first, so the index needs no parse.
_STEP_PREFIX = re.compile(rb'\{\s*"step"\s*:\s*(\d+)\s*[,}]')
# The end of a line as the writer spells it, for listing a long run without parsing every line.
#: A journal line that refers to another step's call orders, as :class:`JournalWriter` writes it.
_CALLS_AS = re.compile(rb'\{"step": (\d+), "calls_as": (\d+), ')
#: One step's calls: ``(rank, (module, call) in start order, (module, call) in end order)``.
CallOrder = tuple[int, tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]
_TOTALS_TAIL = re.compile(rb'"totals": \{"module_calls": (\d+), "tensors": (\d+), "stored": (\d+), '
                          rb'"bytes": (\d+)\}\}\Z')
#: A step's totals as a tuple, in :data:`TOTALS_KEYS` order.
TotalCounts = tuple[int, int, int, int]
_DECODER = json.JSONDecoder()
# The index's pass reads this many bytes at a time; a chunk's lines are split out at once (a bytes
# object each), so its transient memory is a few times this (1 MiB: ~8 MB at 10^5 steps, 36 with 8).
_SCAN_CHUNK = 1 << 20
# Distinct line endings remembered while reading every step's totals.
_SEEN_ENDINGS = 1024
# Parsed journal lines kept per reader (the lines others point to with "calls_as" are reused).
_LINE_CACHE = 64
# call_orders() reads the journal this many bytes at a time (a longer line: the line).
_ORDER_WINDOW = 1 << 20
# Lines that spell their orders out, remembered by call_orders() for the lines that refer to them.
_SPELLED_LINES = 1024


def _c_encoder(check_circular: bool) -> Any:
    """What ``json.dumps(doc, allow_nan=False)`` makes per call (a ``JSONEncoder`` and its C
    encoder), made once: calling it gives the same text, without the two objects and the two
    Python calls (``encode``, ``iterencode``) per document. ``check_circular=False`` leaves out
    the check for circular references (what ``JSONEncoder(check_circular=False)`` does). None
    where this interpreter has no C encoder, or its private signature is not the one checked
    here (against ``json.dumps``, once)."""
    enc = json.JSONEncoder(allow_nan=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # another Python: json.dumps
        return None
    try:
        encoder = make({} if check_circular else None, enc.default, json.encoder.encode_basestring_ascii, None,
                       enc.key_separator, enc.item_separator, False, False, False)
        sample = {"a": [1.5, -0.0, 10**20, None, True, "\u00e9\n"], "b": {"c": 2.5e-300}, "": []}
        if "".join(encoder(sample, 0)) != json.dumps(sample, allow_nan=False):
            return None
    except Exception:
        return None
    return encoder


_ENCODER = _c_encoder(True)
_TREE_ENCODER = _c_encoder(False)
_ENCODE_TREE = json.JSONEncoder(allow_nan=False, check_circular=False).encode


def dumps(doc: Any) -> str:
    """``json.dumps(doc, allow_nan=False)``: the same text and the same errors, cheaper per
    call (the C encoder is made once; only the one-shot C encoder is fast: ``dump`` to a file and
    ``indent`` use the pure-Python one, ~6x slower). A failed call (a NaN, a type JSON lacks) may
    leave its circular-reference marks behind, so the encoder is made again after one."""
    global _ENCODER
    encoder = _ENCODER
    if encoder is None:
        return json.dumps(doc, allow_nan=False)
    try:
        return "".join(encoder(doc, 0))
    except BaseException:
        _ENCODER = _c_encoder(True)
        raise


def dumps_tree(doc: Any) -> str:
    """:func:`dumps` without the check for circular references, for a document known to be a
    tree (a record's structure): the same text; a document that loops raises RecursionError
    instead of ValueError. ~5 % cheaper than :func:`dumps` on the capture benchmark's structures."""
    encoder = _TREE_ENCODER
    if encoder is None:
        return _ENCODE_TREE(doc)
    return "".join(encoder(doc, 0))


#: A string as :func:`dumps` spells it (``ensure_ascii``, escaped, quoted).
json_str = json.encoder.encode_basestring_ascii


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file in the same directory and a rename.

    Compact, from ``json.dumps``: only that one-shot form uses the C encoder (``json.dump`` to a
    file, or any ``indent``, runs the pure-Python one, ~6x slower). A safetensors step index
    lists every tensor of its step: indenting it cost ~20 ms per step of the benchmark
    workload. ``python -m json.tool`` or ``ilstore ls`` pretty-print.
    """
    write_text_atomic(path, json.dumps(data, allow_nan=False))


_UMASK: list[int] = []


def process_umask() -> int:
    """The process's umask (read once): files and directories made under temporary names
    (``tempfile``'s 0o600 and 0o700) are given the mode ``open`` and ``mkdir`` would give them."""
    if not _UMASK:
        mask = None
        try:
            with open("/proc/self/status", encoding="ascii") as fh:  # Linux: read without changing it
                for line in fh:
                    if line.startswith("Umask:"):
                        mask = int(line.split()[1], 8)
        except (OSError, ValueError):
            pass
        if mask is None:
            mask = os.umask(0o022)
            os.umask(mask)
        _UMASK.append(mask)
    return _UMASK[0]


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same directory and a rename.

    For a document already encoded (a safetensors step index assembled from its records' JSON,
    encoded once each as they were written); :func:`write_json_atomic` encodes and calls this.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~process_umask())  # as open() makes a file: mkstemp's 0o600 hid runs from others
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The manifest of ``run_dir``, None if it has none.

    Importable without torch (``ilstore ls`` reads runs with it); the store readers use it too.

    Raises:
        CorruptFileError: the file is unreadable, not JSON, or not an ilstore manifest.
        StoreError: a newer ilstore wrote it (its ``format_version`` is above :data:`FORMAT_VERSION`).
    """
    path = run_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(path, f"unreadable manifest: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != "ilstore":
        raise CorruptFileError(path, "not an ilstore manifest (no \"format\": \"ilstore\")")
    version = data.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        # A newer layout read by this reader could look like a run with missing data; refuse it.
        raise StoreError(f"{path}: written by a newer ilstore ({data.get('ilstore_version', 'unknown version')}, "
                         f"format_version {version}); this ilstore ({__version__}) reads format versions up to "
                         f"{FORMAT_VERSION}: upgrade ilstore to read this run")
    return data


def new_manifest(backend: str, config: dict[str, Any], *, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """A fresh manifest for a run that is about to start.

    Example:
        >>> m = new_manifest("pt", {})
        >>> m["format_version"], m["status"], m["journal"]
        (3, 'running', 'steps.jsonl')
    """
    import torch  # here, not at the top: reading a run's manifest and journal (ilstore ls) needs no torch

    return {
        "format": "ilstore",
        "format_version": FORMAT_VERSION,
        "backend": backend,
        "config": config,
        "ilstore_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "rank": rank,
        "world_size": world_size,
        "status": "running",
        "journal": JOURNAL_NAME,
    }


def warnings_of(manifest: dict[str, Any] | None) -> list[str]:
    """The manifest's ``"warnings"``: what the capture warned about that bears on what the run
    holds (a compiled model whose hooks never fired, steps in which no hooked module ran, a
    ``module_call_match`` that matches nothing...), written at close; empty for a run without
    (a clean run, one killed before its close, one written before the field existed). Entries that are not
    strings are left out: the field is for people, and nothing else depends on it.

    Example:
        >>> warnings_of({"warnings": ["no hooked module ran in 1 step(s) (0): ...", 3]})
        ['no hooked module ran in 1 step(s) (0): ...']
        >>> warnings_of({}), warnings_of(None)
        ([], [])
    """
    said = manifest.get("warnings") if isinstance(manifest, dict) else None
    return [w for w in said if isinstance(w, str)] if isinstance(said, list) else []


def calls_to_json(calls: Iterable[CallKey]) -> list[list[Any]]:
    return [[c.module, c.call] for c in calls]


def calls_from_json(data: Any, step: int, rank: int = 0) -> list[CallKey]:
    """Parse ``[[module, call], ...]``; raises ValueError on anything else."""
    if not isinstance(data, list):
        raise ValueError("expected a list of [module, call] pairs")
    out = []
    for item in data:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or not isinstance(item[1], int) or isinstance(item[1], bool) or item[1] < 0):
            raise ValueError(f"bad call entry {item!r}; expected [module name, call index]")
        out.append(CallKey(rank, step, item[0], item[1]))
    return out


def _step_of(line: bytes) -> int:
    """The step number a journal line starts with, -1 if it does not start with one."""
    m = _STEP_PREFIX.match(line)
    return int(m.group(1)) if m else -1


class JournalWriter:
    """Appends one line per completed step to a run's step journal.

    A line is ``{"step": N, "calls": [[module, call], ...], "call_ends": [...], "totals":
    {"module_calls": .., "tensors": .., "stored": .., "bytes": ..}}``, written by one
    ``os.write`` to a file opened with ``O_APPEND`` and ended by a newline: a line without its
    newline is one a killed process did not finish, and readers ignore it. When a step's
    ``calls`` and ``call_ends`` equal those of the last line that spelled them out, the line
    says ``"calls_as": <that step>`` instead, so a line stays short when the call order
    repeats. The file is created empty (an earlier journal at ``path`` is truncated).

    Args:
        path: the journal file, in the run directory.

    Raises:
        OSError: the file cannot be created.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        self._size = 0
        self._spelled: tuple[int, list[list[Any]], list[list[Any]]] | None = None

    def append(self, step: int, calls: list[list[Any]], call_ends: list[list[Any]], totals: dict[str, int],
               fields: Mapping[str, Any] | None = None) -> None:
        """Append the line of one completed step (``calls``/``call_ends`` as :func:`calls_to_json` gives them;
        ``fields``: a backend's own, placed before ``totals``, which ends every line).

        Raises:
            OSError: the write failed (the journal is cut back to its last complete line).
        """
        if self._fd is None:
            raise OSError(f"{self.path}: the step journal is closed")
        line: dict[str, Any] = {"step": step}
        spelled = self._spelled
        # a step number written again (a writer driven by hand) spells its order out: a line
        # never points at its own step
        if spelled is not None and spelled[0] != step and spelled[1] == calls and spelled[2] == call_ends:
            line["calls_as"] = spelled[0]
        else:
            line["calls"], line["call_ends"] = calls, call_ends
        if fields:
            line.update(fields)
        line["totals"] = totals
        data = (dumps(line) + "\n").encode("utf-8")
        try:
            done = os.write(self._fd, data)
            while done < len(data):  # a short write (a signal, a full disk): finish or fail
                done += os.write(self._fd, data[done:])
        except OSError:
            # No partial line may stay: the next append would complete it into a corrupt one.
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise
        self._size += len(data)
        if "calls" in line:
            self._spelled = (step, calls, call_ends)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class _LineAt:
    """Where a journal line is: its offset, and its 1-based number (what a message says, ``str()``),
    counted from the file only when a message needs it (a line found by offset has none yet)."""

    __slots__ = ("path", "offset", "_number")

    def __init__(self, path: Path, offset: int, number: int | None = None) -> None:
        self.path, self.offset, self._number = path, offset, number

    def __str__(self) -> str:
        if self._number is None:
            count = 0
            try:
                with open(self.path, "rb") as fh:
                    left = self.offset
                    while left > 0 and (chunk := fh.read(min(left, _SCAN_CHUNK))):
                        count += chunk.count(b"\n")
                        left -= len(chunk)
            except OSError:
                return f"at byte {self.offset}"
            self._number = count + 1
        return str(self._number)


class JournalReader:
    """Reads a step journal written by :class:`JournalWriter`, lazily.

    The first query indexes the file once: it reads it line by line and takes each complete
    line's step number from the line's start, without parsing the rest; a step's line is
    parsed only when that step is asked about (and the line its ``calls_as`` names, kept).
    A partial last line (a process killed mid-append) is ignored. A complete line that is not
    valid JSON is a :class:`~ilstore.errors.CorruptFileError` naming the file and the line
    number when its step is read; a line whose step number cannot be read is skipped with a
    warning (its step then counts as incomplete). When a step has several lines, the last wins.

    A reader that wants one step of a journal whose steps ascend (``ordered``: every journal
    the writer did not mark otherwise, see :data:`UNORDERED_KEY`) does not index the file: it
    finds the step's line by a binary search over byte offsets (a few small reads), so reading
    one step of a 10⁵-step run does not read the other 10⁵ lines. Listing the steps indexes it.

    Args:
        path: the journal file.
        rank: the rank put into the :class:`~ilstore.keys.CallKey` s it returns.
        ordered: the lines' steps ascend (a step's repeated lines adjacent), so a step's line
            may be found by a binary search.
    """

    def __init__(self, path: Path, rank: int = 0, ordered: bool = False) -> None:
        self.path = path
        self.rank = rank
        self.ordered = ordered
        self._steps: array[int] | None = None  # ascending, unique
        self._offsets: array[int] = array("q")
        self._lengths: array[int] = array("q")
        self._lines: array[int] = array("q")  # 1-based line numbers, for errors
        self._cache: dict[int, dict[str, Any]] = {}
        self._checked: dict[tuple[int, str], list[tuple[str, int]]] = {}  # (line offset, field) -> its calls
        self._found: dict[int, tuple[int, int] | None] = {}  # step -> (offset, length), by binary search
        self._fd: int | None = None  # for reading lines, opened on first use
        self._orders: tuple[SharedValues[CallOrder] | None] | None = None  # call_orders(), once read

    # -- the index -------------------------------------------------------------------------
    def _index(self) -> array[int]:
        if self._steps is None:
            self._scan(collect_totals=False)
        assert self._steps is not None
        return self._steps

    def _scan(self, collect_totals: bool) -> dict[int, TotalCounts | None]:
        """One pass over the file: builds the index if there is none yet and, if asked, parses
        every complete line for its totals, as tuples in :data:`TOTALS_KEYS` order (then a damaged
        line raises, naming it)."""
        build = self._steps is None
        steps, offsets, lengths, lines = array("q"), array("q"), array("q"), array("q")
        totals: dict[int, TotalCounts | None] = {}
        seen: dict[bytes, TotalCounts] = {}
        bad: list[int] = []
        tail, parse, totals_of = _TOTALS_TAIL.match, self._parse, self._totals_of
        offset, number, rest = 0, 0, b""
        try:
            with open(self.path, "rb") as fh:
                # Chunks split into lines by C code, and the writer's own prefix checked without
                # a regex: a Python loop per line was most of reading one step of a long run.
                while chunk := fh.read(_SCAN_CHUNK):
                    parts = (rest + chunk).split(b"\n")
                    rest = parts.pop()  # the part after the last newline: not a complete line
                    found = [int(raw[9:end]) if raw.startswith(b'{"step": ') and (end := raw.find(b",", 9, 40)) > 9
                             and raw[9:end].isdigit() else _step_of(raw) for raw in parts]
                    sizes = [len(raw) + 1 for raw in parts]
                    if build:
                        starts = list(accumulate(sizes, initial=offset))[:-1]
                        if min(found, default=0) >= 0:  # the usual case: every line has its step
                            steps.extend(found)
                            offsets.extend(starts)
                            lengths.extend(sizes)
                            lines.extend(range(number + 1, number + 1 + len(parts)))
                        else:
                            for i, step in enumerate(found):
                                if step >= 0:
                                    steps.append(step)
                                    offsets.append(starts[i])
                                    lengths.append(sizes[i])
                                    lines.append(number + 1 + i)
                                else:
                                    bad.append(number + 1 + i)
                    if collect_totals:
                        for i, (raw, step) in enumerate(zip(parts, found, strict=True)):
                            if step < 0:
                                continue
                            # Consecutive steps mostly end alike: each distinct ending is matched once.
                            ending = raw[max(0, raw.rfind(b'"totals": ')):]
                            counts = seen.get(ending)
                            if counts is None:
                                t = tail(ending)
                                if t is None:  # not the writer's spelling: parse the whole line
                                    doc = totals_of(parse(raw, number + 1 + i, step), number + 1 + i, step)
                                    totals[step] = None if doc is None else (
                                        doc["module_calls"], doc["tensors"], doc["stored"], doc["bytes"])
                                    continue
                                if len(seen) >= _SEEN_ENDINGS:  # a run whose totals keep changing
                                    seen.clear()
                                module_calls, tensors, stored, nbytes = map(int, t.groups())
                                counts = seen[ending] = (module_calls, tensors, stored, nbytes)
                            totals[step] = counts
                    offset += sum(sizes)
                    number += len(parts)
        except FileNotFoundError:
            raise CorruptFileError(self.path, "the step journal the manifest names is missing") from None
        except (OSError, OverflowError) as exc:
            raise CorruptFileError(self.path, f"unreadable step journal: {exc}") from None
        if not build:
            return totals
        if bad:
            _log.warning("%s: line(s) %s do not start with a step number; their steps count as incomplete",
                         self.path, ", ".join(map(str, bad[:10])))
        if any(map(operator.ge, steps, islice(steps, 1, None))):  # duplicated or out of order: the last line wins
            where = {step: i for i, step in enumerate(steps)}
            order = [where[s] for s in sorted(where)]
            steps = array("q", (steps[i] for i in order))
            offsets = array("q", (offsets[i] for i in order))
            lengths = array("q", (lengths[i] for i in order))
            lines = array("q", (lines[i] for i in order))
        self._offsets, self._lengths, self._lines = offsets, lengths, lines
        self._steps = steps
        return totals

    def _position(self, step: int) -> int | None:
        steps = self._index()
        i = bisect_left(steps, step)
        return i if i < len(steps) and steps[i] == step else None

    def steps(self) -> list[int]:
        """The steps with a complete line, ascending."""
        return list(self._index())

    def __contains__(self, step: object) -> bool:
        if not isinstance(step, int):
            return False
        if self._steps is None and self.ordered:
            return self._search(step) is not None
        return self._position(step) is not None

    # -- one line --------------------------------------------------------------------------
    def _line(self, step: int) -> tuple[dict[str, Any], _LineAt]:
        """The parsed line of ``step`` and where it is; KeyError when the journal has none."""
        if self._steps is None and self.ordered:
            found = self._search(step)
            if found is None:
                raise KeyError(step)
            where = _LineAt(self.path, found[0])
            length = found[1]
        else:
            i = self._position(step)
            if i is None:
                raise KeyError(step)
            where = _LineAt(self.path, self._offsets[i], self._lines[i])
            length = self._lengths[i]
        doc = self._cache.get(step)
        if doc is None:
            try:
                # pread: no shared file position, so threads may read lines at the same time
                raw = os.pread(self._reader_fd(), length, where.offset)
            except OSError as exc:
                raise CorruptFileError(self.path, f"line {where} (step {step}): unreadable: {exc}") from None
            doc = self._parse(raw, where, step)
            if len(self._cache) >= _LINE_CACHE:
                del self._cache[next(iter(self._cache))]
            self._cache[step] = doc
        return doc, where

    def _reader_fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def _line_from(self, pos: int, size: int) -> tuple[int, int, int] | None:
        """``(start, length, step)`` of the first complete line starting at or after ``pos`` whose
        step can be read; None when there is none (``size``: the file's size)."""
        fd = self._reader_fd()
        start = pos
        if pos > 0:  # the line starts after the first newline at or after pos - 1
            start = self._newline_after(fd, pos - 1, size)
            if start < 0:
                return None
            start += 1
        while start < size:
            end = self._newline_after(fd, start, size)
            if end < 0:
                return None  # a partial last line
            head = os.pread(fd, min(40, end - start), start)
            step = _step_of(head)
            if step >= 0:
                return start, end + 1 - start, step
            start = end + 1  # a line without a readable step is skipped, as the index skips it
        return None

    @staticmethod
    def _newline_after(fd: int, pos: int, size: int) -> int:
        """The offset of the first newline at or after ``pos``, -1 if none."""
        block = 4096
        while pos < size:
            data = os.pread(fd, block, pos)
            if not data:
                return -1
            i = data.find(b"\n")
            if i >= 0:
                return pos + i
            pos += len(data)
            block = min(block * 2, _SCAN_CHUNK)
        return -1

    def _search(self, step: int) -> tuple[int, int] | None:
        """``(offset, length)`` of the last line of ``step`` by binary search over byte offsets."""
        if step in self._found:
            return self._found[step]
        try:
            size = os.fstat(self._reader_fd()).st_size
            lo, hi = 0, size
            while lo < hi:  # the smallest offset whose next line has a step >= the one wanted
                mid = (lo + hi) // 2
                line = self._line_from(mid, size)
                if line is None or line[2] >= step:
                    hi = mid
                else:
                    lo = mid + 1
            line = self._line_from(lo, size)
            found = None
            while line is not None and line[2] == step:  # several lines of one step: the last wins
                found = line[:2]
                line = self._line_from(line[0] + line[1], size)
        except OSError as exc:
            raise CorruptFileError(self.path, f"unreadable step journal: {exc}") from None
        if len(self._found) >= _LINE_CACHE:
            del self._found[next(iter(self._found))]
        self._found[step] = found
        return found

    def _parse(self, raw: bytes, number: object, step: int) -> dict[str, Any]:
        try:
            doc = _DECODER.decode(raw.decode("utf-8"))  # a str: json.loads would sniff the encoding of bytes
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise CorruptFileError(self.path, f"line {number} (step {step}): not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("step") != step:
            raise CorruptFileError(self.path, f"line {number} (step {step}): expected a JSON object whose "
                                   "\"step\" is the step number")
        return doc

    def calls(self, step: int, field: str = "calls") -> list[CallKey] | None:
        """``calls`` or ``call_ends`` of ``step``, following ``calls_as``; None when no line has the step.

        Raises:
            CorruptFileError: the line (or the line it points to) is damaged; names the line.
        """
        try:
            doc, number = self._line(step)
        except KeyError:
            return None
        if "calls_as" in doc:
            ref = doc["calls_as"]
            try:
                target, target_number = self._line(ref) if isinstance(ref, int) and ref != step else ({}, number)
            except KeyError:
                target, target_number = {}, number
            if field not in target:
                raise CorruptFileError(self.path, f"line {number} (step {step}): \"calls_as\": {ref!r} names no "
                                       f"step whose line lists {field}")
            doc, number = target, target_number
        pairs = self._checked.get((number.offset, field))
        if pairs is None:  # checked once per line that spells the order out, however many steps refer to it
            try:
                pairs = [(c.module, c.call) for c in calls_from_json(doc.get(field), step, self.rank)]
            except ValueError as exc:
                raise CorruptFileError(self.path, f"line {number} (step {step}): {field}: {exc}") from None
            if len(self._checked) >= _LINE_CACHE:
                del self._checked[next(iter(self._checked))]
            self._checked[(number.offset, field)] = pairs
        rank = self.rank
        return [CallKey(rank, step, module, call) for module, call in pairs]

    def call_orders(self) -> SharedValues[CallOrder] | None:
        """Every step's ``calls`` and ``call_ends`` as :data:`CallOrder` s, read in one pass; steps
        with equal orders share one tuple (so a comparer recognises them by identity, with no
        :class:`CallKey` per call and step).

        The answer holds no Python object per step: the index's own step array and a 4-byte number
        per step into the distinct orders (:class:`~ilstore._stepmap.SharedValues`, a read-only
        mapping in step order; its ``distinct()`` gives each order once). The lines are read a
        window at a time (:data:`_ORDER_WINDOW` bytes), not the whole file at once, and visited in
        file order, so each window is read once whatever the order of the steps in the file (a
        journal whose steps repeat or do not ascend costs one more 4-byte number per line while
        its lines are put in file order). The answer is the one a visit in step order gives: the
        first step (ascending) whose line is damaged or cannot be answered decides the error or None.

        Returns:
            Step -> orders; None when some line does not spell out both orders and names no line
            that does (:meth:`calls` then says what is wrong, step by step).

        Raises:
            CorruptFileError: the journal cannot be read, or a line is not valid JSON (names it).
        """
        if self._orders is None:  # read once, like the index it follows
            self._orders = (self._read_call_orders(),)
        return self._orders[0]

    def _read_call_orders(self) -> SharedValues[CallOrder] | None:
        steps = self._index()
        offsets, lengths, lines, rank, parse = self._offsets, self._lengths, self._lines, self.rank, self._parse
        interned: dict[CallOrder, int] = {}  # an order -> its number, the position in distinct
        distinct: list[CallOrder] = []
        spelled: dict[int, int] = {}  # the last lines that spelled their orders out: step -> number (-1: none)
        window, window_at = b"", 0

        def read(at: int, size: int) -> bytes:
            try:
                return os.pread(self._reader_fd(), size, at)
            except OSError as exc:
                raise CorruptFileError(self.path, f"unreadable step journal: {exc}") from None

        def number_of(doc: dict[str, Any], step: int) -> int:
            """The number of the orders a parsed line without "calls_as" spells out, -1 if it does not."""
            if "calls_as" in doc or "calls" not in doc or "call_ends" not in doc:
                number = -1
            else:
                try:
                    order: CallOrder = (rank, *(tuple((c.module, c.call) for c in calls_from_json(doc[f], step))
                                                for f in ("calls", "call_ends")))  # type: ignore[assignment]
                except ValueError:
                    number = -1
                else:  # lines that spell out the same orders share them too
                    number = interned.setdefault(order, len(distinct))
                    if number == len(distinct):
                        distinct.append(order)
            if len(spelled) >= _SPELLED_LINES:
                del spelled[next(iter(spelled))]
            spelled[step] = number
            return number

        def spelled_out(step: int) -> int:
            """The number of the orders the line of ``step`` (one a "calls_as" names) spells out."""
            number = spelled.get(step)
            if number is None:
                i = bisect_left(steps, step)
                if i == len(steps) or steps[i] != step:
                    return -1
                number = number_of(parse(read(offsets[i], lengths[i]), lines[i], step), step)
            return number

        def visit(i: int) -> int:
            """The number of the orders of the line of step ``steps[i]``, read from the current window."""
            nonlocal window, window_at
            step, at, size = steps[i], offsets[i], lengths[i]
            if not window_at <= at <= at + size <= window_at + len(window):  # the next window (in file order)
                window = b""  # the last one freed before the next is read: one window at a time
                window, window_at = read(at, max(size, _ORDER_WINDOW)), at
            raw = window[at - window_at:at - window_at + size]
            m = _CALLS_AS.match(raw)
            if m is not None and int(m.group(1)) == step:
                return spelled_out(int(m.group(2)))
            doc = parse(raw, lines[i], step)
            if "calls_as" in doc:
                ref = doc["calls_as"]
                if not isinstance(ref, int) or isinstance(ref, bool) or ref == step:
                    return -1
                return spelled_out(ref)
            return number_of(doc, step)

        count = len(steps)
        numbers = array("i", [0]) * count  # each step's slot, written as its line is read
        if all(map(operator.lt, lines, islice(lines, 1, None))):  # the lines in step order: the usual journal
            for i in range(count):
                number = visit(i)
                if number < 0:
                    return None
                numbers[i] = number
            return SharedValues(steps, numbers, distinct)
        # Steps repeated or out of order: the lines in file order (a counting sort by line number,
        # in an array: position + 1 per line of the file, 0 for a line the index does not keep),
        # so that the windows advance through the file once instead of a window per line. Which
        # step's line fails only matters for the first failing step: the answer a visit in step
        # order gives, whatever the order of the file.
        by_line = array("i" if count < 1 << 31 else "q", [0]) * (max(lines, default=0) + 1)
        for i, line in enumerate(lines):
            by_line[line] = i + 1
        failed, failure = count, None  # the first failing position (step order) and its error (None: no answer)
        for k in by_line:
            if not k or k > failed:  # no kept line, or a step not before one that already fails
                continue
            i = k - 1
            try:
                number = visit(i)
            except CorruptFileError as exc:
                failed, failure = i, exc
                continue
            if number < 0:
                failed, failure = i, None
                continue
            numbers[i] = number
        del by_line
        if failed < count:
            if failure is not None:
                raise failure
            return None
        return SharedValues(steps, numbers, distinct)

    def field(self, step: int, name: str) -> Any:
        """The value of a backend's own field ``name`` in ``step``'s line (:meth:`JournalWriter.append`);
        None when no line has the step or the line has no such field.

        Raises:
            CorruptFileError: the line is damaged; names the line.
        """
        try:
            doc, _ = self._line(step)
        except KeyError:
            return None
        return doc.get(name)

    def totals(self, step: int) -> dict[str, int] | None:
        """The ``totals`` of ``step`` (:data:`TOTALS_KEYS`), None when no line has the step or it has none.

        Raises:
            CorruptFileError: the line is damaged; names the line.
        """
        try:
            doc, number = self._line(step)
        except KeyError:
            return None
        return self._totals_of(doc, number, step)

    def all_totals(self) -> dict[int, dict[str, int] | None]:
        """The totals of every step in one pass over the file (much cheaper than :meth:`totals`
        step by step); None for a line without totals. A line that ends the way the writer ends
        it is not parsed further (its other fields are checked when its step is read); any
        other line is parsed whole.

        Raises:
            CorruptFileError: a line is damaged; names the line.
        """
        return {step: None if counts is None else dict(zip(TOTALS_KEYS, counts, strict=True))
                for step, counts in self._scan(collect_totals=True).items()}

    def all_total_counts(self) -> dict[int, TotalCounts | None]:
        """:meth:`all_totals` as tuples in :data:`TOTALS_KEYS` order, read the same way; steps whose
        lines end alike share one tuple. What listing 10⁵ steps wants: no dict per step.

        Example:
            >>> import tempfile
            >>> path = Path(tempfile.mkdtemp()) / JOURNAL_NAME
            >>> writer = JournalWriter(path)
            >>> for step in range(3):
            ...     writer.append(step, [["fc", 0]], [["fc", 0]], dict(zip(TOTALS_KEYS, (1, 2, 2, 64))))
            >>> writer.close()
            >>> JournalReader(path).all_total_counts()
            {0: (1, 2, 2, 64), 1: (1, 2, 2, 64), 2: (1, 2, 2, 64)}

        Raises:
            CorruptFileError: a line is damaged; names the line.
        """
        return self._scan(collect_totals=True)

    def _totals_of(self, doc: dict[str, Any], number: object, step: int) -> dict[str, int] | None:
        totals = doc.get("totals")
        if totals is None:
            return None
        try:
            out = {k: totals[k] for k in TOTALS_KEYS}
        except (KeyError, TypeError, IndexError):
            out = {}
        if len(out) != len(TOTALS_KEYS) or not all(type(v) is int and v >= 0 for v in out.values()):
            raise CorruptFileError(self.path, f"line {number} (step {step}): \"totals\" needs non-negative integers "
                                   f"{', '.join(TOTALS_KEYS)}")
        return out

    def close(self) -> None:
        """Close the file and forget the parsed lines (idempotent; the index stays)."""
        self._cache.clear()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __del__(self) -> None:
        self.close()
