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
import math
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
        manifest.pop("warnings", None)
        said = source.capture_warnings  # every rank's, each with its rank (the copy is rank 0's alone)
        if said:
            manifest["warnings"] = said
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
        # Every rank that recorded the call must hold a tensor at the same paths: a tensor that one
        # rank has and another has not (missing, or a plain value there) is not assembled.
        tensors = {r: dict(iter_tensor_nodes(s)) for r, s in present.items()}
        paths: dict[tuple[str, ...], None] = {}
        for nodes in tensors.values():
            paths.update(dict.fromkeys(nodes))
        # the template: the structure of the rank with the most tensors (the lowest such rank)
        first = max(present, key=lambda r: (len(tensors[r]), -r))
        template = copy.deepcopy(present[first])
        unplaced = []
        for path in paths:
            parts = {r: nodes[path] for r, nodes in tensors.items() if path in nodes}
            lacking = [r for r in present if r not in parts]
            if not lacking or all(_holds_none(present[r], path) for r in lacking):
                # None where other ranks hold the tensor (a result gathered to some ranks only, as
                # vLLM's logits may be): the ranks holding it, as for a call only some ranks made
                logical = self._logical_node(parts)
            else:
                logical = self._unassembled(parts, f"rank(s) {sorted(parts)} recorded a tensor at {kind}"
                                                   f"[{'/'.join(path)}] and rank(s) {lacking} did not")
            if not _put(template, path, logical):
                unplaced.append("/".join(path))
        if unplaced:  # a tensor the template has no place for: nothing of this side is trusted
            why = (f"the ranks {sorted(present)} recorded different structures (rank {first}'s has no place for "
                   f"the tensor(s) at {kind}{unplaced[:3]} that other ranks recorded)")
            for _path, node in list(iter_tensor_nodes(template)):
                unassembled = self._unassembled({first: dict(node)}, why)
                node.clear()
                node.update(unassembled)
        return template

    # -- planning one tensor ---------------------------------------------------------------------
    def _base(self, parts: dict[int, dict[str, Any]]) -> dict[str, Any]:
        first = next(iter(parts.values()))
        return {k: v for k, v in first.items() if k not in (LAYOUT_KEY, "same_as", PLAN_KEY, *self.source.locator_keys)}

    def _unassembled(self, parts: dict[int, dict[str, Any]], why: str) -> dict[str, Any]:
        """A tensor that cannot be assembled: not stored, with the reason; no rank's shape,
        size or statistics (they would pass for the logical tensor's)."""
        base = self._base(parts)
        base.pop("stats", None)
        base.update(shape=None, numel=None, stored=False, reason=why if why.startswith(_NOT_ASSEMBLED)
                    else f"{_NOT_ASSEMBLED}: {why}")
        base[PLAN_KEY] = {"kind": _UNASSEMBLED}
        return base

    @staticmethod
    def unassembled_reason(node: Mapping[str, Any]) -> str | None:
        """Why the logical view could not assemble the tensor of ``node`` (one of its tensor
        nodes, locator keys included); None for a tensor it assembles (stored or not)."""
        plan = node.get(PLAN_KEY)
        if isinstance(plan, dict) and plan.get("kind") == _UNASSEMBLED:
            return str(node.get("reason") or _NOT_ASSEMBLED)
        return None

    def _logical_node(self, parts: dict[int, dict[str, Any]]) -> dict[str, Any]:
        base = self._base(parts)
        try:
            plan, shape = self._plan(parts)
        except LayoutError as exc:
            return self._unassembled(parts, str(exc))
        except Exception as exc:  # noqa: BLE001 - a backstop: malformed metadata must not crash a reader
            return self._unassembled(parts, f"unexpected {type(exc).__name__} while planning it: {exc}")
        unstored = [(r, p.get("reason", "not stored")) for r, p in parts.items()
                    if r in plan["ranks"] and p.get("stored") is False]
        base.update(shape=shape, numel=int(torch.Size(shape).numel()))
        if plan["kind"] != "replicate":
            base.pop("stats", None)  # the shards' statistics are not the logical tensor's
        elif unstored:  # replicas without bodies: their statistics must agree, as bodies would
            differ = self._stats_differ(parts, plan["ranks"], str(base.get("dtype")), base["numel"])
            if differ is not None:
                return self._unassembled(parts, differ)
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

    def _stats_differ(self, parts: dict[int, dict[str, Any]], ranks: list[int], dtype: str,
                      numel: int) -> str | None:
        """Why the replicas' recorded statistics disagree (beyond ``replica_atol`` where their
        bodies would be allowed to: floating tensors), or None when they agree."""
        # Only the replicas that recorded statistics are compared: one that recorded none (its
        # device not in device_names, say) claims nothing, and its reason stays the node's.
        stats = {r: st for r in ranks if isinstance(st := parts[r].get("stats"), Mapping) and st}
        if len(stats) < 2:
            return None
        ref, *others = stats
        floating = any(t in dtype for t in ("float", "half", "bfloat", "double", "complex"))
        for rank in others:
            a, b = stats[ref], stats[rank]
            if not isinstance(a, Mapping) or not isinstance(b, Mapping) or not a or not b or a.keys() != b.keys():
                names = [sorted(x) if isinstance(x, Mapping) else x for x in (a, b)]
                return (f"replicated (no body stored) but ranks {ref} and {rank} recorded different statistics "
                        f"({names[0]} vs {names[1]})")
            for name in a:
                if not _stat_agrees(a[name], b[name], self.replica_atol if floating and not name.endswith("_count")
                                    else 0.0, numel if name == "l2_norm" else 1):
                    return (f"replicated (no body stored) but rank {rank}'s statistics differ from rank {ref}'s "
                            f"({name} {b[name]!r} vs {a[name]!r}, allowed {self.replica_atol:g}); the ranks diverged "
                            "there, or the tensor is split and its module needs a layout (docs/parallel.md)")
        return None

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
                try:
                    lay = Layout.from_json(doc)
                except LayoutError as exc:
                    raise LayoutError(f"rank {rank} recorded a malformed layout: {exc}") from None
                if lay.ranks[lay.index] != rank:
                    raise LayoutError(f"rank {rank} recorded index {lay.index} in group {lay.group!r} "
                                      f"{list(lay.ranks)}, which is rank {lay.ranks[lay.index]}'s position")
                layouts[rank] = lay
        dtypes = {n.get("dtype") for n in parts.values()}
        if len(dtypes) > 1:
            raise LayoutError(f"the ranks hold different dtypes {sorted(map(str, dtypes))}")
        known = [lay for lay in layouts.values() if lay is not None]
        if not known:  # no layout anywhere: replicated on every rank that has it
            return self._replicate(parts, sorted(parts))
        lay = known[0]
        for rank, other in layouts.items():
            if other is None or _agreement(other) != _agreement(lay):
                raise LayoutError(f"ranks {sorted(parts)[0]} and {rank} recorded different layouts "
                                  f"({lay.to_json()} vs {other.to_json() if other else None})")
        missing = [r for r in lay.ranks if r not in self.ranks]
        if missing:
            raise LayoutError(f"group {lay.group!r} has ranks {list(lay.ranks)}, the run has {sorted(self.ranks)}")
        absent = [r for r in lay.ranks if r not in parts]
        if absent:
            raise LayoutError(f"rank(s) {absent} of group {lay.group!r} {list(lay.ranks)} recorded no such tensor")
        outside = [r for r in parts if r not in lay.ranks]
        if outside:
            raise LayoutError(f"rank(s) {outside} recorded the tensor but are not in its group {lay.group!r} "
                              f"{list(lay.ranks)}")
        if lay.kind == "replicate":
            return self._replicate(parts, list(lay.ranks))
        shapes = [_shape_of(r, parts[r]) for r in lay.ranks]
        if lay.kind == "partial":
            dtype = _known_dtype(next(iter(dtypes)))
            if dtype == torch.bool or lay.reduce == "avg" and not (dtype.is_floating_point or dtype.is_complex):
                raise LayoutError(f"a partial {lay.reduce} of {dtype} tensors is not assembled (a sum of booleans "
                                  "is no boolean, a mean of integers no integer); record it reduced, or replicated")
            if any(s != shapes[0] for s in shapes):
                raise LayoutError(f"partial sums of different shapes {shapes}")
            return {"kind": "partial", "ranks": list(lay.ranks), "reduce": lay.reduce}, shapes[0]
        return self._shard(lay, shapes, [layouts[r] for r in lay.ranks])

    @staticmethod
    def _replicate(parts: dict[int, dict[str, Any]], ranks: list[int]) -> tuple[dict[str, Any], list[int]]:
        shapes = {r: _shape_of(r, parts[r]) for r in ranks}
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
        if not isinstance(plan, dict) or plan.get("kind") not in ("replicate", "partial", "shard"):
            raise KeyError(f"{key}: no assembly plan (not stored: {node.get('reason', 'unknown')})")
        try:
            return self._assemble(key, node, plan)
        except (StoreError, KeyError, MemoryError):
            raise
        except Exception as exc:  # a backstop: what the planning did not foresee names the run and tensor
            raise StoreError(f"{self.run_dir}: {key.display()} cannot be assembled from the ranks "
                             f"({type(exc).__name__}: {exc})") from exc

    def _assemble(self, key: TensorKey, node: dict[str, Any], plan: dict[str, Any]) -> torch.Tensor:
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


_NOT_ASSEMBLED = "not assembled"
#: The plan of a tensor the view cannot assemble (:meth:`LogicalReader.unassembled_reason`).
_UNASSEMBLED = "unassembled"


def _agreement(lay: Layout) -> tuple[Any, ...]:
    """What every member of a group must record alike (``index`` differs; ``blocks`` are each
    rank's own sizes: only whether there are blocks, and how many, must agree)."""
    return (lay.kind, lay.ranks, lay.group, lay.dim, lay.reduce, lay.sizes,
            None if lay.blocks is None else len(lay.blocks))


def _shape_of(rank: int, node: Mapping[str, Any]) -> list[int]:
    shape = node.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        why = f" (not stored: {node['reason']})" if node.get("stored") is False and node.get("reason") else ""
        raise LayoutError(f"rank {rank} recorded no shape for it{why}")
    return list(shape)


def _known_dtype(name: Any) -> torch.dtype:
    try:
        return _dtype(str(name))
    except Exception:  # noqa: BLE001 - whatever the name is, the tensor cannot be reduced
        raise LayoutError(f"a partial of dtype {name!r} (no known dtype recorded) is not assembled") from None


def _stat_agrees(a: Any, b: Any, atol: float, numel: int) -> bool:
    """One statistic of two replicas: equal, or numbers within what ``atol`` allows elementwise
    (``numel``: the L2 norm can move by ``atol * sqrt(numel)``)."""
    if a == b:
        return True
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if not numbers:
        return False
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if atol <= 0:
        return False
    allowed = atol * math.sqrt(max(numel, 1)) + 1e-12 * max(abs(a), abs(b))  # (float64 rounding of the stats)
    return abs(a - b) <= allowed


def _put(structure: Any, path: tuple[str, ...], node: dict[str, Any]) -> bool:
    """Put the logical tensor ``node`` at ``path`` of ``structure`` (a template): over the tensor
    there, over a plain value there, or as a new item of the container above; False when the
    structure has no such place (a container stands there, or no container above)."""
    try:
        here = node_at(structure, path)
    except KeyError:
        here = _ABSENT
    if _is_tensor(here):
        here.clear()
        here.update(node)
        return True
    if not path or isinstance(here, dict) and here.get("type") in ("tuple", "list", "dict"):
        return False
    try:
        parent = node_at(structure, path[:-1])
    except KeyError:
        return False
    if not isinstance(parent, dict):
        return False
    last, items, kwargs = path[-1], parent.get("items"), parent.get("kwargs")
    if parent.get("type") in ("tuple", "list") and isinstance(items, list) and last.isdigit() \
            and str(int(last)) == last and int(last) <= len(items):
        if int(last) == len(items):
            items.append(node)
        else:
            items[int(last)] = node
        return True
    if isinstance(kwargs, dict) and (last in kwargs or here is _ABSENT and parent.get("type") != "dict"):
        kwargs[last] = node
        return True
    if parent.get("type") == "dict" and isinstance(items, dict):
        items[last] = node
        return True
    return False


_ABSENT: Any = object()


def _holds_none(structure: Any, path: tuple[str, ...]) -> bool:
    """Whether ``structure`` holds ``None`` at ``path`` or above it (not another value, not
    nothing): JSON null, or a value node of null (how a call's whole ``None`` result is stored).
    Above it: vLLM's first pipeline stage passes ``intermediate_tensors=None`` where later stages
    pass a container of tensors."""
    for depth in range(len(path) + 1):
        try:
            node = node_at(structure, path[:depth])
        except KeyError:
            return False
        if node is None or isinstance(node, dict) and node.get("type") == "value" and "value" in node \
                and node["value"] is None:
            return True
    return False


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
