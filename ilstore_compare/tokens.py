"""Token alignment: which token of one run is which token of the other, whatever the batching.

vLLM packs the tokens of every scheduled request into one flat dimension (``[T, ...]``), a
different mix every step; Hugging Face holds ``[B, S, ...]`` with padding, or runs one prompt
at a time. To compare them, each run's steps are read as *compositions* — per step, which
request each token belongs to, at which position, with which token id — and the requests of
the two runs are matched:

1. by exact token ids (the whole sequence each run fed the model), then
2. by the longest common prefix of token ids, longest first.

A token is *aligned* when both runs fed the same request the same id at the same position and
every earlier position agreed too. Everything else is counted with a reason. The comparer then
compares the aligned tokens only (:mod:`.tokens_view`).

Compositions come from (see :func:`read_composition`):

* the ``ilstore.batch`` record that the vLLM plug-in writes each step
  (:mod:`ilstore.integrations.vllm_batch`): a *packed* step;
* otherwise the step's token ids, the first integer tensor among the calls' ``input_ids``
  keyword or ``inputs[0]`` (Hugging Face: ``model``'s ``input_ids`` or ``embed_tokens``'s
  ``inputs[0]``): a 2-D ``[B, S]`` tensor is a *batched* step, whose padding and positions come
  from a 2-D ``attention_mask`` of the step (``[B, L]``, ``L >= S``: positions are its running
  count minus one over the last ``S`` columns; zeros are padding); without a mask every token
  is real, and its position is the one the run recorded: the integer ``position_ids`` (Hugging
  Face) or ``positions`` (vLLM) keyword of a call of the step, shaped like the ids (or ``[1, S]``,
  shared by the rows). Only where none was recorded is the position guessed: a row continues its
  previous request when the step holds one token per row (a decode step), else starts a new one
  at position 0 — which misreads a new one-token prompt as a decode step, so the composition's
  ``source`` says so. A 1-D ``[T]`` tensor without a record is read the same way, as a one-row
  batch: a single sequence (one prompt per run).

In a batched run a row whose first real token is at position 0 starts a new request (named
``s<step>r<row>``); a row at a later position continues the request last seen in that row —
with recorded positions (no mask) only when it does not skip past that request's next position
(a position at or before it is a recomputation); a row that does starts a new request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Slot", "StepRequest", "StepLayout", "RunComposition", "RequestMatch", "AlignedStep", "TokenAlignment",
           "align", "PACKED", "BATCHED"]

PACKED = "packed"
BATCHED = "batched"

# Reasons a token is not aligned (the report counts tokens per reason and run).
NO_REQUEST = "its request has no counterpart in the other run (no request shares its first token id)"
DIVERGED = "after its request's token ids differ from the other run's"
PAST_END = "past the end of the other run's request"
REPEATED = "its position was fed again in a later step (recomputed); the first one is compared"


@dataclass(frozen=True, order=True)
class Slot:
    """Where one token sits in a run: the step, the batch row (0 when packed), the token index.

    For a packed step ``index`` is the offset in the flat token dimension; for a batched one the
    column in ``[B, S]``.
    """

    step: int
    row: int
    index: int


@dataclass(frozen=True)
class StepRequest:
    """One request's tokens in one step.

    Attributes:
        request: the request id (the engine's, or ``s<step>r<row>`` for a batched run).
        row: the row of per-request tensors (packed: the request's index in the step; batched:
            its batch row).
        positions, token_ids, slots: the request's tokens in this step, in order.
        last: the token whose row a per-request tensor holds (packed: the last scheduled
            token; batched: the token in the last column, when it is not padding), or None.
    """

    request: str
    row: int
    positions: tuple[int, ...]
    token_ids: tuple[int, ...]
    slots: tuple[Slot, ...]
    last: Slot | None


@dataclass(frozen=True)
class StepLayout:
    """One step's composition: ``packed`` (``[T, ...]``) or ``batched`` (``[B, S, ...]``)."""

    step: int
    layout: str
    num_tokens: int  # T, or S
    num_rows: int  # the requests (packed), or B
    requests: tuple[StepRequest, ...]


@dataclass(frozen=True)
class RunComposition:
    """Every step's composition of one run, and where it was read from."""

    steps: tuple[StepLayout, ...]
    source: str

    def step(self, step: int) -> StepLayout | None:
        return next((s for s in self.steps if s.step == step), None)


@dataclass(frozen=True)
class RequestMatch:
    """How a request of one run was matched with the other's.

    Attributes:
        request1, request2: the request ids (None: no counterpart).
        how: ``exact`` (same token ids), ``prefix`` (longest common prefix) or ``unmatched``.
        tokens1, tokens2: tokens each run fed for the request.
        aligned: tokens aligned.
        diverges_at: the first position whose token ids differ, if any.
    """

    request1: str | None
    request2: str | None
    how: str
    tokens1: int
    tokens2: int
    aligned: int
    diverges_at: int | None = None


@dataclass(frozen=True)
class AlignedStep:
    """One step of the aligned comparison: one request's aligned tokens in one dir1 step.

    Attributes:
        step: its number in the aligned comparison (what the report's steps are).
        step1: the dir1 step; steps2: the dir2 step(s) its tokens come from.
        request1, request2: the matched requests.
        tokens1, tokens2: the aligned tokens, pairwise, in dir1's order.
        positions: their positions.
        last1, last2: ``(step, row)`` of each run's per-request rows (logits) for this step's
            last token, when that token is the one the run computed them for; else None.
    """

    step: int
    step1: int
    steps2: tuple[int, ...]
    request1: str
    request2: str
    tokens1: tuple[Slot, ...]
    tokens2: tuple[Slot, ...]
    positions: tuple[int, ...]
    last1: tuple[int, int] | None
    last2: tuple[int, int] | None


@dataclass(frozen=True)
class TokenAlignment:
    """The token alignment of two runs: the report's ``token_alignment``.

    Attributes:
        source1, source2: where each run's composition was read from.
        tokens1, tokens2: tokens each run fed the model (each position of a request once).
        aligned: tokens aligned (the same in both runs).
        requests: every request of either run, matched or not.
        not_aligned: ``(run, reason, tokens)`` for the tokens not aligned.
        steps: the aligned comparison's steps.
    """

    source1: str
    source2: str
    tokens1: int
    tokens2: int
    aligned: int
    requests: tuple[RequestMatch, ...]
    not_aligned: tuple[tuple[str, str, int], ...]
    steps: tuple[AlignedStep, ...] = field(repr=False)

    @property
    def complete(self) -> bool:
        """Every token of both runs is aligned."""
        return self.aligned == self.tokens1 == self.tokens2

    def to_json(self) -> dict[str, Any]:
        return {
            "source1": self.source1, "source2": self.source2, "tokens1": self.tokens1, "tokens2": self.tokens2,
            "aligned": self.aligned, "complete": self.complete,
            "requests": [{"request1": r.request1, "request2": r.request2, "how": r.how, "tokens1": r.tokens1,
                          "tokens2": r.tokens2, "aligned": r.aligned, "diverges_at": r.diverges_at}
                         for r in self.requests],
            "not_aligned": [{"run": run, "reason": reason, "tokens": n} for run, reason, n in self.not_aligned],
            "steps": [{"step": s.step, "step1": s.step1, "steps2": list(s.steps2), "request1": s.request1,
                       "request2": s.request2, "tokens": len(s.tokens1), "first_position": s.positions[0],
                       "last_position": s.positions[-1], "per_request_rows": s.last1 is not None}
                      for s in self.steps],
        }


# -- requests as sequences ---------------------------------------------------------------------
@dataclass
class _Request:
    """A request's tokens across a run's steps, each position once (the first time it was fed)."""

    tokens: dict[int, tuple[int, Slot]] = field(default_factory=dict)
    repeated: int = 0

    def ordered(self) -> list[tuple[int, int, Slot]]:
        return [(p, t, s) for p, (t, s) in sorted(self.tokens.items())]


def _requests(comp: RunComposition) -> dict[str, _Request]:
    out: dict[str, _Request] = {}
    for layout in comp.steps:
        for req in layout.requests:
            seq = out.setdefault(req.request, _Request())
            for pos, tok, slot in zip(req.positions, req.token_ids, req.slots, strict=True):
                if pos in seq.tokens:
                    seq.repeated += 1
                else:
                    seq.tokens[pos] = (tok, slot)
    return out


def _common_prefix(a: Sequence[tuple[int, int, Slot]], b: Sequence[tuple[int, int, Slot]]) -> int:
    n = 0
    for (p1, t1, _), (p2, t2, _) in zip(a, b, strict=False):
        if p1 != p2 or t1 != t2:
            break
        n += 1
    return n


def _match(req1: Mapping[str, _Request], req2: Mapping[str, _Request]) -> list[tuple[str, str, str]]:
    """``(request1, request2, how)``: exact token ids first, then longest common prefix first."""
    seq1 = {r: [t for _, t, _ in q.ordered()] for r, q in req1.items()}
    seq2 = {r: [t for _, t, _ in q.ordered()] for r, q in req2.items()}
    pairs: list[tuple[str, str, str]] = []
    free2 = list(req2)
    for r1 in req1:
        hit = next((r2 for r2 in free2 if seq2[r2] == seq1[r1] and req2[r2].tokens.keys() == req1[r1].tokens.keys()),
                   None)
        if hit is not None:
            pairs.append((r1, hit, "exact"))
            free2.remove(hit)
    done1 = {p[0] for p in pairs}
    order1, order2 = {r: i for i, r in enumerate(req1)}, {r: i for i, r in enumerate(req2)}
    candidates = sorted(((_common_prefix(req1[r1].ordered(), req2[r2].ordered()), r1, r2)
                         for r1 in req1 if r1 not in done1 for r2 in free2),
                        key=lambda c: (-c[0], order1[c[1]], order2[c[2]]))
    for n, r1, r2 in candidates:
        if n > 0 and r1 not in done1 and r2 in free2:
            pairs.append((r1, r2, "prefix"))
            done1.add(r1)
            free2.remove(r2)
    return pairs


# -- the alignment -----------------------------------------------------------------------------
def align(comp1: RunComposition, comp2: RunComposition) -> TokenAlignment:
    """Match the requests of two runs and pair their common tokens.

    Args:
        comp1: dir1's composition; its steps and request order give the aligned steps' order.
        comp2: dir2's (the reference's).

    Returns:
        The alignment: counts, requests, reasons, and the steps of the aligned comparison.

    Example:
        >>> def packed(step, reqs):  # reqs: (id, first position, token ids)
        ...     out, off = [], 0
        ...     for row, (rid, p0, ids) in enumerate(reqs):
        ...         slots = tuple(Slot(step, 0, off + i) for i in range(len(ids)))
        ...         out.append(StepRequest(rid, row, tuple(range(p0, p0 + len(ids))), tuple(ids), slots, slots[-1]))
        ...         off += len(ids)
        ...     return StepLayout(step, PACKED, off, len(reqs), tuple(out))
        >>> a = RunComposition((packed(0, [("a", 0, [5, 6]), ("b", 0, [7])]),), "test")
        >>> b = RunComposition((packed(0, [("x", 0, [7])]), packed(1, [("y", 0, [5, 6])])), "test")
        >>> t = align(a, b)
        >>> t.aligned, t.complete, [(s.request1, s.request2, s.steps2) for s in t.steps]
        (3, True, [('a', 'y', (1,)), ('b', 'x', (0,))])
    """
    req1, req2 = _requests(comp1), _requests(comp2)
    pairs = _match(req1, req2)
    paired1 = {r1: (r2, how) for r1, r2, how in pairs}
    paired2 = {r2 for _, r2, _ in pairs}
    to2: dict[Slot, Slot] = {}  # aligned dir1 slot -> dir2 slot
    lost: dict[tuple[str, str], int] = {}
    matches: list[RequestMatch] = []

    def lose(run: str, reason: str, n: int) -> None:
        if n:
            lost[(run, reason)] = lost.get((run, reason), 0) + n

    for r1, q1 in req1.items():
        lose("dir1", REPEATED, q1.repeated)
        if r1 not in paired1:
            matches.append(RequestMatch(r1, None, "unmatched", len(q1.tokens), 0, 0))
            lose("dir1", NO_REQUEST, len(q1.tokens))
            continue
        r2, how = paired1[r1]
        q2 = req2[r2]
        a, b = q1.ordered(), q2.ordered()
        n = _common_prefix(a, b)
        for (_, _, s1), (_, _, s2) in zip(a[:n], b[:n], strict=True):
            to2[s1] = s2
        diverges = a[n][0] if n < len(a) and n < len(b) else None
        for run, seq, other in (("dir1", a, b), ("dir2", b, a)):
            rest = len(seq) - n
            lose(run, DIVERGED if n < len(other) else PAST_END, rest)
        matches.append(RequestMatch(r1, r2, how, len(a), len(b), n, diverges))
    for r2, q2 in req2.items():
        lose("dir2", REPEATED, q2.repeated)
        if r2 not in paired2:
            matches.append(RequestMatch(None, r2, "unmatched", 0, len(q2.tokens), 0))
            lose("dir2", NO_REQUEST, len(q2.tokens))
    steps = _aligned_steps(comp1, comp2, paired1, to2)
    return TokenAlignment(comp1.source, comp2.source, sum(len(q.tokens) for q in req1.values()),
                          sum(len(q.tokens) for q in req2.values()), len(to2), tuple(matches),
                          tuple((run, reason, n) for (run, reason), n in lost.items()), tuple(steps))


def _aligned_steps(comp1: RunComposition, comp2: RunComposition, paired1: Mapping[str, tuple[str, str]],
                   to2: Mapping[Slot, Slot]) -> list[AlignedStep]:
    lasts2 = {req.last: (layout.step, req.row) for layout in comp2.steps for req in layout.requests
              if req.last is not None}
    out: list[AlignedStep] = []
    for layout in comp1.steps:
        for req in layout.requests:
            if req.request not in paired1:
                continue
            kept = [(s, p) for s, p in zip(req.slots, req.positions, strict=True) if s in to2]
            if not kept:
                continue
            tokens1 = tuple(s for s, _ in kept)
            tokens2 = tuple(to2[s] for s in tokens1)
            # per-request rows compare only where both hold this step's last aligned token
            last1 = (layout.step, req.row) if req.last is not None and req.last == tokens1[-1] else None
            last2 = lasts2.get(tokens2[-1])
            steps2 = tuple(dict.fromkeys(s.step for s in tokens2))
            out.append(AlignedStep(len(out), layout.step, steps2, req.request, paired1[req.request][0], tokens1,
                                   tokens2, tuple(p for _, p in kept), last1, last2))
    return out


# -- building compositions -----------------------------------------------------------------------
def packed_step(step: int, request_ids: Sequence[str], starts: Sequence[int], positions: Sequence[int],
                token_ids: Sequence[int]) -> StepLayout:
    """A packed step from the ``ilstore.batch`` record's lists."""
    requests = []
    for row, rid in enumerate(request_ids):
        lo, hi = starts[row], starts[row + 1]
        slots = tuple(Slot(step, 0, i) for i in range(lo, hi))
        requests.append(StepRequest(str(rid), row, tuple(positions[lo:hi]), tuple(token_ids[lo:hi]), slots,
                                    slots[-1] if slots else None))
    return StepLayout(step, PACKED, len(token_ids), len(request_ids), tuple(requests))


def continues(next_position: int | None, first: int) -> bool:
    """Whether tokens fed from recorded position ``first`` continue the request whose next
    position is ``next_position`` (None: there is none): not at position 0, and not past it (at
    or before it is a recomputation of the same request)."""
    return next_position is not None and 0 < first <= next_position


def batched_steps(steps: Iterable[tuple[int, list[list[int]], list[list[int]] | None, list[list[int]] | None]]
                  ) -> list[StepLayout]:
    """Batched steps from each step's ``[B, S]`` token ids, optional ``[B, L]`` attention mask
    and optional recorded ``[B, S]`` (or ``[1, S]``) positions.

    Requests follow rows across steps (see the module docstring). Recorded positions are used
    where there is no mask (a mask gives the positions itself); a row's must be consecutive.

    Example:
        >>> left_padded = [[0, 5, 6], [7, 8, 9]]
        >>> s0, s1 = batched_steps([(0, left_padded, [[0, 1, 1], [1, 1, 1]], None),
        ...                         (1, [[4], [3]], [[0, 1, 1, 1], [1] * 4], None)])
        >>> [(r.request, r.positions) for r in s0.requests], [(r.request, r.positions) for r in s1.requests]
        ([('s0r0', (0, 1)), ('s0r1', (0, 1, 2))], [('s0r0', (2,)), ('s0r1', (3,))])
        >>> one_by_one = [(0, [[3, 4, 5]], None, [[0, 1, 2]]), (1, [[20]], None, [[3]]), (2, [[7]], None, [[0]])]
        >>> [(r.request, r.positions) for s in batched_steps(one_by_one) for r in s.requests]
        [('s0r0', (0, 1, 2)), ('s0r0', (3,)), ('s2r0', (0,))]
    """
    current: dict[int, tuple[str, int]] = {}  # row -> (request, next position)
    out = []
    for step, ids, mask, recorded in steps:
        rows = len(ids)
        width = len(ids[0]) if rows else 0
        requests = []
        for b in range(rows):
            if mask is not None:
                counted = [0] * len(mask[b])
                total = 0
                for j, m in enumerate(mask[b]):
                    total += 1 if m else 0
                    counted[j] = total - 1
                tail_mask, tail_pos = mask[b][-width:], counted[-width:]
                cols = [j for j in range(width) if tail_mask[j]]
                positions = [tail_pos[j] for j in cols]
            elif recorded is not None:
                cols = list(range(width))
                positions = [int(p) for p in recorded[b if len(recorded) == rows else 0]]
            else:  # nothing recorded: a one-token row is guessed to be a decode step of its request
                cols = list(range(width))
                prev = current.get(b)
                start = prev[1] if prev is not None and width == 1 else 0
                positions = [start + j for j in cols]
            if not cols:
                continue
            prev = current.get(b)
            if mask is None and recorded is not None:
                new = not continues(prev[1] if prev is not None else None, positions[0])
            else:
                new = positions[0] == 0 or prev is None
            if new:
                current[b] = (f"s{step}r{b}", 0)
            rid = current[b][0]
            current[b] = (rid, positions[-1] + 1)
            slots = tuple(Slot(step, b, j) for j in cols)
            last = Slot(step, b, width - 1) if cols[-1] == width - 1 else None
            requests.append(StepRequest(rid, b, tuple(positions), tuple(int(ids[b][j]) for j in cols), slots, last))
        out.append(StepLayout(step, BATCHED, width, rows, tuple(requests)))
    return out
