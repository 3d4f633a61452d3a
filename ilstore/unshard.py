"""Logical runs: a reader view that assembles every tensor of a multi-rank run from its ranks.

:class:`LogicalReader` reads a run (multi-rank or not) as the single-rank run its ranks
computed together: every key has rank 0, each tensor node describes the logical tensor, and
``load`` assembles it from the ranks by the layout each rank recorded (:mod:`ilstore.layout`):

* ``shard``: the ranks' tensors concatenated along the sharded dimension, in the group's
  order (block by block for a fused dimension: ``blocks``);
* ``partial``: their sum (``avg``: their mean), accumulated in float64 (complex128 for complex
  tensors) and cast back to the tensor's dtype;
* ``replicate`` (also a tensor without a layout): one replica, after checking that every
  other rank's replica agrees with it (bitwise by default, ``replica_atol``); disagreement
  raises :class:`ReplicaMismatchError`, which names the tensor, the ranks and the difference.

A tensor that cannot be assembled (a rank lacks it, the layouts or shapes disagree, a layout is
``invalid`` or ``unsupported``) is described as not stored, with the reason. Memory: ``load``
holds the logical tensor plus one rank's part (two logical tensors in float64 for a partial).

Calls are the union of the ranks' calls, in rank 0's order (then calls only later ranks made).
A step is readable when every rank completed it. The view's manifest is rank 0's, with
``world_size`` 1 and ``"unsharded_from"`` naming the source; ``ilstore convert --unshard``
writes it as a run of its own (:func:`ilstore.convert.convert` with ``unshard=True``).

The registered backend ``unsharded`` reads a *view directory*: a directory whose
``ilstore.json`` says ``{"backend": "unsharded", "source": RUN}`` (:func:`write_view`); that
is how ``ilstore-compare --unshard`` hands logical runs to the comparer.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import BackendError, CorruptFileError, StoreError
from .keys import CallKey, TensorKey
from .layout import LAYOUT_KEY, Layout, LayoutError
from .manifest import MANIFEST_NAME, write_json_atomic
from .records import Record, iter_tensor_nodes, node_at
from .store.base import StepInfo, StoreReader, StoreWriter, read_manifest
from .store.ranks import RankedReader
from .store.registry import open_run, register_backend

__all__ = ["LogicalReader", "ReplicaMismatchError", "open_logical", "write_view", "VIEW_BACKEND", "PLAN_KEY"]

#: The backend name of a view directory.
VIEW_BACKEND = "unsharded"
#: The node key that tells :meth:`LogicalReader.load` how to assemble a tensor (a locator key:
#: convert drops it, comparisons of metadata ignore it).
PLAN_KEY = "unshard"


class ReplicaMismatchError(StoreError):
    """The ranks' replicas of a replicated tensor differ."""


def write_view(view_dir: Path, source: Path, replica_atol: float = 0.0) -> Path:
    """Create a view directory that the ``unsharded`` backend opens as the logical run of ``source``."""
    view_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(view_dir / MANIFEST_NAME, {"format": "ilstore", "backend": VIEW_BACKEND,
                                                  "source": str(Path(source).resolve()), "replica_atol": replica_atol})
    return view_dir


def open_logical(path: str | Path, replica_atol: float = 0.0) -> LogicalReader:
    """The logical view of the run at ``path`` (any backend, multi-rank or not).

    Example:
        >>> with open_logical("runs/tp2") as run:  # doctest: +SKIP
        ...     logits = run.load(run.keys(0)[-1])
    """
    return LogicalReader(open_run(path), replica_atol=replica_atol)


def _is_tensor(node: Any) -> bool:
    return isinstance(node, dict) and node.get("type") == "tensor"


class LogicalReader(StoreReader):
    """A multi-rank run read as one logical run (see the module docstring).

    Args:
        source: the run's reader, or a run directory or view directory (opened here).
        replica_atol: largest absolute difference allowed between replicas (0: bitwise equal).

    Raises:
        RunNotFoundError: no run at the path (or at a view's source).
    """

    name = VIEW_BACKEND
    #: Convert computes the statistics of the tensors this reader assembles (they have none).
    restat = True

    def __init__(self, source: StoreReader | str | Path, *, replica_atol: float = 0.0) -> None:
        if not isinstance(source, StoreReader):
            view = read_manifest(Path(source))
            if view is not None and view.get("backend") == VIEW_BACKEND:
                replica_atol = float(view.get("replica_atol", replica_atol))
                named = view.get("source")
                if not isinstance(named, str):
                    raise CorruptFileError(Path(source) / MANIFEST_NAME, "a view names its \"source\" run")
                source = named
            source = open_run(source)
        self.source = source
        self.replica_atol = replica_atol
        self.run_dir = source.run_dir
        if isinstance(source, RankedReader):
            self.ranks: dict[int, StoreReader] = dict(source.ranks)
        else:
            rank = (source.manifest or {}).get("rank", 0)
            self.ranks = {rank if isinstance(rank, int) else 0: source}
        first = self.ranks[min(self.ranks)] if self.ranks else source
        manifest = copy.deepcopy(first.manifest or {})
        for key in ("layout", "ranks", "journal"):
            manifest.pop(key, None)
        manifest.update(rank=0, world_size=1, status=source.status,
                        unsharded_from={"path": str(source.run_dir), "ranks": sorted(self.ranks)})
        self.manifest = manifest
        self._structures = OrderedDict()
        self._journal = None
        self.locator_keys = frozenset({PLAN_KEY}) | source.locator_keys

    @classmethod
    def can_open(cls, run_dir: Path) -> bool:
        manifest = read_manifest(run_dir)
        return manifest is not None and manifest.get("backend") == VIEW_BACKEND

    # -- run-level queries --------------------------------------------------------------------
    @property
    def status(self) -> str:
        return self.source.status

    def steps(self) -> list[int]:
        """Steps every rank completed."""
        done = [set(r.steps()) for r in self.ranks.values()]
        return sorted(set.intersection(*done)) if done else []

    def incomplete_steps(self) -> list[int]:
        done = set(self.steps())
        every = {s for r in self.ranks.values() for s in [*r.steps(), *r.incomplete_steps()]}
        return sorted(every - done)

    def _union(self, step: int, ends: bool) -> list[CallKey]:
        seen: dict[CallKey, None] = {}
        for reader in self.ranks.values():
            for c in (reader.call_ends(step) if ends else reader.calls(step)):
                seen.setdefault(CallKey(0, c.step, c.module, c.call), None)
        return list(seen)

    def calls(self, step: int) -> list[CallKey]:
        return self._union(step, ends=False)

    def call_ends(self, step: int) -> list[CallKey]:
        return self._union(step, ends=True)

    def step_totals(self, step: int) -> dict[str, int] | None:
        return None

    def all_step_totals(self) -> dict[int, dict[str, int] | None] | None:
        return None

    def stats_table(self) -> Any:
        return None

    # -- the hooks the base's structure/meta/load use ----------------------------------------------
    def _list_calls(self, step: int) -> list[CallKey]:
        return self.calls(step)

    def _side(self, rank: int, call: CallKey, kind: str) -> Any | None:
        try:
            return self.ranks[rank].structure(CallKey(rank, call.step, call.module, call.call), kind)
        except KeyError:
            return None

    def _read_structure(self, call: CallKey, kind: str) -> Any | None:
        sides = {r: self._side(r, call, kind) for r in self.ranks}
        present = {r: s for r, s in sides.items() if s is not None}
        if not present:
            if call not in self.calls(call.step):
                raise KeyError(f"no call {call.module}#{call.call} in step {call.step} of {self.run_dir}")
            return None
        template = copy.deepcopy(next(iter(present.values())))
        for path, node in list(iter_tensor_nodes(template)):
            parts = {}
            for rank, side in present.items():
                try:
                    part = node_at(side, path)
                except KeyError:
                    continue
                if _is_tensor(part):
                    parts[rank] = part
            logical = self._logical_node(parts)
            node.clear()
            node.update(logical)
        return template

    # -- planning one tensor ---------------------------------------------------------------------
    def _logical_node(self, parts: dict[int, dict[str, Any]]) -> dict[str, Any]:
        first = next(iter(parts.values()))
        base = {k: v for k, v in first.items() if k not in (LAYOUT_KEY, "same_as", PLAN_KEY, *self.source.locator_keys)}
        try:
            plan, shape = self._plan(parts)
        except LayoutError as exc:
            base.pop("stats", None)  # one rank's statistics would pass for the logical tensor's
            base.update(stored=False, reason=f"not assembled: {exc}")
            return base
        unstored = [(r, p.get("reason", "not stored")) for r, p in parts.items()
                    if r in plan["ranks"] and p.get("stored") is False]
        base.update(shape=shape, numel=int(torch.Size(shape).numel()))
        if plan["kind"] != "replicate":
            base.pop("stats", None)  # the shards' statistics are not the logical tensor's
        if unstored:
            base.update(stored=False, reason="; ".join(f"rank {r}: {why}" for r, why in unstored))
            return base
        # The ranks' own nodes ride along (in memory only: the plan is a locator key), so that
        # loading a part looks nothing up in the rank's structures again (they may be gone from
        # its cache by the time a comparer's window loads) and a planning rank reader is told them.
        plan["nodes"] = {r: parts[r] for r in plan["ranks"]}
        base[PLAN_KEY] = plan
        base["stored"] = True
        return base

    def _plan(self, parts: dict[int, dict[str, Any]]) -> tuple[dict[str, Any], list[int]]:
        """How to assemble the tensor from ``parts`` (rank → node), and its logical shape."""
        layouts: dict[int, Layout | None] = {}
        for rank, node in parts.items():
            doc = node.get(LAYOUT_KEY)
            if doc is None:
                layouts[rank] = None
            elif isinstance(doc, dict) and doc.get("kind") in ("invalid", "unsupported"):
                raise LayoutError(f"rank {rank} recorded a layout that cannot be assembled: "
                                  f"{doc.get('reason', doc.get('kind'))}")
            else:
                layouts[rank] = Layout.from_json(doc)
        dtypes = {n.get("dtype") for n in parts.values()}
        if len(dtypes) > 1:
            raise LayoutError(f"the ranks hold different dtypes {sorted(map(str, dtypes))}")
        known = [lay for lay in layouts.values() if lay is not None]
        if not known:  # no layout anywhere: replicated on every rank that has it
            return self._replicate(parts, sorted(parts))
        lay = known[0]
        for rank, other in layouts.items():
            if other is None or (other.kind, other.ranks, other.dim, other.reduce) != \
                    (lay.kind, lay.ranks, lay.dim, lay.reduce):
                raise LayoutError(f"ranks {sorted(parts)[0]} and {rank} recorded different layouts "
                                  f"({lay.to_json()} vs {other.to_json() if other else None})")
        missing = [r for r in lay.ranks if r not in self.ranks]
        if missing:
            raise LayoutError(f"group {lay.group!r} has ranks {list(lay.ranks)}, the run has {sorted(self.ranks)}")
        if lay.kind == "replicate":
            return self._replicate(parts, [r for r in lay.ranks if r in parts])
        absent = [r for r in lay.ranks if r not in parts]
        if absent:
            raise LayoutError(f"rank(s) {absent} of group {lay.group!r} recorded no such tensor")
        shapes = [list(parts[r].get("shape") or []) for r in lay.ranks]
        if lay.kind == "partial":
            if any(s != shapes[0] for s in shapes):
                raise LayoutError(f"partial sums of different shapes {shapes}")
            return {"kind": "partial", "ranks": list(lay.ranks), "reduce": lay.reduce}, shapes[0]
        return self._shard(lay, shapes, [layouts[r] for r in lay.ranks])

    @staticmethod
    def _replicate(parts: dict[int, dict[str, Any]], ranks: list[int]) -> tuple[dict[str, Any], list[int]]:
        shapes = {r: list(parts[r].get("shape") or []) for r in ranks}
        if len({tuple(s) for s in shapes.values()}) > 1:
            raise LayoutError(f"no layout recorded and the ranks' shapes differ ({shapes}); annotate the module "
                              "(ilstore.layout.annotate, docs/parallel.md)")
        return {"kind": "replicate", "ranks": ranks}, shapes[ranks[0]]

    @staticmethod
    def _shard(lay: Layout, shapes: list[list[int]], layouts: list[Layout | None]) -> tuple[dict[str, Any], list[int]]:
        dim = lay.dim
        assert dim is not None
        if any(len(s) <= dim for s in shapes) or any(s[:dim] + s[dim + 1:] != shapes[0][:dim] + shapes[0][dim + 1:]
                                                      for s in shapes):
            raise LayoutError(f"shards of shapes {shapes} do not concatenate along dimension {dim}")
        if lay.sizes is not None and [s[dim] for s in shapes] != list(lay.sizes):
            raise LayoutError(f"shard sizes {[s[dim] for s in shapes]} along dimension {dim} are not the recorded "
                              f"{list(lay.sizes)}")
        plan: dict[str, Any] = {"kind": "shard", "ranks": list(lay.ranks), "dim": dim}
        if lay.blocks is not None:
            blocks = [list(x.blocks) if x is not None and x.blocks is not None else None for x in layouts]
            fits = [b is not None and len(b) == len(lay.blocks) and sum(b) == s[dim]
                    for b, s in zip(blocks, shapes, strict=True)]
            if not all(fits):
                raise LayoutError(f"the ranks' blocks {blocks} do not fit their shapes {shapes} (dimension {dim})")
            plan["blocks"] = blocks
        shape = list(shapes[0])
        shape[dim] = sum(s[dim] for s in shapes)
        return plan, shape

    # -- assembling ----------------------------------------------------------------------------
    def _part(self, rank: int, key: TensorKey, plan: dict[str, Any]) -> torch.Tensor:
        part = _rank_key(key, rank)
        node = plan.get("nodes", {}).get(rank)
        return self.ranks[rank].load(part) if node is None else self.ranks[rank].load_node(part, node)

    def prepare_loads(self, keys: Iterable[TensorKey | tuple[TensorKey, Mapping[str, Any] | None]]) -> None:
        """Hand each rank's reader that plans its loads (hdf5: ``prepare_loads``) the parts the
        logical tensors will load, with the rank's own nodes (see :meth:`_load`)."""
        by_rank: dict[int, list[TensorKey | tuple[TensorKey, Mapping[str, Any] | None]]] = {r: [] for r in self.ranks}
        for item in keys:
            key, node = item if isinstance(item, tuple) else (item, None)
            plan = (node or {}).get(PLAN_KEY)
            if not isinstance(plan, dict):
                continue  # (no plan at hand: the part is looked up when it is loaded)
            for rank, part_node in plan.get("nodes", {}).items():
                by_rank[rank].append((_rank_key(key, rank), part_node))
        for rank, reader in self.ranks.items():
            prepare = getattr(reader, "prepare_loads", None)
            if prepare is not None:
                prepare(by_rank[rank])

    def _load(self, key: TensorKey, node: dict[str, Any]) -> torch.Tensor:
        plan = node.get(PLAN_KEY)
        if not isinstance(plan, dict):
            raise KeyError(f"{key}: no assembly plan (not stored: {node.get('reason', 'unknown')})")
        ranks = plan["ranks"]
        if plan["kind"] == "replicate":
            return self._replica(key, ranks, plan)
        dtype = node.get("dtype")
        if plan["kind"] == "partial":
            total: torch.Tensor | None = None
            for rank in ranks:
                part = self._part(rank, key, plan)
                wide = torch.complex128 if part.is_complex() else torch.float64 if part.is_floating_point() else None
                total = part.to(wide or part.dtype, copy=True) if total is None else total.add_(part)
            assert total is not None
            if plan.get("reduce") == "avg":
                total /= len(ranks)
            return total.to(part.dtype)
        out = torch.empty(node["shape"], dtype=_dtype(dtype)) if dtype else None
        dim, blocks = plan["dim"], plan.get("blocks")
        offsets = [0] * (len(blocks[0]) if blocks else 1)  # per block, what the ranks so far filled
        # block i of the logical tensor starts after every rank's blocks before i
        block_starts = [sum(b[j] for b in blocks for j in range(i)) for i in range(len(offsets))] if blocks else [0]
        for n, rank in enumerate(ranks):
            part = self._part(rank, key, plan)
            if out is None:
                out = torch.empty(node["shape"], dtype=part.dtype)
            pieces = part.split(blocks[n], dim) if blocks else (part,)
            for i, piece in enumerate(pieces):
                start = block_starts[i] + offsets[i]
                out.narrow(dim, start, piece.shape[dim]).copy_(piece)
                offsets[i] += piece.shape[dim]
            del part, pieces
        assert out is not None
        return out

    def _replica(self, key: TensorKey, ranks: list[int], plan: dict[str, Any]) -> torch.Tensor:
        first = self._part(ranks[0], key, plan)
        for rank in ranks[1:]:
            other = self._part(rank, key, plan)
            if self._agree(first, other):
                continue
            diff = "?"
            if first.is_floating_point() or first.is_complex():
                diff = f"{(first.to(torch.float64) - other.to(torch.float64)).abs().max().item():.3g}" \
                    if not first.is_complex() else f"{(first - other).abs().max().item():.3g}"
            raise ReplicaMismatchError(f"{self.run_dir}: {key.display()} is replicated (no layout says otherwise) but "
                                       f"rank {rank}'s replica differs from rank {ranks[0]}'s (max abs diff {diff}, "
                                       f"allowed {self.replica_atol:g}); the ranks diverged there, or the tensor is "
                                       "split and its module needs a layout (docs/parallel.md)")
        return first

    def _agree(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if torch.equal(a, b):
            return True
        if not (a.is_floating_point() or a.is_complex()):
            return False
        nan_a, nan_b = a.isnan(), b.isnan()
        if not torch.equal(nan_a, nan_b):
            return False
        if self.replica_atol == 0:
            return bool(torch.equal(a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0)))
        return bool(torch.allclose(a, b, rtol=0.0, atol=self.replica_atol, equal_nan=True))

    def close(self) -> None:
        self._structures.clear()
        self.source.close()


def _rank_key(key: TensorKey, rank: int) -> TensorKey:
    return TensorKey(key.step, key.module, key.call, key.kind, key.path, rank=rank)


def _dtype(name: str) -> torch.dtype:
    from .records import dtype_from_str

    return dtype_from_str(name)


class _ViewWriter(StoreWriter):
    """The ``unsharded`` backend only reads: logical runs are written with ``ilstore convert --unshard``."""

    name = VIEW_BACKEND

    def __init__(self, run_dir: str | Path, options: Any = None) -> None:
        raise BackendError(f"the {VIEW_BACKEND!r} backend is a read-only view of a multi-rank run; write a logical run "
                           "with `ilstore convert SRC DST --to BACKEND --unshard`")

    def _write(self, record: Record) -> None:  # pragma: no cover - never constructed
        raise BackendError("read-only")

    def _end_step(self, info: StepInfo) -> None:  # pragma: no cover - never constructed
        raise BackendError("read-only")


register_backend(VIEW_BACKEND, _ViewWriter, LogicalReader, override=True)
