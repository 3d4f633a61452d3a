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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from .keys import KINDS
from .records import dtype_from_str
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
    """One step: its module calls in call-start order, and their totals."""

    step: int
    calls: tuple[CallSummary, ...]

    @property
    def tensors(self) -> int:
        return sum(c.tensors for c in self.calls)

    @property
    def stored(self) -> int:
        return sum(c.stored for c in self.calls)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.calls)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "calls": [c.to_dict() for c in self.calls], "tensors": self.tensors,
                "stored": self.stored, "bytes": self.nbytes}


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


def summarize_run(run_dir: str | Path) -> RunSummary:
    """Count the tensors and bytes of every module call of a run, in any backend.

    Args:
        run_dir: the run directory (any backend, also multi-rank runs and dumps without a
            manifest).

    Returns:
        The :class:`RunSummary`; bytes count stored tensor bodies only.

    Raises:
        IlstoreError: the directory is missing, not a run, or corrupt (see
            :func:`~ilstore.store.registry.open_run`).
    """
    run_dir = Path(run_dir)
    with open_run(run_dir) as run:
        steps = []
        for step in run.steps():
            calls = []
            for call in run.calls(step):
                tensors = stored = nbytes = 0
                for kind in KINDS:
                    for _key, node in run.tensor_nodes(call, kind):
                        tensors += 1
                        if node.get("stored", True):
                            stored += 1
                            nbytes += _node_bytes(node)
                calls.append(CallSummary(call.module, call.call, tensors, stored, nbytes))
            steps.append(StepSummary(step, tuple(calls)))
        return RunSummary(run_dir, run.name, run.status, tuple(steps), tuple(run.incomplete_steps()))


def _node_bytes(node: dict[str, Any]) -> int:
    try:
        itemsize = torch.empty((), dtype=dtype_from_str(str(node.get("dtype")))).element_size()
    except (ValueError, TypeError):
        return 0
    numel = node.get("numel")
    return int(numel) * itemsize if isinstance(numel, int) else 0


def human_bytes(n: float) -> str:
    """A byte count for people: ``human_bytes(1536)`` is ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_summary(summary: RunSummary, *, show_calls: bool = False) -> str:
    """The plain-text form of a summary: a header, a table of steps, optionally one per step of calls."""
    lines = [f"run {summary.run_dir}", f"backend {summary.backend}, status {summary.status}, "
             f"{len(summary.steps)} step(s)"]
    rows = [[s.step, len(s.calls), s.tensors, s.stored, human_bytes(s.nbytes)] for s in summary.steps]
    lines.append(tabulate(rows, headers=["step", "module calls", "tensors", "stored", "bytes"], tablefmt="simple"))
    if summary.incomplete_steps:
        lines.append(f"incomplete step(s), cut before they finished: {list(summary.incomplete_steps)}")
    if show_calls:
        for s in summary.steps:
            lines.append(f"\nstep {s.step}")
            rows = [[c.module + (f"#{c.call}" if c.call else ""), c.tensors, c.stored, human_bytes(c.nbytes)]
                    for c in s.calls]
            lines.append(tabulate(rows, headers=["module call", "tensors", "stored", "bytes"], tablefmt="simple"))
    return "\n".join(lines)
