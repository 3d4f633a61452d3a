"""The batch composition of a vLLM engine step: which request each packed token belongs to.

vLLM packs the tokens of every scheduled request into one flat batch (``[num_tokens, ...]``),
prefill chunks and decode tokens side by side, differently from step to step. To compare such a
run token by token with a run batched another way (Hugging Face's ``batch x seq``),
``ilstore-compare --align-tokens`` needs to know, per step, whose token sits where. The plug-in
records it as one call of the pseudo-module :data:`BATCH_MODULE` (``ilstore.batch``) per step,
through the store API like any module call, so every backend stores it and ``ilstore convert``
carries it. Its inputs are keyword arguments, plain JSON lists (never tensors, so the capture's
tensor policy, ``mode: "stats"`` included, never drops them):

* ``request_ids``: the scheduled requests, in the order their tokens are packed;
* ``query_start_loc``: ``len(request_ids) + 1`` offsets: request *i*'s tokens are
  ``[query_start_loc[i], query_start_loc[i + 1])`` of the packed dimension;
* ``positions``: each packed token's position in its request's sequence;
* ``input_ids``: each packed token's id;
* ``format``: ``"ilstore.batch/1"``.

Tensors with one row per request (vLLM's logits: the last scheduled token of each request) are
in ``request_ids`` order. The record is selected by ``module_call_match`` like a module named
``ilstore.batch``: everything by default; add ``"ilstore\\\\.batch"`` to a narrower selection.
It is written when the runner has prepared the step's inputs (``_prepare_inputs`` returns), so
it is the step's first call, before the model's. A replay (``replay_from``) records none: it
pairs steps by number with its reference, batched alike.

Example:
    >>> composition = {"request_ids": ["a", "b"], "query_start_loc": [0, 3, 4], "positions": [0, 1, 2, 7],
    ...                "input_ids": [5, 6, 7, 8], "format": BATCH_FORMAT}
    >>> check_composition(composition)
    []
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

from ..engine_capture import EngineCapture

__all__ = ["BATCH_MODULE", "BATCH_FORMAT", "batch_composition", "record_batch", "check_composition",
           "patch_prepare_inputs"]

_log = logging.getLogger(__name__)

#: The pseudo-module whose one call per step holds the batch composition.
BATCH_MODULE = "ilstore.batch"
#: The ``format`` value of the record; a reader refuses others.
BATCH_FORMAT = "ilstore.batch/1"

_warned: set[str] = set()
_RECORDED = "_ilstore_batch_step"  # the runner attribute: the step whose composition was recorded


def batch_composition(runner: Any, scheduler_output: Any) -> dict[str, Any] | None:
    """The composition of the step ``runner`` has just prepared, or None if it cannot be read.

    Reads vLLM's V1 model runner once ``_prepare_inputs`` has returned: ``input_batch.req_ids``
    (the packed order), ``scheduler_output.num_scheduled_tokens``, and the runner's ``input_ids``
    (device side: with asynchronous scheduling the decode tokens are filled in there) and
    ``positions`` buffers, which hold what the model is fed. Another runner gives None, with
    one warning.
    """
    try:
        total = int(scheduler_output.total_num_scheduled_tokens)
        req_ids = [str(r) for r in list(runner.input_batch.req_ids)[:runner.input_batch.num_reqs]]
        counts = [int(scheduler_output.num_scheduled_tokens[r]) for r in req_ids]
        input_ids = runner.input_ids.gpu[:total].cpu().tolist()
        positions = runner.positions[:total].cpu().tolist()
    except Exception as exc:  # another vLLM version or runner: capture goes on without it
        _warn_once(type(runner).__name__, f"ilstore: cannot read the batch composition from {type(runner).__name__} "
                   f"({exc!r}); token alignment (ilstore-compare --align-tokens) will not work for this run")
        return None
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    composition = {"request_ids": req_ids, "query_start_loc": starts, "positions": positions,
                   "input_ids": input_ids, "format": BATCH_FORMAT}
    problems = check_composition(composition)
    if problems:
        _warn_once(type(runner).__name__, f"ilstore: the batch composition read from vLLM is inconsistent "
                   f"({'; '.join(problems)}); not recorded")
        return None
    return composition


def record_batch(cap: EngineCapture, runner: Any, scheduler_output: Any) -> bool:
    """Record the step's composition as the ``ilstore.batch`` call of the live step (if selected).

    Returns:
        True when it was recorded.
    """
    if not cap.live or cap.config.replay_from is not None or not cap.config.module_may_match(BATCH_MODULE):
        return False
    composition = batch_composition(runner, scheduler_output)
    return composition is not None and cap.record_call(BATCH_MODULE, **composition)


def patch_prepare_inputs(classes: Iterable[type], state_attr: str, marker: str) -> None:
    """Wrap ``_prepare_inputs`` of the runner classes that define it: once it returns, the
    runner's live capture (its attribute ``state_attr``) records the step's composition.

    Optional: a runner without it records none (and token alignment cannot use the run).
    ``marker`` marks the wrapper so it is never wrapped twice.
    """
    name = "_prepare_inputs"
    for cls in classes:
        method = vars(cls).get(name)
        if method is not None and not hasattr(method, marker):
            wrapper = _wrap_prepare_inputs(method, state_attr)
            setattr(wrapper, marker, True)
            setattr(cls, name, wrapper)


def _wrap_prepare_inputs(prepare: Callable[..., Any], state_attr: str) -> Callable[..., Any]:
    @functools.wraps(prepare)
    def wrapper(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        result = prepare(self, scheduler_output, *args, **kwargs)
        cap: EngineCapture | None = getattr(self, state_attr, None)
        if cap is not None and cap.live and getattr(self, _RECORDED, None) != cap.step_index:
            setattr(self, _RECORDED, cap.step_index)  # once per step, whatever calls it again
            record_batch(cap, self, scheduler_output)
        return result

    return wrapper


def check_composition(composition: Any) -> list[str]:
    """One message per inconsistency of a recorded composition (empty when it is sound)."""
    if not isinstance(composition, dict):
        return ["not a mapping"]
    if composition.get("format") != BATCH_FORMAT:
        return [f"format is {composition.get('format')!r}, expected {BATCH_FORMAT!r}"]
    ids, starts = composition.get("request_ids"), composition.get("query_start_loc")
    positions, tokens = composition.get("positions"), composition.get("input_ids")
    lists = {"request_ids": ids, "query_start_loc": starts, "positions": positions, "input_ids": tokens}
    problems = [f"{name} is not a list" for name, value in lists.items() if not isinstance(value, list)]
    if problems:
        return problems
    assert isinstance(ids, list) and isinstance(starts, list) and isinstance(positions, list)
    assert isinstance(tokens, list)
    if len(set(ids)) != len(ids):
        problems.append("a request id appears twice")
    if len(starts) != len(ids) + 1 or starts[:1] != [0] or any(b < a for a, b in zip(starts, starts[1:], strict=False)):
        problems.append("query_start_loc must be len(request_ids) + 1 non-decreasing offsets from 0")
    elif not len(positions) == len(tokens) == starts[-1]:
        problems.append(f"{starts[-1]} packed tokens but {len(positions)} positions and {len(tokens)} input ids")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in [*starts, *positions, *tokens]):
        problems.append("offsets, positions and input ids must be integers")
    return problems


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        _log.warning("%s", message)
