"""``ilstore demo`` when files cannot be written (a full disk, SPEC section 7): one ``error: <file>:
...`` line naming what could not be written, exit status 2, no traceback, and no half-written report
under its final name.

The demo runs in a child process whose file size limit (``RLIMIT_FSIZE``) makes a write past the
limit fail (``EFBIG``, with ``SIGXFSZ`` ignored) as a full disk does (``ENOSPC``): the same
``OSError`` from ``write()``, without mounting anything. The demo's largest run file is ~18 KB, its
markdown report ~26 KB, its HTML report ~60 KB.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("transformers")


def _demo(out: Path, limit: int) -> subprocess.CompletedProcess[str]:
    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of killing the child
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "ilstore", "demo", "--output-dir", str(out)], capture_output=True,
                          text=True, timeout=300, env=env, preexec_fn=limited)


def test_a_report_that_cannot_be_written_stops_the_demo_naming_it(tmp_path: Path) -> None:
    """The runs fit, the markdown report does not: no traceback, and no report.md (it was left
    cut short, or empty, under its final name)."""
    proc = _demo(tmp_path, 22_000)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'report.md'}: cannot write the report: "), last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "bf16_replay", "fp32"]  # no report, no temporary


def test_a_capture_that_fails_stops_the_demo_naming_the_run(tmp_path: Path) -> None:
    """The float32 run's files do not fit: the demo stops there, naming that run (it went on and
    failed later on another run: "error: replay: .../bf16_replay: not a run directory")."""
    proc = _demo(tmp_path, 4_000)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'fp32'}") and "(capturing the demo's fp32 run)" in last, last
    assert not (tmp_path / "bf16").exists() and not (tmp_path / "report.md").exists()
