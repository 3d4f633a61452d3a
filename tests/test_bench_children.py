"""The benchmarks' child processes end: ``bench_compare``'s forked floor processes (no OpenMP hang
after the fork; killed at a deadline or when the parent fails) and ``_long_run.run_cli``'s child
(killed when the parent raises; SIGKILL when the parent dies).

Each case runs in a fresh Python process with a timeout, so a regression fails here instead of
hanging the test session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
# the benchmarks' child processes: the slow tier (~20 s in all)
pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, /proc and prctl: Linux only"),
              pytest.mark.slow]

#: What each script starts with: ``benchmarks/`` importable, as the scripts themselves do.
_PRELUDE = f"import sys; sys.path.insert(0, {str(BENCH)!r})\n"


def _python(code: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter, in a session of its own; its output. Past ``timeout`` s (a
    hang) the whole session is killed, the processes it forked too, and the test fails. On time,
    what it left running is left for the test to see (and to clean up)."""
    with subprocess.Popen([sys.executable, "-c", _PRELUDE + textwrap.dedent(code)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"still running after {timeout} s (hung); output: {out!r} {err!r}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _gone(pid: int) -> bool:
    """``pid`` has exited: no such process, or a zombie its new parent has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _pids(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _kill(pids: list[int]) -> None:
    """Leave nothing behind when a test fails."""
    for pid in pids:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_forked_floor_after_openmp_regions_answers(tmp_path: Path) -> None:
    """The 'compare_tensors, N processes' row with the compare kernel off (torch's own ops): the
    parent has run OpenMP parallel regions before forking, which made each child hang at its first
    parallel op."""
    out = _python(f"""
        import numpy as np, torch
        import bench_compare
        torch.set_num_threads(2)
        x = torch.arange(1 << 22, dtype=torch.float32)
        assert float((x * 2).sum()) > 0  # parallel regions in this process, before the forks
        rng = np.random.default_rng(0)
        pairs = []
        for i in range(4):
            a = rng.standard_normal(1 << 20, dtype=np.float32)
            b = a.copy()
            b[::1009] *= 1 + 1e-4
            pa, pb = {str(tmp_path)!r} + f"/a{{i}}.f32", {str(tmp_path)!r} + f"/b{{i}}.f32"
            a.tofile(pa)
            b.tofile(pb)
            pairs.append((pa, pb, (1 << 20,)))
        in_process = bench_compare.floor_lib(pairs)
        mismatched, seconds, rss = bench_compare.floor_forked(bench_compare.floor_lib, pairs, 2)
        assert mismatched == in_process > 0, (mismatched, in_process)
        print("ok", mismatched)
        """, timeout=60, env={"ILSTORE_COMPARE_KERNEL": "0"})
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr


@pytest.mark.parametrize("how", ["deadline", "parent fails"])
def test_forked_floor_processes_that_never_answer_are_killed(tmp_path: Path, how: str) -> None:
    """A floor process that never answers is killed once the deadline passes, and so are all of
    them when the parent raises while it waits (here: an alarm's exception, like a Ctrl-C)."""
    pid_file = tmp_path / "pids"
    out = _python(f"""
        import os, signal, time
        import bench_compare

        def stuck(pairs):
            with open({str(pid_file)!r}, "a") as fh:
                fh.write(f"{{os.getpid()}}\\n")
            time.sleep(3600)
            return 0

        class Interrupted(Exception):
            pass

        def when_both_stuck(signum, frame):
            if os.path.exists({str(pid_file)!r}) and len(open({str(pid_file)!r}).read().split()) == 2:
                raise Interrupted()  # like a Ctrl-C while floor_forked waits for the answers

        if {how!r} == "deadline":
            bench_compare._FORKED_DEADLINE_S = 1
        else:
            signal.signal(signal.SIGALRM, when_both_stuck)
            signal.setitimer(signal.ITIMER_REAL, 0.2, 0.2)
        t0 = time.monotonic()
        try:
            bench_compare.floor_forked(stuck, [("a", "b", (1,))] * 2, 2)
        except (RuntimeError, Interrupted) as exc:
            signal.setitimer(signal.ITIMER_REAL, 0)
            print(type(exc).__name__, round(time.monotonic() - t0, 1), exc)
        """, timeout=60)
    pids = _pids(pid_file)
    try:
        assert out.returncode == 0, out.stderr
        expected = "RuntimeError" if how == "deadline" else "Interrupted"
        assert out.stdout.split()[0] == expected, out.stdout
        if how == "deadline":
            assert "no answer within 1 s" in out.stdout
        assert float(out.stdout.split()[1]) < 10, out.stdout
        assert len(pids) == 2, pids  # both processes got as far as the floor
        assert all(_wait_gone(pid, 5) for pid in pids), [p for p in pids if not _gone(p)]
    finally:
        _kill(pids)


def _sleeper(pid_file: Path) -> str:
    """A child for ``run_cli`` that writes its pid (the shell's, kept by ``exec``) and sleeps."""
    return repr(["/bin/sh", "-c", f"echo $$ > {pid_file}; exec sleep 60"])


def test_run_cli_kills_its_child_when_the_caller_raises(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    out = _python(f"""
        import os, signal, time
        import _long_run

        class Interrupted(Exception):
            pass

        def interrupt(signum, frame):
            raise Interrupted()

        def when_started(signum, frame):
            if os.path.exists({str(pid_file)!r}) and open({str(pid_file)!r}).read().strip():
                raise Interrupted()  # like a Ctrl-C while run_cli waits

        signal.signal(signal.SIGALRM, when_started)
        signal.setitimer(signal.ITIMER_REAL, 0.2, 0.2)
        t0 = time.monotonic()
        try:
            _long_run.run_cli({_sleeper(pid_file)})
        except Interrupted:
            signal.setitimer(signal.ITIMER_REAL, 0)
            print("interrupted", round(time.monotonic() - t0, 1))
        """, timeout=60)
    pids = _pids(pid_file)
    try:
        assert out.returncode == 0 and out.stdout.startswith("interrupted"), out.stdout + out.stderr
        assert float(out.stdout.split()[1]) < 10, out.stdout
        assert len(pids) == 1 and _wait_gone(pids[0], 5), pids
    finally:
        _kill(pids)


def test_run_cli_child_dies_with_the_caller(tmp_path: Path) -> None:
    """The caller killed by SIGKILL (no Python handler runs): the child still goes."""
    pid_file = tmp_path / "pid"
    code = f"import _long_run; _long_run.run_cli({_sleeper(pid_file)})"
    parent = subprocess.Popen([sys.executable, "-c", _PRELUDE + code])
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not (pids := _pids(pid_file)) and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.05)
        assert len(pids) == 1 and not _gone(pids[0]), pids
        parent.kill()
        parent.wait(10)
        assert _wait_gone(pids[0], 5), f"the child {pids[0]} outlived its caller"
    finally:
        parent.kill()
        parent.wait()
        _kill(pids)
