"""The result of a comparison: frozen value objects, from one tensor pair up to the whole run.

Statuses of a tensor entry (:attr:`TensorResult.status`):

==========================  =====================================================================
``match``                   both bodies loaded, every element within tolerance
``mismatch``                both bodies loaded, some element out of tolerance
``shape_mismatch``          shapes differ; no elementwise comparison
``stats_only_match``        a body was not stored on at least one side; the recorded statistics agree
``stats_only_mismatch``     ... and the statistics disagree
``not_compared``            neither a body nor statistics to compare on at least one side
``only_in_dir1``            the tensor exists only in dir1
``only_in_dir2``            the tensor exists only in dir2
``unaligned``               the map declares it cannot be aligned (one-sided or not); not compared
``unreadable``              a stored body could not be read (file missing, truncated, corrupt); not
                            compared, and the comparison exits 2 (see :class:`Unreadable`)
==========================  =====================================================================

A dtype difference is not a status: the values are compared after upcasting and the entry
carries ``dtype_mismatch=True``. Nor is a shape difference in size-1 dimensions only, with
``squeeze_shapes``: the values are compared and the entry carries ``squeezed=True``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ilstore.errors import CorruptFileError, StoreError
from ilstore.keys import CallKey, TensorKey

from .entries import objects, tally
from .metrics import TensorMetrics
from .options import CompareOptions
from .tokens import TokenAlignment

__all__ = ["MATCH", "MISMATCH", "SHAPE_MISMATCH", "STATS_ONLY_MATCH", "STATS_ONLY_MISMATCH", "NOT_COMPARED",
           "ONLY_IN_DIR1", "ONLY_IN_DIR2", "UNALIGNED", "UNREADABLE", "STATUSES", "BAD_VALUE_STATUSES",
           "CompareOptions", "TensorResult", "CallResult", "Divergence", "Summary", "LocalError", "LocalReport",
           "OracleCall", "OracleReport", "CompareResult", "THRESHOLD", "MEASURED", "Unreadable"]

MATCH = "match"
MISMATCH = "mismatch"
SHAPE_MISMATCH = "shape_mismatch"
STATS_ONLY_MATCH = "stats_only_match"
STATS_ONLY_MISMATCH = "stats_only_mismatch"
NOT_COMPARED = "not_compared"
ONLY_IN_DIR1 = "only_in_dir1"
ONLY_IN_DIR2 = "only_in_dir2"
UNALIGNED = "unaligned"
UNREADABLE = "unreadable"
STATUSES = (MATCH, MISMATCH, SHAPE_MISMATCH, STATS_ONLY_MATCH, STATS_ONLY_MISMATCH, NOT_COMPARED,
            ONLY_IN_DIR1, ONLY_IN_DIR2, UNALIGNED, UNREADABLE)
#: Statuses that mean the values differ (they drive the first divergence).
BAD_VALUE_STATUSES = frozenset({MISMATCH, SHAPE_MISMATCH, STATS_ONLY_MISMATCH})
#: :attr:`Divergence.basis`: located by the tolerance along the propagated comparison, or
#: measured by replay (the call's local error crosses the tolerance).
THRESHOLD = "threshold"
MEASURED = "measured"


@dataclass(frozen=True)
class Unreadable:
    """A stored tensor body that could not be read: the run's file is missing, truncated or corrupt.

    The comparison goes on without it (the tensor, or the call whose local error needed it,
    counts as not compared) and exits 2 at the end: the user must fix or recapture the run.

    Attributes:
        run: which run: ``dir1``, ``dir2``, ``replay`` or ``oracle``.
        run_dir: that run's directory.
        key: the tensor, in that run's own naming (before the name map).
        file: the file the store named (None when the error named no file).
        reason: what is wrong with it.
        during: ``compare`` (the dir1 vs dir2 pair) or ``local_error`` (measuring a replay).
    """

    run: str
    run_dir: str
    key: TensorKey
    file: str | None
    reason: str
    during: str = "compare"

    @classmethod
    def from_error(cls, exc: StoreError, *, run: str, run_dir: object, key: TensorKey,
                   during: str = "compare") -> Unreadable:
        """The entry for a store error raised while loading ``key`` (a :class:`CorruptFileError` names its file)."""
        if isinstance(exc, CorruptFileError):
            return cls(run, str(run_dir), key, exc.path, exc.reason, during)
        return cls(run, str(run_dir), key, None, str(exc), during)

    def text(self) -> str:
        """One line for a note or a message: ``dir1: <file>: <reason>``."""
        return f"{self.run}: {self.file}: {self.reason}" if self.file else f"{self.run}: {self.reason}"


@dataclass(frozen=True)
class TensorResult:
    """One paired or one-sided tensor.

    Attributes:
        key: the tensor key; its module name is the one both runs share after the name map
            (the unmapped side's name).
        status: one of :data:`STATUSES`.
        renamed_from: the mapped side's own module name when the name map changed it, else None.
        shape1, shape2, dtype1, dtype2, device1, device2: metadata of each side (None if absent).
        dtype_mismatch: both sides present with different dtypes.
        metrics: elementwise metrics (``match``/``mismatch``), else None.
        stats_failed: for stats-only pairs, the statistics that disagree ``(name, v1, v2)``.
        note: why a pair was compared by statistics or not at all (or the map's reason for an
            ``unaligned`` one).
        presence: ``both``, ``dir1`` or ``dir2``: the runs the tensor was found in.
        squeezed: the shapes differ only by size-1 dimensions and the values were compared
            squeezed (``squeeze_shapes``).
        alignment: what the map's path rules did to either side (move, select, sum).
        unreadable: for status ``unreadable``, the side(s) whose body could not be read.
    """

    key: TensorKey
    status: str
    renamed_from: str | None = None
    shape1: tuple[int, ...] | None = None
    shape2: tuple[int, ...] | None = None
    dtype1: str | None = None
    dtype2: str | None = None
    device1: str | None = None
    device2: str | None = None
    dtype_mismatch: bool = False
    metrics: TensorMetrics | None = None
    stats_failed: tuple[tuple[str, Any, Any], ...] = ()
    note: str | None = None
    presence: str = "both"
    squeezed: bool = False
    alignment: tuple[str, ...] = ()
    unreadable: tuple[Unreadable, ...] = ()

    @property
    def bad_value(self) -> bool:
        return self.status in BAD_VALUE_STATUSES


@dataclass(frozen=True)
class CallResult:
    """One module call: the verdict over its tensors and its worst metrics.

    Attributes:
        call: the call (names after the name map).
        presence: ``both``, ``dir1`` or ``dir2``.
        verdict: ``mismatch`` (some value differs), ``unreadable`` (a tensor body could not be
            read), ``one_sided`` (some tensor or the call
            itself is in one run only, and not declared unaligned), ``not_compared``,
            ``unaligned`` (every tensor declared unaligned), ``stats_only_match``, ``match``
            (the tensors compared match; others may be declared unaligned) or ``no_tensors``,
            the first that applies.
        origin: for a call whose outputs differ: ``introduced`` or ``inherited``; else None.
        order: position in execution (completion) order over the whole comparison.
        tensors: tensor entries of the call.
        mismatched_tensors: entries whose values differ.
        unaligned_tensors: entries the map declares unaligned.
        output_rel_l2, input_rel_l2: the largest relative L2 error over outputs / inputs.
        max_abs_diff, max_rel_diff: the largest over all tensors of the call.
        max_abs_diff_at: the tensor holding ``max_abs_diff``: its kind, then its path
            (``("inputs", "attention_mask")``); None when it is 0 or None.
        min_cosine: the smallest cosine similarity over all tensors of the call.
        local: the call's local error (measured by replay) when the comparison has one, else None.
    """

    call: CallKey
    presence: str
    verdict: str
    origin: str | None
    order: int
    tensors: int
    mismatched_tensors: int
    output_rel_l2: float | None = None
    input_rel_l2: float | None = None
    max_abs_diff: float | None = None
    max_abs_diff_at: tuple[str, ...] | None = None
    max_rel_diff: float | None = None
    min_cosine: float | None = None
    unaligned_tensors: int = 0
    local: LocalError | None = None


@dataclass(frozen=True)
class Divergence:
    """A module call whose outputs differ: where, whether it inherited the error, how much it grew.

    Attributes:
        step, module, call, rank: the call.
        origin: ``introduced`` (its inputs matched) or ``inherited``.
        output_rel_l2: largest relative L2 error over its outputs (None: none measurable).
        input_rel_l2: largest over its inputs (None: no input compared elementwise).
        growth: ``output_rel_l2 / input_rel_l2``; None when the inputs are identical (or unknown).
        tensors: the differing output tensors (display form).
        basis: ``threshold`` (where the tolerance is first crossed along the propagated
            comparison; ``origin`` says whether the call's inputs already differed) or
            ``measured`` (the first call, in execution order, whose local error measured by
            replay crosses the tolerance: introduced there by measurement).
        local_rel_l2: the call's local error (relative L2) when measured by replay.
    """

    step: int
    module: str
    call: int
    rank: int
    origin: str
    output_rel_l2: float | None
    input_rel_l2: float | None
    growth: float | None
    tensors: tuple[str, ...] = ()
    basis: str = THRESHOLD
    local_rel_l2: float | None = None


@dataclass(frozen=True)
class Summary:
    """Counts over the whole comparison (see ``docs/compare.md``).

    ``calls_only_in_dir1``/``calls_only_in_dir2`` count one-sided calls that are not wholly
    declared unaligned; those are ``calls_unaligned``. ``not_compared`` includes the
    ``unreadable`` tensors (a body that could not be read is not compared). ``steps_in_neither``:
    the steps asked for one by one (:attr:`CompareOptions.required_steps`) that neither run has, a
    coverage gap like a step in one run only.
    """

    tensors: int = 0
    compared: int = 0
    matched: int = 0
    mismatched: int = 0
    shape_mismatches: int = 0
    dtype_mismatches: int = 0
    stats_only_matched: int = 0
    stats_only_mismatched: int = 0
    not_compared: int = 0
    unreadable: int = 0
    only_in_dir1: int = 0
    only_in_dir2: int = 0
    unaligned: int = 0
    squeezed: int = 0
    calls: int = 0
    calls_mismatched: int = 0
    calls_only_in_dir1: int = 0
    calls_only_in_dir2: int = 0
    calls_unaligned: int = 0
    steps: tuple[int, ...] = ()
    steps_only_in_dir1: tuple[int, ...] = ()
    steps_only_in_dir2: tuple[int, ...] = ()
    steps_in_neither: tuple[int, ...] = ()

    @classmethod
    def of(cls, tensors: Sequence[TensorResult], calls: Sequence[CallResult], steps: Sequence[int],
           only1: Sequence[int], only2: Sequence[int], missing: Sequence[int] = ()) -> Summary:
        """The counts of a comparison's entries and calls (which may hold blocks of entries made on
        demand, :mod:`.entries`: those are counted without being made where the block can say).

        Args:
            tensors, calls: every entry and call.
            steps, only1, only2: the steps compared, and those of dir1 only and of dir2 only.
            missing: the steps asked for one by one that neither run has.
        """
        count = tally(tensors, "status")
        dtype_mismatches = squeezed = 0
        for t in objects(tensors):  # the blocks' entries have no dtype mismatch and are not squeezed
            dtype_mismatches += t.dtype_mismatch
            squeezed += t.squeezed
        calls_only1 = calls_only2 = calls_unaligned = 0
        for c in objects(calls):  # nor are the blocks' calls one-sided or unaligned
            if c.verdict == UNALIGNED:
                calls_unaligned += 1
            elif c.presence == "dir1":
                calls_only1 += 1
            elif c.presence == "dir2":
                calls_only2 += 1
        mismatched = sum(count.get(s, 0) for s in BAD_VALUE_STATUSES)
        return cls(
            tensors=len(tensors),
            compared=count.get(MATCH, 0) + count.get(STATS_ONLY_MATCH, 0) + mismatched,
            matched=count.get(MATCH, 0), mismatched=mismatched, shape_mismatches=count.get(SHAPE_MISMATCH, 0),
            dtype_mismatches=dtype_mismatches,
            stats_only_matched=count.get(STATS_ONLY_MATCH, 0),
            stats_only_mismatched=count.get(STATS_ONLY_MISMATCH, 0),
            not_compared=count.get(NOT_COMPARED, 0) + count.get(UNREADABLE, 0), unreadable=count.get(UNREADABLE, 0),
            only_in_dir1=count.get(ONLY_IN_DIR1, 0), only_in_dir2=count.get(ONLY_IN_DIR2, 0),
            unaligned=count.get(UNALIGNED, 0), squeezed=squeezed, calls=len(calls),
            calls_mismatched=tally(calls, "verdict").get("mismatch", 0),
            calls_only_in_dir1=calls_only1, calls_only_in_dir2=calls_only2, calls_unaligned=calls_unaligned,
            steps=tuple(steps), steps_only_in_dir1=tuple(only1), steps_only_in_dir2=tuple(only2),
            steps_in_neither=tuple(missing))

    @classmethod
    def total(cls, parts: Iterable[Summary], steps: Sequence[int], only1: Sequence[int],
              only2: Sequence[int], missing: Sequence[int] = ()) -> Summary:
        """The counts of a comparison made in parts (windows of its steps, each part's
        :meth:`of` without steps) added up, with the steps compared, those of dir1 only and of
        dir2 only, and those asked for in neither run: what :meth:`of` over all the entries and
        calls gives."""
        counts = {f.name: 0 for f in fields(cls) if not f.name.startswith("steps")}
        for part in parts:
            for name in counts:
                counts[name] += getattr(part, name)
        return cls(**counts, steps=tuple(steps), steps_only_in_dir1=tuple(only1), steps_only_in_dir2=tuple(only2),
                   steps_in_neither=tuple(missing))


@dataclass(frozen=True)
class LocalError:
    """The error one module call introduces, measured by replay.

    A replay run fed every selected call the reference's recorded inputs; the call's outputs
    against the reference's outputs (all output tensors together, :func:`~.metrics.compare_many`)
    are its local error.

    Attributes:
        call: the call (names after the name map).
        rel_l2: ``||a - b|| / ||b||`` over all output tensors (their elements finite on both
            sides); ``math.inf`` when the reference's outputs are zero and the replay's are not,
            or when the NaN/Inf of the two differ (``reason`` says how); None when not measured
            (``compared`` false).
        max_abs_diff: the largest ``|a - b|`` over the outputs.
        max_ulp: the largest distance in units in the last place (the replay's dtype), where
            the metric exists.
        mismatched: output elements outside the comparison's tolerance (None: not measured);
            above 0 means the local error crosses the tolerance.
        replayed: the replay run fed this call the reference's inputs.
        compared: the local error was measured.
        reason: why the call was not replayed or not measured; or, for a measured call, what
            to keep in mind (it drew random numbers, inputs kept live).
        container: another selected call ran inside this one: its local error only carries
            the error of what runs after its last replayed child.
        random: the call drew random numbers (its local error includes them).
        order: position in the replay run's execution (completion) order.
        unreadable: output bodies that could not be read (then not measured; ``reason`` names them).
    """

    call: CallKey
    rel_l2: float | None
    max_abs_diff: float | None
    max_ulp: int | None
    mismatched: int | None
    replayed: bool
    compared: bool
    reason: str | None
    container: bool
    random: bool
    order: int
    unreadable: tuple[Unreadable, ...] = ()

    @property
    def exceeds(self) -> bool:
        """The local error crosses the comparison's tolerance (some output element is out of it)."""
        return bool(self.mismatched)


@dataclass(frozen=True)
class LocalReport:
    """Local errors of every selected call of a replay run, against the run it was replayed from.

    Attributes:
        replay: the replay run's directory.
        reference: the reference run's directory.
        replayed_from: what the replay run's manifest records (``path``, ``run_id``).
        source: ``dir1`` (dir1 is a replay of dir2) or ``replay`` (``--replay``).
        errors: one entry per call, largest ``rel_l2`` first, unmeasured calls last: a tuple,
            or, for a comparison of several windows of steps, a :class:`~.local.Ranked` that
            reads them back from a temporary file when iterated (equal to the tuple).
        first: the first call in execution order whose local error crosses the tolerance.
    """

    replay: str
    reference: str
    replayed_from: dict[str, str]
    source: str
    errors: Sequence[LocalError]
    first: LocalError | None

    @property
    def not_compared(self) -> tuple[LocalError, ...]:
        """Calls whose local error could not be measured (they fail the comparison closed)."""
        unmeasured = getattr(self.errors, "unmeasured", None)  # a Ranked: without reading the measured ones
        if unmeasured is not None:
            return tuple(unmeasured())
        return tuple(e for e in self.errors if not e.compared)


@dataclass(frozen=True)
class OracleCall:
    """One call's oracle verdict: the candidate's local error against K times the reference's.

    Attributes:
        call: the call.
        candidate_rel_l2: local error of the candidate's replay (dir1) against the oracle.
        reference_rel_l2: local error of the reference's replay (dir2) against the oracle.
        ratio: ``candidate_rel_l2 / reference_rel_l2`` (None when undefined).
        flagged: ``candidate_rel_l2 > factor * reference_rel_l2`` (with a zero reference
            error: any candidate error).
        evaluated: both local errors were measured.
        reason: why the call could not be evaluated, or what to keep in mind.
        container: the call is a container in either replay.
    """

    call: CallKey
    candidate_rel_l2: float | None
    reference_rel_l2: float | None
    ratio: float | None
    flagged: bool
    evaluated: bool
    reason: str | None
    container: bool


@dataclass(frozen=True)
class OracleReport:
    """The oracle verdict over every call (see ``docs/compare.md``, "Oracle verdict").

    Attributes:
        run: the oracle run's directory.
        run_id: its run id.
        factor: K.
        calls: every call, in the candidate replay's execution order (a tuple, or, for a
            comparison of several windows of steps, an :class:`~.entries.Entries` equal to it).
    """

    run: str
    run_id: str | None
    factor: float
    calls: Sequence[OracleCall]

    @property
    def flagged(self) -> tuple[OracleCall, ...]:
        return tuple(c for c in self.calls if c.flagged)

    @property
    def not_evaluated(self) -> tuple[OracleCall, ...]:
        return tuple(c for c in self.calls if not c.evaluated)

    @property
    def verdict(self) -> str:
        """``mismatch`` (some call flagged), ``incomplete`` (some call not evaluated), ``empty`` or ``match``."""
        if not self.calls:
            return "empty"
        if self.flagged:
            return "mismatch"
        return "incomplete" if self.not_evaluated else "match"


@dataclass(frozen=True)
class CompareResult:
    """Everything a comparison found; reports are rendered from it.

    Attributes:
        dir1, dir2: the run directories compared (dir2 is the reference).
        backend1, backend2: their backends.
        status1, status2: their run status (``complete``, ``running``...).
        options: what was asked for.
        tensors: one entry per paired or one-sided tensor, by step then call start order: a
            tuple, or, when statistics tables decided whole steps, an
            :class:`~.entries.Entries` that makes those steps' entries when they are read
            (equal to the tuple, item for item; slices are tuples).
        calls: one entry per module call, same order (a tuple or an :class:`~.entries.Entries`).
        first_divergence: the earliest call (execution order) whose outputs differ, or None.
        introduced: calls where error is introduced, largest growth first (a few).
        summary: the counts.
        notes: remarks for the reader (incomplete steps, steps missing on one side...).
        local: local errors measured by replay (dir1 a replay of dir2, or ``--replay``), else None.
            Then ``first_divergence`` is the measured one (``basis`` ``measured``, None when no
            call's local error crosses the tolerance) and ``threshold_divergence`` the one the
            tolerance locates along the propagated comparison.
        threshold_divergence: see ``local``; None without local errors.
        oracle: the oracle verdict (``--oracle``), else None; it then decides the verdict.
        unreadable: every tensor body that could not be read (compare and local error), each
            run's file once; any makes :attr:`exit_code` 2.
        token_alignment: with ``align_tokens``, how the two runs' tokens were aligned (the
            steps compared are its steps); tokens not aligned are a coverage gap unless
            ``allow_unaligned``.
    """

    dir1: str
    dir2: str
    backend1: str
    backend2: str
    status1: str
    status2: str
    options: CompareOptions
    tensors: Sequence[TensorResult]
    calls: Sequence[CallResult]
    first_divergence: Divergence | None
    introduced: tuple[Divergence, ...]
    summary: Summary
    notes: tuple[str, ...] = field(default=())
    local: LocalReport | None = None
    threshold_divergence: Divergence | None = None
    oracle: OracleReport | None = None
    unreadable: tuple[Unreadable, ...] = ()
    token_alignment: TokenAlignment | None = None

    @property
    def verdict(self) -> str:
        """``match``, ``mismatch`` (values differ), ``incomplete`` (coverage gaps only) or ``empty``.

        With an oracle, the oracle's verdict (:attr:`OracleReport.verdict`). With local errors,
        a call whose local error crosses the tolerance is a mismatch, and one that could not
        be measured a coverage gap. A step asked for that neither run has is a coverage gap in
        every case (fail closed).
        """
        if self.oracle is not None:
            verdict = self.oracle.verdict
            return "incomplete" if verdict == "match" and self.summary.steps_in_neither else verdict
        verdict = self._compared_verdict()
        if self.local is not None and verdict in ("match", "incomplete"):
            if self.local.first is not None:
                return "mismatch"
            if self.local.not_compared:
                return "incomplete"
        return verdict

    def _compared_verdict(self) -> str:
        s = self.summary
        if s.compared == 0 and not (s.only_in_dir1 or s.only_in_dir2 or s.not_compared or s.unaligned):
            return "empty"
        if s.mismatched:
            return "mismatch"
        unverified = s.stats_only_matched if not self.options.allow_stats_only else 0
        unaligned = s.unaligned if not self.options.allow_unaligned else 0
        tokens = self.token_alignment
        if tokens is not None and not tokens.complete and not self.options.allow_unaligned:
            unaligned += 1  # tokens not compared: a coverage gap like a declared unaligned tensor
        if (s.only_in_dir1 or s.only_in_dir2 or s.not_compared or s.calls_only_in_dir1 or s.calls_only_in_dir2
                or s.steps_only_in_dir1 or s.steps_only_in_dir2 or s.steps_in_neither or unverified or unaligned
                or s.compared == 0):
            return "incomplete"
        return "match"

    @property
    def exit_code(self) -> int:
        """2 when a tensor body could not be read (the user must repair or recapture a run, whatever
        else was found); else 0 when everything was compared and matched; 1 otherwise (never 0 for
        an empty comparison)."""
        if self.unreadable:
            return 2
        return 0 if self.verdict == "match" else 1

    @property
    def ok(self) -> bool:
        return self.exit_code == 0
