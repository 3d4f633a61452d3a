"""Long runs (issue 13): does a step cost the same at step 100,000 as at step 10?

Workload: 8 x (Linear 64->64 + ReLU) in an ``nn.Sequential``, 16 module calls per step, one
1 x 64 input, every step logged (``log_step_ids: []``), asynchronous writes as by default. For
each backend and mode it reports, from one run:

* forward time per step over the first and the last 10 % of steps (ms) and their ratio, and over
  each tenth of the run (``tenths_ms``: where a growth starts), with the slowest steps
  (``slowest_ms``: a stall, e.g. the writer making the producer wait, shows there), and the
  process's CPU time per step over each tenth (``tenths_cpu_ms``, every thread's, the writer's
  included: on a shared machine a growth in wall time that CPU time lacks is other work's);
* ``close()`` time (the writer's backlog shows here);
* peak RSS growth over the run (the kernel's high-water mark);
* the manifest's size, and the run's size on disk;
* ``ilstore ls`` of the run (the CLI in a fresh process, so its start-up is included: it imports
  no torch), reading one step's records (the last step: every tensor's metadata, and its body
  where stored; a reader that scanned the run would be slowest there), and comparing two such
  runs: ``compare()`` in process (steps per second, the median of three) and ``ilstore-compare``
  in a fresh process with its default markdown report and with ``--format json`` (seconds, the
  process's peak RSS and the report's size), see :func:`compare_cost`.

Run it through ``bench_capture.py --steps N`` (see there for the options).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _bench_common import PeakRss, dir_size  # benchmarks/ is on sys.path

import ilstore
from ilstore.manifest import MANIFEST_NAME


def long_run_model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(8):
        layers += [torch.nn.Linear(64, 64), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).eval()


def capture_run(out: Path, run_id: str, steps: int, backend: str, mode: str) -> dict[str, Any]:
    """Capture ``steps`` forwards into ``out/run_id``; per-step times, close time, peak RSS."""
    model = long_run_model()
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    config = {"output_dir": str(out), "run_id": run_id, "backend": backend, "mode": mode, "log_step_ids": []}
    times = [0.0] * steps
    bounds = _tenths(steps)
    cpu = [0.0] * len(bounds)  # the process's CPU time (all threads) at each tenth's start, then at the end
    with torch.no_grad(), PeakRss() as peak:
        cap = ilstore.capture(model, config)
        for part, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
            cpu[part] = time.process_time()
            for i in range(a, b):
                t0 = time.perf_counter()
                model(x)
                times[i] = time.perf_counter() - t0
        cpu[-1] = time.process_time()
        t0 = time.perf_counter()
        cap.close()
        close_s = time.perf_counter() - t0
    tenth = max(1, steps // 10)
    first, last = sum(times[:tenth]) / tenth, sum(times[-tenth:]) / tenth
    assert cap.run_dir is not None
    return {"run_dir": cap.run_dir, "first_ms": first * 1e3, "last_ms": last * 1e3, "last_over_first": last / first,
            "tenths_ms": tenths_ms(times), "slowest_ms": sorted((t * 1e3 for t in times), reverse=True)[:5],
            "tenths_cpu_ms": [(c1 - c0) / (b - a) * 1e3
                              for c0, c1, a, b in zip(cpu, cpu[1:], bounds, bounds[1:], strict=False)],
            "close_s": close_s, "rss_mb": peak.growth / 2**20,
            "manifest_mb": (cap.run_dir / MANIFEST_NAME).stat().st_size / 2**20,
            "run_mb": dir_size(cap.run_dir)[0] / 2**20}


def _tenths(steps: int) -> list[int]:
    """Where each tenth of ``steps`` starts, then ``steps`` (fewer parts for < 10 steps)."""
    parts = min(10, steps)
    return [steps * i // parts for i in range(parts + 1)]


def tenths_ms(times: Sequence[float]) -> list[float]:
    """Mean time per step (ms) over each tenth of the run, in order (fewer parts for < 10 steps)."""
    bounds = _tenths(len(times))
    return [sum(times[a:b]) / (b - a) * 1e3 for a, b in zip(bounds, bounds[1:], strict=False)]


def run_cli(args: Sequence[str], max_rss_mb: float = 0) -> tuple[int, float, float]:
    """Run ``args`` in a fresh process, output discarded: (exit status, wall s, the child's peak RSS MB).

    The peak is the child's own high-water mark (``VmHWM``), polled every 0.1 s, so growth in its
    last 0.1 s is missed: the rusage of the child cannot serve, as its ``ru_maxrss`` starts at this
    (large, after ``compare()``) process's resident set at the fork. With ``max_rss_mb`` the child
    is killed (SIGKILL: exit status -9) once its peak passes that, so one report too large for the
    machine does not take down what else runs on it."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent)
    peak = 0.0
    try:
        while True:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _hwm_mb(proc.pid))
            if max_rss_mb and peak > max_rss_mb:
                proc.kill()
            time.sleep(0.1)
    except BaseException:  # Ctrl-C, an error here: the cap can no longer be kept, so the child goes
        proc.kill()
        proc.wait()
        raise
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, peak


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL when this process dies, so no capped child outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _hwm_mb(pid: int) -> float:
    """``pid``'s peak resident set so far (MB), 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, IndexError, ValueError):
        pass
    return 0.0


def read_costs(run_dir: Path, steps: int) -> dict[str, Any]:
    """``ilstore ls`` in a fresh process, and one step's records read in this one."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ilstore", "ls", str(run_dir)], check=True, stdout=subprocess.DEVNULL)
    ls_s = time.perf_counter() - t0
    open_run = ilstore.open_run  # imported on first use: not part of the read
    t0 = time.perf_counter()
    with open_run(run_dir) as run:
        step = steps - 1
        for key in run.keys(step):
            meta = run.meta(key)
            if meta.get("stored", True):
                run.load(key)
    return {"ls_s": ls_s, "read_step_s": time.perf_counter() - t0}


def compare_cost(dir1: Path, dir2: Path, steps: int, tmp: Path, cli_max_rss_mb: float = 0) -> dict[str, Any]:
    """Comparing the two runs as a user does.

    * ``compare()`` in process, three times: the median gives ``compare_steps_per_s``; the
      first (``compare_first_s``) includes the compare package's one-time imports and set-up.
    * ``ilstore-compare --dir1 A --dir2 B --output report.md`` in a fresh process
      (``cli_s``, its peak RSS ``cli_rss_mb`` and the report's size ``cli_report_mb``): start-up
      (``import torch``), the comparison and the default markdown report, which has a table of
      every step's calls, so it grows with the run; then the same with ``--format json``
      (``cli_json_s``, ``cli_json_rss_mb``, ``cli_json_report_mb``). A CLI killed for passing
      ``cli_max_rss_mb`` (see :func:`run_cli`) has exit status -9 in ``cli_exit`` /
      ``cli_json_exit`` and no report size; any other exit status unlike ``compare()``'s is an error.
    """
    from ilstore_compare import compare

    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        result = compare(dir1, dir2)
        times.append(time.perf_counter() - t0)
    row: dict[str, Any] = {"compare_steps_per_s": steps / sorted(times)[1], "compare_first_s": times[0],
                           "compare_exit": result.exit_code}
    for fmt, suffix in (("md", ""), ("json", "_json")):
        report = tmp / f"long-run-report.{fmt}"
        code, wall, rss = run_cli([sys.executable, "-c", "from ilstore_compare.cli import main; main()",
                                   "--dir1", str(dir1), "--dir2", str(dir2), "--output", str(report)], cli_max_rss_mb)
        killed = code == -9 and cli_max_rss_mb > 0
        if code != result.exit_code and not killed:
            raise RuntimeError(f"ilstore-compare ({fmt}) exited {code}, compare() said {result.exit_code}")
        row.update({f"cli{suffix}_s": wall, f"cli{suffix}_rss_mb": rss, f"cli{suffix}_exit": code,
                    f"cli{suffix}_report_mb": None if killed else report.stat().st_size / 2**20})
        report.unlink(missing_ok=True)
    return row


def main(steps: int, backends: Sequence[str], modes: Sequence[str], tmp: Path, *, with_compare: bool = True,
         json_rows: list[dict[str, Any]] | None = None, cli_max_rss_mb: float = 0,
         second_run: bool | None = None) -> int:
    """One row per backend and mode; the runs stay in ``tmp`` (the caller deletes them).

    Each part is printed (and its row appended to ``json_rows``, then filled in) as soon as it is
    measured: the capture of run a with its reads, run b's capture (``b_*`` figures, a second
    sample), then the compare. ``second_run`` (default: ``with_compare``) makes run b without the
    compare too: a second sample where comparing two runs would take too long."""
    if second_run is None:
        second_run = with_compare
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    header = (f"{'backend':12} {'mode':8} {'first ms':>8} {'last ms':>8} {'last/1st':>8} {'close s':>8} "
              f"{'RSS+MB':>7} {'manif MB':>8} {'run MB':>7}")
    print(f"long run: {steps} steps, 16 module calls per step, every step logged; {tmp}")
    print(header)
    print("-" * len(header))
    for backend in backends:
        for mode in modes:
            row: dict[str, Any] = {"backend": backend, "mode": mode, "steps": steps}
            if json_rows is not None:
                json_rows.append(row)
            first = capture_run(tmp, f"{backend}-{mode}-a", steps, backend, mode)
            row.update({k: v for k, v in first.items() if k != "run_dir"})
            row.update(read_costs(first["run_dir"], steps))
            _print_capture(backend, mode, row)
            print(f"{'':21} ls s / step s: {row['ls_s']:.2f} / {row['read_step_s']:.3f}", flush=True)
            if not (with_compare or second_run):
                continue
            second = capture_run(tmp, f"{backend}-{mode}-b", steps, backend, mode)
            row.update({f"b_{k}": v for k, v in second.items() if k != "run_dir"})
            _print_capture(backend, f"{mode}(b)", {k[2:]: v for k, v in row.items() if k.startswith("b_")})
            if not with_compare:
                continue
            row.update(compare_cost(first["run_dir"], second["run_dir"], steps, tmp, cli_max_rss_mb))
            print(f"{'':21} compare(): {row['compare_steps_per_s']:.0f} steps/s (median of 3; first "
                  f"{row['compare_first_s']:.2f} s), exit {row['compare_exit']}", flush=True)
            for fmt, suffix in (("md", ""), ("json", "_json")):
                size = row[f"cli{suffix}_report_mb"]
                print(f"{'':21} ilstore-compare {fmt}: {row[f'cli{suffix}_s']:.2f} s, "
                      f"{row[f'cli{suffix}_rss_mb']:.0f} MB peak RSS, "
                      + (f"report {size:.2f} MB" if size is not None
                         else f"killed (SIGKILL; the RSS cap is {cli_max_rss_mb:.0f} MB)"), flush=True)
    return 0


def _print_capture(backend: str, mode: str, row: dict[str, Any]) -> None:
    print(f"{backend:12} {mode:8} {row['first_ms']:8.2f} {row['last_ms']:8.2f} {row['last_over_first']:8.2f} "
          f"{row['close_s']:8.2f} {row['rss_mb']:7.1f} {row['manifest_mb']:8.2f} {row['run_mb']:7.1f}")
    print(f"{'':21} ms per step by tenth: {' '.join(f'{t:.2f}' for t in row['tenths_ms'])}; "
          f"slowest: {' '.join(f'{t:.0f}' for t in row['slowest_ms'])}")
    print(f"{'':21} CPU ms per step by tenth (all threads): {' '.join(f'{t:.2f}' for t in row['tenths_cpu_ms'])}",
          flush=True)
