"""The safetensors reader of a long run keeps a bounded number of shards open and indexes parsed.

It kept every shard it read open and every index parsed: comparing two runs of a few hundred
steps in tensors mode ran out of file descriptors (1,024 by default on many systems, two shards a
step), and a compare of 100,000 steps would have held 200,000 parsed indexes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import ilstore
from ilstore.store import safetensors as st
from ilstore_compare import compare

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _long_run import long_run_model  # noqa: E402

STEPS = 24


def _run(out: Path, run_id: str, scale: float = 1.0) -> Path:
    model = long_run_model()
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    config = {"output_dir": str(out), "run_id": run_id, "backend": "safetensors", "log_step_ids": []}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        for step in range(STEPS):
            model(x * (scale if step == STEPS - 1 else 1.0))
    assert cap.run_dir is not None
    return cap.run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    out = tmp_path_factory.mktemp("open_files")
    return _run(out, "a"), _run(out, "b"), _run(out, "c", scale=1.5)


def _open_shards(run: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(str(run)) and target.endswith(".safetensors")
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_a_reader_keeps_a_bounded_number_of_shards_open(runs: tuple[Path, Path, Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(st, "_KEEP_SHARDS", 3)
    monkeypatch.setattr(st, "_KEEP_INDEXES", 2)
    a = runs[0]
    reader = ilstore.open_run(a)
    try:
        loaded = 0
        for step in reader.steps():
            for key in reader.keys(step):
                if reader.meta(key).get("stored") and "same_as" not in reader.meta(key):
                    assert torch.equal(reader.load(key), reader.load(key))
                    loaded += 1
            assert _open_shards(a) <= 3
            assert len(reader._indexes) <= 2  # type: ignore[attr-defined]
        assert loaded >= STEPS * 8
        # a step read again after its shard was closed and its index dropped reads the same
        first = next(k for k in reader.keys(0) if reader.meta(k).get("stored"))
        again = ilstore.open_run(a)
        try:
            assert torch.equal(reader.load(first), again.load(first))
        finally:
            again.close()
    finally:
        reader.close()
    assert _open_shards(a) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_compare_with_few_shards_kept_gives_the_same_result(runs: tuple[Path, Path, Path], workers: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards dropped while other workers read from them: the same result as with every shard kept."""
    a, b, c = runs
    full_same, full_diff = compare(a, b, workers=workers), compare(a, c, workers=workers)
    monkeypatch.setattr(st, "_KEEP_SHARDS", 1)
    monkeypatch.setattr(st, "_KEEP_INDEXES", 1)
    few_same, few_diff = compare(a, b, workers=workers), compare(a, c, workers=workers)
    assert few_same.exit_code == 0 and few_diff.exit_code == 1
    assert few_same == full_same and few_diff == full_diff


@pytest.mark.slow  # a long run in a child process: ~16 s
def test_compare_of_many_steps_under_a_low_file_limit(tmp_path: Path) -> None:
    """Two runs of 400 steps (800 shards) compare within a limit of 256 open files."""
    import subprocess
    import textwrap

    script = textwrap.dedent(f"""
        import resource, sys, torch
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent / 'benchmarks')!r})
        import ilstore
        from _long_run import long_run_model
        from ilstore_compare import compare
        for rid in "ab":
            model, x = long_run_model(), torch.ones(1, 64)
            config = {{"output_dir": {str(tmp_path)!r}, "run_id": rid, "backend": "safetensors", "log_step_ids": []}}
            with torch.no_grad(), ilstore.capture(model, config):
                for _ in range(400):
                    model(x)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        result = compare({str(tmp_path / 'a')!r}, {str(tmp_path / 'b')!r})
        print(result.exit_code, result.summary.matched)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0", str(400 * 32)]
