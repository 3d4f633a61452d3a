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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import tabulate

from .keys import KINDS, CallKey
from .store.base import StoreReader, node_nbytes
from .store.registry import open_run

__all__ = ["CallSummary", "StepSummary", "RunSummary", "summarize_run", "format_summary", "human_bytes"]


@dataclass(frozen=True)
class CallSummary:
    """One module call: how many tensors it has, how many are stored, and their bytes."""

    module: str
    call: int
    tensors: int
    stored: int
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "call": self.call, "tensors": self.tensors, "stored": self.stored,
                "bytes": self.nbytes}


@dataclass(frozen=True)
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

    def counts(self) -> tuple[int, int, int, int]:
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
    """A run's backend, status, steps and the steps cut before they finished."""

    run_dir: Path
    backend: str
    status: str
    steps: tuple[StepSummary, ...]
    incomplete_steps: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (what ``ilstore ls --json`` prints)."""
        return {"run_dir": str(self.run_dir), "backend": self.backend, "status": self.status,
                "steps": [s.to_dict() for s in self.steps], "incomplete_steps": list(self.incomplete_steps)}


def summarize_run(run_dir: str | Path, *, calls: bool = True) -> RunSummary:
    """Count the tensors and bytes of every step (and module call) of a run, in any backend.

    Args:
        run_dir: the run directory (any backend, also multi-rank runs and dumps without a
            manifest).
        calls: also count every module call (:attr:`StepSummary.calls`): this reads every
            structure of the run. Without it, a run that keeps a step journal (format 2) is
            summarised from the journal's totals alone, whatever its length; runs that do not
            (format 1, dumps) are still counted from their structures.

    Returns:
        The :class:`RunSummary`; bytes count stored tensor bodies only.

    Raises:
        IlstoreError: the directory is missing, not a run, or corrupt (see
            :func:`~ilstore.store.registry.open_run`).
    """
    run_dir = Path(run_dir)
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
        return RunSummary(run_dir, run.name, run.status, tuple(steps), tuple(run.incomplete_steps()))


def _call_summary(run: StoreReader, call: CallKey) -> CallSummary:
    tensors = stored = nbytes = 0
    for kind in KINDS:
        for _key, node in run.tensor_nodes(call, kind):
            tensors += 1
            if node.get("stored", True):
                stored += 1
                nbytes += node_nbytes(node)
    return CallSummary(call.module, call.call, tensors, stored, nbytes)


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
    rows = [[label, s.module_calls, s.tensors, s.stored, human_bytes(s.nbytes)]
            for label, s in _step_rows(summary.steps)]
    lines.append(tabulate(rows, headers=["step", "module calls", "tensors", "stored", "bytes"], tablefmt="simple"))
    if summary.incomplete_steps:
        lines.append(f"incomplete step(s), cut before they finished: {list(summary.incomplete_steps)}")
    if show_calls:
        for s in summary.steps:
            lines.append(f"\nstep {s.step}")
            rows = [[c.module + (f"#{c.call}" if c.call else ""), c.tensors, c.stored, human_bytes(c.nbytes)]
                    for c in s.calls or ()]
            lines.append(tabulate(rows, headers=["module call", "tensors", "stored", "bytes"], tablefmt="simple"))
    return "\n".join(lines)


def _step_rows(steps: tuple[StepSummary, ...]) -> Iterator[tuple[int | str, StepSummary]]:
    """``(label, step)`` per table row: a step, or the first of >= 3 consecutive identical steps
    with the label ``"<first>-<last>"``."""
    i = 0
    while i < len(steps):
        j = i
        while (j + 1 < len(steps) and steps[j + 1].step == steps[j].step + 1
               and steps[j + 1].counts() == steps[i].counts()):
            j += 1
        if j - i >= 2:
            yield f"{steps[i].step}-{steps[j].step}", steps[i]
            i = j + 1
        else:
            yield steps[i].step, steps[i]
            i += 1
