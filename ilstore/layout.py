"""Parallel layouts: how a captured tensor is split over the ranks of a process group.

Each tensor node of a multi-rank run may carry a ``"layout"`` (see ``docs/parallel.md``)::

    {"kind": "shard", "dim": 1, "group": "tp", "ranks": [0, 1], "index": 1, "sizes": [8, 8],
     "source": "dtensor"}
    {"kind": "shard", "dim": 1, "blocks": [64, 32, 32], ...}    # blocks sharded separately (fused QKV)
    {"kind": "partial", "reduce": "sum", "group": "tp", "ranks": [0, 1], "index": 0, ...}
    {"kind": "replicate", "group": "tp", "ranks": [0, 1], "index": 0, ...}

* ``shard``: the logical tensor is the concatenation along ``dim`` of the members' tensors, in
  the order of ``ranks`` (``sizes``: each member's size along ``dim``, when known). With
  ``blocks``, the dimension is made of blocks (this rank's size of each), each of which is
  sharded: the logical tensor concatenates block 0 of every rank, then block 1, and so on.
* ``partial``: the logical tensor is the sum (``reduce``: ``sum`` or ``avg``) of the members'.
* ``replicate``: every member holds the whole logical tensor.

``ranks`` are global ranks in the group's order (each once, >= 0); ``index`` is this rank's
position in it. A tensor of a multi-rank run without a layout is taken to be replicated on every
rank that recorded it.

Where layouts come from, in order of precedence: a ``DTensor`` (its placements; its local
shard is what is stored), an annotation (:func:`annotate`, a dims string such as ``"t h[tp]"``)
and the module's own ``DTensor`` parameters (what ``parallelize_module`` produces); the vLLM
plug-in annotates vLLM's parallel layers (:mod:`ilstore.integrations.vllm_layout`).

Example:
    >>> spec = parse_dims("... h[tp]")
    >>> spec.bind([3, 5, 8], rank=1, world_size=2).to_json()["dim"]
    2
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import torch
from torch import nn

from .errors import IlstoreError

__all__ = ["LAYOUT_KEY", "KINDS", "Layout", "LayoutError", "DimsSpec", "parse_dims", "annotate", "set_group",
           "group_ranks", "split_dtensor", "module_layout", "ModuleLayout", "chunk_sizes"]

#: The key of a tensor node that holds its layout.
LAYOUT_KEY = "layout"
#: The kinds of layout.
KINDS = ("shard", "partial", "replicate")
_REDUCE = ("sum", "avg")
_ATTR = "__ilstore_layout__"


class LayoutError(IlstoreError, ValueError):
    """A bad dims string or layout, or one that does not fit the tensor it is applied to."""


def _is_int(value: Any) -> TypeGuard[int]:
    """An integer that is not a bool (JSON ``true`` must not pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def chunk_sizes(total: int, parts: int) -> list[int]:
    """How ``torch.chunk`` (and DTensor's ``Shard``) splits ``total`` elements into ``parts``.

    Example:
        >>> chunk_sizes(10, 4), chunk_sizes(8, 2)
        ([3, 3, 3, 1], [4, 4])
    """
    size = math.ceil(total / parts) if parts else 0
    return [max(0, min(size, total - i * size)) for i in range(parts)]


@dataclass(frozen=True)
class Layout:
    """One tensor's layout on one rank (see the module docstring for the JSON form)."""

    kind: str
    ranks: tuple[int, ...]
    index: int
    group: str = "tp"
    dim: int | None = None
    sizes: tuple[int, ...] | None = None
    blocks: tuple[int, ...] | None = None
    reduce: str = "sum"
    source: str = "annotation"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LayoutError(f"layout kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.ranks, tuple) or not self.ranks or not all(_is_int(r) and r >= 0 for r in self.ranks):
            raise LayoutError(f"layout ranks must be a non-empty list of ranks >= 0, got {self.ranks!r:.80}")
        if len(set(self.ranks)) != len(self.ranks):
            raise LayoutError(f"layout ranks {list(self.ranks)} name a rank twice")
        if not _is_int(self.index) or not 0 <= self.index < len(self.ranks):
            raise LayoutError(f"layout index {self.index!r} is not a position in ranks {list(self.ranks)}")
        if self.dim is not None and (not _is_int(self.dim) or self.dim < 0):
            raise LayoutError(f"layout dim must be an integer >= 0, got {self.dim!r}")
        if self.kind == "shard" and self.dim is None:
            raise LayoutError("a shard layout needs a dimension >= 0")
        if self.sizes is not None:
            if not all(_is_int(v) and v >= 0 for v in self.sizes):
                raise LayoutError(f"layout sizes must be integers >= 0, got {list(self.sizes)!r:.80}")
            if len(self.sizes) != len(self.ranks):
                raise LayoutError(f"layout sizes {list(self.sizes)} must give one size per rank of {list(self.ranks)}")
        if self.blocks is not None and (not self.blocks or not all(_is_int(v) and v > 0 for v in self.blocks)):
            raise LayoutError(f"layout blocks must be a non-empty list of sizes > 0, got {list(self.blocks)!r:.80}")
        if self.kind == "partial" and self.reduce not in _REDUCE:
            raise LayoutError(f"partial layouts reduce with one of {_REDUCE}, got {self.reduce!r}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "group": self.group, "ranks": list(self.ranks),
                               "index": self.index}
        if self.kind == "shard":
            out["dim"] = self.dim
            if self.sizes is not None:
                out["sizes"] = list(self.sizes)
            if self.blocks is not None:
                out["blocks"] = list(self.blocks)
        if self.kind == "partial":
            out["reduce"] = self.reduce
        out["source"] = self.source
        return out

    @classmethod
    def from_json(cls, doc: Any) -> Layout:
        """Parse a node's ``"layout"``; raises :class:`LayoutError` naming what is wrong."""
        if not isinstance(doc, Mapping):
            raise LayoutError(f"a layout must be a JSON object, got {doc!r:.80}")

        def ints(name: str) -> tuple[int, ...] | None:
            value = doc.get(name)
            if value is None:
                return None
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise LayoutError(f"layout {name!r} must be a list of integers, got {value!r:.80}")
            return tuple(value)

        ranks, index, dim = ints("ranks"), doc.get("index"), doc.get("dim")
        if ranks is None or not _is_int(index) or dim is not None and not _is_int(dim):
            raise LayoutError(f"layout needs integer 'ranks' and 'index' (and 'dim' for a shard): {dict(doc)!r:.120}")
        return cls(kind=str(doc.get("kind")), ranks=ranks, index=index, group=str(doc.get("group", "tp")), dim=dim,
                   sizes=ints("sizes"), blocks=ints("blocks"), reduce=str(doc.get("reduce", "sum")),
                   source=str(doc.get("source", "annotation")))


# -- process groups by name ------------------------------------------------------------------
_groups: dict[str, tuple[int, ...]] = {}


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def set_group(name: str, ranks: Sequence[int] | Any) -> None:
    """Name a process group for dims strings: ``set_group("tp", [0, 1])`` or ``set_group("tp", pg)``.

    A name never set stands for every rank of the world (``torch.distributed``'s default group).
    """
    if not isinstance(ranks, Sequence):
        ranks = torch.distributed.get_process_group_ranks(ranks)
    _groups[name] = tuple(int(r) for r in ranks)


def group_ranks(name: str | None, world_size: int) -> tuple[int, ...]:
    """The global ranks of the group called ``name`` (every rank when it was never set)."""
    if name is not None and name in _groups:
        return _groups[name]
    return tuple(range(world_size))


# -- dims strings ----------------------------------------------------------------------------
_DIM = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*|\*)(?:\[(?P<group>[A-Za-z_][A-Za-z0-9_]*)"
                  r"(?::(?P<how>partial|avg|blocks=[0-9,]+))?\])?$")


@dataclass(frozen=True)
class DimsSpec:
    """A parsed dims string: dimension names, where ``...`` stands, and how the tensor is split.

    Grammar (whitespace-separated dimensions)::

        dim      := name | name "[" group "]" | name "[" group ":partial" "]"
                  | name "[" group ":avg" "]" | name "[" group ":blocks=" N | a,b,... "]"
        name     := identifier | "*"
        "..."    := any number of dimensions (at most once)

    ``t h[tp]``: 2-D, sharded along ``h`` over group ``tp``. ``t h[tp:partial]``: partial sums
    over ``tp`` awaiting a reduction (which dimension carries the mark does not matter).
    ``t h[tp:blocks=3]``: ``h`` is 3 equal blocks each sharded over ``tp`` (fused gate/up or QKV
    projections); ``blocks=64,32,32`` gives this rank's block sizes. ``t h``: replicated on every
    rank of the world.
    """

    names: tuple[str, ...]
    ellipsis: int | None = None  # position of "..." among the names
    kind: str = "replicate"
    dim: int | None = None  # index into names of the sharded (or marked) dimension
    group: str | None = None
    blocks: tuple[int, ...] | int | None = None
    reduce: str = "sum"
    text: str = field(default="", compare=False)

    def bind(self, shape: Sequence[int], *, rank: int, world_size: int, source: str = "annotation") -> Layout:
        """The layout of a tensor of ``shape`` on ``rank`` under this spec.

        Raises:
            LayoutError: the number of dimensions does not fit, the rank is not in the group, or
                the blocks do not add up to the dimension.
        """
        ndim = len(shape)
        fixed = len(self.names)
        if self.ellipsis is None and ndim != fixed or self.ellipsis is not None and ndim < fixed:
            raise LayoutError(f"dims {self.text!r} name {fixed} dimension(s), the tensor has {ndim} {list(shape)}")
        ranks = group_ranks(self.group, world_size)
        if rank not in ranks:
            raise LayoutError(f"dims {self.text!r}: rank {rank} is not in group {self.group!r} {list(ranks)}")
        dim = None
        if self.kind == "shard":
            assert self.dim is not None
            dim = self.dim if self.ellipsis is None or self.dim < self.ellipsis else self.dim + ndim - fixed
        blocks: tuple[int, ...] | None = None
        if isinstance(self.blocks, int):
            assert dim is not None
            if shape[dim] % self.blocks:
                raise LayoutError(f"dims {self.text!r}: size {shape[dim]} does not split into {self.blocks} blocks")
            blocks = (shape[dim] // self.blocks,) * self.blocks
        elif self.blocks is not None:
            assert dim is not None
            if sum(self.blocks) != shape[dim]:
                raise LayoutError(f"dims {self.text!r}: blocks {list(self.blocks)} do not add up to {shape[dim]}")
            blocks = self.blocks
        return Layout(self.kind, ranks, ranks.index(rank), self.group or "world", dim=dim, blocks=blocks,
                      reduce=self.reduce, source=source)


def parse_dims(text: str) -> DimsSpec:
    """Parse a dims string (grammar: :class:`DimsSpec`).

    Raises:
        LayoutError: a malformed dimension (named, with what is allowed), two ``...`` or two
            marked dimensions.

    Example:
        >>> s = parse_dims("t h[tp:partial]")
        >>> s.kind, s.group
        ('partial', 'tp')
    """
    if not isinstance(text, str) or not text.split():
        raise LayoutError(f"a dims string names the dimensions, e.g. 't h[tp]'; got {text!r}")
    names: list[str] = []
    ellipsis = dim = None
    kind, group, reduce = "replicate", None, "sum"
    blocks: tuple[int, ...] | int | None = None
    for token in text.split():
        if token == "...":
            if ellipsis is not None:
                raise LayoutError(f"dims {text!r}: '...' may appear once")
            ellipsis = len(names)
            continue
        m = _DIM.match(token)
        if m is None:
            raise LayoutError(f"dims {text!r}: bad dimension {token!r}; write name, name[group], "
                              "name[group:partial] or name[group:blocks=N]")
        if m.group("group"):
            if dim is not None:
                raise LayoutError(f"dims {text!r}: only one dimension may name a group")
            dim, group = len(names), m.group("group")
            how = m.group("how") or ""
            if how in ("partial", "avg"):
                kind, reduce = "partial", "sum" if how == "partial" else "avg"
            else:
                kind = "shard"
                if how.startswith("blocks="):
                    sizes = [int(v) for v in how.removeprefix("blocks=").split(",") if v]
                    if not sizes or any(v <= 0 for v in sizes):
                        raise LayoutError(f"dims {text!r}: blocks= needs a count or sizes > 0")
                    blocks = sizes[0] if len(sizes) == 1 else tuple(sizes)
        names.append(m.group("name"))
    return DimsSpec(tuple(names), ellipsis, kind, dim, group, blocks, reduce, text)


# -- DTensor -----------------------------------------------------------------------------------
def _dtensor_class() -> Any:
    # Only a program that imported torch.distributed.tensor can hold a DTensor: never import it here.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def _mesh_ranks(mesh: Any) -> tuple[int, ...]:
    return tuple(int(r) for r in mesh.mesh.flatten().tolist())


def _is_plain_shard(placement: Any) -> bool:
    """Whether a placement is exactly ``Shard``: a subclass (``_StridedShard``, FSDP2 + TP's
    interleaved shards) splits the dimension otherwise than a concatenation in rank order."""
    module = sys.modules.get("torch.distributed.tensor.placement_types")
    cls = getattr(module, "Shard", None) if module is not None else None
    return cls is not None and type(placement) is cls


def _reduce_of(placement: Any) -> str | None:
    """A ``Partial`` placement's reduction as a layout's ``reduce`` (``sum``, ``avg``); None for
    any other (``max``, ``min``, ...), which the logical view cannot assemble."""
    op = str(getattr(placement, "reduce_op", "sum")).lower().rsplit(".", 1)[-1]  # "sum", or "RedOpType.SUM"
    return op if op in _REDUCE else None


def _placement_layout(placement: Any, mesh: Any, shape: Sequence[int], source: str) -> dict[str, Any]:
    """The layout (JSON) a 1-D mesh placement gives a tensor of logical ``shape``:
    ``{"kind": "unsupported", ...}`` for a placement the logical view cannot assemble."""
    ranks = _mesh_ranks(mesh)
    rank, _world_size = _world()
    index = ranks.index(rank) if rank in ranks else 0
    group = (mesh.mesh_dim_names or ("mesh",))[0]

    def unsupported(reason: str) -> dict[str, Any]:
        return {"kind": "unsupported", "reason": reason, "placements": str((placement,)), "source": source}

    if placement.is_shard():
        if not _is_plain_shard(placement):
            return unsupported(f"{type(placement).__name__} placement (only Shard is assembled)")
        dim = placement.dim % len(shape) if shape else 0
        return Layout("shard", ranks, index, group, dim=dim, sizes=tuple(chunk_sizes(shape[dim], len(ranks))),
                      source=source).to_json()
    if placement.is_partial():
        reduce = _reduce_of(placement)
        if reduce is None:
            return unsupported(f"Partial({getattr(placement, 'reduce_op', '?')!s}) placement "
                               f"(only {' and '.join(_REDUCE)} are assembled)")
        return Layout("partial", ranks, index, group, reduce=reduce, source=source).to_json()
    if placement.is_replicate():
        return Layout("replicate", ranks, index, group, source=source).to_json()
    return unsupported(f"{type(placement).__name__} placement")


def _async_collective(t: Any) -> torch.Tensor | None:
    """The result an ``AsyncCollectiveTensor`` (what a DTensor's ``to_local()`` may return after
    a collective) stands for, waited for; None for anything else."""
    module = sys.modules.get("torch.distributed._functional_collectives")
    cls = getattr(module, "AsyncCollectiveTensor", None) if module is not None else None
    if cls is None or not isinstance(t, cls):
        return None
    return t.trigger_wait()


def split_dtensor(t: Any) -> tuple[torch.Tensor, dict[str, Any] | None] | None:
    """A DTensor's local shard and its layout (JSON); None if ``t`` is no distributed tensor.

    A DTensor over a mesh of more than one dimension, or with a placement other than ``Shard``
    (exactly: not a subclass such as ``_StridedShard``), ``Partial`` with a ``sum`` or ``avg``
    reduction, or ``Replicate``, gets ``{"kind": "unsupported", ...}`` with the reason: it is
    stored, but not assembled into a logical tensor. An ``AsyncCollectiveTensor`` (the
    local output of ``parallelize_module``'s row-wise styles) gives the plain tensor it holds,
    waited for, and no layout.
    """
    if type(t) is torch.Tensor:
        return None
    waited = _async_collective(t)
    if waited is not None:
        return waited, None
    cls = _dtensor_class()
    if cls is None or not isinstance(t, cls):
        return None
    local = t.to_local()
    mesh = t.device_mesh
    if mesh.ndim != 1:
        return local, {"kind": "unsupported", "reason": f"DTensor on a {mesh.ndim}-D mesh", "placements":
                       str(tuple(t.placements)), "source": "dtensor"}
    return local, _placement_layout(t.placements[0], mesh, list(t.shape), "dtensor")


# -- per-module layouts ----------------------------------------------------------------------
Rule = DimsSpec | Layout | str


@dataclass(frozen=True)
class _LastDim:
    """A module whose tensors are sharded along their last dimension when they have the shard's
    size (``sizes[index]`` of ``full``), replicated when they have the full size: what a module
    with DTensor parameters computes once ``parallelize_module``'s hooks made its outputs local."""

    full: int
    ranks: tuple[int, ...]
    index: int
    group: str

    def layout(self, shape: Sequence[int]) -> Layout | None:
        if not shape:
            return None
        sizes = tuple(chunk_sizes(self.full, len(self.ranks)))
        last = len(shape) - 1
        if shape[last] == self.full and self.full != sizes[self.index]:
            return Layout("replicate", self.ranks, self.index, self.group, source="module")
        if shape[last] == sizes[self.index]:
            return Layout("shard", self.ranks, self.index, self.group, dim=last, sizes=sizes, source="module")
        return None


@dataclass(frozen=True)
class ModuleLayout:
    """How a module's captured tensors are laid out: rules per side, per path.

    ``inputs`` / ``outputs`` map a path (``"0"``, ``"0/1"``, a keyword name; ``"*"`` for every
    tensor of that side without a rule of its own) to a dims string, a :class:`DimsSpec` or a
    :class:`Layout`. Post-forward inputs follow ``inputs``.
    """

    inputs: Mapping[str, Any] = field(default_factory=dict)
    outputs: Mapping[str, Any] = field(default_factory=dict)

    def _rule(self, kind: str, path: tuple[str, ...]) -> Any:
        rules = self.outputs if kind == "outputs" else self.inputs
        key = "/".join(path)
        return rules.get(key, rules.get("*"))

    def apply(self, kind: str, nodes: Iterable[tuple[tuple[str, ...], dict[str, Any]]], rank: int,
              world_size: int) -> None:
        """Add a ``"layout"`` to each tensor node that a rule covers and has none.

        Args:
            kind: the side of the call (``inputs``, ``outputs``, ``post_fwd_inputs``).
            nodes: ``(path, node)`` of the record's tensor nodes
                (:func:`~ilstore.records.iter_tensor_nodes` of its structure).
            rank, world_size: this process's place in the world.

        A rule that does not fit the tensor is recorded as ``{"kind": "invalid", "reason": ...}``
        (the capture goes on; the logical view reports it).
        """
        for path, node in nodes:
            if LAYOUT_KEY in node:
                continue
            rule = self._rule(kind, path)
            if rule is None:
                continue
            shape = node.get("shape")
            try:
                layout = _resolve(rule, shape if isinstance(shape, list) else [], rank, world_size)
            except LayoutError as exc:
                node[LAYOUT_KEY] = {"kind": "invalid", "reason": str(exc)}
                continue
            if layout is not None:
                node[LAYOUT_KEY] = layout.to_json()


def _resolve(rule: Any, shape: list[int], rank: int, world_size: int) -> Layout | None:
    if isinstance(rule, str):
        rule = parse_dims(rule)
    if isinstance(rule, DimsSpec):
        return rule.bind(shape, rank=rank, world_size=world_size)
    if isinstance(rule, Layout):
        return rule
    if isinstance(rule, _LastDim):
        return rule.layout(shape)
    raise LayoutError(f"a layout rule is a dims string, a DimsSpec or a Layout, got {type(rule).__name__}")


def _rules(side: Any) -> dict[str, Any]:
    if side is None:
        return {}
    if isinstance(side, (str, DimsSpec, Layout)):
        side = {"*": side}
    out = {}
    for key, rule in dict(side).items():
        out[str(key)] = parse_dims(rule) if isinstance(rule, str) else rule  # bad strings fail here, early
    return out


def annotate(module: nn.Module, *, inputs: Any = None, outputs: Any = None,
             groups: Mapping[str, Any] | None = None) -> nn.Module:
    """Declare how a module's inputs and outputs are split over ranks; returns the module.

    Args:
        module: the module (annotate it before attaching the capture).
        inputs: a dims string for every input tensor, or a dict from path (``"0"``, a keyword
            name, ``"0/1"``; ``"*"`` for the rest) to a dims string.
        outputs: the same for the outputs (``"0"`` is the first element of a tuple output;
            a single-tensor output has the path ``""`` or is covered by ``"*"``).
        groups: names used in the dims strings → global ranks or a process group
            (:func:`set_group`); a name never set means every rank.

    Raises:
        LayoutError: a malformed dims string.

    Example:
        >>> act = annotate(torch.nn.SiLU(), inputs="... i[tp]", outputs="... i[tp]")
        >>> module_layout(act).outputs["*"].kind
        'shard'
    """
    for name, ranks in (groups or {}).items():
        set_group(name, ranks)
    setattr(module, _ATTR, ModuleLayout(_rules(inputs), _rules(outputs)))
    return module


def _dtensor_param_layout(module: nn.Module) -> ModuleLayout | None:
    """What a module's DTensor weight says about its plain (local) inputs and outputs."""
    cls = _dtensor_class()
    if cls is None:  # no DTensor in this program (asked first: the lookup below raises inside nn.Module)
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, cls) or weight.device_mesh.ndim != 1 or weight.ndim != 2:
        return None
    placement = weight.placements[0]
    if not _is_plain_shard(placement):
        return None
    ranks = _mesh_ranks(weight.device_mesh)
    rank, _ = _world()
    index = ranks.index(rank) if rank in ranks else 0
    group = (weight.device_mesh.mesh_dim_names or ("mesh",))[0]
    wdim = placement.dim % 2
    # nn.Linear's weight is [out, in]; nn.Embedding's is [num, dim]: the feature dimension that
    # reaches the output is 0 for a Linear and 1 for an Embedding.
    out_dim = 1 if isinstance(module, nn.Embedding) else 0
    out_full = int(weight.shape[out_dim])
    if wdim == out_dim:  # column-wise: outputs sharded along their last dimension
        return ModuleLayout({}, {"*": _LastDim(out_full, ranks, index, group)})
    rule_out = _LastDim(out_full, ranks, index, group)  # row-wise: outputs full (after the reduction)
    if isinstance(module, nn.Embedding):
        return ModuleLayout({}, {"*": rule_out})
    return ModuleLayout({"*": _LastDim(int(weight.shape[1]), ranks, index, group)}, {"*": rule_out})


def module_layout(module: nn.Module) -> ModuleLayout | None:
    """The layout rules of a module: its annotation, else what its DTensor parameters imply."""
    # annotate() sets it on the instance: looked up there (and on the class) without nn.Module's
    # __getattr__, which raises and catches an AttributeError for every module without one. A
    # module class with its own __getattr__ (a wrapper that forwards lookups to the module it
    # wraps, e.g. torch's checkpoint_wrapper) is asked the usual way: it may answer the inner one's.
    if type(module).__getattr__ is nn.Module.__getattr__:
        annotated = module.__dict__.get(_ATTR)
        if annotated is None:
            annotated = getattr(type(module), _ATTR, None)
    else:
        annotated = getattr(module, _ATTR, None)
    if isinstance(annotated, ModuleLayout):
        return annotated
    return _dtensor_param_layout(module)
