"""The JSON report: strict JSON (no NaN/Infinity: non-finite numbers become null), validated by
``schemas/report.schema.json``."""

from __future__ import annotations

import json
import math
from typing import Any

from .result import CallResult, CompareResult, Divergence, TensorResult

__all__ = ["REPORT_FORMAT", "REPORT_VERSION", "report_dict", "render_json", "validate_report"]

REPORT_FORMAT = "ilstore-compare-report"
REPORT_VERSION = 1


def _f(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return _f(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _tensor(t: TensorResult) -> dict[str, Any]:
    k = t.key
    entry: dict[str, Any] = {
        "step": k.step, "rank": k.rank, "module": k.module, "call": k.call, "kind": k.kind, "path": list(k.path),
        "status": t.status, "renamed_from": t.renamed_from,
        "shape1": list(t.shape1) if t.shape1 is not None else None,
        "shape2": list(t.shape2) if t.shape2 is not None else None,
        "dtype1": t.dtype1, "dtype2": t.dtype2, "device1": t.device1, "device2": t.device2,
        "dtype_mismatch": t.dtype_mismatch, "presence": t.presence, "squeezed": t.squeezed,
        "alignment": list(t.alignment),
    }
    m = t.metrics
    entry.update({
        "numel": m.numel if m else None, "mismatched": m.mismatched if m else None,
        "mismatched_pct": _f(m.mismatched_pct) if m else None, "max_abs_diff": _f(m.max_abs_diff) if m else None,
        "max_abs_diff_index": list(m.max_abs_diff_index) if m and m.max_abs_diff_index is not None else None,
        "mean_abs_diff": _f(m.mean_abs_diff) if m else None, "max_rel_diff": _f(m.max_rel_diff) if m else None,
        "rel_l2": _f(m.rel_l2) if m else None, "cosine_similarity": _f(m.cosine) if m else None,
        "nan_count1": m.nan1 if m else None, "nan_count2": m.nan2 if m else None,
        "inf_count1": m.inf1 if m else None, "inf_count2": m.inf2 if m else None,
        "stats_failed": [{"stat": name, "value1": _plain(v1), "value2": _plain(v2)} for name, v1, v2 in t.stats_failed],
        "note": t.note,
    })
    return entry


def _call(c: CallResult) -> dict[str, Any]:
    return {"step": c.call.step, "rank": c.call.rank, "module": c.call.module, "call": c.call.call,
            "presence": c.presence, "verdict": c.verdict, "origin": c.origin, "order": c.order, "tensors": c.tensors,
            "mismatched_tensors": c.mismatched_tensors, "unaligned_tensors": c.unaligned_tensors,
            "output_rel_l2": _f(c.output_rel_l2),
            "input_rel_l2": _f(c.input_rel_l2), "max_abs_diff": _f(c.max_abs_diff),
            "max_rel_diff": _f(c.max_rel_diff), "min_cosine": _f(c.min_cosine)}


def _divergence(d: Divergence | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {"step": d.step, "rank": d.rank, "module": d.module, "call": d.call, "origin": d.origin,
            "output_rel_l2": _f(d.output_rel_l2), "input_rel_l2": _f(d.input_rel_l2), "growth": _f(d.growth),
            "tensors": list(d.tensors)}


def report_dict(result: CompareResult) -> dict[str, Any]:
    """The report as plain JSON-ready data (every tensor, every call)."""
    from ilstore import __version__

    o, s = result.options, result.summary
    return {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "ilstore_version": __version__,
        "verdict": result.verdict,
        "exit_code": result.exit_code,
        "dir1": {"path": result.dir1, "backend": result.backend1, "status": result.status1},
        "dir2": {"path": result.dir2, "backend": result.backend2, "status": result.status2},
        "options": {"rtol": o.rtol, "atol": o.atol, "steps": list(o.steps) if o.steps is not None else None,
                    "modules": list(o.modules) if o.modules is not None else None, "exact": o.exact,
                    "equal_nan": o.equal_nan, "allow_stats_only": o.allow_stats_only, "name_map": o.name_map,
                    "squeeze_shapes": o.squeeze_shapes, "allow_unaligned": o.allow_unaligned},
        "summary": {
            "tensors": s.tensors, "compared": s.compared, "matched": s.matched, "mismatched": s.mismatched,
            "shape_mismatches": s.shape_mismatches, "dtype_mismatches": s.dtype_mismatches,
            "stats_only_matched": s.stats_only_matched, "stats_only_mismatched": s.stats_only_mismatched,
            "not_compared": s.not_compared, "only_in_dir1": s.only_in_dir1, "only_in_dir2": s.only_in_dir2,
            "unaligned": s.unaligned, "squeezed": s.squeezed,
            "calls": s.calls, "calls_mismatched": s.calls_mismatched, "calls_only_in_dir1": s.calls_only_in_dir1,
            "calls_only_in_dir2": s.calls_only_in_dir2, "calls_unaligned": s.calls_unaligned, "steps": list(s.steps),
            "steps_only_in_dir1": list(s.steps_only_in_dir1), "steps_only_in_dir2": list(s.steps_only_in_dir2),
        },
        "first_divergence": _divergence(result.first_divergence),
        "introduced": [_divergence(d) for d in result.introduced],
        "notes": list(result.notes),
        "calls": [_call(c) for c in result.calls],
        "tensors": [_tensor(t) for t in result.tensors],
    }


def render_json(result: CompareResult, verbose: bool = False) -> str:
    """The report as strict JSON text (``verbose`` is accepted for symmetry; JSON has every tensor)."""
    return json.dumps(report_dict(result), indent=1, allow_nan=False) + "\n"


def validate_report(data: Any) -> list[str]:
    """Check report data against ``schemas/report.schema.json``; one message per problem."""
    import jsonschema

    from ilstore import schemas

    validator = jsonschema.Draft202012Validator(schemas.load("report"))
    return [f"{'/'.join(str(p) for p in err.absolute_path) or '(root)'}: {err.message}"
            for err in sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))]
