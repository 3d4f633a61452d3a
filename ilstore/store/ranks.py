"""Runs written by several ranks (torchrun): one sub-run per rank behind one reader.

Under ``torch.distributed`` every rank writes its own complete run, in any backend, into
``<run_dir>/rank_<r>/``; rank 0 also writes ``<run_dir>/ilstore.json`` with
``"layout": "ranks"`` and the list of ranks. Nothing is shared between ranks, so nothing can
collide, whatever devices they run on. :class:`RankedReader` presents the whole run as one:
every :class:`~ilstore.keys.CallKey` / :class:`~ilstore.keys.TensorKey` carries its rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptFileError, RunNotFoundError
from ..keys import CallKey, TensorKey
from ..manifest import MANIFEST_NAME
from .base import StoreReader

__all__ = ["RankedReader", "rank_dir_name", "is_ranked"]


def rank_dir_name(rank: int) -> str:
    return f"rank_{rank}"


def is_ranked(manifest: dict[str, Any] | None) -> bool:
    return bool(manifest) and manifest.get("layout") == "ranks"  # type: ignore[union-attr]


class RankedReader(StoreReader):
    """One reader over the per-rank sub-runs of a multi-rank run."""

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__(run_dir)
        from .registry import open_run  # the sub-runs may use any backend

        ranks = (self.manifest or {}).get("ranks")
        if not isinstance(ranks, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
            raise CorruptFileError(self.run_dir / MANIFEST_NAME, "\"ranks\" must be a list of integers")
        self.ranks: dict[int, StoreReader] = {}
        for rank in ranks:
            sub = self.run_dir / rank_dir_name(rank)
            if not sub.is_dir():
                raise RunNotFoundError(f"{sub}: rank {rank} listed in {self.run_dir / MANIFEST_NAME} wrote nothing")
            self.ranks[rank] = open_run(sub)
        first = next(iter(self.ranks.values()), None)
        self.name = first.name if first is not None else "ranks"
        self.locator_keys = frozenset().union(*(r.locator_keys for r in self.ranks.values()))

    @classmethod
    def can_open(cls, run_dir: Path) -> bool:
        return False  # only ever chosen through the manifest

    def _reader(self, rank: int) -> StoreReader:
        try:
            return self.ranks[rank]
        except KeyError:
            raise KeyError(f"no rank {rank} in {self.run_dir}") from None

    @property
    def status(self) -> str:
        statuses = {r.status for r in self.ranks.values()}
        for worst in ("failed", "running", "unknown"):
            if worst in statuses:
                return worst
        return "complete" if statuses else "unknown"

    def steps(self) -> list[int]:
        return sorted({s for r in self.ranks.values() for s in r.steps()})

    def _list_steps(self) -> list[int]:
        return sorted({s for r in self.ranks.values() for s in r._list_steps()})

    def incomplete_steps(self) -> list[int]:
        return sorted({s for r in self.ranks.values() for s in r.incomplete_steps()})

    def calls(self, step: int) -> list[CallKey]:
        return [c for r in self.ranks.values() if step in r.steps() for c in r.calls(step)]

    def call_ends(self, step: int) -> list[CallKey]:
        return [c for r in self.ranks.values() if step in r.steps() for c in r.call_ends(step)]

    def _list_calls(self, step: int) -> list[CallKey]:
        return self.calls(step)

    def _read_structure(self, call: CallKey, kind: str) -> Any | None:
        return self._reader(call.rank).structure(call, kind)

    def _load(self, key: TensorKey, node: dict[str, Any]) -> torch.Tensor:
        return self._reader(key.rank).load(key)

    def load(self, key: TensorKey) -> torch.Tensor:
        return self._reader(key.rank).load(key)

    def close(self) -> None:
        for reader in self.ranks.values():
            reader.close()
        super().close()
