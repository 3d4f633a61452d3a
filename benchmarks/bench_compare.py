"""``ilstore_compare.compare`` throughput and memory against a raw-read floor, in one process.

Workload: two runs of about ``--size-mb`` MB each (default 500: ~400 float32 tensors from
1 KiB to 64 MiB, shuffled), written through ``ilstore.capture`` (one module call per tensor,
outputs only) in each backend of ``--backends``; run "b" scales one element in 1009 by
1 + 1e-4, so about 0.1 % of the elements mismatch at the default tolerances. The same tensors
are also written once as raw float32 files, one per tensor.

Rows, each a median over ``--rounds`` rounds, rounds interleaved (every row once per round):
* ``floor: read only``: ``numpy.fromfile`` of both sides of every pair, nothing else.
* ``floor: minimal`` (THE floor, issue 18's): the same reads plus the verdict count
  (``|a-b| <= atol + rtol |b|``) and the relative L2 error in numpy, one whole tensor at a time.
* ``floor: minimal, N processes`` (with a ``--workers`` value N > 1: the largest): the minimal
  floor with the pairs dealt out to N forked processes (pair i to process i mod N), which share
  no GIL and no Python work: the machine's ceiling for ``--workers N`` (memory bandwidth, the
  page-cache copy, the scheduler), timed from the parent from "go" until every process has sent
  its count (the forks come before, untimed). RSS: the processes' peak growths added up.
* ``floor: read + f32 metrics``: the same reads plus the metrics that
  ``ilstore_compare.metrics`` computes (the tolerance check, NaN/Inf counts, |a-b| max and
  its index, mean |a-b|, max rel diff, the sums for rel-L2 and cosine), in the same 1 Mi-element
  chunks, in float32 elementwise with float64 sums, skipping the NaN/Inf masking when a chunk is
  all finite.
* ``floor: read + metrics.compare_tensors``: the same reads plus the library's own per-tensor
  arithmetic (float64 upcast): isolates the arithmetic from storage and engine overhead.
* ``floor: compare_tensors, N processes``: that floor in N forked processes, as above: the
  ceiling for the compare's own arithmetic (one fused pass, far less memory traffic than the
  minimal floor's numpy passes), so the one that bounds ``compare`` w2/w1.
* ``floor: compare_tensors, N threads``: the same on N threads of this process (sharing
  the GIL and the address space, no memory bound, no order): against the processes' row, what
  the GIL costs; against ``compare wN``, what the engine's scheduling costs.
* ``<backend> compare w1`` / ``w2``: ``ilstore_compare.compare(a, b, workers=1|2)``, the whole
  call (opening both runs, planning, loading, metrics, the result).
* with ``--loaded``, ``<backend> compare w1, loaded`` / ``w2, loaded``: the same with every pair
  loaded whole, as the comparer did before it read large float32/float64 pairs from their files
  a piece at a time (2026-12-03): the A/B of that change in one run.
* with ``--cli``, ``<backend> CLI w1`` / ``w2``: ``ilstore-compare --format json`` in a fresh
  process (start-up, imports and the report included), as a user runs it.

Columns: median seconds; MB/s of tensor data read (both runs together); the throughput ratios
to the minimal floor (``x floor``: its seconds / the row's; target >= 0.5) and to the f32-metrics
floor (``x f32``); peak RSS growth during the call over the RSS before it, sampled every 2 ms,
as the whole resident set and as its anonymous part (resident minus file-backed pages:
memory-mapped files show up in the first only) -- for the CLI rows, the whole peak RSS of the
child process (``VmHWM``, not a growth); and the RSS target, 2 x the largest tensor + 300 MB.
Then the ``--workers`` ratios per backend (w2/w1 throughput; target >= 1.6). ``load``: the median
1-minute load average before the row's rounds (on a shared machine a second worker only helps
when a core is idle: quote the load with every figure); ``steal%``: the share of the CPUs' time
the VM's host took while the row's rounds ran (``/proc/stat``; a row measured while it is more
than a few percent is slowed by the host, not by its code). ``--paired N`` adds, per backend, N
rounds of ``compare()`` with one worker and with the largest of ``--workers`` back to back
(alternating which goes first): the median and the best of the per-round ratios, which a load
that comes and goes disturbs less than the ratio of two medians; and first the same for the two
floors in one process against them in N processes (``floor: paired wN/w1``, ``floor: read +
metrics.compare_tensors: paired wN/w1``) and the latter against it on N threads: the ceilings the
compare's ratios are to be read against. ``--fifo`` runs those paired
rounds (only them) at real-time priority (``SCHED_FIFO`` 1; needs root or ``CAP_SYS_NICE``, and
Linux keeps 5 % of each second for everything else): other processes then wait while the
compare's threads can run, so the ratio is that of a machine with every core free, whatever
else runs on it. Without it, another busy process takes a fair share of the cores from a
second worker (on two cores, one such process leaves the two workers about 1.3 of them). ``--breakdown N``
times planning (one thread, before the first pair) apart from the stream of pairs, with 1 and with
the most workers, and the CPU seconds of each: the cores the stream keeps busy, and how much of
the one-worker time no second worker can share. ``--nice-group`` runs the paired rounds (and the
breakdown) with this process's scheduler autogroup at nice -20 (Linux with
``kernel.sched_autogroup_enabled``; root): the usual time-sharing scheduler, so the compare's own
threads still share cores and wait for them as on a quiet machine, while the other sessions' busy
processes get a small share. ``--fifo`` does not time-share at all (a thread runs until it
blocks): on this 2-core VM it showed pt w2/w1 1.69-1.82 for code that a quiet machine put at
1.41 and ``--nice-group`` at 1.31-1.47, so it hides what the engine's threads cost each other.

By default the page cache is warm: all files were just written or read, so "reads" come from
memory. ``--cold`` writes back and evicts (``posix_fadvise(DONTNEED)``) the files a row reads
before each of its rounds, so that row reads from the disk (on a tmpfs such as /dev/shm there is
no disk: ``--cold`` changes nothing there). ``--tmp /dev/shm`` (tmpfs) or a directory on a disk
chooses where the runs live.

Usage:
    python benchmarks/bench_compare.py [--size-mb 500] [--rounds 3] [--backends pt,safetensors,hdf5]
        [--workers 1,2] [--cold] [--cli] [--no-f32] [--tmp DIR] [--json FILE] [--profile N] [--paired N]
        [--breakdown N] [--fifo] [--nice-group]
    python benchmarks/bench_compare.py --size-mb 50 --rounds 1        # a quick smoke run
    python benchmarks/bench_compare.py --size-mb 200 --rounds 1 --no-f32 --tmp /dev/shm --paired 5
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import (  # noqa: E402
    MiB,
    Steal,
    drop_page_cache,
    files_under,
    loadavg,
    memory_note,
    nbytes_of,
    read_all,
    release_memory,
    timed,
    workload,
    write_raw,
    write_run,
)

RTOL, ATOL = 1e-5, 1e-8
MINIMAL = "floor: minimal (numpy verdict+relL2)"
F32 = "floor: read + f32 metrics"
LIB = "floor: read + metrics.compare_tensors"
LIB_THREADS = "floor: compare_tensors, {} threads"
CHUNK = 1 << 20


def floor_metrics(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL, atol: float = ATOL,
                  chunk: int = CHUNK) -> dict[str, Any]:
    """The metrics of ``ilstore_compare.metrics.compare_tensors``, in float32 with float64 sums."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    n = fa.numel()
    mismatched = nan1 = nan2 = inf1 = inf2 = n_fin = 0
    sum_abs = dd = aa = bb = ab = 0.0
    max_abs, max_at, max_rel = -1.0, -1, -1.0
    f64 = torch.float64
    with torch.no_grad():
        for start in range(0, n, chunk):
            x, y = fa[start:start + chunk], fb[start:start + chunk]
            d = (x - y).abs()
            yabs = y.abs()
            ok = (x == y) | (d <= atol + rtol * yabs)
            finite = torch.isfinite(x) & torch.isfinite(y)
            nf = int(finite.sum())
            counts = [0, 0, 0, 0]
            if nf != x.numel():  # NaN/Inf present: mask them out of the difference metrics
                counts = [int(torch.isnan(x).sum()), int(torch.isnan(y).sum()), int(torch.isinf(x).sum()),
                          int(torch.isinf(y).sum())]
                zero = torch.zeros((), dtype=x.dtype)
                d = torch.where(finite, d, zero)
                x, y, yabs = torch.where(finite, x, zero), torch.where(finite, y, zero), torch.where(finite, yabs, zero)
            rel = torch.where(yabs > 0, d / yabs, torch.zeros((), dtype=d.dtype))
            cmax, cidx = d.max(dim=0)
            vals = torch.stack([
                (~ok).sum(dtype=f64), d.sum(dtype=f64), (d * d).sum(dtype=f64), (x * x).sum(dtype=f64),
                (y * y).sum(dtype=f64), (x * y).sum(dtype=f64), cmax.double(), cidx.double(), rel.max().double(),
            ]).tolist()
            mismatched += int(vals[0])
            nan1, nan2, inf1, inf2 = nan1 + counts[0], nan2 + counts[1], inf1 + counts[2], inf2 + counts[3]
            n_fin += nf
            sum_abs, dd, aa, bb, ab = sum_abs + vals[1], dd + vals[2], aa + vals[3], bb + vals[4], ab + vals[5]
            if vals[6] > max_abs:
                max_abs, max_at = vals[6], start + int(vals[7])
            max_rel = max(max_rel, vals[8])
    rel_l2 = math.sqrt(dd) / math.sqrt(bb) if bb > 0 else (0.0 if dd == 0 else None)
    cosine = max(-1.0, min(1.0, ab / math.sqrt(aa * bb))) if aa > 0 and bb > 0 else (1.0 if aa == bb == 0 else 0.0)
    return {"mismatched": mismatched, "max_abs": max_abs, "max_at": max_at, "mean_abs": sum_abs / max(n_fin, 1),
            "max_rel": max_rel, "rel_l2": rel_l2, "cosine": cosine, "nan": (nan1, nan2), "inf": (inf1, inf2)}


def _read(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(path, dtype=np.float32)).reshape(shape)


def floor_minimal(pairs: list[tuple[Path, Path, tuple[int, ...]]], rtol: float = RTOL, atol: float = ATOL) -> int:
    """The issue's minimal floor: ``numpy.fromfile`` of both sides, the verdict count and the
    relative L2 error, one whole tensor at a time, in numpy (float32 elementwise, single thread)."""
    mismatched = 0
    for pa, pb, _shape in pairs:
        a, b = np.fromfile(pa, dtype=np.float32), np.fromfile(pb, dtype=np.float32)
        d = np.abs(a - b)
        mismatched += int(np.count_nonzero(~(d <= atol + rtol * np.abs(b))))
        _rel_l2 = float(np.linalg.norm(d)) / float(np.linalg.norm(b))
        del a, b, d
    return mismatched


#: A forked floor process that has not answered after this long is killed.
_FORKED_DEADLINE_S = 600


def floor_forked(floor: Callable[[list[tuple[Path, Path, tuple[int, ...]]]], int],
                 pairs: list[tuple[Path, Path, tuple[int, ...]]], processes: int = 2) -> tuple[int, float, int]:
    """``floor(pairs)`` (:func:`floor_minimal`, :func:`floor_lib`) with pair ``i`` in forked process
    ``i % processes``: processes share no GIL, so this is what ``processes`` cores give that
    floor on this machine.

    The processes are forked and have answered "ready" before the clock starts; it stops when
    the last has sent its count (its exit and the parent's wait are not timed).

    Returns:
        (mismatched elements, seconds, the processes' peak RSS growths added up, in bytes).

    Raises:
        RuntimeError: a process failed (its error in the message) or died.
    """
    children: list[tuple[int, int, Any]] = []  # (pid, the write end of its "go" pipe, its result pipe)
    try:
        for k in range(processes):
            go_r, go_w = os.pipe()
            res_r, res_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # never returns into the parent's code (no finally, no atexit)
                code = 1
                try:
                    for fd in [go_w, res_r] + [fd for _pid, go, res in children for fd in (go, res.fileno())]:
                        os.close(fd)
                    # one core each, as intended; and an OpenMP team forked from a parent that ran
                    # parallel regions hangs at its first parallel op (libgomp), e.g. torch's path
                    # without the compare kernel
                    torch.set_num_threads(1)
                    code = _forked_floor(floor, pairs[k::processes], go_r, res_w)
                finally:
                    os._exit(code)
            os.close(go_r)
            os.close(res_w)
            children.append((pid, go_w, os.fdopen(res_r)))
        for _pid, _go, res in children:
            if res.read(1) != "r":
                raise RuntimeError("floor_forked: a process died before it was ready")
        start = time.perf_counter()
        for _pid, go, _res in children:
            os.write(go, b"g")
        lines = []
        for _pid, _go, res in children:
            if not select.select([res], [], [], _FORKED_DEADLINE_S)[0]:
                raise RuntimeError(f"floor_forked: no answer within {_FORKED_DEADLINE_S} s")
            lines.append(res.readline())
        seconds = time.perf_counter() - start
    except BaseException:
        for pid, _go, _res in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise
    finally:
        for pid, go, res in children:
            os.close(go)  # a process still waiting for "go" ends
            res.close()
            os.waitpid(pid, 0)
    answers: list[dict[str, Any]] = [json.loads(line) if line.strip() else {"error": "it died"} for line in lines]
    failed = [a["error"] for a in answers if "error" in a]
    if failed:
        raise RuntimeError(f"floor_forked: a process failed: {failed[0]}")
    return sum(a["mismatched"] for a in answers), seconds, sum(a["rss"] for a in answers)


def _forked_floor(floor: Callable[[list[tuple[Path, Path, tuple[int, ...]]]], int],
                  pairs: list[tuple[Path, Path, tuple[int, ...]]], go: int, out: int) -> int:
    """One process of :func:`floor_forked`: "r", wait for "go", ``floor(pairs)``,
    then one JSON line (the count and the peak RSS growth, or the error); the exit status."""
    try:
        rss_before = _status_kb("VmRSS")
        os.write(out, b"r")
        if os.read(go, 1) != b"g":
            return 1  # the parent gave up
        mismatched = floor(pairs)
        grown = max(0, _status_kb("VmHWM") - rss_before) * 1024
        os.write(out, (json.dumps({"mismatched": mismatched, "rss": grown}) + "\n").encode())
        return 0
    except BaseException as exc:  # noqa: BLE001 -- reported to the parent
        with contextlib.suppress(OSError):
            os.write(out, (json.dumps({"error": repr(exc)}) + "\n").encode())
        return 1


def _status_kb(name: str) -> int:
    """A ``/proc/self/status`` figure (``VmHWM``, ``VmRSS``) in KiB; 0 where unknown."""
    try:
        with open("/proc/self/status") as fh:
            return int(next(line.split()[1] for line in fh if line.startswith(name + ":")))
    except (OSError, StopIteration, ValueError):
        return 0


def floor_threads(floor: Callable[[list[tuple[Path, Path, tuple[int, ...]]]], int],
                  pairs: list[tuple[Path, Path, tuple[int, ...]]], threads: int = 2) -> int:
    """``floor(pairs)`` with pair ``i`` on thread ``i % threads`` of this process, nothing shared
    but the GIL (and the process's memory): against :func:`floor_forked`, what the GIL costs that
    floor; against the compare, what the engine's scheduling (in-order results, the memory bound,
    the split of large pairs) costs. Every thread's error is raised (the first)."""
    counts: list[int] = [0] * threads
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            counts[k] = floor(pairs[k::threads])
        except BaseException as exc:  # noqa: BLE001 -- raised on the calling thread below
            errors.append(exc)

    started = [threading.Thread(target=work, args=(k,), name=f"floor-{k}") for k in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join()
    if errors:
        raise errors[0]
    return sum(counts)


def floor_read_only(pairs: list[tuple[Path, Path, tuple[int, ...]]]) -> int:
    n = 0
    for pa, pb, shape in pairs:
        a, b = _read(pa, shape), _read(pb, shape)
        n += a.numel() + b.numel()
        del a, b
    return n


def floor_f32(pairs: list[tuple[Path, Path, tuple[int, ...]]]) -> int:
    mismatched = 0
    for pa, pb, shape in pairs:
        a, b = _read(pa, shape), _read(pb, shape)
        mismatched += floor_metrics(a, b)["mismatched"]
        del a, b
    return mismatched


def floor_lib(pairs: list[tuple[Path, Path, tuple[int, ...]]]) -> int:
    from ilstore_compare.metrics import compare_tensors

    mismatched = 0
    for pa, pb, shape in pairs:
        a, b = _read(pa, shape), _read(pb, shape)
        mismatched += compare_tensors(a, b, rtol=RTOL, atol=ATOL).mismatched
        del a, b
    return mismatched


def run_compare(a: Path, b: Path, workers: int, loaded: bool = False) -> int:
    """``compare(a, b)``'s mismatched elements; ``loaded``: every pair loaded, none read from its
    files a piece at a time (the comparer's way before 2026-12-03), for an A/B in one run."""
    import ilstore_compare
    from ilstore_compare import engine

    files_bytes = engine._FILE_BYTES
    if loaded:
        engine._FILE_BYTES = 1 << 62  # no pair is large enough to be read from its files
    try:
        result = ilstore_compare.compare(a, b, rtol=RTOL, atol=ATOL, workers=workers)
    finally:
        engine._FILE_BYTES = files_bytes
    return sum(t.metrics.mismatched for t in result.tensors if t.metrics is not None)


def breakdown(a: Path, b: Path, workers: int, rounds: int) -> dict[int, dict[str, float]]:
    """Where one ``compare()``'s time goes, with 1 and with ``workers`` workers (``rounds`` rounds
    each, alternating which goes first; medians): ``plan`` (opening the runs and planning, up to
    the first pair: one thread), ``stream`` (the pairs: loads and metrics on the workers, and the
    result after), their wall seconds and the process's CPU seconds in each (``*_cpu``: every
    thread's), and ``cores``: stream CPU / stream wall, the cores the workers kept busy; the
    idle core-seconds of the stream are ``workers * stream - stream_cpu``."""
    from ilstore_compare import engine

    marks: list[tuple[float, float]] = []
    real = engine._stream

    def marked(*args: Any, **kwargs: Any) -> Iterator[Any]:
        marks.append((time.perf_counter(), time.process_time()))
        yield from real(*args, **kwargs)

    out: dict[int, list[dict[str, float]]] = {1: [], workers: []}
    engine._stream = marked
    try:
        for i in range(rounds):
            for w in ((1, workers) if i % 2 == 0 else (workers, 1)):
                release_memory()
                marks.clear()
                t0, c0 = time.perf_counter(), time.process_time()
                run_compare(a, b, w)
                t2, c2 = time.perf_counter(), time.process_time()
                (t1, c1), = marks
                out[w].append({"wall": t2 - t0, "cpu": c2 - c0, "plan": t1 - t0, "plan_cpu": c1 - c0,
                               "stream": t2 - t1, "stream_cpu": c2 - c1, "cores": (c2 - c1) / (t2 - t1)})
    finally:
        engine._stream = real
    return {w: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for w, rows in out.items()}


@contextlib.contextmanager
def fifo(wanted: bool) -> Iterator[bool]:
    """With ``wanted``, this thread (and the threads it starts) at ``SCHED_FIFO`` priority 1 inside
    the block, back to the usual policy after; yields whether that was allowed."""
    if not wanted:
        yield False
        return
    try:
        before = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (AttributeError, OSError) as exc:
        print(f"--fifo: cannot run at real-time priority here ({exc}); paired rounds at the usual priority")
        yield False
        return
    try:
        yield True
    finally:
        os.sched_setscheduler(0, before[0], before[1])


#: This process's scheduler autogroup (Linux): ``/autogroup-N nice K``; writing a nice value sets K.
AUTOGROUP = Path("/proc/self/autogroup")


@contextlib.contextmanager
def nice_group(wanted: bool, nice: int = -20) -> Iterator[bool]:
    """With ``wanted``, this process's autogroup (its session's processes) at nice ``nice`` inside
    the block, back to its value before after; yields whether that was allowed."""
    if not wanted:
        yield False
        return
    try:
        before = int(AUTOGROUP.read_text().split()[-1])
        AUTOGROUP.write_text(str(nice))
    except (OSError, ValueError, IndexError) as exc:
        print(f"--nice-group: cannot set the autogroup's nice value here ({exc}); paired rounds as they are")
        yield False
        return
    try:
        yield True
    finally:
        AUTOGROUP.write_text(str(before))


def paired_ratios(a: Path, b: Path, workers: int, rounds: int) -> dict[str, Any]:
    """``rounds`` rounds of ``compare()`` with 1 and with ``workers`` workers back to back (which
    goes first alternates): each round's throughput ratio (one worker's seconds / the other's)."""
    return _paired(partial(_seconds, run_compare, a, b), workers, rounds)


def paired_floor(floor: Callable[[list[tuple[Path, Path, tuple[int, ...]]]], int],
                 pairs: list[tuple[Path, Path, tuple[int, ...]]], processes: int, rounds: int,
                 threads: bool = False) -> dict[str, Any]:
    """:func:`paired_ratios` of a floor: in this process against in ``processes`` forked ones
    (:func:`floor_forked`; with ``threads``, on that many threads: :func:`floor_threads`), round
    by round: a ceiling for those ratios."""
    def run(n: int) -> float:
        if n == 1:
            return _seconds(floor, pairs)
        return _seconds(floor_threads, floor, pairs, n) if threads else floor_forked(floor, pairs, n)[1]

    return _paired(run, processes, rounds)


def _seconds(fn: Callable[..., Any], *args: Any) -> float:
    start = time.perf_counter()  # no RSS sampler here: its thread would compete for the GIL
    fn(*args)
    return time.perf_counter() - start


def _paired(seconds_of: Callable[[int], float], workers: int, rounds: int) -> dict[str, Any]:
    """``rounds`` rounds of ``seconds_of(1)`` and ``seconds_of(workers)`` back to back, which goes
    first alternating: each round's ratio (the first's seconds / the second's) and the load."""
    ratios, loads = [], []
    steal = Steal()
    for i in range(rounds):
        seconds = {}
        loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan)
        for w in ((1, workers) if i % 2 == 0 else (workers, 1)):
            release_memory()
            with steal:
                seconds[w] = seconds_of(w)
        ratios.append(seconds[1] / seconds[workers])
    return {"workers": workers, "ratios": ratios, "loads": loads, "steal_percent": steal.percent}


#: The CLI's entry point, writing its peak RSS (``VmHWM``: the whole resident set, mapped files
#: included; ``ru_maxrss`` would include the forking parent's before the exec) to argv[1] at exit.
_CLI_WITH_PEAK = """import atexit, sys
peak = sys.argv.pop(1)
def hwm():
    with open('/proc/self/status') as fh:
        kb = next(line.split()[1] for line in fh if line.startswith('VmHWM:'))
    with open(peak, 'w') as fh:
        fh.write(kb)
atexit.register(hwm)
from ilstore_compare.cli import main
sys.exit(main())
"""


def run_cli(a: Path, b: Path, workers: int, peak_file: Path) -> tuple[int, int]:
    """``ilstore-compare --format json`` in a fresh process, as a user runs it: (exit status, peak
    RSS of that process in bytes)."""
    cmd = [sys.executable, "-c", _CLI_WITH_PEAK, str(peak_file),
           "--dir1", str(a), "--dir2", str(b), "--rtol", str(RTOL), "--atol", str(ATOL),
           "--format", "json", "--output", os.devnull, "--workers", str(workers)]
    code = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    return code, int(peak_file.read_text()) * 1024


class Row:
    def __init__(self, name: str, fn: Callable[[], Any], files: list[Path], group: str, child: bool = False,
                 forked: bool = False) -> None:
        """``child``: ``fn`` runs another process and returns ``(check, its peak RSS)``; ``forked``:
        ``fn`` times itself and returns ``(check, seconds, its processes' peak RSS growth)``."""
        self.name, self.fn, self.files, self.group, self.child, self.forked = name, fn, files, group, child, forked
        self.times: list[float] = []
        self.loads: list[float] = []  # the 1-minute load average before each round of this row
        self.steal = Steal()  # the host's share of the CPUs while this row's rounds ran
        self.rss: list[int] = []
        self.anon: list[int] = []
        self.check: int | None = None

    def measure(self, cold: bool) -> None:
        release_memory()
        if cold:
            drop_page_cache(self.files)
        self.loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan)
        with self.steal:
            seconds, sampler, check = timed(self.fn)
        if self.forked:  # its own clock (the forks untimed); its processes' growth, no anonymous part known
            check, seconds, grown = check
            self.rss.append(grown)
            self.anon.append(grown)
        elif self.child:  # the other process's whole peak RSS, not a growth; no anonymous part known
            check, peak = check
            self.rss.append(peak)
            self.anon.append(peak)
        else:
            self.rss.append(sampler.growth)
            self.anon.append(sampler.growth_anon)
        self.times.append(seconds)
        self.check = check

    def result(self) -> dict[str, Any]:
        return {"name": self.name, "group": self.group, "seconds": statistics.median(self.times),
                "rss": statistics.median(self.rss), "rss_anon": statistics.median(self.anon),
                "rss_max": max(self.rss), "rss_anon_max": max(self.anon), "times": self.times,
                "load": statistics.median(self.loads), "loads": self.loads, "steal_percent": self.steal.percent,
                "check_mismatched": self.check}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=500, help="MB (10^6 bytes) of tensor data per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backends", default="pt,safetensors,hdf5")
    ap.add_argument("--workers", default="1,2", help="compare(workers=...) values, comma-separated")
    ap.add_argument("--cold", action="store_true", help="evict the files a row reads before each of its rounds")
    ap.add_argument("--tmp", default=None, help="directory for the runs (default: a temp dir); removed after")
    ap.add_argument("--no-f32", action="store_true",
                    help="leave out the f32-metrics floor (slow: torch elementwise in 1 Mi chunks); x f32 is then nan")
    ap.add_argument("--loaded", action="store_true",
                    help="also rows with every pair loaded whole (none read from its files a piece at a time)")
    ap.add_argument("--cli", action="store_true",
                    help="also time the whole `python -m ilstore_compare --format json` per backend and worker count")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the rounds, cProfile one workers=1 compare per backend and print the top N functions")
    ap.add_argument("--paired", type=int, default=0, metavar="N",
                    help="after the rounds, N paired rounds of the floors in 1 process and in as many as the most "
                         "workers (the ceiling), then per backend of compare() with 1 and with the most workers, "
                         "back to back, alternating which goes first; ratios per round")
    ap.add_argument("--breakdown", type=int, default=0, metavar="N",
                    help="after the rounds, N rounds per backend of compare() with 1 and with the most workers, "
                         "timing planning (one thread) apart from the stream of pairs, with the CPU used in each "
                         "(at real-time priority with --fifo)")
    ap.add_argument("--fifo", action="store_true",
                    help="run the --paired rounds at real-time priority (SCHED_FIFO 1; root): the ratio of a "
                         "machine with every core free")
    ap.add_argument("--nice-group", action="store_true",
                    help="run the --paired and --breakdown rounds with this process's autogroup at nice -20 "
                         "(Linux, root): other sessions' processes get a small share, the scheduler is the usual one")
    args = ap.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    worker_counts = [int(w) for w in args.workers.split(",") if w]
    shapes = workload(args.size_mb)
    run_bytes = nbytes_of(shapes)
    largest = max(nbytes_of([s]) for s in shapes)
    load_before = loadavg()
    note = memory_note(args.tmp)
    if note:
        print(note, flush=True)
    tmp = Path(tempfile.mkdtemp(dir=args.tmp, prefix="ilstore-bench-compare-"))
    try:
        print(f"building: {len(shapes)} float32 tensors, {run_bytes / 1e6:.1f} MB per run, largest "
              f"{largest / MiB:.0f} MiB; backends {', '.join(backends)} ...", flush=True)
        raw_a, raw_b = write_raw(tmp / "raw_a", shapes, "a"), write_raw(tmp / "raw_b", shapes, "b")
        pairs = list(zip(raw_a, raw_b, shapes, strict=True))
        runs: dict[str, tuple[Path, Path]] = {}
        for backend in backends:
            runs[backend] = (write_run(tmp / backend, "a", backend, shapes, "a"),
                             write_run(tmp / backend, "b", backend, shapes, "b"))
        raw_files = raw_a + raw_b
        most = max(worker_counts)
        rows = [Row("floor: read only", lambda: floor_read_only(pairs), raw_files, "floor"),
                Row(MINIMAL, lambda: floor_minimal(pairs), raw_files, "floor"),
                *([Row(f"floor: minimal, {most} processes", partial(floor_forked, floor_minimal, pairs, most),
                       raw_files, "floor", forked=True)] if most > 1 else []),
                Row(F32, lambda: floor_f32(pairs), raw_files, "floor"),
                Row(LIB, lambda: floor_lib(pairs), raw_files, "floor"),
                *([Row(f"floor: compare_tensors, {most} processes", partial(floor_forked, floor_lib, pairs, most),
                       raw_files, "floor", forked=True),
                   Row(LIB_THREADS.format(most), partial(floor_threads, floor_lib, pairs, most), raw_files, "floor")]
                  if most > 1 else [])]
        if args.no_f32:
            rows = [r for r in rows if r.name != F32]
        disk: dict[str, tuple[int, int]] = {}
        for backend, (a, b) in runs.items():
            files = files_under(a) + files_under(b)
            disk[backend] = (sum(f.stat().st_size for f in files), len(files))
            for w in worker_counts:
                rows.append(Row(f"{backend} compare w{w}", partial(run_compare, a, b, w), files, backend))
            if args.loaded:
                for w in worker_counts:
                    rows.append(Row(f"{backend} compare w{w}, loaded", partial(run_compare, a, b, w, True), files,
                                    backend))
            if args.cli:
                for w in worker_counts:
                    cli = partial(run_cli, a, b, w, tmp / "peak")
                    rows.append(Row(f"{backend} CLI w{w} (peak RSS)", cli, files, backend, child=True))
        read_all(raw_files + [f for a, b in runs.values() for f in files_under(a) + files_under(b)])
        floor_f32(pairs[:8])  # warm-up: first-touch costs of the torch kernels
        for _ in range(args.rounds):  # interleaved, so slow drifts of the machine hit every row alike
            for row in rows:
                row.measure(args.cold)
        results = [row.result() for row in rows]
        paired: dict[str, dict[str, Any]] = {}
        if args.paired and most > 1:
            with fifo(args.fifo) as realtime, nice_group(args.nice_group) as niced:  # the ceilings, then each backend
                paired = {name: {**paired_floor(floor, pairs, most, args.paired, threads), "fifo": realtime,
                                 "nice_group": niced}
                          for name, floor, threads in (("floor", floor_minimal, False), (LIB, floor_lib, False),
                                                       (LIB_THREADS.format(most), floor_lib, True))}
                paired.update({backend: {**paired_ratios(a, b, most, args.paired), "fifo": realtime,
                                         "nice_group": niced}
                               for backend, (a, b) in runs.items()})
        parts: dict[str, dict[int, dict[str, float]]] = {}
        if args.breakdown:
            with fifo(args.fifo), nice_group(args.nice_group):
                parts = {backend: breakdown(a, b, most, args.breakdown) for backend, (a, b) in runs.items()}
        profiles: dict[str, str] = {}
        if args.profile:
            for backend, (a, b) in runs.items():
                prof = cProfile.Profile()
                prof.enable()
                run_compare(a, b, 1)
                prof.disable()
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.profile)
                profiles[backend] = out.getvalue()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = loadavg()

    floor = next(r for r in results if r["name"] == MINIMAL)["seconds"]
    floor32 = next((r["seconds"] for r in results if r["name"] == F32), math.nan)
    both = 2 * run_bytes
    target_rss = 2 * largest + 300e6
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs; "
          f"{args.rounds} round(s), medians; {len(shapes)} tensors, {run_bytes / 1e6:.1f} MB per run "
          f"({both / 1e6:.1f} MB read per compare), largest tensor {largest / MiB:.0f} MiB")
    print("page cache: " + ("COLD (each row's files evicted with posix_fadvise(DONTNEED) before each round)"
                            if args.cold else "WARM (every file was just written/read: reads come from memory)"))
    print(f"loadavg before: {load_before}   after: {load_after}")
    for backend, (nbytes, nfiles) in disk.items():
        print(f"  {backend}: both runs {nbytes / 1e6:.1f} MB on disk in {nfiles} files")
    header = (f"{'row':38} {'s':>7} {'MB/s':>7} {'x floor':>7} {'x f32':>7} {'RSS+MB':>7} {'anon+MB':>7} "
              f"{'<=target RSS/anon':>17} {'load':>5} {'steal%':>6}")
    print(header)
    print("-" * len(header))
    for r in results:
        r["mb_per_s"] = both / 1e6 / r["seconds"]
        r["ratio_to_floor"] = floor / r["seconds"]
        r["ratio_to_f32_floor"] = floor32 / r["seconds"]
        r["rss_target_ok"] = r["rss"] <= target_rss
        r["rss_anon_target_ok"] = r["rss_anon"] <= target_rss
        ok = "/".join("yes" if r[k] else "NO" for k in ("rss_target_ok", "rss_anon_target_ok"))
        print(f"{r['name']:38} {r['seconds']:7.3f} {r['mb_per_s']:7.0f} {r['ratio_to_floor']:7.2f} "
              f"{r['ratio_to_f32_floor']:7.2f} "
              f"{r['rss'] / 1e6:7.0f} {r['rss_anon'] / 1e6:7.0f} {ok:>17} {r['load']:5.1f} {r['steal_percent']:6.1f}")
    checks = {r["check_mismatched"] for r in results if r["group"] != "floor" or r["name"] != "floor: read only"}
    print(f"check: mismatched elements per row (CLI rows: exit status) {sorted(checks)} (expect the count and 1)")
    for backend in backends:
        by_w = {w: next((r["seconds"] for r in results if r["name"] == f"{backend} compare w{w}"), None)
                for w in worker_counts}
        if by_w.get(1) and len(by_w) > 1:
            print(f"{backend}: " + ", ".join(f"w{w}/w1 throughput {by_w[1] / t:.2f}" for w, t in by_w.items()
                                             if t and w != 1))
        loaded = {w: next((r["seconds"] for r in results if r["name"] == f"{backend} compare w{w}, loaded"), None)
                  for w in worker_counts}
        if any(loaded.values()):
            print(f"{backend}: throughput from the files / loaded " + ", ".join(
                f"w{w} {loaded[w] / t:.2f}" for w, t in by_w.items() if t and loaded.get(w)))
    print("targets: x floor >= 0.5 (throughput vs the minimal floor); w2/w1 >= 1.6; RSS <= 2 x largest tensor "
          f"+ 300 MB = {target_rss / 1e6:.0f} MB (in-process rows: growth, whole / anonymous; CLI rows: whole peak)")
    for backend, p in paired.items():
        print(f"{backend}: paired w{p['workers']}/w1 throughput, {len(p['ratios'])} rounds: median "
              f"{statistics.median(p['ratios']):.2f}, best {max(p['ratios']):.2f} "
              f"[{', '.join(f'{r:.2f}' for r in p['ratios'])}], load {statistics.median(p['loads']):.1f}, "
              f"steal {p['steal_percent']:.1f} %"
              + (", SCHED_FIFO" if p["fifo"] else "") + (", autogroup nice -20" if p["nice_group"] else ""))
    for backend, per_w in parts.items():
        for w, part in per_w.items():
            print(f"{backend} w{w} breakdown, {args.breakdown} rounds (medians): wall {part['wall']:.3f} s (CPU "
                  f"{part['cpu']:.3f}); plan {part['plan']:.3f} s (CPU {part['plan_cpu']:.3f}); stream "
                  f"{part['stream']:.3f} s (CPU {part['stream_cpu']:.3f}, {part['cores']:.2f} cores busy)")
    for backend, text in profiles.items():
        print(f"\n== cProfile: {backend} compare workers=1 (tottime) ==\n{text}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "compare", "size_mb": args.size_mb, "rounds": args.rounds, "cold": args.cold,
            "tensors": len(shapes), "run_bytes": run_bytes, "largest_bytes": largest, "rss_target": target_rss,
            "floor_seconds": floor, "loadavg_before": load_before, "loadavg_after": load_after,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "disk": {k: {"bytes": v[0], "files": v[1]} for k, v in disk.items()}, "rows": results,
            "paired": paired, "breakdown": parts}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
