"""Comparing two long statistics runs (issue 13): identical runs, and runs that differ.

Workload: the long-run model of ``_long_run.py`` (8 x (Linear 64->64 + ReLU), 16 module calls
and 32 statistics-only tensors per step), every step logged in ``mode: stats``. Run "a" feeds
the same 1 x 64 input at every step; run "b" feeds

* ``identical``: the same input (every pair passes: the steps are *plain*, ``.columnar``);
* ``divergent``: the input plus 1e-3 at every step (every output differs at every step, as two
  kernels or fp32 against bf16 do);
* ``from-middle``: the input plus 1e-3 from step N/2 on (the first half identical).

For each backend and case it prints ``compare(a, b)``'s steps per second (the median of
``--rounds`` rounds, CPU time of this process, so other processes on the machine disturb it
less; the wall-clock figure beside it), its ratio to the identical case, and the steps per
second of the general per-pair path (the plan and a comparison per pair, the tables still
answering the statistics) on the first ``--general-steps`` steps, for comparison. ``load``: the
1-minute load average before the row.

Usage:
    python benchmarks/bench_stats_compare.py [--steps 2000] [--backends pt,safetensors,hdf5]
        [--cases identical,divergent,from-middle] [--rounds 3] [--general-steps 200] [--tmp /dev/shm]
        [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _long_run import long_run_model  # noqa: E402

import ilstore  # noqa: E402

CASES: dict[str, Callable[[int, int], float]] = {
    "identical": lambda step, steps: 0.0,
    "divergent": lambda step, steps: 1e-3,
    "from-middle": lambda step, steps: 1e-3 if step >= steps // 2 else 0.0,
}


def capture(out: Path, run_id: str, steps: int, backend: str, noise: Callable[[int, int], float]) -> Path:
    """``steps`` forwards of the long-run model in ``mode: stats``, input plus ``noise(step, steps)``."""
    model = long_run_model()
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    config = {"output_dir": str(out), "run_id": run_id, "backend": backend, "mode": "stats", "log_step_ids": []}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        for step in range(steps):
            model(x + noise(step, steps))
    assert cap.run_dir is not None
    return cap.run_dir


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return time.process_time() - cpu, time.perf_counter() - wall, result


@contextlib.contextmanager
def general_path() -> Iterator[None]:
    """A context in which ``compare()`` decides no step as a whole (every step goes pair by pair)."""
    import ilstore_compare.columnar as columnar

    original = columnar.plain_steps
    columnar.plain_steps = lambda *a, **k: columnar.PlainSteps({})  # type: ignore[assignment]
    try:
        yield
    finally:
        columnar.plain_steps = original  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--backends", default="pt,safetensors,hdf5")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--general-steps", type=int, default=200, help="steps compared by the general path (0: none)")
    parser.add_argument("--tmp", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    parser.add_argument("--profile", action="store_true", help="print a profile of one compare() per row")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = [c for c in args.cases.split(",") if c]
    tmp = Path(tempfile.mkdtemp(prefix="bench_stats_compare_", dir=args.tmp))
    header = (f"{'backend':12} {'case':12} {'steps/s cpu':>11} {'wall':>9} {'x ident':>8} {'general/s':>9} "
              f"{'exit':>4} {'mismatched':>10} {'first':>6} {'load':>5}")
    print(f"two stats runs of {args.steps} steps (16 calls, 32 tensors a step), median of {args.rounds}; "
          f"{tmp}")
    print(header)
    print("-" * len(header))
    try:
        rows(args, cases, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def rows(args: argparse.Namespace, cases: list[str], tmp: Path) -> None:
    from ilstore_compare import compare

    for backend in [b for b in args.backends.split(",") if b]:
        a = capture(tmp / backend, "a", args.steps, backend, CASES["identical"])
        identical: float | None = None
        for case in cases:
            b = capture(tmp / backend, f"b-{case}", args.steps, backend, CASES[case])
            load = os.getloadavg()[0]
            runs = [_timed(functools.partial(compare, a, b)) for _ in range(args.rounds)]
            cpu = sorted(r[0] for r in runs)[len(runs) // 2]
            wall = sorted(r[1] for r in runs)[len(runs) // 2]
            result = runs[0][2]
            rate = args.steps / cpu
            if case == "identical":
                identical = rate
            general = "-"
            if args.general_steps:
                prefix = list(range(min(args.general_steps, args.steps)))
                with general_path():
                    g_cpu, _w, _r = _timed(functools.partial(compare, a, b, steps=prefix))
                general = f"{len(prefix) / g_cpu:9.0f}"
            first = result.first_divergence.step if result.first_divergence is not None else "-"
            ratio = f"{rate / identical:8.2f}" if identical else "-"
            print(f"{backend:12} {case:12} {rate:11.0f} {args.steps / wall:9.0f} {ratio:>8} {general:>9} "
                  f"{result.exit_code:4d} {result.summary.stats_only_mismatched:10d} {first!s:>6} {load:5.2f}",
                  flush=True)
            if args.profile:
                profile = cProfile.Profile()
                profile.runcall(compare, a, b)
                pstats.Stats(profile).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    sys.exit(main())
