"""The comparison engine: plan the pairs, stream them through the metrics, assemble the result.

Memory stays bounded: each worker holds at most one pair of tensors at a time (plus a few
chunk-sized temporaries, see :mod:`.metrics`; a large float32/float64 pair is read from its files
a piece at a time instead, :func:`.metrics.compare_files`), and at most ``_AHEAD * workers``
pairs are queued; only the metrics are kept.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ilstore.errors import IlstoreError, StoreError
from ilstore.keys import TensorKey
from ilstore.records import tensor_stats
from ilstore.store.base import Body, StoreReader
from ilstore.store.registry import open_run

from . import columnar, stats_table
from ._heap import HeapGuard
from ._kernel import FILE_CHUNK
from ._kernel import enabled as kernel_enabled
from .align import RuleMismatch, Side, materialize, squeezable
from .divergence import analyse_calls, merge_introduced
from .entries import Entries, Held
from .local import LocalWindows, local_notes, measured_divergence
from .maps import pick_map
from .metrics import Split, compare_files, compare_stats, compare_tensors, is_float_dtype
from .options import CompareOptions
from .oracle import OracleWindows
from .pairing import Pair, Planner, build_plan, compile_patterns, neither_notes, resolve_run_dir
from .provenance import find_sources, open_option_run
from .result import (
    MATCH,
    MISMATCH,
    NOT_COMPARED,
    ONLY_IN_DIR1,
    ONLY_IN_DIR2,
    SHAPE_MISMATCH,
    STATS_ONLY_MATCH,
    STATS_ONLY_MISMATCH,
    UNALIGNED,
    UNREADABLE,
    CallResult,
    CompareResult,
    Divergence,
    OracleReport,
    Summary,
    TensorResult,
    Unreadable,
)
from .spill import Spill

__all__ = ["compare", "Progress"]

_log = logging.getLogger(__name__)

#: ``progress(done, total)``, called after each tensor pair.
Progress = Callable[[int, int], None]


def compare(dir1: str | Path, dir2: str | Path, options: CompareOptions | None = None, *,
            progress: Progress | None = None, **changes: Any) -> CompareResult:
    """Compare two runs (any backends); dir2 is the reference.

    Args:
        dir1: a run directory, or a directory holding exactly one run.
        dir2: the reference run, same.
        options: what to compare and how (default: :class:`CompareOptions`'s defaults).
        progress: called as ``progress(done, total)`` after each tensor pair.
        **changes: options given by name instead (or on top of ``options``):
            ``rtol``, ``atol``, ``steps``, ``modules``, ``exact``, ``equal_nan``,
            ``allow_stats_only``, ``name_map``, ``squeeze_shapes``, ``allow_unaligned``,
            ``workers``, ``replay``, ``oracle``, ``oracle_factor``, ``keep_going``; see
            :class:`CompareOptions`.

    Returns:
        The :class:`CompareResult`; ``result.exit_code`` is 0 only when every tensor was
        compared and matched. When dir1 is a replay of dir2 (its manifest's ``replayed_from``),
        or with ``replay``, ``result.local`` holds every call's local error and
        ``first_divergence`` is the measured one; with ``oracle``, ``result.oracle`` holds the
        oracle verdict, which decides the exit status. With ``keep_going``, a tensor body that
        cannot be read is listed in ``result.unreadable`` (status ``unreadable``) and the rest
        is compared; ``result.exit_code`` is then 2.

    Raises:
        RunNotFoundError: a directory is missing or holds no run.
        AmbiguousRunError: a directory holds several runs.
        CorruptFileError: a metadata file (manifest, journal, index, structure) is unreadable, or,
            without ``keep_going``, a tensor file (the message names it).
        NameMapError: a bad name map.
        OptionError: a bad or unknown option (a :class:`CompareError`); a ``replay`` run that
            is not a replay of dir2, or a dir1/dir2 that is not a replay of ``oracle``.

    Example:
        >>> import tempfile, torch, ilstore
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> def run(x):
        ...     with ilstore.capture(model, {"output_dir": tempfile.mkdtemp()}) as cap:
        ...         _ = model(x)
        ...     return cap.run_dir
        >>> result = compare(run(torch.ones(1, 4)), run(torch.full((1, 4), 1.5)), rtol=1e-2, atol=1e-3)
        >>> result.exit_code, result.verdict, result.summary.mismatched
        (1, 'mismatch', 2)
        >>> d = result.first_divergence
        >>> d.module, d.origin
        ('0', 'inherited')
    """
    options = CompareOptions.create(options, **changes)
    patterns = compile_patterns(options.modules) if options.modules is not None else None
    path1, path2 = resolve_run_dir(dir1), resolve_run_dir(dir2)
    with ExitStack() as stack:
        r1 = stack.enter_context(open_run(path1))
        r2 = stack.enter_context(open_run(path2))
        options, pick_notes = _auto_map(options, r1, r2)
        from .tokens_view import align_runs  # --align-tokens: compare token-aligned views of the runs

        r1, r2, token_alignment = align_runs(r1, r2, options)
        nmap = options.map
        replay = open_option_run(stack, options, "replay")
        oracle = open_option_run(stack, options, "oracle")
        sources = find_sources(r1, r2, replay, oracle)  # checked before the long part
        # -- issue 13: statistics-only pairs from the runs' statistics tables (see .stats_table) --
        table = stats_table.attach(r1, r2, options) if sources.local_run is None and oracle is None else None
        p1, p2 = table.readers if table is not None else (r1, r2)
        # whole steps that pass, planned and decided from the tables (see .columnar)
        plain = columnar.plain_steps(table, options, patterns, failing=True) if table is not None else None
        # -- end issue 13 --

        heap = HeapGuard()
        pool = assist = None
        if options.workers > 1:  # one pool: the workers run the pairs and help each other with the large ones
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=options.workers,
                                                          thread_name_prefix="ilstore-compare"))
            assist = _Assist(options.workers, pool)

        def one(pair: Pair, bodies: tuple[Body, Body] | None | bool = None) -> TensorResult:
            if table is not None and (done := table.result(pair)) is not None:  # issue 13
                _close(bodies)
                return done
            size = _pair_bytes(pair)
            # a pair read from its files is not split: it holds no memory, so other pairs run beside it
            # (split too, with 2 workers, 2 x 300 MB: w2/w1 1.38-1.41 against 1.51-1.68, paired)
            helped = assist if size >= _SPLIT_BYTES and not isinstance(bodies, tuple) else None
            result = _compare_pair(pair, r1, r2, options, helped, bodies)
            heap.after(size)  # (nothing to give back after a pair compared from its files)
            return result

        def opened(pair: Pair) -> tuple[Body, Body] | None:
            if table is not None and table.result(pair) is not None:
                return None
            return _open_bodies(pair, r1, r2, options)

        lost: list[Unreadable]
        calls: Sequence[CallResult]
        beside: LocalWindows | OracleWindows | None = None
        summary: Summary | None = None
        if plain is not None and plain.templates:  # steps decided in arrays (.columnar), failing ones too
            plan = build_plan(p1, p2, steps=options.steps, modules=patterns, name_map=nmap,
                              planned_elsewhere=plain.templates, required=options.required_steps or ())
            if table is not None:
                table.results(plan.pairs, options)
            _log.info("comparing %d tensor pair(s) in %d module call(s)", len(plan.pairs), len(plan.calls))
            _prepare_loads(plan.pairs, r1, r2)
            report = progress
            if progress is not None:  # the plain steps are decided already
                report = _after(progress, sum(len(t.pairs) for t in plain.templates.values()), len(plan.pairs))
            tensors: Sequence[TensorResult] = tuple(_stream(plan.pairs, one, options.workers, report, pool, opened))
            lost = [u for t in tensors for u in t.unreadable]
            tensors, calls, first, introduced = columnar.analyse(plan, plain, tensors)
            plan_notes, steps = plan.notes, (plan.steps, plan.steps_only1, plan.steps_only2, plan.steps_missing)
        else:
            # local errors and the oracle verdict are found beside the comparison, window by window
            if sources.local_run is not None:
                beside = LocalWindows(sources.local_run, sources.local_source, sources.replayed_from, r2, options,
                                      nmap, patterns)
            elif oracle is not None:
                beside = OracleWindows(r1, r2, oracle, options, patterns)
            planner = Planner(p1, p2, steps=options.steps, modules=patterns, name_map=nmap,
                              required=options.required_steps or ())
            whole = _compare_windows(planner, one, table, r1, r2, options, progress,
                                     beside.window if beside is not None else None, pool, opened)
            tensors, calls, first, introduced, lost = whole.tensors, whole.calls, whole.first, whole.introduced, \
                whole.lost
            plan_notes, steps, summary = whole.notes, whole.steps, whole.summary
        backend1, backend2, status1, status2 = r1.name, r2.name, r1.status, r2.status
        notes = capture_notes(r1, r2) + pick_notes + list(plan_notes) + sources.notes
        local = oracle_report = threshold = None
        if isinstance(beside, LocalWindows):
            local = beside.report(_WINDOW_PAIRS)
            lost += beside.lost
            threshold, first = first, measured_divergence(local, calls, tensors)
            notes += local_notes(local)
        elif isinstance(beside, OracleWindows):
            assert oracle is not None and options.oracle_factor is not None
            oracle_report = OracleReport(str(oracle.run_dir), sources.oracle_id, options.oracle_factor,
                                         beside.calls(_WINDOW_PAIRS))
            lost += beside.lost
    if summary is None:
        summary = Summary.of(tensors, calls, *steps)
    return CompareResult(dir1=str(path1), dir2=str(path2), backend1=backend1, backend2=backend2, status1=status1,
                         status2=status2, options=options, tensors=tensors,
                         calls=calls if isinstance(calls, Entries) else tuple(calls),
                         first_divergence=first, introduced=tuple(introduced), summary=summary,
                         notes=tuple(notes), local=local, threshold_divergence=threshold, oracle=oracle_report,
                         unreadable=_once(lost), token_alignment=token_alignment)


def capture_notes(r1: StoreReader, r2: StoreReader) -> list[str]:
    """What each run's capture warned about (the manifest's ``"warnings"``: a compiled model whose
    hooks never fired, steps with no hooked module...), as the report's first notes."""
    return [f"{side}{CAPTURE_NOTE}{w}" for side, run in (("dir1", r1), ("dir2", r2)) for w in run.capture_warnings]


#: What a note of :func:`capture_notes` says after ``dir1`` or ``dir2``.
CAPTURE_NOTE = "'s capture warned: "


#: About how many tensor pairs a window of steps holds (:func:`_compare_windows`). A window's
#: plan (both runs' parsed structures), entries and calls are what a comparison of small tensors
#: holds most of: ~8 KB a pair on the long-run workload. ``ilstore-compare --format json`` of two
#: hdf5 tensors-mode runs of 3,000 steps peaked at 305 MB with 4,096 (over the issue 18 bound of
#: 300 MB), 283 MB with 2,048, 271 MB with 1,024 (pt: 275, 258 MB with 2,048), in the same CPU
#: time (with 1 or 2 workers): a window boundary costs far less than its pairs.
_WINDOW_PAIRS = 1024


@dataclasses.dataclass
class _Whole:
    """What :func:`_compare_windows` found: every entry and call, the first divergence, the
    introduced-error calls, the unreadable bodies, the plan's notes, the steps (compared, dir1
    only, dir2 only, asked for and in neither run) and the counts."""

    tensors: Sequence[TensorResult]
    calls: Sequence[CallResult]
    first: Divergence | None
    introduced: list[Divergence]
    lost: list[Unreadable]
    notes: list[str]
    steps: tuple[list[int], list[int], list[int], list[int]]
    summary: Summary


def _compare_windows(planner: Planner, one: Callable[..., TensorResult], table: Any, r1: StoreReader,
                     r2: StoreReader, options: CompareOptions, progress: Progress | None,
                     beside: Callable[[list[CallResult], int], list[CallResult] | None] | None = None,
                     pool: ThreadPoolExecutor | None = None, opened: _Opener | None = None) -> _Whole:
    """Plan, compare and analyse the steps a window at a time (each about :data:`_WINDOW_PAIRS`
    pairs): no plan of the whole run is held, and the entries and calls of every window after
    the first are kept in a temporary file (:mod:`.spill`), so a comparison of 100,000 steps
    holds one window's plan and entries at a time (issue 18).

    The result is the one of planning every step at once: :func:`~.divergence.analyse_calls`
    works step by step except for whether an earlier step had a differing output (``bad_from``)
    and the calls' execution positions (``order``, shifted by the calls before), and the
    introduced-error calls of the windows are ranked together (:func:`~.divergence.merge_introduced`).
    A comparison that fits in one window holds tuples, as always.

    ``progress`` gets the pairs done and, while steps are still to be planned, an estimate of
    the total from the pairs per step so far (exact once the last window is planned).

    ``beside(calls, last_step)`` is called with each window's calls and the last step it
    planned, before they are kept: what is measured beside the comparison (local errors,
    :class:`~.local.LocalWindows`; the oracle verdict, :class:`~.oracle.OracleWindows`) is
    measured for the same steps, and the calls it gives back (with their local errors; None:
    unchanged) are kept instead. (A run's unreadable body is then found in step order across the
    comparison and the measurement: without ``keep_going``, the first one raises.)

    ``pool``: the workers' threads, shared by every window, and ``opened``: see :func:`_stream`.
    """
    spill: Spill | None = None
    tensor_parts: list[Held[TensorResult]] = []
    call_parts: list[Held[CallResult]] = []
    summaries: list[Summary] = []
    notes, lost = list(planner.notes), []
    steps: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])
    skipped: list[int] = []  # steps only a range selected that neither run has
    first: Divergence | None = None
    introduced: list[Divergence] = []
    before = done = 0  # calls and pairs of the windows so far
    last_total = [0]  # the total progress was last told (none told: 0)
    wanted, start = len(planner.wanted), 0
    while start < wanted or start == 0:
        if table is not None:
            table.forget()  # the last window's nodes
        plan, stop = planner.window(start, _WINDOW_PAIRS)
        notes += plan.notes
        for into, found in zip(steps, (plan.steps, plan.steps_only1, plan.steps_only2, plan.steps_missing),
                               strict=True):
            into += found
        skipped += plan.steps_skipped
        if table is not None:
            table.results(plan.pairs, options)
        _log.info("comparing %d tensor pair(s) in %d module call(s) of steps %d..%d of %d", len(plan.pairs),
                  len(plan.calls), start, stop - 1, wanted)
        _prepare_loads(plan.pairs, r1, r2)
        report = None
        if progress is not None:
            planned = done + len(plan.pairs)
            left = wanted - stop
            total = planned + (round(planned / stop * left) if stop and left else 0)
            report = partial(_counted, progress, done, total, last_total)
        tensors = tuple(_stream(plan.pairs, one, options.workers, report, pool, opened))
        lost += [u for t in tensors for u in t.unreadable]
        calls, first_here, introduced_here = analyse_calls(plan.calls, tensors,
                                                           bad_from=first.step if first is not None else None)
        if before:
            calls = [dataclasses.replace(c, order=c.order + before) for c in calls]
        if beside is not None and stop > start:
            calls = beside(calls, int(planner.wanted[stop - 1])) or calls
        if first is None:
            first = first_here
        introduced = merge_introduced(introduced, introduced_here) if introduced else introduced_here
        summaries.append(Summary.of(tensors, calls, (), (), (), ()))
        before, done = before + len(calls), done + len(plan.pairs)
        if not tensor_parts:  # the first window is held as it is
            tensor_parts.append(tensors)
            call_parts.append(tuple(calls))
        else:
            spill = spill or Spill()
            first_step, last_step = (plan.steps[0], plan.steps[-1]) if plan.steps else (None, None)
            tensor_parts.append(spill.add(tensors, first_step=first_step, last_step=last_step))
            call_parts.append(spill.add(tuple(calls), first_step=first_step, last_step=last_step))
        del plan, tensors, calls
        if stop == start:  # no step at all
            break
        start = stop
    if progress is not None and done != last_total[0]:  # the last windows had no pair: say the total is exact
        progress(done, done)
    notes += neither_notes(steps[3], skipped)  # as build_plan gives them: last
    if len(tensor_parts) == 1:
        all_tensors: Sequence[TensorResult] = tensor_parts[0]
        all_calls: Sequence[CallResult] = call_parts[0]
    else:
        all_tensors, all_calls = Entries(tensor_parts), Entries(call_parts)
    return _Whole(all_tensors, all_calls, first, introduced, lost, notes, steps,
                  Summary.total(summaries, *steps))


def _counted(progress: Progress, before: int, total: int, told: list[int], done: int, _total: int) -> None:
    """``progress`` told of ``before + done`` pairs out of ``total`` (kept in ``told[0]``)."""
    told[0] = total
    progress(before + done, total)


def _prepare_loads(pairs: Sequence[Pair], r1: StoreReader, r2: StoreReader) -> None:
    """Let a reader that can (``prepare_loads``, the hdf5 reader) find every body the pairs will
    load before the workers start: its loads then hold no lock a worker waits on. Each key goes
    with the run's own node for it where the plan holds one (:func:`_load` loads it so too), so
    the reader need not keep the window's structures to look them up again."""
    for index, reader in enumerate((r1, r2)):
        prepare = getattr(reader, "prepare_loads", None)
        if prepare is None:
            continue
        keys: list[tuple[TensorKey, Mapping[str, Any] | None]] = []
        for pair in pairs:
            side = pair.side2 if index else pair.side1
            if side is not None and pair.unaligned is None and _stored(side.node):  # (the table's pairs are not)
                if side.parts or side.select is not None:  # a sum's or a select's node is derived
                    keys.extend((key, None) for key in side.parts or (side.key,))
                else:
                    keys.append((side.key, side.node))
        prepare(keys)


def _after(progress: Progress, decided: int, left: int) -> Progress:
    """``progress`` told that ``decided`` pairs are done, and then counting on from there."""
    total = decided + left
    progress(decided, total)
    return lambda done, _total: progress(decided + done, total)


def _auto_map(options: CompareOptions, r1: StoreReader, r2: StoreReader) -> tuple[CompareOptions, list[str]]:
    """Without a map, the shipped map declared for the runs' models, if one is (and a note)."""
    if options.name_map is not None or not options.auto_map:
        return options, []
    pick = pick_map(r1.manifest, r2.manifest)
    if pick.map is not None:
        _log.info("%s", pick.note)
        options = options.with_map(pick.map)
    return options, [pick.note] if pick.note else []


def _once(entries: Sequence[Unreadable]) -> tuple[Unreadable, ...]:
    """Each run's tensor once (the pair and a replay measurement may both have tried it), in order."""
    seen: dict[tuple[str, str, object], Unreadable] = {}
    for u in entries:
        seen.setdefault((u.run, u.run_dir, u.key), u)
    return tuple(seen.values())


#: Opens a pair's bodies to compare it from its files (:func:`_open_bodies`), or None.
_Opener = Callable[[Pair], "tuple[Body, Body] | None"]


def _stream(pairs: Sequence[Pair], fn: Callable[..., TensorResult], workers: int,
            progress: Progress | None, pool: ThreadPoolExecutor | None = None,
            opened: _Opener | None = None) -> Iterator[TensorResult]:
    """Results in input order.

    With several workers, pairs are loaded and compared in threads (reading releases the GIL,
    and so does the fused metrics kernel, so one worker reads while another computes). A pair
    starts only while the tensor bytes of the pairs running stay within the largest pair's plus
    :data:`_SLACK`: the memory bound of one worker (about 2 x the largest tensor) holds whatever
    ``workers`` is, and two large pairs run one after the other. A pair that must wait for
    memory does not hold back the smaller pairs just behind it: up to :data:`_AHEAD` ``* workers``
    units from the oldest unfinished one may start, the oldest first whenever memory frees. Small pairs run
    in batches of neighbours in this thread (:func:`_units`), a batch counting as one pair here.

    ``pool``: the workers' threads (``workers`` of them), which may also run the pieces of the
    large pairs (:class:`_Assist`); without it, a pool of ``workers`` threads for this call.

    ``opened``: with several workers, a large pair's bodies are opened here (:func:`_open_bodies`)
    as it is about to start (at most :data:`_OPEN_AHEAD` such units a worker hold bodies), and
    ``fn(pair, bodies)`` compares it from its files (False: it could not be, ``fn`` loads it):
    such a pair counts only its pieces' memory (:data:`_FILE_PAIR_BYTES`), so large pairs run
    side by side. Should its files change before it is read (a read that ends early), it is
    loaded beyond the budget: the one case the bound does not cover. Every body opened is
    closed, whatever happens.
    """
    total = len(pairs)
    if workers <= 1:
        for done, pair in enumerate(pairs, 1):
            yield fn(pair)
            if progress is not None:
                progress(done, total)
        return
    units = _units(pairs)  # (first index, end index, bytes): small neighbours go together
    sizes = [size for _start, _end, size in units]
    batched = [size < _BATCH_BYTES for size in sizes]
    budget = max(sizes, default=0) + _SLACK
    ahead = _AHEAD * workers
    running = [0]  # bytes of the units started and not finished
    changed = threading.Condition()  # a unit finished: memory freed, results are ready
    bodies: dict[int, tuple[Body, Body] | bool] = {}  # unit index -> its pair's opened bodies (False: none)
    held = [0]  # units whose bodies are open (not yet given to a worker, or being compared)

    def run(unit: tuple[int, int, int], size: int,
            index: int | None = None) -> tuple[list[TensorResult], BaseException | None]:
        start, end, _bytes = unit
        done: list[TensorResult] = []
        opened_bodies = None
        try:
            opened_bodies = bodies.pop(index, None) if index is not None else None  # (the one taking them)
            if opened_bodies is not None:
                done.append(fn(pairs[start], opened_bodies))
            else:
                for index in range(start, end):
                    done.append(fn(pairs[index]))
        except BaseException as exc:  # noqa: BLE001 - raised after the results before it
            return done, exc
        finally:
            with changed:
                running[0] -= size
                held[0] -= isinstance(opened_bodies, tuple)
        return done, None

    def arrive(index: int) -> bool:
        """Open the bodies of a unit's large pair as it is about to start (see ``opened``), unless
        :data:`_OPEN_AHEAD` units per worker hold theirs: False then (it waits, and is tried again
        when one finishes). True for every other unit, and once opened or found not to open."""
        start, end, size = units[index]
        if opened is None or batched[index] or end - start != 1 or size < 2 * _FILE_BYTES or index in bodies:
            return True
        if held[0] >= _OPEN_AHEAD * workers:
            return False
        found = opened(pairs[start])
        bodies[index] = found if found is not None else False
        if found is not None:
            held[0] += 1
            sizes[index] = min(size, _FILE_PAIR_BYTES)
        return True

    def finished(_future: Future[tuple[list[TensorResult], BaseException | None]]) -> None:
        with changed:  # after the future is done: a waiter that saw it not done is woken
            changed.notify_all()

    futures: dict[int, Future[tuple[list[TensorResult], BaseException | None]]] = {}
    ready: dict[int, tuple[list[TensorResult], BaseException | None]] = {}  # batches run here
    waiting: list[int] = []  # unit indices not started, in order, below next_new
    next_new = next_out = 0
    with ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ilstore-compare"))
        try:
            while next_out < len(units):
                here = None
                with changed:
                    while next_new < min(len(units), next_out + ahead):
                        waiting.append(next_new)
                        next_new += 1
                    for index in list(waiting):  # the oldest first
                        if not arrive(index) or running[0] and running[0] + sizes[index] > budget:
                            continue
                        if batched[index]:  # this thread's, when it would otherwise wait
                            here = index if here is None else here
                            continue
                        running[0] += sizes[index]
                        waiting.remove(index)
                        futures[index] = pool.submit(run, units[index], sizes[index], index)
                        futures[index].add_done_callback(finished)
                    head = futures.get(next_out)
                    if next_out not in ready and (head is None or not head.done()):
                        if here is None or running[0] and running[0] + sizes[here] > budget:
                            changed.wait()
                            continue
                        running[0] += sizes[here]
                        waiting.remove(here)
                    else:
                        here = None
                if here is not None:  # taken above: run it while the oldest runs or waits
                    ready[here] = run(units[here], sizes[here])
                    if not isinstance(ready[here][1], Exception | None):  # Ctrl-C: at once
                        raise ready[here][1]  # type: ignore[misc]
                    continue
                results, exc = ready.pop(next_out) if next_out in ready else futures.pop(next_out).result()
                for index, result in enumerate(results, units[next_out][0] + 1):
                    yield result
                    if progress is not None:
                        progress(index, total)
                if exc is not None:
                    raise exc
                next_out += 1
        finally:
            for future in futures.values():  # after an error: don't start anything new
                future.cancel()
            for index in list(bodies):  # opened, never run (cancelled, or not started)
                _close(bodies.pop(index, None))


class _Assist:
    """Help for a worker with one large pair: both sides loaded at once, the metrics computed in
    ranges at once (see :class:`.metrics.Split`), so a large pair -- which, with the memory
    budget, runs beside small pairs only -- still uses every core. Its memory is the pair's
    own: nothing more is loaded.

    The pieces go to the compare's own workers (``pool``): a worker with nothing else to do
    takes them, one busy with another pair leaves them to the pair's worker. A thread of its
    own for the pieces made more threads than cores: beside a worker busy with a smaller pair it
    took a share of that core, and the large pair then waited for its slowest piece (with two
    workers on two cores, ``--workers 2`` gained less than two threads of the metrics alone).

    Args:
        workers: the compare's workers; a pair is cut into ``2 * workers`` pieces.
        pool: the threads that run pieces beside the pair's worker (the compare's workers);
            without it, ``workers - 1`` threads of this object's own.
    """

    def __init__(self, workers: int, pool: ThreadPoolExecutor | None = None) -> None:
        self._own = pool is None
        self._pool = pool if pool is not None else ThreadPoolExecutor(max_workers=workers - 1,
                                                                      thread_name_prefix="ilstore-compare-assist")
        # two pieces a thread: a thread that gets less of a core (another process, a small pair
        # beside) is left fewer pieces (see run_all)
        self.split = Split(parts=2 * workers, run_all=self.run_all)

    def __enter__(self) -> _Assist:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._own:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def run_all(self, fns: Sequence[Callable[[], Any]]) -> list[Any]:
        """``[fn() for fn in fns]``, the first on this thread and the others on the assisting
        threads at once: they take the pieces from the front, this thread from the back those
        not started yet, so whichever runs faster does more of them. Every function has
        returned before this does (an error is raised after that: the first in order)."""
        if len(fns) <= 1:
            return [fn() for fn in fns]
        futures = [self._pool.submit(fn) for fn in fns[1:]]
        done = {0: _attempt(fns[0])}
        for index in range(len(fns) - 1, 0, -1):
            if futures[index - 1].cancel():  # not started yet: run it here
                done[index] = _attempt(fns[index])
        for index in range(1, len(fns)):
            if index not in done:
                done[index] = _attempt(futures[index - 1].result)
        return [_outcome(*done[index]) for index in range(len(fns))]


#: Pairs of at least this many tensor bytes (both sides) are helped by :class:`_Assist` with
#: several workers: their sides load at once, their metrics are computed in ranges at once.
#: Smaller ones run beside each other (a thread hand-over costs more than it saves on them).
_SPLIT_BYTES = 4 * 2**20
#: Tensor bytes that may run beside the largest pair with several workers: pairs of tensors up
#: to 8 MiB each overlap freely; larger ones overlap with smaller ones only. With 64 MiB two
#: 16 MiB pairs ran together, and ``ilstore-compare --workers 2`` of two 300 MB hdf5 runs
#: peaked at 320-336 MB against the bound of 2 x 16 MiB + 300 MB = 333.6 MB (288 MB with 16 MiB).
_SLACK = 16 * 2**20
#: With several workers, consecutive pairs smaller than this run together in the streaming
#: thread, up to this many bytes and :data:`_BATCH_PAIRS` pairs (:func:`_units`).
_BATCH_BYTES = 2**18
_BATCH_PAIRS = 64
#: With several workers, up to this many units per worker from the oldest unfinished one may
#: start (:func:`_stream`). Pairs read from their files hold no memory, so many run while a large
#: one is compared: 2 per worker left workers idle behind it (2 workers, 2 x 300 MB runs of
#: float32: w2/w1 1.38-1.41 with 2 per worker, 1.51-1.68 with 8, paired rounds on the same runs).
_AHEAD = 8
#: ... of which at most this many per worker hold their bodies open (:func:`_stream`): two
#: descriptors each in the pt and hdf5 readers, so ``--workers`` of any size stays far below the
#: process's open-file limit (with the 8 of :data:`_AHEAD`: ~34 more descriptors with 2 workers).
_OPEN_AHEAD = 2
#: Bytes per element by dtype name (``torch.`` prefix removed); other names count 4.
_ITEMSIZE = {"float64": 8, "double": 8, "int64": 8, "uint64": 8, "complex64": 8, "complex128": 16, "cdouble": 16,
             "float16": 2, "half": 2, "bfloat16": 2, "int16": 2, "uint16": 2, "int8": 1, "uint8": 1, "bool": 1}


def _pair_bytes(pair: Pair) -> int:
    """The bytes of the pair's stored tensors, from their metadata (an estimate is enough)."""
    total = 0
    for side in (pair.side1, pair.side2):
        node = side.node if side is not None else None
        numel = node.get("numel") if isinstance(node, Mapping) else None
        if isinstance(numel, int) and not isinstance(numel, bool):
            dtype = node.get("dtype") if isinstance(node, Mapping) else None
            name = dtype.removeprefix("torch.") if isinstance(dtype, str) else ""
            total += numel * (1 if name.startswith("float8") else _ITEMSIZE.get(name, 4))
    return total


def _units(pairs: Sequence[Pair]) -> list[tuple[int, int, int]]:
    """The pairs cut into the units :func:`_stream` runs, ``(start, end, bytes)``: a pair of at
    least :data:`_BATCH_BYTES` alone (a worker's), consecutive smaller ones together, up to
    :data:`_BATCH_PAIRS` pairs or that many bytes in all (the streaming thread's own, run when
    it is the oldest: beside the workers' large pairs, never beside another batch). A unit's
    pairs run one after the other, so its bytes are its largest pair's. A small pair costs its
    Python, which two threads cannot run at once: handed to the workers one by one, 1,000 steps
    of 32 pairs of 256 bytes took ~15 % more CPU and longer with 2 workers than with 1."""
    units: list[tuple[int, int, int]] = []
    start, size, batch = 0, 0, 0
    for index, pair in enumerate(pairs):
        nbytes = _pair_bytes(pair)
        if nbytes >= _BATCH_BYTES or batch + nbytes > _BATCH_BYTES or index - start >= _BATCH_PAIRS:
            if index > start:
                units.append((start, index, size))
            start, size, batch = index, 0, 0
        if nbytes >= _BATCH_BYTES:
            units.append((index, index + 1, nbytes))
            start = index + 1
            continue
        size, batch = max(size, nbytes), batch + nbytes
    if len(pairs) > start:
        units.append((start, len(pairs), size))
    return units


# -- one pair ---------------------------------------------------------------------------------
def _shape(node: Mapping[str, Any] | None) -> tuple[int, ...] | None:
    shape = node.get("shape") if node is not None else None
    return tuple(int(d) for d in shape) if isinstance(shape, list) else None


def _str(node: Mapping[str, Any] | None, key: str) -> str | None:
    value = node.get(key) if node is not None else None
    return value if isinstance(value, str) else None


def _stored(node: Mapping[str, Any]) -> bool:
    return node.get("stored", True) is not False


def _load_key(reader: StoreReader, key: TensorKey, label: str, node: Mapping[str, Any] | None = None) -> torch.Tensor:
    """``reader.load(key)``; with the plan's ``node`` for the key, a reader whose ``load`` and
    ``meta`` are :class:`StoreReader`'s, or that has a ``load_node`` of its own, loads it without
    looking the node up again (the structures of the window's early steps have left the
    reader's cache by then)."""
    try:
        cls = type(reader)
        if node is not None and (cls.load is StoreReader.load and cls.meta is StoreReader.meta
                                 or cls.load_node is not StoreReader.load_node):  # (a multi-rank run's)
            return reader.load_node(key, dict(node) if not isinstance(node, dict) else node)
        return reader.load(key)
    except IlstoreError:
        raise
    except KeyError as exc:
        raise StoreError(f"{reader.run_dir} ({label}): cannot load {key.display()}: {exc}") from None
    except Exception as exc:  # a backend (maybe a plug-in) that lets its library's error through
        raise StoreError(f"{reader.run_dir} ({label}): cannot load {key.display()}: "
                         f"{type(exc).__name__}: {exc}") from None


class _Unreadable(Exception):
    """A record could not be read (carried through the map's sum or select, which must not catch it)."""

    def __init__(self, entry: Unreadable) -> None:
        super().__init__(entry.text())
        self.entry = entry


def _load(reader: StoreReader, side: Side, label: str, keep_going: bool = False) -> torch.Tensor:
    """The side's tensor, with the map's sum or select applied (RuleMismatch when they do not fit).

    Raises:
        StoreError: a record cannot be read (without ``keep_going``).
        _Unreadable: the same, with ``keep_going``: the entry that says which record and why.
    """
    known = side.node if not side.parts and side.select is None else None  # the run's own node of side.key

    def one(key: TensorKey) -> torch.Tensor:
        try:
            return _load_key(reader, key, label, known if key == side.key else None)
        except StoreError as exc:
            if not keep_going:
                raise
            raise _Unreadable(Unreadable.from_error(exc, run=label, run_dir=reader.run_dir, key=key)) from None

    return materialize(side, one)


def _attempt(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """``fn()``'s result, or the exception it raised (to be raised again by :func:`_outcome`)."""
    try:
        return fn(), None
    except BaseException as exc:  # noqa: BLE001 -- raised again where the one-thread order would
        return None, exc


def _outcome(result: Any, exc: BaseException | None) -> Any:
    if exc is not None:
        raise exc
    return result


def _load_both(pair: Pair, r1: StoreReader, r2: StoreReader, o: CompareOptions, want1: bool = True,
               want2: bool = True, assist: _Assist | None = None,
               ) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[Unreadable, ...]]:
    """Each wanted side's tensor (None where not wanted or unreadable) and what could not be read.

    Both sides are tried, so a report names every damaged file, not only the first; an unreadable
    side outranks a map rule that does not fit the other (the run must be repaired first). With
    ``assist`` both sides are read at once, and the outcome is the same as one after the other.

    Raises:
        RuleMismatch: a map rule does not fit (and nothing was unreadable).
        StoreError: a record cannot be read, without ``keep_going``.
    """
    assert pair.side1 is not None and pair.side2 is not None
    sides = ((r1, pair.side1, "dir1", want1), (r2, pair.side2, "dir2", want2))
    loaded: list[Callable[[], torch.Tensor]] = [partial(_load, reader, side, label, o.keep_going)
                                                for reader, side, label, _want in sides]
    if assist is not None and want1 and want2:  # both at once; then taken in order, as one after the other
        loaded = [partial(_outcome, *done) for done in assist.run_all([partial(_attempt, fn) for fn in loaded])]
    out: list[torch.Tensor | None] = []
    lost: list[Unreadable] = []
    misfit: RuleMismatch | None = None
    for (_reader, _side, _label, want), load in zip(sides, loaded, strict=True):
        tensor = None
        if want and misfit is None:  # after a misfit the other side is not read (or what it gave is ignored)
            try:
                tensor = load()
            except _Unreadable as exc:
                lost.append(exc.entry)
            except RuleMismatch as exc:
                misfit = exc
        out.append(tensor)
    if misfit is not None and not lost:
        raise misfit
    return out[0], out[1], tuple(lost)


def _unreadable(pair: Pair, lost: tuple[Unreadable, ...], meta: dict[str, Any],
                notes: Sequence[str] = ()) -> TensorResult:
    note = "; ".join([*notes, *(f"unreadable in {u.text()}" for u in lost)])
    return TensorResult(pair.key, UNREADABLE, note=note, unreadable=lost, **meta)


def _why_not_stored(node: Mapping[str, Any]) -> str:
    return str(node.get("reason") or "body not stored")


_SQUEEZE_HINT = "only size-1 dimensions differ: --squeeze-shapes (or the map's squeeze_shapes) compares the values"


def _shape_mismatch(pair: Pair, o: CompareOptions, meta: dict[str, Any]) -> TensorResult:
    hint = _SQUEEZE_HINT if not o.squeeze_shapes and squeezable(meta["shape1"], meta["shape2"]) else None
    return TensorResult(pair.key, SHAPE_MISMATCH, note=hint, **meta)


#: Stored tensors of at least this many bytes are compared from their files a piece at a time
#: (:func:`.metrics.compare_files`) where both readers say where the elements lie
#: (:meth:`StoreReader.open_body`), instead of being loaded: a pair then needs two pieces of
#: :data:`._kernel.FILE_CHUNK` bytes per thread, not its tensors' size, so with several workers
#: large pairs run side by side, and each piece is still in the cache when the kernel reads it.
#: Smaller ones load (one read each: fewer system calls than the pieces' way, and little memory).
_FILE_BYTES = FILE_CHUNK
#: The memory a pair compared from its files counts for in :func:`_stream`'s budget.
_FILE_PAIR_BYTES = 2 * FILE_CHUNK
_FILE_DTYPES = ("torch.float32", "torch.float64")


def _open_bodies(pair: Pair, r1: StoreReader, r2: StoreReader, o: CompareOptions) -> tuple[Body, Body] | None:
    """Both sides' bodies (:meth:`StoreReader.open_body`) when the pair is to be compared from its
    files: stored tensors of one float32/float64 dtype and shape, each of at least
    :data:`_FILE_BYTES`, no map sum or select, not ``exact``; None for every other pair (it is
    loaded) and where either reader cannot say."""
    s1, s2 = pair.side1, pair.side2
    if o.exact or pair.unaligned is not None or s1 is None or s2 is None:
        return None
    n1, n2 = s1.node, s2.node
    if (s1.parts or s2.parts or s1.select is not None or s2.select is not None or s1.problem or s2.problem
            or n1 is None or n2 is None or not _stored(n1) or not _stored(n2)):
        return None
    dtype = n1.get("dtype")
    if dtype not in _FILE_DTYPES or n2.get("dtype") != dtype or n1.get("shape") != n2.get("shape"):
        return None
    if _pair_bytes(pair) < 2 * _FILE_BYTES or not kernel_enabled():  # (without the kernel: loaded)
        return None
    b1 = r1.open_body(s1.key, n1 if isinstance(n1, dict) else dict(n1))
    if b1 is None:
        return None
    try:
        b2 = r2.open_body(s2.key, n2 if isinstance(n2, dict) else dict(n2))
    except BaseException:  # (Ctrl-C)
        b1.close()
        raise
    if b2 is None or b2.shape != b1.shape:
        b1.close()
        if b2 is not None:
            b2.close()
        return None
    return b1, b2


def _close(bodies: tuple[Body, Body] | None | bool) -> None:
    if isinstance(bodies, tuple):
        for body in bodies:
            body.close()


def _compare_pair(pair: Pair, r1: StoreReader, r2: StoreReader, o: CompareOptions,
                  assist: _Assist | None = None, bodies: tuple[Body, Body] | None | bool = None) -> TensorResult:
    """One pair's result. ``bodies``: both sides' opened bodies (:func:`_open_bodies`, closed
    here), to be compared from the files; None to open them here where the pair allows; False
    when they were tried already (the pair is loaded)."""
    if bodies is None:
        bodies = _open_bodies(pair, r1, r2, o) or False
    try:
        return _compare_pair_of(pair, r1, r2, o, assist, bodies if isinstance(bodies, tuple) else None)
    finally:
        _close(bodies)


def _compare_pair_of(pair: Pair, r1: StoreReader, r2: StoreReader, o: CompareOptions, assist: _Assist | None,
                     bodies: tuple[Body, Body] | None) -> TensorResult:
    n1 = pair.side1.node if pair.side1 is not None else None
    n2 = pair.side2.node if pair.side2 is not None else None
    meta: dict[str, Any] = dict(renamed_from=pair.renamed_from, shape1=_shape(n1), shape2=_shape(n2),
                                dtype1=_str(n1, "dtype"), dtype2=_str(n2, "dtype"), device1=_str(n1, "device"),
                                device2=_str(n2, "device"), presence=pair.presence,
                                alignment=tuple(s.rule for s in (pair.side1, pair.side2) if s is not None and s.rule))
    if pair.unaligned is not None:
        return TensorResult(pair.key, UNALIGNED, note=pair.unaligned, **meta)
    if pair.side1 is None or n1 is None:
        return TensorResult(pair.key, ONLY_IN_DIR2, **meta)
    if pair.side2 is None or n2 is None:
        return TensorResult(pair.key, ONLY_IN_DIR1, **meta)
    meta["dtype_mismatch"] = None not in (meta["dtype1"], meta["dtype2"]) and meta["dtype1"] != meta["dtype2"]
    problems = [f"{label}: {s.problem}" for label, s in (("dir1", pair.side1), ("dir2", pair.side2)) if s.problem]
    if problems:
        return TensorResult(pair.key, NOT_COMPARED, note="; ".join(problems), **meta)
    if meta["shape1"] is not None and meta["shape2"] is not None and meta["shape1"] != meta["shape2"]:
        if not (o.squeeze_shapes and squeezable(meta["shape1"], meta["shape2"])):
            return _shape_mismatch(pair, o, meta)
        meta["squeezed"] = True
    stored1, stored2 = _stored(n1), _stored(n2)
    if bodies is not None:
        try:
            metrics = compare_files(*bodies, rtol=o.rtol, atol=o.atol, equal_nan=o.equal_nan,
                                    split=assist.split if assist is not None else None)
        except (OSError, ValueError):  # a file changed since its body was opened: loaded below, with its errors
            metrics = None
        if metrics is not None:
            return TensorResult(pair.key, MATCH if metrics.mismatched == 0 else MISMATCH, metrics=metrics, **meta)
    if stored1 and stored2:
        try:
            a, b, lost = _load_both(pair, r1, r2, o, assist=assist)
        except RuleMismatch as exc:  # a path rule's sum or select does not fit the stored tensors
            return TensorResult(pair.key, NOT_COMPARED, note=f"map: {exc}", **meta)
        if lost or a is None or b is None:
            return _unreadable(pair, lost, meta)
        meta.update(shape1=tuple(a.shape), shape2=tuple(b.shape), dtype1=str(a.dtype), dtype2=str(b.dtype),
                    dtype_mismatch=a.dtype != b.dtype)
        if a.shape != b.shape:
            if not (o.squeeze_shapes and squeezable(a.shape, b.shape)):
                return _shape_mismatch(pair, o, meta)
            meta["squeezed"] = True
            a = a.reshape(b.shape)  # same elements in the same order; indices are reported in dir2's shape
        metrics = compare_tensors(a, b, rtol=o.rtol, atol=o.atol, exact=o.exact, equal_nan=o.equal_nan,
                                  split=assist.split if assist is not None else None)
        del a, b
        return TensorResult(pair.key, MATCH if metrics.mismatched == 0 else MISMATCH, metrics=metrics, **meta)
    return _compare_by_stats(pair, r1, r2, o, n1, n2, stored1, stored2, meta)


def _compare_by_stats(pair: Pair, r1: StoreReader, r2: StoreReader, o: CompareOptions, n1: Mapping[str, Any],
                      n2: Mapping[str, Any], stored1: bool, stored2: bool, meta: dict[str, Any]) -> TensorResult:
    assert pair.side1 is not None and pair.side2 is not None
    notes = [f"{label}: {_why_not_stored(n)}" for label, n, stored in (("dir1", n1, stored1), ("dir2", n2, stored2))
             if not stored]
    try:
        a, b, lost = _load_both(pair, r1, r2, o, stored1, stored2)
    except RuleMismatch as exc:  # a path rule's sum or select does not fit the stored tensor
        return TensorResult(pair.key, NOT_COMPARED, note="; ".join(notes + [f"map: {exc}"]), **meta)
    if lost:
        return _unreadable(pair, lost, meta, notes)
    s1 = tensor_stats(a) if a is not None else n1.get("stats")
    s2 = tensor_stats(b) if b is not None else n2.get("stats")
    del a, b
    shape1, shape2 = meta["shape1"], meta["shape2"]
    if shape1 is not None and shape1 == shape2 and math.prod(shape1) == 0 and isinstance(s1, Mapping) and isinstance(
            s2, Mapping):  # (integer and bool tensors without elements have no statistics at all)
        return TensorResult(pair.key, STATS_ONLY_MATCH, note="; ".join(notes + ["no element on either side"]), **meta)
    if not isinstance(s1, Mapping) or not isinstance(s2, Mapping) or not s1 or not s2:
        missing = [label for label, s in (("dir1", s1), ("dir2", s2)) if not isinstance(s, Mapping) or not s]
        return TensorResult(pair.key, NOT_COMPARED, note="; ".join(notes + [f"no statistics in {', '.join(missing)}"]),
                            **meta)
    shape = meta["shape2"] or meta["shape1"] or ()
    recorded = n2.get("numel")
    numel = recorded if isinstance(recorded, int) else math.prod(shape)
    is_float = is_float_dtype(meta["dtype1"]) or is_float_dtype(meta["dtype2"])
    check = compare_stats(s1, s2, numel=numel, is_float=is_float, rtol=o.rtol, atol=o.atol, exact=o.exact,
                          equal_nan=o.equal_nan)
    status = STATS_ONLY_MATCH if check.matched else STATS_ONLY_MISMATCH
    return TensorResult(pair.key, status, stats_failed=check.failed,
                        note="; ".join(notes + [f"compared by statistics: {', '.join(check.checked)}"]), **meta)
