"""A capture process killed with SIGKILL mid-step: completed steps stay readable in every backend."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import ilstore
from ilstore.cli import cli

WORKER = Path(__file__).parent / "workers" / "kill_worker.py"
BACKENDS = ["pt", "safetensors", "hdf5"]
# a killed child per backend takes 5-8 s: pt in the default tier, the others in the slow tier
BACKENDS_PT_FIRST = ["pt", pytest.param("safetensors", marks=pytest.mark.slow),
                     pytest.param("hdf5", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", BACKENDS_PT_FIRST)
def test_sigkill_mid_step(out_dir: Path, backend: str) -> None:
    proc = subprocess.run([sys.executable, str(WORKER), str(out_dir), backend, "2"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run_dir = out_dir / "run"
    with ilstore.open_run(run_dir) as run:
        assert run.status == "running"
        assert run.steps() == [0, 1]
        assert run.incomplete_steps() == [2]
        n = 0
        for key in run.keys():
            run.load(key)
            n += 1
        assert n == 2 * 82
    result = CliRunner().invoke(cli, ["ls", str(run_dir)])
    assert result.exit_code == 0
    assert "status running" in result.output and "cut before they finished: [2]" in result.output


@pytest.mark.parametrize("backend", BACKENDS_PT_FIRST)
def test_sigkill_at_a_late_step(out_dir: Path, backend: str) -> None:
    """Killed at step 1,500 of a run logging every step: every earlier step is listed (from the
    step journal) and readable, the cut step is reported, and ``ilstore ls`` lists the run."""
    kill = 1500
    proc = subprocess.run([sys.executable, str(WORKER), str(out_dir), backend, str(kill), "small"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run_dir = out_dir / "run"
    with ilstore.open_run(run_dir) as run:
        assert run.status == "running"
        assert run.steps() == list(range(kill)) and run.incomplete_steps() == [kill]
        for step in (0, 1, kill // 2, kill - 1):
            assert [(c.module, c.call) for c in run.calls(step)] == [("0", 0), ("1", 0)]
            assert [(c.module, c.call) for c in run.call_ends(step)] == [("0", 0), ("1", 0)]
            keys = run.keys(step)
            assert len(keys) == 4 and all(run.load(k).shape == (1, 8) for k in keys)
            assert run.step_totals(step) == {"module_calls": 2, "tensors": 4, "stored": 4, "bytes": 128}
    result = CliRunner().invoke(cli, ["ls", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert f"status running, {kill} step(s)" in result.output
    assert f"cut before they finished: [{kill}]" in result.output
    assert [ln.split()[:4] for ln in result.output.splitlines() if ln.startswith("0-")] == [
        [f"0-{kill - 1}", "2", "4", "4"]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_with_a_starved_writer_thread_loses_at_most_one_completed_step(out_dir: Path, backend: str) -> None:
    """Asynchronous writes whose writer thread never gets a core (nice 19 on a busy machine),
    killed without a flush at step 300 of a statistics run: a step end waits until at most
    pipeline.MAX_PENDING_STEPS completed steps are unwritten, so at most the last completed
    step is lost besides the cut one, and what is listed is readable. (Before, up to the
    1,024-item bound stayed queued: ~200 steps of this run were lost.)"""
    from ilstore import pipeline

    kill = 300
    proc = subprocess.run([sys.executable, str(WORKER), str(out_dir), backend, str(kill), "small", "starved"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with ilstore.open_run(out_dir / "run") as run:
        steps = run.steps()
        assert steps == list(range(len(steps))) and len(steps) >= kill - pipeline.MAX_PENDING_STEPS, steps[-3:]
        assert run.incomplete_steps() in ([], [len(steps)])
        assert all(run.meta(k)["shape"] == [1, 8] and "min" in run.meta(k)["stats"] for k in run.keys(steps[-1]))


@pytest.mark.slow  # two killed workers and a compare: ~9 s
def test_compare_reports_the_cut_step(out_dir: Path) -> None:
    """Comparing a killed run with a complete one fails closed: the cut step is missing."""
    from ilstore_compare import compare

    # the two workers run at once (each is mostly imports: two cores halve the wait)
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out_dir / name), "pt", kill],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, kill in (("killed", "2"), ("full", "3"))]
    for proc in procs:
        assert proc.wait(timeout=120) == -signal.SIGKILL
    result = compare(out_dir / "killed" / "run", out_dir / "full" / "run")
    assert result.exit_code == 1
    assert result.summary.only_in_dir2 > 0 and result.summary.mismatched == 0
    assert {t.key.step for t in result.tensors if t.status == "only_in_dir2"} == {2}
