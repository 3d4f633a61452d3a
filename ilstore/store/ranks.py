"""Runs written by several ranks (torchrun): one sub-run per rank behind one reader.

Under ``torch.distributed`` every rank writes its own complete run, in any backend, into
``<run_dir>/rank_<r>/`` (:func:`rank_run_dir`); rank 0 also writes ``<run_dir>/ilstore.json``
with ``"layout": "ranks"`` and the list of ranks (:func:`write_ranks_manifest`). Nothing is
shared between ranks, so nothing can collide, whatever devices they run on; each rank's
sub-run has its own manifest and step journal, and the top-level manifest is written once.
:class:`RankedReader` presents the whole run as one: every :class:`~ilstore.keys.CallKey` /
:class:`~ilstore.keys.TensorKey` carries its rank. It opens each rank's run through the opener
it is given (the registry passes :func:`~ilstore.store.registry.open_run`), so this module does
not depend on the registry, and it exposes the ranks as its :meth:`~RankedReader.parts`, which
is all convert needs to copy the layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeGuard

import torch

from ..errors import CorruptFileError, RunNotFoundError
from ..keys import CallKey, TensorKey
from ..manifest import MANIFEST_NAME, TOTALS_KEYS, write_json_atomic
from .base import Body, StoreReader, read_manifest

__all__ = ["RankedReader", "rank_dir_name", "rank_run_dir", "write_ranks_manifest", "is_ranked", "RANKS_LAYOUT"]

#: The manifest's ``"layout"`` of a multi-rank run.
RANKS_LAYOUT = "ranks"
#: The ``format_version`` of the top-level manifest, which has not changed since ilstore 0.1
#: (the per-rank sub-runs are ordinary runs with their own manifest and version).
RANKS_FORMAT_VERSION = 1


def rank_dir_name(rank: int) -> str:
    """The sub-directory of rank ``rank`` in a multi-rank run.

    Example:
        >>> rank_dir_name(3)
        'rank_3'
    """
    return f"rank_{rank}"


def rank_run_dir(run_dir: Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` writes its own run: ``run_dir`` itself when ``world_size == 1``, else
    ``run_dir / rank_dir_name(rank)``.

    Example:
        >>> rank_run_dir(Path("runs/a"), 0, 1).as_posix(), rank_run_dir(Path("runs/a"), 1, 2).as_posix()
        ('runs/a', 'runs/a/rank_1')
    """
    return run_dir if world_size == 1 else run_dir / rank_dir_name(rank)


def write_ranks_manifest(run_dir: Path, *, backend: str, world_size: int, config: dict[str, Any]) -> None:
    """Rank 0 of a multi-rank run: create ``run_dir`` and write its top-level ``ilstore.json``
    with ``"layout": "ranks"``, listing ranks ``0 .. world_size - 1``.

    Args:
        run_dir: the run directory shared by every rank.
        backend: the registered name of the backend every rank writes with.
        world_size: the number of ranks.
        config: the resolved capture config.

    Raises:
        OSError: the directory or the manifest cannot be written.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / MANIFEST_NAME, {
        "format": "ilstore", "format_version": RANKS_FORMAT_VERSION, "layout": RANKS_LAYOUT,
        "world_size": world_size, "ranks": list(range(world_size)), "backend": backend, "config": config})


def is_ranked(manifest: dict[str, Any] | None) -> bool:
    """Whether a top-level manifest describes a multi-rank run."""
    return manifest is not None and manifest.get("layout") == RANKS_LAYOUT


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _listed_ranks(run_dir: Path, manifest: Mapping[str, Any]) -> list[int]:
    """The ranks of a multi-rank run's manifest: exactly ``0 .. world_size - 1``, each once.

    Raises:
        CorruptFileError: ``ranks`` or ``world_size`` is malformed, or they disagree (a rank
            missing from ``ranks``: a run that lost a rank would otherwise read as a smaller one).
    """
    path = run_dir / MANIFEST_NAME
    ranks, world_size = manifest.get("ranks"), manifest.get("world_size")
    if not isinstance(ranks, list) or not all(_is_int(r) for r in ranks):
        raise CorruptFileError(path, "\"ranks\" must be a list of integers")
    if not _is_int(world_size) or world_size < 1:
        raise CorruptFileError(path, f"\"world_size\" must be an integer >= 1, got {world_size!r:.40}")
    if len(set(ranks)) != len(ranks) or any(not 0 <= r < world_size for r in ranks):
        raise CorruptFileError(path, f"\"ranks\" {ranks!r:.80} must list each rank of 0 .. {world_size - 1} once")
    missing = [r for r in range(world_size) if r not in ranks]
    if missing:
        raise CorruptFileError(path, f"the run has world_size {world_size} but rank(s) {missing} are missing from "
                                     f"\"ranks\" {ranks}: the run is incomplete")
    return sorted(ranks)


def _check_rank_manifest(sub: Path, manifest: Mapping[str, Any] | None, rank: int, world_size: int) -> None:
    """A rank's own manifest, where it says, must be that rank of a run of ``world_size``."""
    said = {key: (manifest or {}).get(key) for key in ("rank", "world_size")}
    expected = {"rank": rank, "world_size": world_size}
    wrong = {key: value for key, value in said.items() if value is not None and value != expected[key]}
    if wrong:
        raise CorruptFileError(sub / MANIFEST_NAME, f"says {', '.join(f'{k} {v!r:.20}' for k, v in said.items())}; "
                                                    f"as {sub.name} of the run it must be rank {rank} of world_size "
                                                    f"{world_size}")


class RankedReader(StoreReader):
    """One reader over the per-rank sub-runs of a multi-rank run.

    Args:
        run_dir: the run directory holding ``ilstore.json`` (``"layout": "ranks"``) and the
            ``rank_<r>/`` sub-runs.
        open_part: opens one rank's run (any backend) and returns its reader.

    Raises:
        CorruptFileError: the manifest's ``"ranks"`` is not each rank of ``0 .. world_size - 1``
            once, or a rank's own manifest names another rank or world size.
        RunNotFoundError: a listed rank wrote nothing.
    """

    def __init__(self, run_dir: str | Path, open_part: Callable[[Path], StoreReader]) -> None:
        super().__init__(run_dir)
        ranks = _listed_ranks(self.run_dir, self.manifest or {})
        world_size = len(ranks)
        self.ranks: dict[int, StoreReader] = {}
        try:
            for rank in ranks:
                sub = self.run_dir / rank_dir_name(rank)
                if not sub.is_dir():
                    raise RunNotFoundError(f"{sub}: rank {rank} listed in {self.run_dir / MANIFEST_NAME} wrote nothing")
                self.ranks[rank] = reader = open_part(sub)
                _check_rank_manifest(sub, reader.manifest, rank, world_size)
        except BaseException:
            for reader in self.ranks.values():
                reader.close()
            raise
        self._rank_steps: dict[int, frozenset[int]] = {}  # each rank's completed steps, read once
        first = next(iter(self.ranks.values()), None)
        self.name = first.name if first is not None else "ranks"
        self.locator_keys = frozenset().union(*(r.locator_keys for r in self.ranks.values()))

    @classmethod
    def can_open(cls, run_dir: Path) -> bool:
        """Whether ``run_dir`` has a top-level manifest with ``"layout": "ranks"``."""
        return is_ranked(read_manifest(run_dir))

    def _reader(self, rank: int) -> StoreReader:
        try:
            return self.ranks[rank]
        except KeyError:
            raise KeyError(f"no rank {rank} in {self.run_dir}") from None

    # -- the run-level queries, over every rank ----------------------------------------------
    @property
    def status(self) -> str:
        """The worst status of any rank: ``failed``, then ``running``, then ``unknown``."""
        statuses = {r.status for r in self.ranks.values()}
        for worst in ("failed", "running", "unknown"):
            if worst in statuses:
                return worst
        return "complete" if statuses else "unknown"

    @property
    def capture_warnings(self) -> list[str]:
        """Every rank's, each prefixed with its rank."""
        return [f"rank {rank}: {w}" for rank, reader in self.ranks.items() for w in reader.capture_warnings]

    def steps(self) -> list[int]:
        """Steps completed by at least one rank."""
        return sorted({s for r in self.ranks.values() for s in r.steps()})

    def incomplete_steps(self) -> list[int]:
        """Steps some rank started and never completed."""
        return sorted({s for r in self.ranks.values() for s in r.incomplete_steps()})

    def _ranks_with(self, step: int) -> list[StoreReader]:
        """The readers of the ranks that completed ``step``, in rank order."""
        out = []
        for rank, reader in self.ranks.items():
            done = self._rank_steps.get(rank)
            if done is None:
                done = self._rank_steps[rank] = frozenset(reader.steps())
            if step in done:
                out.append(reader)
        return out

    def calls(self, step: int) -> list[CallKey]:
        """The calls of ``step``, rank after rank (each rank's in start order)."""
        return [c for r in self._ranks_with(step) for c in r.calls(step)]

    def call_ends(self, step: int) -> list[CallKey]:
        """The calls of ``step`` in end order, rank after rank."""
        return [c for r in self._ranks_with(step) for c in r.call_ends(step)]

    def step_totals(self, step: int) -> dict[str, int] | None:
        """The sums of the totals of the ranks that completed ``step``; None unless every one of
        them records its totals (or none completed it)."""
        parts = [r.step_totals(step) for r in self._ranks_with(step)]
        if not parts or any(p is None for p in parts):
            return None
        return {key: sum(p[key] for p in parts if p is not None) for key in TOTALS_KEYS}

    def all_step_totals(self) -> dict[int, dict[str, int] | None] | None:
        """Per step, the sums over the ranks that completed it (None where one of them has no
        totals); None unless every rank records totals."""
        per_rank = [r.all_step_totals() for r in self.ranks.values()]
        if not per_rank or any(t is None for t in per_rank):
            return None
        out: dict[int, dict[str, int] | None] = {}
        for totals in per_rank:
            assert totals is not None
            for step, part in totals.items():
                if step in out and (out[step] is None or part is None):
                    out[step] = None
                elif step in out:
                    out[step] = {key: out[step][key] + part[key] for key in TOTALS_KEYS}  # type: ignore[index]
                else:
                    out[step] = part
        return out

    def load(self, key: TensorKey) -> torch.Tensor:
        """Load from the rank ``key`` names (which resolves ``same_as`` and checks the tensor)."""
        return self._reader(key.rank).load(key)

    def load_node(self, key: TensorKey, node: dict[str, Any]) -> torch.Tensor:
        """:meth:`load` with the rank's own node for ``key`` (no lookup of it there)."""
        return self._reader(key.rank).load_node(key, node)

    def open_body(self, key: TensorKey, node: dict[str, Any]) -> Body | None:
        """Where the rank ``key`` names keeps the tensor's elements (see :meth:`StoreReader.open_body`)."""
        try:
            reader = self._reader(key.rank)
        except Exception:  # noqa: BLE001 -- load_node() reports it
            return None
        return reader.open_body(key, node)

    def prepare_loads(self, keys: Iterable[TensorKey | tuple[TensorKey, Mapping[str, Any] | None]]) -> None:
        """Hand each rank's reader that plans its loads (hdf5: ``prepare_loads``) its rank's keys,
        with their nodes, so that it need not keep a comparer's window of structures."""
        by_rank: dict[int, list[TensorKey | tuple[TensorKey, Mapping[str, Any] | None]]] = {}
        for item in keys:
            key = item[0] if isinstance(item, tuple) else item
            by_rank.setdefault(key.rank, []).append(item)
        for rank, reader in self.ranks.items():
            prepare = getattr(reader, "prepare_loads", None)
            if prepare is not None:
                prepare(by_rank.get(rank, []))

    def parts(self) -> list[tuple[str, StoreReader]]:
        """One part per rank: ``("rank_<r>", that rank's reader)``."""
        return [(rank_dir_name(rank), reader) for rank, reader in self.ranks.items()]

    def layout_manifest(self, backend: str) -> dict[str, Any] | None:
        """This run's top-level manifest, naming ``backend`` instead."""
        return {**(self.manifest or {}), "backend": backend}

    # -- the per-call hooks, dispatched by rank ---------------------------------------------------
    def _list_steps(self) -> list[int]:
        return sorted({*self.steps(), *self.incomplete_steps()})

    def _list_calls(self, step: int) -> list[CallKey]:
        return self.calls(step)

    def _read_structure(self, call: CallKey, kind: str) -> Any | None:
        return self._reader(call.rank).structure(call, kind)

    def _load(self, key: TensorKey, node: dict[str, Any]) -> torch.Tensor:
        return self._reader(key.rank).load(key)

    def close(self) -> None:
        for reader in self.ranks.values():
            reader.close()
        super().close()
