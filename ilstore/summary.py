"""A run at a glance: its steps and module calls with tensor counts and bytes, and its status.

:func:`summarize_run` reads only metadata (no tensor is loaded); :func:`format_summary` renders
the plain-text tables that ``ilstore ls`` and ``ilstore demo`` print, and
:meth:`RunSummary.to_dict` the data that ``ilstore ls --json`` prints.

Example:
    >>> import ilstore, torch, tempfile
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> with ilstore.capture(model, {"output_dir": tempfile.mkdtemp()}) as cap:
    ...     _ = model(torch.ones(1, 4))
    >>> summary = summarize_run(cap.run_dir)
    >>> summary.status, [(s.step, s.tensors, s.nbytes) for s in summary.steps]
    ('complete', [(0, 2, 32)])
    >>> print(format_summary(summary).splitlines()[1])
    backend pt, status complete, 1 step(s)
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Container, Iterator
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from .errors import IlstoreError
from .keys import KINDS, CallKey, printable
from .manifest import JournalReader, TotalCounts, read_manifest, warnings_of

if TYPE_CHECKING:
    from .store.base import StoreReader

__all__ = ["CallSummary", "StepSummary", "RunSummary", "summarize_run", "format_summary", "human_bytes"]

# How each built-in backend's reader lists the steps on disk, completed or not (its
# ``_list_steps``: step_<N> directories, or hdf5's step_<N>.h5[.partial] files), for the
# listing that imports no torch (the backend modules do). tests/test_ls_fast.py checks that
# both listings agree in every backend.
_STEP_DIR = re.compile(r"^step_(\d+)$")
_STEP_H5 = re.compile(r"^step_(\d+)\.h5(\.partial)?$")
_STEP_LAYOUTS: dict[str, tuple[re.Pattern[str], bool]] = {  # backend -> (name pattern, directories only)
    "pt": (_STEP_DIR, True), "safetensors": (_STEP_DIR, True), "hdf5": (_STEP_H5, False)}
_RANKS_LAYOUT = "ranks"  # ilstore.store.ranks.RANKS_LAYOUT


@dataclass(frozen=True)
class CallSummary:
    """One module call: how many tensors it has, how many are stored, and their bytes (``rank``:
    the rank that made it, in a multi-rank run; the same call of each rank is one entry each)."""

    module: str
    call: int
    tensors: int
    stored: int
    nbytes: int
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "call": self.call, "rank": self.rank, "tensors": self.tensors,
                "stored": self.stored, "bytes": self.nbytes}


@dataclass(frozen=True, slots=True)  # slots: a listing of 10⁵ steps builds 10⁵ of them
class StepSummary:
    """One step: its totals and, when they were read, its module calls in call-start order.

    Attributes:
        step: the step index.
        module_calls: how many module calls the step has.
        tensors: tensor nodes in the step's structures.
        stored: those whose body is stored.
        nbytes: the bytes of the stored bodies.
        calls: one :class:`CallSummary` per module call, or None when only the totals were read.
    """

    step: int
    module_calls: int
    tensors: int
    stored: int
    nbytes: int
    calls: tuple[CallSummary, ...] | None = None

    @classmethod
    def from_calls(cls, step: int, calls: tuple[CallSummary, ...]) -> StepSummary:
        """The summary of a step whose calls were counted one by one."""
        return cls(step, len(calls), sum(c.tensors for c in calls), sum(c.stored for c in calls),
                   sum(c.nbytes for c in calls), calls)

    def counts(self) -> TotalCounts:
        """``(module_calls, tensors, stored, nbytes)``: what one row of ``ilstore ls`` shows."""
        return self.module_calls, self.tensors, self.stored, self.nbytes

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "module_calls": self.module_calls}
        if self.calls is not None:
            out["calls"] = [c.to_dict() for c in self.calls]
        out.update(tensors=self.tensors, stored=self.stored, bytes=self.nbytes)
        return out


@dataclass(frozen=True)
class RunSummary:
    """A run's backend, status, steps, the steps cut before they finished, and what its capture
    warned about (:attr:`~ilstore.store.base.StoreReader.capture_warnings`)."""

    run_dir: Path
    backend: str
    status: str
    steps: tuple[StepSummary, ...]
    incomplete_steps: tuple[int, ...]
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (what ``ilstore ls --json`` prints)."""
        return {"run_dir": str(self.run_dir), "backend": self.backend, "status": self.status,
                "steps": [s.to_dict() for s in self.steps], "incomplete_steps": list(self.incomplete_steps),
                "warnings": list(self.warnings)}


def summarize_run(run_dir: str | Path, *, calls: bool = True) -> RunSummary:
    """Count the tensors and bytes of every step (and module call) of a run, in any backend.

    Args:
        run_dir: the run directory (any backend, also multi-rank runs and dumps without a
            manifest).
        calls: also count every module call (:attr:`StepSummary.calls`): this reads every
            structure of the run. Without it, a run that keeps a step journal (format 2) in a
            built-in backend is summarised from its manifest, its journal's totals and a
            listing of its directory, without importing torch, whatever its length; any other
            run (format 1, dumps, plug-in backends, a journal line without totals, an error)
            is read through its backend's reader, with the same result.

    Returns:
        The :class:`RunSummary`; bytes count stored tensor bodies only.

    Raises:
        IlstoreError: the directory is missing, not a run, or corrupt (see
            :func:`~ilstore.store.registry.open_run`).
    """
    run_dir = Path(run_dir)
    if not calls:
        summary = _summary_from_journal(run_dir)
        if summary is not None:
            return summary
    return _summary_from_reader(run_dir, calls)


def _summary_from_reader(run_dir: Path, calls: bool) -> RunSummary:
    """:func:`summarize_run` through the run's backend reader: works for every run."""
    from .store.registry import open_run

    with open_run(run_dir) as run:
        steps = []
        journal = None if calls else run.all_step_totals()  # first: its pass over the journal also indexes it
        for step in run.steps():
            totals = journal.get(step) if journal is not None else None
            if totals is not None:
                steps.append(StepSummary(step, totals["module_calls"], totals["tensors"], totals["stored"],
                                         totals["bytes"]))
                continue
            summary = StepSummary.from_calls(step, tuple(_call_summary(run, call) for call in run.calls(step)))
            steps.append(summary if calls else dataclasses.replace(summary, calls=None))
        return RunSummary(run_dir, run.name, run.status, tuple(steps), tuple(run.incomplete_steps()),
                          tuple(run.capture_warnings))


@dataclass(frozen=True)
class _Listing:
    """What :func:`_summary_from_journal` reads of one run: backend name, status, each completed
    step's totals (ascending steps, :data:`~ilstore.manifest.TOTALS_KEYS` order), incomplete steps,
    the capture's warnings."""

    backend: str
    status: str
    totals: dict[int, TotalCounts]
    incomplete: list[int]
    warnings: list[str]


def _summary_from_journal(run_dir: Path) -> RunSummary | None:
    """:func:`summarize_run` without calls, from the manifests and step journals alone (no torch);
    None whenever that cannot give what the backend's reader gives (then ask the reader)."""
    listing = _listing(run_dir)
    if listing is None:
        return None
    steps = tuple(StepSummary(step, *counts) for step, counts in listing.totals.items())
    return RunSummary(run_dir, listing.backend, listing.status, steps, tuple(listing.incomplete),
                      tuple(listing.warnings))


def _listing(run_dir: Path) -> _Listing | None:
    """The :class:`_Listing` of a run, as its reader would answer (:func:`~ilstore.store.registry.open_run`
    and :class:`~ilstore.store.base.StoreReader`); None where only the reader can tell."""
    try:
        manifest = read_manifest(run_dir) if run_dir.is_dir() else None
    except IlstoreError:
        return None
    if manifest is None:  # not a run, or a dump: the reader says which
        return None
    if manifest.get("layout") == _RANKS_LAYOUT:
        return _ranks_listing(run_dir, manifest)
    backend, journal_name = manifest.get("backend"), manifest.get("journal")
    if (not isinstance(backend, str) or backend not in _STEP_LAYOUTS or not _builtin_reader(backend)
            or not isinstance(journal_name, str) or journal_name in ("", ".", "..")
            or any(c in journal_name for c in "/\\\0")):
        return None  # format 1, a plug-in backend, or a manifest the reader rejects
    journal = JournalReader(run_dir / journal_name)
    try:
        counts = journal.all_total_counts()  # first: its pass over the file also indexes it
        steps = journal.steps()
        totals = {}
        for step in steps:
            step_counts = counts.get(step)
            if step_counts is None:  # a line without totals: the reader counts that step from its files
                return None
            totals[step] = step_counts
        incomplete = _incomplete_on_disk(run_dir, backend, totals)
    except (IlstoreError, OSError):
        return None
    finally:
        journal.close()
    return _Listing(backend, str(manifest.get("status", "unknown")), totals, incomplete, warnings_of(manifest))


def _builtin_reader(backend: str) -> bool:
    """Whether ``backend`` still reads with its built-in reader: ``register_backend(..., override=True)``
    may have replaced it in this process (nothing did if the registry was never imported)."""
    registry = sys.modules.get("ilstore.store.registry")
    loaded = getattr(registry, "_loaded", {}).get(backend) if registry is not None else None
    return loaded is None or loaded.reader.__module__ == f"ilstore.store.{backend}"


def _incomplete_on_disk(run_dir: Path, backend: str, done: Container[int]) -> list[int]:
    """The steps a built-in backend's reader lists on disk (``_list_steps``) that are not ``done``,
    in its order: what its ``incomplete_steps`` gives. Only those few names are stat'ed."""
    pattern, dirs_only = _STEP_LAYOUTS[backend]
    match, isdir = pattern.match, os.path.isdir
    cut = [step for name in os.listdir(run_dir) if (m := match(name)) and (step := int(m.group(1))) not in done
           and (not dirs_only or isdir(os.path.join(run_dir, name)))]
    return sorted(cut) if dirs_only else sorted(set(cut))


def _ranks_listing(run_dir: Path, manifest: dict[str, Any]) -> _Listing | None:
    """A multi-rank run as :class:`~ilstore.store.ranks.RankedReader` lists it: the first rank's
    backend, the worst status, and per step the sums of the totals of the ranks that completed it."""
    ranks, world_size = manifest.get("ranks"), manifest.get("world_size")
    if "journal" in manifest or not isinstance(ranks, list) or not all(
            isinstance(r, int) and not isinstance(r, bool) for r in ranks) or sorted(ranks) != list(
            range(world_size if isinstance(world_size, int) and not isinstance(world_size, bool) else -1)):
        return None  # a manifest the reader rejects (each rank of 0 .. world_size - 1 once)
    parts, said = [], []
    for rank in dict.fromkeys(ranks):
        part = _listing(run_dir / f"rank_{rank}")  # ilstore.store.ranks.rank_dir_name
        if part is None:
            return None
        parts.append(part)
        said += [f"rank {rank}: {w}" for w in part.warnings]  # as RankedReader.capture_warnings
    statuses = {p.status for p in parts}
    status = next((worst for worst in ("failed", "running", "unknown") if worst in statuses),
                  "complete" if statuses else "unknown")
    totals: dict[int, TotalCounts] = {}
    for part in parts:
        for step, counts in part.totals.items():
            have = totals.get(step)
            totals[step] = counts if have is None else (
                have[0] + counts[0], have[1] + counts[1], have[2] + counts[2], have[3] + counts[3])
    return _Listing(parts[0].backend if parts else _RANKS_LAYOUT, status, dict(sorted(totals.items())),
                    sorted({s for p in parts for s in p.incomplete}), said)


def _call_summary(run: StoreReader, call: CallKey) -> CallSummary:
    from .store.base import node_nbytes

    tensors = stored = nbytes = 0
    for kind in KINDS:
        for _key, node in run.tensor_nodes(call, kind):
            tensors += 1
            if node.get("stored", True):
                stored += 1
                nbytes += node_nbytes(node)
    return CallSummary(call.module, call.call, tensors, stored, nbytes, call.rank)


def human_bytes(n: float) -> str:
    """A byte count for people: ``human_bytes(1536)`` is ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_summary(summary: RunSummary, *, show_calls: bool = False) -> str:
    """The plain-text form of a summary: a header, a table of steps, optionally one per step of calls.

    In the table of steps, three or more consecutive steps with the same counts share one row
    labelled with their range (``1-99999``), so a long run lists in a few lines.
    """
    lines = [f"run {summary.run_dir}", f"backend {summary.backend}, status {summary.status}, "
             f"{len(summary.steps)} step(s)"]
    lines += [f"warning (from the capture): {printable(w)}" for w in summary.warnings]
    rows = [[label, s.module_calls, s.tensors, s.stored, human_bytes(s.nbytes)]
            for label, s in _step_rows(summary.steps)]
    lines.append(tabulate(rows, headers=["step", "module calls", "tensors", "stored", "bytes"], tablefmt="simple"))
    if summary.incomplete_steps:
        lines.append(f"incomplete step(s), cut before they finished: {list(summary.incomplete_steps)}")
    if show_calls:
        for s in summary.steps:
            lines.append(f"\nstep {s.step}")
            calls = s.calls or ()
            ranked = any(c.rank for c in calls)  # a multi-rank run: each rank's calls, told apart
            call_rows = [[*([c.rank] if ranked else []), printable(c.module) + (f"#{c.call}" if c.call else ""),
                          c.tensors, c.stored, human_bytes(c.nbytes)] for c in calls]
            headers = (["rank"] if ranked else []) + ["module call", "tensors", "stored", "bytes"]
            lines.append(tabulate(call_rows, headers=headers, tablefmt="simple"))
    return "\n".join(lines)


def _step_rows(steps: tuple[StepSummary, ...]) -> Iterator[tuple[int | str, StepSummary]]:
    """``(label, step)`` per table row: a step, or the first of >= 3 consecutive identical steps
    with the label ``"<first>-<last>"``."""
    numbers = list(map(attrgetter("step"), steps))
    counts = list(map(attrgetter("module_calls", "tensors", "stored", "nbytes"), steps))  # as counts()
    # where each run of consecutive step numbers with the same counts begins
    neighbours = zip(numbers, numbers[1:], counts, counts[1:], strict=False)
    starts = [0, *(i for i, (n0, n1, c0, c1) in enumerate(neighbours, 1) if n1 != n0 + 1 or c1 != c0)]
    for first, end in zip(starts, [*starts[1:], len(steps)], strict=True):
        if end - first >= 3:
            yield f"{numbers[first]}-{numbers[end - 1]}", steps[first]
        else:
            yield from ((numbers[i], steps[i]) for i in range(first, end))
