"""The ``hdf5`` reader on long runs (issue 13): it keeps at most ``_OPEN_FILES`` step files open,
closing the least recently used, so streaming a run of more steps than the process may open files
(convert, reading every step, compare) works; after a compare planned its loads no file is closed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ilstore
from ilstore.store import hdf5
from ilstore.testing import assert_bits_equal


def _run(out: Path, steps: int, mode: str = "tensors") -> Path:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    config = {"output_dir": str(out), "run_id": "r", "backend": "hdf5", "mode": mode, "log_step_ids": []}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        for step in range(steps):
            model(torch.full((1, 4), float(step)))
    assert cap.run_dir is not None
    return cap.run_dir


def test_open_files_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = _run(tmp_path, 12)
    with ilstore.open_run(run_dir) as run:
        want = {key: run.load(key) for key in run.keys()}
        assert len(run._files) == hdf5._OPEN_FILES == 8  # the default bound, reached
    monkeypatch.setattr(hdf5, "_OPEN_FILES", 3)
    with ilstore.open_run(run_dir) as run:
        assert isinstance(run, hdf5.Hdf5Reader)
        for _sweep in range(2):  # the second sweep reopens the files closed in the first
            for step in run.steps():
                for key in run.keys(step):
                    assert_bits_equal(run.load(key), want[key], str(key))
                assert len(run._files) <= 3 and step in run._files
                assert set(run._raw_fds) <= set(run._files)
        # back to an early step, whose file was closed: a load reopens it
        first = [key for key in want if key.step == 0]
        assert 0 not in run._files
        assert_bits_equal(run.load(first[-1]), want[first[-1]], str(first[-1]))
        assert 0 in run._files and len(run._files) == 3
        # planning (a compare) opens the files under the same bound, and planned loads open the
        # step file themselves (the reader's copy of it may have been closed since)
        run.prepare_loads(list(want))
        assert len(run._files) == 3 and run._located and all(run._located.values())
        for key, tensor in want.items():
            assert_bits_equal(run.load(key), tensor, str(key))
            assert len(run._files) <= 3


_LOW_LIMIT = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    import ilstore
    from ilstore.convert import convert
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))  # two readers of up to 64 files each, and more
    run_dir = Path(sys.argv[1])
    with ilstore.open_run(run_dir) as run:
        n = sum(run.load(key).numel() for key in run.keys())
    convert(run_dir, run_dir.parent / "as_pt", to="pt")
    convert(run_dir, run_dir.parent / "as_hdf5", to="hdf5")
    with ilstore.open_run(run_dir.parent / "as_hdf5") as run:
        assert run.steps() == list(range(150))
    from ilstore_compare import compare
    for workers in (1, 2):  # both runs planned: 300 step files, 200 descriptors
        result = compare(run_dir, run_dir.parent / "as_hdf5", workers=workers)
        assert result.exit_code == 0 and result.summary.compared == 600, result.summary
    print(n)
""")


@pytest.mark.slow  # a long run in a child process: ~8 s
def test_a_run_of_more_steps_than_open_files(tmp_path: Path) -> None:
    """150 steps read, converted and compared under a limit of 200 open files (each reader held one
    descriptor per step before, and failed with 'Too many open files'; a compare's planning kept
    every planned file open, and failed the same way)."""
    run_dir = _run(tmp_path, 150)
    proc = subprocess.run([sys.executable, "-c", _LOW_LIMIT, str(run_dir)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(150 * 2 * 2 * 4)]  # inputs and outputs of 2 calls, 4 values each
