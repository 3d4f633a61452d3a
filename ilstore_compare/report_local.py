"""Formatting of the replay parts of the markdown and HTML reports: local errors and the oracle verdict."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ilstore.keys import CallKey

from .report_common import call_label, num
from .result import CallResult, CompareResult, Divergence, LocalError, LocalReport, OracleCall, OracleReport

__all__ = ["TOP_LOCAL", "LOCAL_HEADERS", "local_rows", "UNREPLAYED_HEADERS", "unreplayed_rows", "ORACLE_HEADERS",
           "oracle_rows", "measured_text", "no_measured_text", "local_intro", "oracle_intro", "oracle_line",
           "CALL_LOCAL_HEADERS", "call_local_cells", "kind_label"]

#: Calls listed by local error without ``--verbose``.
TOP_LOCAL = 10


def kind_label(container: bool) -> str:
    return "container" if container else "leaf"


def _tolerance(e: LocalError) -> str:
    if e.mismatched is None:
        return "—"
    return f"crossed ({e.mismatched} element(s))" if e.mismatched else "within"


LOCAL_HEADERS = ["#", "step", "module call", "kind", "local rel L2", "local max abs diff", "local max_ulp",
                 "tolerance", "propagated out rel L2", "note"]


def local_rows(errors: Sequence[LocalError], calls: Sequence[CallResult]) -> list[list[Any]]:
    """Measured calls, ranked (``#``), with the propagated output error of the same call beside them.

    Only the propagated errors of the calls listed are kept (``calls`` may be a long run's, read
    back from a temporary file window by window)."""
    listed = {e.call for e in errors}
    propagated = {c.call: c.output_rel_l2 for c in calls if c.call in listed}
    return [[n, e.call.step, call_label(e.call), kind_label(e.container), num(e.rel_l2), num(e.max_abs_diff),
             num(e.max_ulp), _tolerance(e), num(propagated.get(e.call)), e.reason or ""]
            for n, e in enumerate(errors, 1)]


UNREPLAYED_HEADERS = ["step", "module call", "kind", "replayed", "reason"]


def unreplayed_rows(errors: Sequence[LocalError]) -> list[list[Any]]:
    return [[e.call.step, call_label(e.call), kind_label(e.container), "yes" if e.replayed else "no", e.reason or ""]
            for e in sorted(errors, key=lambda e: e.order)]


def local_intro(local: LocalReport) -> str:
    src = local.replayed_from
    who = "dir1" if local.source == "dir1" else f"The replay run {local.replay} (--replay)"
    measured = sum(1 for e in local.errors if e.compared)
    containers = sum(1 for e in local.errors if e.container)
    return (f"{who} fed every selected call the inputs the reference recorded (replayed from run "
            f"{src.get('run_id') or '?'}); each call's outputs against the reference's outputs are the error the "
            f"call itself introduces, whatever happened upstream. {measured} of {len(local.errors)} call(s) "
            f"measured, {len(local.not_compared)} not (they count as not compared). {containers} container(s), calls "
            "that ran other selected calls inside them: fed the reference's inputs like their children, a "
            "container's outputs only carry the error of what runs after its last replayed child (its own code, and "
            "that child's local error when the child's outputs are the container's); leaves carry their own.")


def measured_text(d: Divergence, local: LocalReport) -> str:
    where = f"step {d.step}, {call_label(CallKey(d.rank, d.step, d.module, d.call))}"
    kind = "container" if local.first is not None and local.first.container else "leaf"
    return (f"{where} — measured by replay ({kind}): fed the reference's own inputs, its outputs still differ from the "
            f"reference's beyond the tolerance (local rel-L2 {num(d.local_rel_l2)}; propagated output rel-L2 "
            f"{num(d.output_rel_l2)}): the error is introduced in this call. It is the first such call in execution "
            "order.")


def no_measured_text(result: CompareResult) -> str:
    text = ("No call's local error crosses the tolerance: fed the reference's inputs, every measured call reproduces "
            "the reference's outputs within it")
    if result.threshold_divergence is not None:
        text += (", so the propagated differences are errors below the tolerance that accumulate from call to call "
                 "(see the local error ranking for where they are largest)")
    return text + "."


ORACLE_HEADERS = ["step", "module call", "kind", "candidate local rel L2", "reference local rel L2", "ratio",
                  "flagged", "note"]


def oracle_rows(calls: Sequence[OracleCall]) -> list[list[Any]]:
    return [[c.call.step, call_label(c.call), kind_label(c.container), num(c.candidate_rel_l2),
             num(c.reference_rel_l2), num(c.ratio), "FLAGGED" if c.flagged else ("no" if c.evaluated else "—"),
             c.reason or ""] for c in calls]


def oracle_intro(o: OracleReport) -> str:
    return (f"dir1 (the candidate) and dir2 (the reference) were both replayed from the oracle {o.run} (run "
            f"{o.run_id or '?'}). A call is flagged only when the candidate's local error against the oracle exceeds "
            f"{o.factor:g} × the reference's (with a reference error of 0: any candidate error). "
            f"{len(o.flagged)} flagged, {len(o.not_evaluated)} not evaluated, {len(o.calls)} call(s) in all. "
            "This verdict decides the exit status; the two-way comparison below is for information.")


def oracle_line(o: OracleReport) -> str:
    if o.verdict == "empty":
        return "ORACLE: no call to evaluate"
    if o.verdict == "mismatch":
        return f"ORACLE: {len(o.flagged)} call(s) flagged: local error above {o.factor:g} × the reference's"
    if o.verdict == "incomplete":
        return f"ORACLE INCOMPLETE: none flagged, but {len(o.not_evaluated)} call(s) could not be evaluated"
    return f"ORACLE: no call flagged: every call's local error is within {o.factor:g} × the reference's"


CALL_LOCAL_HEADERS = ["local rel L2", "replay"]


def call_local_cells(c: CallResult) -> list[str]:
    """The local-error columns of a step table row."""
    e = c.local
    if e is None:
        return ["—", "not in the replay run"]
    if not e.compared:
        return ["—", ("replayed, not measured" if e.replayed else "not replayed") + f" ({kind_label(e.container)})"]
    return [num(e.rel_l2), f"replayed ({kind_label(e.container)})"]
