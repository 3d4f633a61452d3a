"""Tensor alignment inside a module call: the map's path rules, and size-1 squeezing.

:func:`align_call` turns one run's tensors of a call (``(kind, path) -> Side``) into the
tensors the comparison sees: a move renames a path, a select keeps one index along a
dimension, a sum stands for several tensors added together. The plan still holds metadata
only; :func:`materialize` applies the same transform to the loaded tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ilstore.keys import TensorKey

from .errors import NameMapError
from .mapping import PathRule, TensorPath, display_tensor_path

__all__ = ["Side", "RuleMismatch", "align_call", "materialize", "squeezed_shape", "squeezable"]


class RuleMismatch(Exception):
    """The loaded tensors do not fit a path rule (a sum of different shapes, a select out of range).

    A data problem, not a bad map: the comparer reports the pair as ``not_compared``.
    """


@dataclass(frozen=True)
class Side:
    """One side of a pair: where its tensor comes from in that run, and its metadata.

    Attributes:
        key: the tensor in the run's own naming (the first summand for a sum).
        node: its metadata (shape, dtype, stored, stats...); for a select or a sum, derived.
        parts: every summand, for a tensor made by a sum rule; else empty.
        select: ``(dim, index)`` taken from the loaded tensor, or None.
        rule: what a path rule did, for the report; None when no rule applied.
        problem: why the rule cannot be applied to this data (the pair is not compared).
    """

    key: TensorKey
    node: Mapping[str, Any]
    parts: tuple[TensorKey, ...] = ()
    select: tuple[int, int] | None = None
    rule: str | None = None
    problem: str | None = None


def squeezed_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape without its size-1 dimensions."""
    return tuple(int(d) for d in shape if d != 1)


def squeezable(shape1: Sequence[int] | None, shape2: Sequence[int] | None) -> bool:
    """Whether two different shapes differ only by size-1 dimensions (``[T, H]`` vs ``[1, T, H]``).

    Their elements then come in the same order, so the tensors compare element for element.

    Example:
        >>> squeezable([5, 128], [1, 5, 128]), squeezable([3, 1], [1, 3]), squeezable([2, 3], [3, 2])
        (True, True, False)
    """
    if shape1 is None or shape2 is None or tuple(shape1) == tuple(shape2):
        return False
    return squeezed_shape(shape1) == squeezed_shape(shape2)


def _shape(node: Mapping[str, Any]) -> list[int] | None:
    shape = node.get("shape")
    return [int(d) for d in shape] if isinstance(shape, list) else None


def _stored(node: Mapping[str, Any]) -> bool:
    return node.get("stored", True) is not False


def _selected_node(node: Mapping[str, Any], dim: int, index: int) -> tuple[dict[str, Any], str | None]:
    """Metadata of ``tensor.select(dim, index)``; the problem if it cannot be taken."""
    out: dict[str, Any] = {k: node[k] for k in ("type", "dtype", "device") if k in node}
    shape = _shape(node)
    problem = None
    if shape is not None:
        if not -len(shape) <= dim < len(shape):
            problem = f"select: dim {dim} is out of range for shape {shape}"
        elif not -shape[dim] <= index < shape[dim]:
            problem = f"select: index {index} is out of range for dim {dim} of shape {shape}"
        else:
            shape = shape[:dim % len(shape)] + shape[dim % len(shape) + 1:]
            out.update(shape=shape, numel=math.prod(shape))
    if _stored(node):
        out["stored"] = True
    else:  # the statistics describe the whole tensor, not the slice
        out.update(stored=False, reason=f"{node.get('reason') or 'body not stored'}; a select rule needs the body")
    return out, problem


def _summed_node(nodes: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> tuple[dict[str, Any], str | None]:
    """Metadata of the sum of several tensors; the problem if they cannot be added."""
    out: dict[str, Any] = {k: nodes[0][k] for k in ("type", "device") if k in nodes[0]}
    shapes = [_shape(n) for n in nodes]
    problem = None
    if None not in shapes and any(s != shapes[0] for s in shapes):
        listed = ", ".join(f"{label} {s}" for label, s in zip(labels, shapes, strict=True))
        problem = f"sum: shapes differ ({listed})"
    elif shapes[0] is not None:
        out.update(shape=shapes[0], numel=math.prod(shapes[0]))
    dtype = _result_dtype([n.get("dtype") for n in nodes])
    if dtype is not None:
        out["dtype"] = dtype
    missing = [label for label, n in zip(labels, nodes, strict=True) if not _stored(n)]
    if missing:
        out.update(stored=False, reason=f"{', '.join(missing)} not stored; a sum rule needs every body")
    else:
        out["stored"] = True
    return out, problem


def _result_dtype(names: Sequence[Any]) -> str | None:
    dtypes = []
    for name in names:
        dtype = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
        if not isinstance(dtype, torch.dtype):
            return None
        dtypes.append(dtype)
    result = dtypes[0]
    for dtype in dtypes[1:]:
        result = torch.promote_types(result, dtype)
    return str(result)


def align_call(tensors: Mapping[TensorPath, Side], module: str, rules: Sequence[PathRule], where: str
               ) -> dict[TensorPath, Side]:
    """Apply path rules to one run's tensors of one module call.

    A rule applies when its module regex matches ``module`` and every tensor it takes is there
    and not taken by an earlier rule. The result keeps the tensors' order (a rule's result
    takes the place of its first source).

    Args:
        tensors: the call's tensors in that run, ``(kind, path) -> Side``, in capture order.
        module: the call's module name after the renames.
        rules: the path rules of this run, in priority order.
        where: the run and call, for messages (``dir1 step 0 model.layers.0``).

    Raises:
        NameMapError: two tensors of the call end up at the same path.
    """
    taken: dict[TensorPath, tuple[PathRule, TensorPath]] = {}
    for rule in rules:
        if not rule.module.search(module):
            continue
        if any(s not in tensors or s in taken for s in rule.sources):
            continue
        for source in rule.sources:
            taken[source] = (rule, rule.sources[0])
    out: dict[TensorPath, Side] = {}
    origin: dict[TensorPath, str] = {}
    for tp, side in tensors.items():
        if tp not in taken:
            target, made, what = tp, side, display_tensor_path(tp)
        else:
            rule, first = taken[tp]
            if tp != first:
                continue  # a later summand: the sum sits where the first one was
            target, made, what = rule.target, _apply(rule, tensors), rule.label
        if target in out:
            raise NameMapError(f"{where}: {what} and {origin[target]} both land on {display_tensor_path(target)}; "
                               "add a path rule that moves one of them, or change the rule's \"to\"")
        out[target] = made
        origin[target] = what
    return out


def _apply(rule: PathRule, tensors: Mapping[TensorPath, Side]) -> Side:
    sides = [tensors[s] for s in rule.sources]
    if rule.is_sum:
        node, problem = _summed_node([s.node for s in sides], [display_tensor_path(s) for s in rule.sources])
        return Side(sides[0].key, node, parts=tuple(s.key for s in sides), rule=rule.describe(), problem=problem)
    if rule.select is not None:
        node, problem = _selected_node(sides[0].node, *rule.select)
        return Side(sides[0].key, node, select=rule.select, rule=rule.describe(), problem=problem)
    return Side(sides[0].key, sides[0].node, rule=rule.describe())


def materialize(side: Side, load: Callable[[TensorKey], torch.Tensor]) -> torch.Tensor:
    """Load a side's tensor (``load`` reads one record) and apply its sum or select.

    Raises:
        RuleMismatch: the sum or select does not fit the loaded tensors (shapes).
    """
    if side.parts:
        tensors = [load(k) for k in side.parts]
        if any(t.shape != tensors[0].shape for t in tensors[1:]):
            raise RuleMismatch("sum: shapes differ (" + ", ".join(str(list(t.shape)) for t in tensors) + ")")
        total = tensors[0]
        for t in tensors[1:]:
            total = total + t  # in the tensors' own dtype, as the model adds them
        tensor = total
    else:
        tensor = load(side.key)
    if side.select is not None:
        dim, index = side.select
        try:
            tensor = tensor.select(dim, index)
        except (IndexError, RuntimeError) as exc:
            raise RuleMismatch(f"select dim {dim} index {index} of shape {list(tensor.shape)}: {exc}") from None
    return tensor
