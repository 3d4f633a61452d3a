"""StoreReader.call_orders(): every step's call orders from the step journal in one pass (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ilstore
from ilstore.store.base import StoreReader

BACKENDS = ["pt", "safetensors", "hdf5"]


class _Varying(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.step in (3, 4, 9):  # a second call of b: another order, then back
            h = self.b(h)
        self.step += 1
        return self.b(h)


def _run(out_dir: Path, backend: str, steps: int = 12) -> Path:
    model = _Varying()
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(out_dir), "run_id": backend, "backend": backend,
                                                  "log_step_ids": [], "mode": "stats"}) as cap:
        for _ in range(steps):
            model(torch.ones(1, 4))
    assert cap.run_dir is not None
    return cap.run_dir


@pytest.mark.parametrize("backend", BACKENDS)
def test_call_orders_are_the_steps_calls(out_dir: Path, backend: str) -> None:
    with ilstore.open_run(_run(out_dir, backend)) as run:
        orders = run.call_orders()
        assert orders is not None and sorted(orders) == run.steps()
        for step, (rank, starts, ends) in orders.items():
            assert [(rank, m, c) for m, c in starts] == [(k.rank, k.module, k.call) for k in run.calls(step)]
            assert [(rank, m, c) for m, c in ends] == [(k.rank, k.module, k.call) for k in run.call_ends(step)]
        assert orders[0] is orders[11] and orders[3] is orders[9] and orders[3] != orders[2]
        assert len({id(o) for o in orders.values()}) == 2  # equal orders are one tuple


def test_call_orders_none_where_the_journal_cannot_answer(out_dir: Path) -> None:
    run_dir = _run(out_dir, "pt")
    journal = run_dir / "steps.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[4] = lines[4].replace(b'"calls_as": 3', b'"calls_as": 77')  # names a step with no line
    journal.write_bytes(b"".join(lines))
    with ilstore.open_run(run_dir) as run:
        assert run.call_orders() is None
        with pytest.raises(ilstore.CorruptFileError, match="calls_as"):
            run.calls(4)


def test_readers_that_answer_calls_themselves_say_none(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ilstore.unshard import LogicalReader

    with ilstore.open_run(_run(out_dir, "pt")) as run:
        assert LogicalReader(run).call_orders() is None
        monkeypatch.setattr(type(run), "calls", lambda self, step: StoreReader.calls(self, step))
        assert run.call_orders() is None
