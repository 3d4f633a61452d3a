"""Token-aligned views of two runs: the comparer's input with ``--align-tokens``.

:func:`align_runs` reads both runs' compositions (:func:`read_composition`), aligns their
tokens (:func:`.tokens.align`), and wraps each run in a :class:`TokenView`: a
:class:`~ilstore.store.base.StoreReader` whose steps are the aligned steps — one per request
per dir1 step, holding that request's aligned tokens — so the rest of the comparer (pairing,
the name map, metrics, reports) runs unchanged. In a view, each step holds the module calls of
its source step (dir2: the step its tokens came from) and each tensor is cut to the step's
tokens:

* a tensor with a token dimension (packed ``[T, ...]``; batched ``[B, S, ...]``, or
  ``[1, S, ...]`` shared by every row) becomes ``[n, ...]`` (packed) or ``[1, n, ...]``
  (batched): the aligned tokens, in dir1's order — a single-prompt step, which is what the
  shipped vLLM-to-HF maps align;
* a tensor with one row per request (packed ``[R, ...]``: vLLM's logits) or per batch row at the
  last position (batched ``[B, 1, ...]`` with ``S > 1``: Hugging Face's ``logits_to_keep=1``)
  becomes ``[1, ...]`` / ``[1, 1, ...]`` when that row belongs to the step's last aligned token,
  and is left out (a value saying why) otherwise;
* any other tensor is the source step's, whole.

Gathering loads the source tensor and picks rows: memory stays one source tensor per side.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ilstore.integrations.vllm_batch import BATCH_MODULE, check_composition
from ilstore.keys import CallKey, TensorKey
from ilstore.records import iter_tensor_nodes
from ilstore.store.base import StoreReader

from .errors import CompareError, OptionError
from .options import CompareOptions
from .tokens import (
    PACKED,
    AlignedStep,
    RunComposition,
    Slot,
    StepLayout,
    TokenAlignment,
    align,
    batched_steps,
    continues,
    packed_step,
)

__all__ = ["TokenAlignmentError", "TokenView", "WithoutBatch", "read_composition", "align_runs"]

_GATHER = "token_gather"  # the view's locator key: where a node's rows come from
_INTS = ("torch.int64", "torch.int32", "torch.int16", "torch.int8", "torch.uint8")
_POSITIONS = (("position_ids",), ("positions",))  # the keywords Hugging Face / vLLM feed positions as


class TokenAlignmentError(CompareError):
    """A run's token composition cannot be read (the message names the run, step and what is missing)."""


# -- compositions ----------------------------------------------------------------------------
def _plain(node: Any) -> Any:
    """A captured plain value back from its structure node (lists of JSON values)."""
    if isinstance(node, dict) and node.get("type") in ("list", "tuple") and isinstance(node.get("items"), list):
        return [_plain(i) for i in node["items"]]
    return node


def _record_step(reader: StoreReader, call: CallKey, label: str) -> StepLayout:
    structure = reader.structure(call, "inputs")
    kwargs = structure.get("kwargs") if isinstance(structure, dict) else None
    values = {k: _plain(v) for k, v in kwargs.items()} if isinstance(kwargs, dict) else None
    problems = check_composition(values)
    if problems:
        raise TokenAlignmentError(f"{label} ({reader.run_dir}): step {call.step}: the {BATCH_MODULE} record is "
                                  f"unusable: {'; '.join(problems)}")
    assert values is not None
    return packed_step(call.step, values["request_ids"], values["query_start_loc"], values["positions"],
                       values["input_ids"])


def _find(reader: StoreReader, step: int, want: Any) -> tuple[TensorKey, dict[str, Any]] | None:
    for call in reader.calls(step):
        for key, node in reader.tensor_nodes(call, "inputs"):
            if want(key, node):
                return key, node
    return None


def _load_ints(reader: StoreReader, key: TensorKey, node: dict[str, Any], label: str) -> list[Any]:
    if node.get("stored") is False:
        raise TokenAlignmentError(f"{label} ({reader.run_dir}): {key.display()} holds the token ids or mask but its "
                                  "body was not stored; token alignment needs it (capture it in full)")
    return reader.load(key).to(torch.int64).tolist()


def _is_ids(key: TensorKey, node: dict[str, Any]) -> bool:
    shape = node.get("shape")
    return (key.path in (("input_ids",), ("0",)) and node.get("dtype") in _INTS and isinstance(shape, list)
            and len(shape) in (1, 2))


def _is_positions(key: TensorKey, node: dict[str, Any], shape: list[int]) -> bool:
    """The positions the run fed with the ids of ``shape``: ``[B, S]`` (or ``[1, S]``) / ``[T]``."""
    got = node.get("shape")
    return (key.path in _POSITIONS and node.get("dtype") in _INTS and isinstance(got, list)
            and (got == shape or got == [1, shape[-1]]))


def _recorded_positions(reader: StoreReader, step: int, ids_shape: list[int], label: str
                        ) -> tuple[list[list[int]] | None, str]:
    """The step's recorded positions as rows (None: not recorded, or not stored) and a note on
    where they came from (or that the caller guesses them).

    Raises:
        TokenAlignmentError: a row's positions are not consecutive (several sequences in one row,
            or padding without an attention mask).
    """
    found = _find(reader, step, functools.partial(_is_positions, shape=ids_shape))
    if found is None or found[1].get("stored") is False:
        why = ("not recorded (no integer position_ids or positions keyword)" if found is None
               else f"at {found[0].display()} not stored")
        return None, (f"positions {why}, so guessed: a step of one token per row is read as a decode step of the "
                      "row's last request (a new one-token prompt would be misread; pass the model position_ids "
                      "by keyword)")
    key, node = found
    rows = _load_ints(reader, key, node, label)
    rows = rows if len(node["shape"]) == 2 else [rows]
    for b, row in enumerate(rows):
        if any(q != p + 1 for p, q in zip(row, row[1:], strict=False)):
            shown = row if len(row) <= 12 else [*row[:12], "..."]
            raise TokenAlignmentError(
                f"{label} ({reader.run_dir}): step {step}: the positions at {key.display()} (row {b}: {shown}) are "
                "not consecutive: the row holds several sequences, or padding without an attention mask; capture "
                f"the {BATCH_MODULE} record (vLLM) or the model's attention_mask to align tokens")
    return rows, f"positions from {key.module} {key.kind}[{key.path[0]}]"


def _is_mask(key: TensorKey, node: dict[str, Any], rows: int, width: int) -> bool:
    shape = node.get("shape")
    return (key.path[-1:] == ("attention_mask",) and node.get("dtype") in (*_INTS, "torch.bool")
            and isinstance(shape, list) and len(shape) == 2 and shape[0] == rows and shape[1] >= width)


def read_composition(reader: StoreReader, label: str) -> RunComposition:
    """Every step's composition of a run (see :mod:`.tokens` for the sources).

    Without a record or a mask, a step's positions are the ones it recorded (``position_ids`` /
    ``positions``); only without those are they guessed, and the composition's ``source`` says so.

    Raises:
        TokenAlignmentError: a step has neither a usable ``ilstore.batch`` record nor integer
            token ids, or their bodies were not stored, or its recorded positions are not
            consecutive within a row.
    """
    layouts: list[StepLayout] = []
    batched: list[tuple[int, list[list[int]], list[list[int]] | None, list[list[int]] | None]] = []
    sources: dict[str, None] = {}
    single: tuple[str, int] | None = None  # without a record: (request, next position) of the 1-D run
    for step in reader.steps():
        record = next((c for c in reader.calls(step) if c.module == BATCH_MODULE), None)
        if record is not None:
            layouts.append(_record_step(reader, record, label))
            sources[f"{BATCH_MODULE} records"] = None
            continue
        found = _find(reader, step, _is_ids)
        if found is None:
            raise TokenAlignmentError(f"{label} ({reader.run_dir}): step {step} has no {BATCH_MODULE} record and no "
                                      "integer token ids (input_ids or inputs[0]) in any captured call; capture the "
                                      "embedding (or the model's input_ids) to align tokens")
        ids_key, ids_node = found
        ids = _load_ints(reader, ids_key, ids_node, label)
        where = f"{ids_key.module} {ids_key.kind}[{ids_key.path[0]}]"
        if len(ids_node["shape"]) == 1:  # packed without a record: one sequence, as a 1-row batch is read
            n = len(ids)
            if n == 0:  # nothing fed: no request
                layouts.append(packed_step(step, [], [0], [], []))
                continue
            recorded, note = _recorded_positions(reader, step, ids_node["shape"], label)
            if recorded is not None:
                positions = recorded[0]
                new = not continues(single[1] if single is not None else None, positions[0])
            else:  # guessed: a one-token step continues the sequence (a decode step)
                new = n != 1 or single is None
                start = 0 if new or single is None else single[1]
                positions = list(range(start, start + n))
            request = f"s{step}" if new or single is None else single[0]
            layouts.append(packed_step(step, [request], [0, n], positions, ids))
            single = (request, positions[-1] + 1)
            sources[f"token ids from {where}, one request (no {BATCH_MODULE} record), {note}"] = None
            continue
        rows, width = ids_node["shape"]
        mask_found = _find(reader, step, functools.partial(_is_mask, rows=rows, width=width))
        mask = _load_ints(reader, *mask_found, label) if mask_found is not None else None
        recorded, note = (None, "") if mask_found else _recorded_positions(reader, step, ids_node["shape"], label)
        how = f" and padding from {mask_found[0].module} inputs[attention_mask]" if mask_found else f", {note}"
        sources[f"token ids from {where}{how}"] = None
        batched.append((step, ids, mask, recorded))
    layouts += batched_steps(batched)
    layouts.sort(key=lambda s: s.step)
    return RunComposition(tuple(layouts), "; ".join(sources) or "no steps")


# -- the views --------------------------------------------------------------------------------
def _groups(slots: Sequence[Slot]) -> list[tuple[int, list[Slot]]]:
    """Consecutive runs of slots of the same step."""
    out: list[tuple[int, list[Slot]]] = []
    for s in slots:
        if out and out[-1][0] == s.step:
            out[-1][1].append(s)
        else:
            out.append((s.step, [s]))
    return out


def _classify(shape: list[int], layout: StepLayout) -> str:
    """``token``, ``request`` (one row per request / per batch row's last position) or ``other``."""
    if layout.layout == PACKED:
        if shape[:1] == [layout.num_tokens]:
            return "token"
        return "request" if shape[:1] == [layout.num_rows] else "other"
    if len(shape) >= 2 and shape[1] == layout.num_tokens and shape[0] in (layout.num_rows, 1):
        return "token"
    if len(shape) >= 2 and shape[0] == layout.num_rows and shape[1] == 1 and layout.num_tokens > 1:
        return "request"
    return "other"


def _dropped(reason: str) -> dict[str, Any]:
    return {"type": "value", "class": "ilstore_compare.tokens", "repr": reason}


class _View(StoreReader):
    """A reader over another run's reader (``base``): nothing is read from a directory."""

    def __init__(self, base: StoreReader) -> None:
        # not StoreReader.__init__: everything comes from ``base``
        self.run_dir = base.run_dir
        self.manifest = base.manifest
        self.name = base.name
        self._structures = OrderedDict()
        self._journal = None
        self._base = base

    @classmethod
    def can_open(cls, run_dir: Path) -> bool:
        return False  # a view, never a run on disk

    @property
    def status(self) -> str:
        return self._base.status

    @property
    def capture_warnings(self) -> list[str]:
        return self._base.capture_warnings  # (a multi-rank base's manifest is the ranks' own, without them)

    def incomplete_steps(self) -> list[int]:
        return self._base.incomplete_steps()

    def close(self) -> None:
        self._structures.clear()  # the run itself is closed by whoever opened it


class TokenView(_View):
    """One run seen through a token alignment: its steps are the alignment's steps.

    Args:
        base: the run.
        alignment: the two runs' alignment.
        side: 1 (dir1) or 2 (dir2).
        composition: this run's composition.
    """

    locator_keys = frozenset({_GATHER})

    def __init__(self, base: StoreReader, alignment: TokenAlignment, side: int, composition: RunComposition) -> None:
        super().__init__(base)
        self._side = side
        self._steps = {s.step: s for s in alignment.steps}
        self._layouts = {s.step: s for s in composition.steps}

    def steps(self) -> list[int]:
        return sorted(self._steps)

    def step_totals(self, step: int) -> dict[str, int] | None:
        return None

    def all_step_totals(self) -> dict[int, dict[str, int] | None] | None:
        return None

    def stats_table(self) -> Any:
        return None  # the run's statistics table describes its own tensors, not the view's cuts

    def _source(self, step: int) -> tuple[AlignedStep, int]:
        s = self._steps[step]
        return s, s.step1 if self._side == 1 else s.steps2[0]

    def _rekey(self, calls: list[CallKey], step: int) -> list[CallKey]:
        return [CallKey(c.rank, step, c.module, c.call) for c in calls if c.module != BATCH_MODULE]

    def calls(self, step: int) -> list[CallKey]:
        return self._rekey(self._base.calls(self._source(step)[1]), step)

    def call_ends(self, step: int) -> list[CallKey]:
        return self._rekey(self._base.call_ends(self._source(step)[1]), step)

    def _list_calls(self, step: int) -> list[CallKey]:
        return self.calls(step)

    def _read_structure(self, call: CallKey, kind: str) -> Any | None:
        aligned, source = self._source(call.step)
        structure = self._base.structure(CallKey(call.rank, source, call.module, call.call), kind)
        if structure is None:
            return None
        structure = copy.deepcopy(structure)
        for path, node in list(iter_tensor_nodes(structure)):
            new = self._cut(aligned, source, call, kind, path, node)
            node.clear()
            node.update(new)
        return structure

    def _cut(self, aligned: AlignedStep, source: int, call: CallKey, kind: str, path: tuple[str, ...],
             node: dict[str, Any]) -> dict[str, Any]:
        """The view's node for one tensor of the source step (see the module docstring)."""
        shape = node.get("shape")
        if not isinstance(shape, list):
            return node
        layout = self._layouts[source]
        tokens = aligned.tokens1 if self._side == 1 else aligned.tokens2
        what = _classify(shape, layout)
        if what == "other":
            return self._gathered(node, shape, [[source, None]])
        if what == "request":
            last = aligned.last1 if self._side == 1 else aligned.last2
            if last is None:
                return _dropped("one row per request, and this step's last aligned token is not the one it was "
                                "computed for (token alignment)")
            index = [last[1]] if layout.layout == PACKED else [last[1], 0]
            return self._gathered(node, [1] * len(index) + shape[len(index):], [[last[0], [index]]])
        parts: list[list[Any]] = []
        for step, slots in _groups(tokens):
            other = self._node_in(step, call, kind, path) if step != source else node
            lay = self._layouts[step]
            if other is None or not isinstance(other.get("shape"), list) or _classify(other["shape"], lay) != "token":
                return _dropped(f"no token rows of this tensor in step {step} of the run (token alignment)")
            shared = other["shape"][0] == 1 and lay.num_rows > 1
            parts.append([step, [[s.index] if lay.layout == PACKED else [0 if shared else s.row, s.index]
                                 for s in slots]])
        lead = [len(tokens)] if layout.layout == PACKED else [1, len(tokens)]
        rest = shape[1:] if layout.layout == PACKED else shape[2:]
        return self._gathered(node, lead + rest, parts)

    def _node_in(self, step: int, call: CallKey, kind: str, path: tuple[str, ...]) -> dict[str, Any] | None:
        source = CallKey(call.rank, step, call.module, call.call)
        if source not in self._base.calls(step):
            return None
        return next((n for k, n in self._base.tensor_nodes(source, kind) if k.path == path), None)

    def _gathered(self, node: dict[str, Any], shape: list[int], parts: list[list[Any]]) -> dict[str, Any]:
        out = {k: v for k, v in node.items() if k not in ("same_as", "stats", *self._base.locator_keys)}
        out["shape"] = shape
        out["numel"] = int(torch.Size(shape).numel())
        if node.get("stored") is False:
            out["reason"] = f"{node.get('reason') or 'body not stored'}; token alignment needs the body"
        else:
            out[_GATHER] = parts
        return out

    def _load(self, key: TensorKey, node: dict[str, Any]) -> torch.Tensor:
        pieces = []
        for step, index in node[_GATHER]:
            tensor = self._base.load(TensorKey(step, key.module, key.call, key.kind, key.path, key.rank))
            if index is None:
                return tensor
            columns = [torch.tensor(c, dtype=torch.long) for c in zip(*index, strict=True)]
            pieces.append(tensor[tuple(columns)])
        rows = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        return rows.reshape(node["shape"])


class WithoutBatch(_View):
    """A run without its ``ilstore.batch`` calls: run metadata, not a module, never compared.

    Everything else is the run's own (this view only filters the call lists).
    """

    def __init__(self, base: StoreReader) -> None:
        super().__init__(base)
        self.locator_keys = base.locator_keys

    def steps(self) -> list[int]:
        return self._base.steps()

    def calls(self, step: int) -> list[CallKey]:
        return [c for c in self._base.calls(step) if c.module != BATCH_MODULE]

    def call_ends(self, step: int) -> list[CallKey]:
        return [c for c in self._base.call_ends(step) if c.module != BATCH_MODULE]

    def _list_calls(self, step: int) -> list[CallKey]:
        return self.calls(step)

    def structure(self, call: CallKey, kind: str) -> Any | None:
        return self._base.structure(call, kind)

    def _read_structure(self, call: CallKey, kind: str) -> Any | None:
        return self._base.structure(call, kind)

    def load(self, key: TensorKey) -> torch.Tensor:
        return self._base.load(key)

    def _load(self, key: TensorKey, node: dict[str, Any]) -> torch.Tensor:
        return self._base.load(key)

    def step_totals(self, step: int) -> dict[str, int] | None:
        return self._base.step_totals(step)

    def stats_table(self) -> Any:
        table = getattr(self._base, "stats_table", None)
        return table() if table is not None else None


def _has_batch(reader: StoreReader) -> bool:
    orders = reader.call_orders()  # every step's calls in one pass, where the reader can
    if orders is not None:
        shared = getattr(orders, "distinct", None)  # the step journal's: each distinct order once
        distinct = shared() if callable(shared) else {id(order): order for order in orders.values()}.values()
        return any(module == BATCH_MODULE for order in distinct for module, _ in order[1])
    return any(c.module == BATCH_MODULE for step in reader.steps() for c in reader.calls(step))


def align_runs(r1: StoreReader, r2: StoreReader, options: CompareOptions
               ) -> tuple[StoreReader, StoreReader, TokenAlignment | None]:
    """With ``options.align_tokens``, the two runs' token-aligned views and their alignment.

    Without it, the runs themselves (without their ``ilstore.batch`` calls, see
    :class:`WithoutBatch`) and None.

    Raises:
        OptionError: combined with ``replay`` or ``oracle`` (their local errors are per step
            of the runs themselves).
        TokenAlignmentError: a run's composition cannot be read.
    """
    if not options.align_tokens:
        return (WithoutBatch(r1) if _has_batch(r1) else r1), (WithoutBatch(r2) if _has_batch(r2) else r2), None
    for name in ("replay", "oracle"):
        if getattr(options, name) is not None:
            raise OptionError("align_tokens", f"cannot be combined with {name}: local errors are measured per step "
                              "of the runs themselves")
    comp1, comp2 = read_composition(r1, "dir1"), read_composition(r2, "dir2")
    alignment = align(comp1, comp2)
    return TokenView(r1, alignment, 1, comp1), TokenView(r2, alignment, 2, comp2), alignment

