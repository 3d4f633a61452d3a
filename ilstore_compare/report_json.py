"""The JSON report: strict JSON (no NaN/Infinity: non-finite numbers become null), validated by
``schemas/report.schema.json``."""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import json
import math
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from ilstore._version import __version__
from ilstore.keys import CallKey, TensorKey

from .metrics import TensorMetrics, metric_infos
from .options import reported_options
from .result import (
    CallResult,
    CompareResult,
    LocalError,
    LocalReport,
    OracleCall,
    OracleReport,
    TensorResult,
    Unreadable,
)

__all__ = ["REPORT_FORMAT", "REPORT_VERSION", "report_dict", "render_json", "write_json", "validate_report",
           "local_error_item", "unreadable_item"]

REPORT_FORMAT = "ilstore-compare-report"
REPORT_VERSION = 1


def _plain(value: Any) -> Any:
    """JSON-ready data: tuples become lists, non-finite floats null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_SCALARS = (str, int, bool, type(None))


def _plain_item(item: dict[str, Any]) -> dict[str, Any]:
    """:func:`_plain` of a flat item, fast: scalars are checked in place, only containers recurse."""
    for k, v in item.items():
        if v.__class__ is float:
            if not math.isfinite(v):
                item[k] = None
        elif not isinstance(v, _SCALARS):
            item[k] = _plain(v)
    return item


def _key(key: TensorKey | CallKey) -> dict[str, Any]:
    out = {"step": key.step, "rank": key.rank, "module": key.module, "call": key.call}
    if isinstance(key, TensorKey):
        out.update(kind=key.kind, path=list(key.path))
    return out


def _metrics(m: TensorMetrics | None) -> dict[str, Any]:
    """Every metric under its JSON key (:class:`~ilstore_compare.metrics.MetricInfo`); null without metrics."""
    if m is None:
        return dict.fromkeys(_metric_keys())
    return {key: getattr(m, name) for name, key in _metric_names()}


@functools.cache
def _metric_names() -> tuple[tuple[str, str], ...]:
    return tuple((name, info.key) for name, info in metric_infos())


@functools.cache
def _metric_keys() -> tuple[str, ...]:
    return tuple(key for _, key in _metric_names())


#: TensorResult fields that go into an item as they are (``key``, ``metrics``, ``stats_failed`` and
#: ``note`` are spread or placed; ``unreadable`` is the report's top-level list).
_TENSOR_FIELDS = tuple(f.name for f in dataclasses.fields(TensorResult)
                       if f.name not in ("key", "metrics", "stats_failed", "note", "unreadable"))


_CALL_FIELDS = tuple(f.name for f in dataclasses.fields(CallResult))


def _tensor(t: TensorResult) -> dict[str, Any]:
    """One ``tensors`` item, not yet :func:`_plain_item`-ed."""
    return {**_key(t.key), **{name: getattr(t, name) for name in _TENSOR_FIELDS}, **_metrics(t.metrics),
            "stats_failed": [{"stat": name, "value1": v1, "value2": v2} for name, v1, v2 in t.stats_failed],
            "note": t.note}


def _call(c: CallResult, local: bool) -> dict[str, Any]:
    """One ``calls`` item, not yet :func:`_plain_item`-ed."""
    entry = {name: getattr(c, name) for name in _CALL_FIELDS}
    e: LocalError | None = entry.pop("local")
    if local:  # the local error beside the propagated one
        entry.update(local_rel_l2=e.rel_l2 if e is not None else None,
                     local_max_abs_diff=e.max_abs_diff if e is not None else None,
                     replayed=e.replayed if e is not None else None)
    return {**_key(entry.pop("call")), **entry}


def local_error_item(e: LocalError) -> dict[str, Any]:
    """One ``local_errors`` item (``rel_l2`` null when not measured, or infinite: ``compared`` tells)."""
    return _plain({**_key(e.call), "rel_l2": e.rel_l2, "max_abs_diff": e.max_abs_diff, "max_ulp": e.max_ulp,
                   "mismatched": e.mismatched, "replayed": e.replayed, "compared": e.compared, "reason": e.reason,
                   "container": e.container, "random": e.random, "order": e.order})


def unreadable_item(u: Unreadable) -> dict[str, Any]:
    """One ``unreadable`` item: which run, which tensor (that run's own naming), the file and the reason."""
    return {"run": u.run, "run_dir": u.run_dir, **_key(u.key), "tensor": u.key.display(), "file": u.file,
            "reason": u.reason, "during": u.during}


def _replay(local: LocalReport) -> dict[str, Any]:
    return {"run": local.replay, "source": local.source, "replayed_from": dict(local.replayed_from),
            "not_compared": len(local.not_compared)}


def _oracle_call(c: OracleCall) -> dict[str, Any]:
    return _plain({**_key(c.call), "candidate_rel_l2": c.candidate_rel_l2, "reference_rel_l2": c.reference_rel_l2,
                   "ratio": c.ratio, "flagged": c.flagged, "evaluated": c.evaluated, "reason": c.reason,
                   "container": c.container})


def _oracle(o: OracleReport) -> dict[str, Any]:
    return {"run": o.run, "run_id": o.run_id, "factor": o.factor, "verdict": o.verdict,
            "flagged": [_key(c.call) for c in o.flagged], "not_evaluated": len(o.not_evaluated),
            "calls": _Items(o.calls, _oracle_call, one_line=False)}


class _Items:
    """A list of report items made one at a time, when written (:func:`write_json`) or listed
    (:func:`report_dict`); items may still hold tuples and non-finite floats (:func:`_plain_item`
    makes them JSON-ready).

    Args:
        source: the entries, iterated once per write.
        make: an entry's item.
        one_line: each item written on one line (``calls``, ``tensors``), or indented like the rest
            of the report (``local_errors``, the oracle's ``calls``: their text as it always was).
    """

    def __init__(self, source: Any, make: Callable[[Any], dict[str, Any]], *, one_line: bool = True) -> None:
        self.source, self.make, self.one_line = source, make, one_line

    def __iter__(self) -> Iterator[dict[str, Any]]:
        make = self.make
        for obj in self.source:
            yield make(obj)


def _report(result: CompareResult) -> dict[str, Any]:
    """The report with its long lists (``calls``, ``tensors``, ``local_errors``, the oracle's ``calls``)
    still to be made (:class:`_Items`)."""
    local = result.local
    replayed = local is not None
    out = {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "ilstore_version": __version__,
        "verdict": result.verdict,
        "exit_code": result.exit_code,
        "dir1": {"path": result.dir1, "backend": result.backend1, "status": result.status1},
        "dir2": {"path": result.dir2, "backend": result.backend2, "status": result.status2},
        "options": _plain(reported_options(result.options)),
        "summary": _plain(dataclasses.asdict(result.summary)),
        "first_divergence": _plain(dataclasses.asdict(result.first_divergence)) if result.first_divergence else None,
        "introduced": [_plain(dataclasses.asdict(d)) for d in result.introduced],
        "notes": list(result.notes),
        "calls": _Items(result.calls, lambda c: _call(c, replayed)),
        "tensors": _Items(result.tensors, _tensor),
        "unreadable": [unreadable_item(u) for u in result.unreadable],
    }
    if local is not None:
        d = result.threshold_divergence
        out.update(replay=_replay(local), local_errors=_Items(local.errors, local_error_item, one_line=False),
                   threshold_divergence=_plain(dataclasses.asdict(d)) if d is not None else None)
    if result.oracle is not None:
        out["oracle"] = _oracle(result.oracle)
    if result.token_alignment is not None:
        out["token_alignment"] = result.token_alignment.to_json()
    return out


def report_dict(result: CompareResult) -> dict[str, Any]:
    """The report as plain JSON-ready data (every tensor, every call).

    ``unreadable`` lists every tensor body that could not be read (then ``exit_code`` is 2).
    With local errors (a replay), also ``replay``, ``local_errors`` (ranked) and
    ``threshold_divergence``; with an oracle, ``oracle``; with ``align_tokens``,
    ``token_alignment``.
    """
    return {k: _made(v) for k, v in _report(result).items()}


def _made(value: Any) -> Any:
    """``value`` with its :class:`_Items` (at any depth of dicts) made into lists."""
    if isinstance(value, _Items):
        return [_plain_item(item) for item in value]
    if isinstance(value, dict):
        return {k: _made(v) for k, v in value.items()}
    return value


def write_json(result: CompareResult, out: TextIO) -> None:
    """Write the report as strict JSON text to ``out``, a batch of items at a time.

    The text is :func:`report_dict` indented by one space per level, except that each item of
    ``calls`` and ``tensors`` is one line: a report of millions of tensors is written in memory
    bounded by a batch, whatever the run's length, and stays one item per line for tools like
    ``grep``. ``local_errors`` and the oracle's ``calls`` are written a batch at a time too,
    indented like the rest.
    """
    out.write("{")
    for i, (key, value) in enumerate(_report(result).items()):
        out.write(("\n " if i == 0 else ",\n ") + json.dumps(key) + ": ")
        _write_value(out, value, "\n ")
    out.write("\n}\n")


def _write_value(out: TextIO, value: Any, pad: str) -> None:
    """``value`` as ``json.dumps(value, indent=1)`` gives it, each line break followed by ``pad``, its
    :class:`_Items` made and written a batch at a time."""
    if isinstance(value, _Items):
        _write_list(out, _one_line(value) if value.one_line else _indented(value, pad + " "), pad)
    elif isinstance(value, dict) and any(isinstance(v, _Items) for v in value.values()):
        for i, (key, v) in enumerate(value.items()):
            out.write(("{" if i == 0 else ",") + pad + " " + json.dumps(key) + ": ")
            _write_value(out, v, pad + " ")
        out.write(pad + "}")
    else:
        out.write(json.dumps(value, indent=1, allow_nan=False).replace("\n", pad))


def _one_line(items: _Items) -> Iterator[str]:
    dump = json.JSONEncoder(allow_nan=False).encode  # the C encoder: one line per item
    for item in items:
        try:
            yield dump(item)
        except ValueError:  # a NaN or infinity: null (rare, so checked only when the encoder refuses)
            yield dump(_plain_item(item))


def _indented(items: _Items, pad: str) -> Iterator[str]:
    for item in items:
        yield json.dumps(_plain_item(item), indent=1, allow_nan=False).replace("\n", pad)


#: Items written to the file between two writes (a few MB of text).
_BATCH = 2048


def _write_list(out: TextIO, texts: Iterator[str], pad: str) -> None:
    """A JSON list of the items' ``texts``, each after a line break and ``pad`` and one space, written
    :data:`_BATCH` items at a time; ``[]`` when there is none."""
    batch: list[str] = []
    opened = False
    sep = "," + pad + " "
    for text in itertools.chain(texts, (None,)):  # None: the end, write what is left
        if text is not None:
            batch.append(text)
        if batch and (text is None or len(batch) == _BATCH):
            out.write(("," if opened else "[") + pad + " " + sep.join(batch))
            opened = True
            batch.clear()
    out.write(pad + "]" if opened else "[]")


def render_json(result: CompareResult, verbose: bool = False) -> str:
    """The report as strict JSON text (``verbose`` is accepted for symmetry; JSON has every tensor)."""
    text = io.StringIO()
    write_json(result, text)
    return text.getvalue()


def validate_report(data: Any) -> list[str]:
    """Check report data against ``schemas/report.schema.json``; one message per problem."""
    import jsonschema

    from ilstore.schemas import load as load_schema

    validator = jsonschema.Draft202012Validator(load_schema("report"))
    return [f"{'/'.join(str(p) for p in err.absolute_path) or '(root)'}: {err.message}"
            for err in sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))]
