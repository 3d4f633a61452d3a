"""The local error of one replayed call: its replay record read, its outputs checked and measured.

:func:`measure_call` gives one call's :class:`~.result.LocalError` (or None when its outputs hold
no tensor on either side); :func:`completion_order` and :func:`nested_calls` give, per step, the
execution order and the containers the entries carry. :mod:`.local` measures the calls of a
comparison with these, window by window, and turns the entries into the report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ilstore.errors import IlstoreError, StoreError
from ilstore.keys import CallKey, TensorKey
from ilstore.records import iter_tensor_nodes
from ilstore.store.base import StoreReader

from .metrics import TensorMetrics, compare_many
from .options import CompareOptions
from .result import LocalError, Unreadable

__all__ = ["REPLAY_KEY", "completion_order", "nested_calls", "measure_call", "unmeasured"]

#: The key of the per-call replay record on the top level of a call's ``outputs`` structure.
REPLAY_KEY = "replay"

_RANDOM_NOTE = "the call drew random numbers (RNG state changed across it): its local error includes them"


def completion_order(reader: StoreReader, step: int, offset: int) -> tuple[dict[CallKey, int], int]:
    """Position of each call of ``step`` in completion order (by position among its rank's calls, then
    rank), counted from ``offset``, and how many positions the step takes."""
    keys = []
    counters: dict[int, int] = {}
    for c in reader.call_ends(step):
        pos = counters.get(c.rank, 0)
        counters[c.rank] = pos + 1
        keys.append(((pos, c.rank), c))
    return {c: n for n, (_, c) in enumerate(sorted(keys, key=lambda item: item[0]), offset)}, len(keys)


def nested_calls(reader: StoreReader, step: int) -> set[CallKey]:
    """Calls another selected call started and ended inside (from the start and end orders)."""
    out: set[CallKey] = set()
    starts: dict[CallKey, int] = {}
    ends: dict[CallKey, int] = {}
    for n, c in enumerate(reader.calls(step)):
        starts[c] = n
    for n, c in enumerate(reader.call_ends(step)):
        ends[c] = n
    by_start = sorted(starts, key=lambda c: (c.rank, starts[c]))
    for i, c in enumerate(by_start):
        nxt = by_start[i + 1] if i + 1 < len(by_start) else None
        if nxt is not None and nxt.rank == c.rank and ends.get(nxt, -1) < ends.get(c, -1):
            out.add(c)  # the next call to start ended before this one did: it ran inside it
    return out


def _replay_record(structure: Any) -> dict[str, Any] | None:
    record = structure.get(REPLAY_KEY) if isinstance(structure, dict) else None
    return record if isinstance(record, dict) else None


def _join(*parts: str | None) -> str | None:
    text = "; ".join(p for p in parts if p)
    return text or None


def _note_of(record: Mapping[str, Any]) -> str | None:
    """The record's reason, with the inputs kept live and the randomness said when it does not say them."""
    reason = record.get("reason") if isinstance(record.get("reason"), str) else None
    kept = record.get("kept")
    if reason is None and isinstance(kept, Mapping) and kept:
        reason = "inputs kept live: " + ", ".join(f"{p or '(whole)'} ({why})" for p, why in kept.items())
    if record.get("random") is True and not (reason and "random" in reason):
        reason = _join(reason, _RANDOM_NOTE)
    return reason


def unmeasured(call: CallKey, reason: str, *, replayed: bool, container: bool, random: bool,
                order: int, unreadable: tuple[Unreadable, ...] = ()) -> LocalError:
    return LocalError(call, rel_l2=None, max_abs_diff=None, max_ulp=None, mismatched=None, replayed=replayed,
                      compared=False, reason=reason, container=container, random=random, order=order,
                      unreadable=unreadable)


def _load(reader: StoreReader, key: TensorKey, label: str) -> torch.Tensor:
    try:
        return reader.load(key)
    except IlstoreError:
        raise
    except Exception as exc:  # a backend (maybe a plug-in) that lets its library's error through
        raise StoreError(f"{reader.run_dir} ({label}): cannot load {key.display()}: "
                         f"{type(exc).__name__}: {exc}") from None


def _outputs_problem(nodes: Mapping[tuple[str, ...], dict[str, Any]],
                     ref_nodes: Mapping[tuple[str, ...], dict[str, Any]], source: str = "reference") -> str | None:
    """Why the replay's and the reference's (``source``: what the messages call it) outputs cannot be
    compared as they are, or None."""
    only = [p for p in nodes if p not in ref_nodes]
    missing = [p for p in ref_nodes if p not in nodes]
    if only or missing:
        def show(paths: list[tuple[str, ...]]) -> str:
            return ", ".join("outputs" + "".join(f"[{e}]" for e in p) for p in paths[:4])
        parts = ([f"only in the replay: {show(only)}"] if only else []) + (
            [f"only in the {source}: {show(missing)}"] if missing else [])
        return "outputs differ in structure (" + "; ".join(parts) + ")"
    for path, node in nodes.items():
        ref = ref_nodes[path]
        name = "outputs" + "".join(f"[{e}]" for e in path)
        if node.get("shape") is not None and ref.get("shape") is not None and list(node["shape"]) != list(ref["shape"]):
            return f"{name}: shape differs: replay {list(node['shape'])}, {source} {list(ref['shape'])}"
        for side, n in (("replay", node), (source, ref)):
            if n.get("stored", True) is False:
                return f"{name}: body not stored in the {side} ({n.get('reason') or 'not stored'})"
    return None


def _load_pair(replay: StoreReader, reference: StoreReader, key: TensorKey, labels: tuple[str, str],
               keep_going: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides' bodies; with ``keep_going`` an unreadable one (both tried) raises :class:`_Unreadables`."""
    out: list[torch.Tensor] = []
    lost: list[Unreadable] = []
    for reader, label in zip((replay, reference), labels, strict=True):
        try:
            out.append(_load(reader, key, label))
        except StoreError as exc:
            if not keep_going:
                raise
            lost.append(Unreadable.from_error(exc, run=label, run_dir=reader.run_dir, key=key, during="local_error"))
    if lost:
        raise _Unreadables(tuple(lost))
    return out[0], out[1]


def _measure(replay: StoreReader, reference: StoreReader, call: CallKey, paths: Sequence[tuple[str, ...]],
             options: CompareOptions, labels: tuple[str, str]
             ) -> tuple[TensorMetrics | None, str | None, str | None, tuple[Unreadable, ...]]:
    """The metrics of the call's outputs, all tensors together, and how their NaN/Inf differ
    (:func:`_nonfinite_text`; None: they do not); or a reason they cannot be compared (and the bodies
    that could not be read, if that is the reason).

    The metrics' ``rel_l2`` is taken over the elements finite on both sides, so it cannot say a
    replay that outputs NaN where the reference is finite: the NaN/Inf text does (then the local
    error is infinite).
    """
    source = _source(labels)

    def pairs() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for path in paths:
            a, b = _load_pair(replay, reference, call.tensor("outputs", path), labels, options.keep_going)
            if a.shape != b.shape:
                raise _ShapeDiffers(f"outputs{''.join(f'[{e}]' for e in path)}: shape differs: replay "
                                    f"{list(a.shape)}, {source} {list(b.shape)}")
            yield a, b

    try:
        metrics = compare_many(pairs(), rtol=options.rtol, atol=options.atol, exact=options.exact,
                               equal_nan=options.equal_nan)
        nonfinite = None
        if metrics.nan1 or metrics.nan2 or metrics.inf1 or metrics.inf2:  # rare: the bodies are read again
            nonfinite = _nonfinite_text(pairs(), source)
        return metrics, nonfinite, None, ()
    except _ShapeDiffers as exc:
        return None, None, str(exc), ()
    except _Unreadables as exc:
        return None, None, "; ".join(f"unreadable in {u.text()}" for u in exc.entries), exc.entries


def _source(labels: tuple[str, str]) -> str:
    """What the messages call the run replayed from: ``oracle`` for the oracle verdict, else ``reference``."""
    return "oracle" if labels[1] == "oracle" else "reference"


#: The replay record's words for the run replayed from (:mod:`ilstore.replay`), said of the oracle.
_REFERENCE_WORDS = re.compile(r"\bthe reference\b|(?<=, )reference(?= \[)")


def _oracle_words(text: str | None) -> str | None:
    """A replay record's reason, the run replayed from called the oracle (the record says "the reference").

    Example:
        >>> _oracle_words("step 2 is not in the reference (stepping mismatch)")
        'step 2 is not in the oracle (stepping mismatch)'
        >>> _oracle_words("inputs kept live: 0 (shape differs: live [5, 16], reference [4, 16])")
        'inputs kept live: 0 (shape differs: live [5, 16], oracle [4, 16])'
    """
    if text is None:
        return None
    return _REFERENCE_WORDS.sub(lambda m: m.group(0).replace("reference", "oracle"), text)


def _nonfinite_text(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], source: str) -> str | None:
    """How the replay's NaN/Inf differ from those of ``source`` (what the other run is called); None
    when both sides have the same NaN/Inf at the same places.

    Example:
        >>> nan, inf = float("nan"), float("inf")
        >>> _nonfinite_text([(torch.tensor([nan, inf, 1.0, nan]), torch.tensor([1.0, 2.0, 3.0, nan]))], "reference")
        'the replay has 1 NaN / 1 Inf where the reference is finite'
        >>> _nonfinite_text([(torch.tensor([nan, inf]), torch.tensor([nan, inf]))], "reference") is None
        True
    """
    nan = inf = lost = other = 0
    for a, b in pairs:
        if not (a.is_floating_point() or a.is_complex() or b.is_floating_point() or b.is_complex()):
            continue  # exact types hold no NaN/Inf
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        nan += int((nan_a & fb).sum())
        inf += int((torch.isinf(a) & fb).sum())
        lost += int((~fb & fa).sum())
        same = (nan_a & nan_b) | (torch.isinf(a) & torch.isinf(b) & (a == b))
        other += int((~fa & ~fb & ~same).sum())
    parts = ([f"the replay has {nan} NaN / {inf} Inf where the {source} is finite"] if nan or inf else []) + (
        [f"the {source} has {lost} NaN/Inf where the replay is finite"] if lost else []) + (
        [f"{other} element(s) NaN/Inf on both sides differ (NaN against Inf, or Inf of the other sign)"]
        if other else [])
    return "; ".join(parts) or None


class _ShapeDiffers(Exception):
    pass


class _Unreadables(Exception):
    def __init__(self, entries: tuple[Unreadable, ...]) -> None:
        super().__init__("; ".join(u.text() for u in entries))
        self.entries = entries


def _no_tensors(structure: Any) -> bool:
    return next(iter_tensor_nodes(structure), None) is None


def measure_call(replay: StoreReader, reference: StoreReader, call: CallKey, shown: CallKey, options: CompareOptions,
         step_in_ref: bool, in_ref: bool, nested: bool, order: int, labels: tuple[str, str]) -> LocalError | None:
    """The call's local error; None when there is nothing to measure (no tensor output on either side)."""
    structure = replay.structure(call, "outputs")
    if (structure is not None and _no_tensors(structure)
            and not (in_ref and not _no_tensors(reference.structure(call, "outputs")))):
        return None  # None, a number...: capture records no replay object, and there is no error to measure
    record = _replay_record(structure)
    container = bool(record.get("container")) if record is not None and "container" in record else nested
    random = bool(record.get("random")) if record is not None else False
    if structure is None:
        return unmeasured(shown, "outputs not captured (log_outputs is off): no local error", replayed=False,
                           container=container, random=random, order=order)
    if record is None:
        return unmeasured(shown, "no replay record on its outputs (not a replayed call)", replayed=False,
                           container=container, random=random, order=order)
    source = _source(labels)
    note = _note_of(record) if source == "reference" else _oracle_words(_note_of(record))
    if record.get("replayed") is not True:
        return unmeasured(shown, note or "not replayed (no reason recorded)", replayed=False, container=container,
                           random=random, order=order)
    problem = None
    nodes: dict[tuple[str, ...], dict[str, Any]] = {}
    if not step_in_ref:
        problem = f"step {call.step} is not in the {source}"
    elif not in_ref:
        problem = f"call not in the {source}"
    else:
        ref_structure = reference.structure(call, "outputs")
        if ref_structure is None:
            problem = f"the {source} recorded no outputs for this call"
        else:
            nodes = dict(iter_tensor_nodes(structure))
            problem = _outputs_problem(nodes, dict(iter_tensor_nodes(ref_structure)), source)
    metrics = nonfinite = None
    lost: tuple[Unreadable, ...] = ()
    if problem is None:
        metrics, nonfinite, problem, lost = _measure(replay, reference, call, list(nodes), options, labels)
    if problem is not None or metrics is None:
        return unmeasured(shown, _join(problem, note) or "not measured", replayed=True, container=container,
                           random=random, order=order, unreadable=lost)
    rel_l2 = metrics.rel_l2
    if nonfinite is not None:  # rel_l2 counts only the elements finite on both sides: it cannot say this
        rel_l2 = math.inf
        note = _join(f"local error infinite: {nonfinite}", note)
    elif rel_l2 is None and metrics.cosine is None:  # float64 sums of squares overflowed: not known
        why = "local error not measured: a float64 sum of squares overflows (values past ~1e154)"
        return unmeasured(shown, _join(why, note) or why, replayed=True, container=container, random=random,
                          order=order)
    elif rel_l2 is None:  # the reference's outputs are zero and the replay's are not
        rel_l2 = math.inf
        note = _join(f"relative L2 infinite: the {source}'s outputs are zero, the replay's are not", note)
    return LocalError(shown, rel_l2=rel_l2, max_abs_diff=metrics.max_abs_diff, max_ulp=metrics.max_ulp,
                      mismatched=metrics.mismatched, replayed=True, compared=True, reason=note, container=container,
                      random=random, order=order)
