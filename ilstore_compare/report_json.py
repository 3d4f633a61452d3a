"""The JSON report: strict JSON (no NaN/Infinity: non-finite numbers become null), validated by
``schemas/report.schema.json``."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

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

__all__ = ["REPORT_FORMAT", "REPORT_VERSION", "report_dict", "render_json", "validate_report", "local_error_item",
           "unreadable_item"]

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


def _fields(obj: Any) -> dict[str, Any]:
    """A dataclass's fields, shallow (nested dataclasses stay objects)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _key(key: TensorKey | CallKey) -> dict[str, Any]:
    out = {"step": key.step, "rank": key.rank, "module": key.module, "call": key.call}
    if isinstance(key, TensorKey):
        out.update(kind=key.kind, path=list(key.path))
    return out


def _metrics(m: TensorMetrics | None) -> dict[str, Any]:
    """Every metric under its JSON key (:class:`~ilstore_compare.metrics.MetricInfo`); null without metrics."""
    return {info.key: getattr(m, name) if m is not None else None for name, info in metric_infos()}


def _tensor(t: TensorResult) -> dict[str, Any]:
    entry = _fields(t)
    key, metrics, stats_failed, note, _ = (entry.pop(k) for k in ("key", "metrics", "stats_failed", "note",
                                                                   "unreadable"))  # those: top-level
    return _plain({**_key(key), **entry, **_metrics(metrics),
                   "stats_failed": [{"stat": name, "value1": v1, "value2": v2} for name, v1, v2 in stats_failed],
                   "note": note})


def _call(c: CallResult, local: bool) -> dict[str, Any]:
    entry = _fields(c)
    e: LocalError | None = entry.pop("local")
    if local:  # the local error beside the propagated one
        entry.update(local_rel_l2=e.rel_l2 if e is not None else None,
                     local_max_abs_diff=e.max_abs_diff if e is not None else None,
                     replayed=e.replayed if e is not None else None)
    return _plain({**_key(entry.pop("call")), **entry})


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
            "calls": [_oracle_call(c) for c in o.calls]}


def report_dict(result: CompareResult) -> dict[str, Any]:
    """The report as plain JSON-ready data (every tensor, every call).

    ``unreadable`` lists every tensor body that could not be read (then ``exit_code`` is 2).
    With local errors (a replay), also ``replay``, ``local_errors`` (ranked) and
    ``threshold_divergence``; with an oracle, ``oracle``; with ``align_tokens``,
    ``token_alignment``.
    """
    local = result.local
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
        "calls": [_call(c, local is not None) for c in result.calls],
        "tensors": [_tensor(t) for t in result.tensors],
        "unreadable": [unreadable_item(u) for u in result.unreadable],
    }
    if local is not None:
        d = result.threshold_divergence
        out.update(replay=_replay(local), local_errors=[local_error_item(e) for e in local.errors],
                   threshold_divergence=_plain(dataclasses.asdict(d)) if d is not None else None)
    if result.oracle is not None:
        out["oracle"] = _oracle(result.oracle)
    if result.token_alignment is not None:
        out["token_alignment"] = result.token_alignment.to_json()
    return out


def render_json(result: CompareResult, verbose: bool = False) -> str:
    """The report as strict JSON text (``verbose`` is accepted for symmetry; JSON has every tensor)."""
    return json.dumps(report_dict(result), indent=1, allow_nan=False) + "\n"


def validate_report(data: Any) -> list[str]:
    """Check report data against ``schemas/report.schema.json``; one message per problem."""
    import jsonschema

    from ilstore.schemas import load as load_schema

    validator = jsonschema.Draft202012Validator(load_schema("report"))
    return [f"{'/'.join(str(p) for p in err.absolute_path) or '(root)'}: {err.message}"
            for err in sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))]
