"""ilstore-compare answers --help, usage errors and map (config) errors without importing torch,
h5py, safetensors or numba (issue 18: start-up is most of a short answer's time)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support import run_cli_cases

HEAVY = ("torch", "h5py", "safetensors", "numba")


def test_help_usage_and_map_errors_import_nothing_heavy(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"rules": [')
    bad_key = tmp_path / "key.json"
    bad_key.write_text('{"renames": {}}')
    d = str(tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a run")
    corrupt = tmp_path / "corrupt_run"
    corrupt.mkdir()
    (corrupt / "ilstore.json").write_text('{"format": "ilstore", ')
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    two = tmp_path / "two_runs"
    for name in ("a", "b"):
        (two / name).mkdir(parents=True)
        (two / name / "ilstore.json").write_text('{"format": "ilstore"}')
    newer = tmp_path / "newer_run"
    newer.mkdir()
    (newer / "ilstore.json").write_text('{"format": "ilstore", "format_version": 999}')
    cases = [
        (["--help"], 0),
        ([], 2),  # --dir1 missing
        (["--dir1", d], 2),
        (["--dir1", d, "--dir2", d, "--bogus"], 2),
        (["--dir1", d, "--dir2", d, "--format", "pdf"], 2),
        (["--dir1", d, "--dir2", d, "--rtol", "-1"], 2),
        (["--dir1", d, "--dir2", d, "--steps", "x"], 2),
        (["--dir1", d, "--dir2", d, "--modules", "("], 2),
        (["--dir1", d, "--dir2", d, "--workers", "0"], 2),
        (["--dir1", d, "--dir2", d, "--map", str(bad_json)], 2),
        (["--dir1", d, "--dir2", d, "--map", str(bad_key)], 2),
        (["--dir1", d, "--dir2", d, "--map", "no_such_shipped_map"], 2),
        (["--dir1", d + "/no_such_run", "--dir2", d], 2),  # a mistyped run directory
        (["--dir1", str(a_file), "--dir2", d], 2),  # a file, not a run directory
        (["--dir1", d, "--dir2", d, "--output", str(a_file / "report.md")], 2),  # a report nowhere to go
        (["--dir1", str(corrupt), "--dir2", d], 2),  # a manifest that is not JSON
        (["--dir1", d, "--dir2", str(newer)], 2),  # a run written by a newer ilstore
        (["--dir1", d, "--dir2", d, "--replay", str(corrupt)], 2),
        (["--dir1", str(empty), "--dir2", d], 2),  # an empty directory
        (["--dir1", d, "--dir2", str(two)], 2),  # an output_dir holding two runs
    ]
    codes, heavy, stderr = run_cli_cases("ilstore_compare.cli", "ilstore-compare", [args for args, _ in cases], HEAVY)
    assert codes == [code for _, code in cases], stderr
    assert heavy == []
    for needle in ("--dir1", "--bogus", "pdf", "bad.json", "renames", "no_such_shipped_map",
                   "no_such_run: no such run directory", "a_file: not a directory",
                   "report.md: cannot write the report", "corrupt_run/ilstore.json: unreadable manifest",
                   "newer_run/ilstore.json: written by a newer ilstore",
                   "empty_dir: not a run directory (no ilstore.json, no step_<N> data) and no run inside it",
                   "two_runs: holds 2 runs; pass one of them"):
        assert needle in stderr


def test_the_command_maps_large_blocks_on_their_own(monkeypatch: Any) -> None:
    """main() (the console script, owner of its process) sets glibc's mmap threshold before it
    compares; the library itself (and --help's answer) does not depend on it."""
    from ilstore_compare import cli

    calls: list[int] = []
    monkeypatch.setattr(cli, "_own_mappings_for_large_blocks", lambda: calls.append(1))
    monkeypatch.setattr(sys, "argv", ["ilstore-compare", "--help"])
    try:
        cli.main()
    except SystemExit as exc:
        assert exc.code == 0
    assert calls == ([1] if sys.platform.startswith("linux") else [])


_FREED = """
import sys, threading, numpy as np
from ilstore_compare.cli import _own_mappings_for_large_blocks
if sys.argv[1] == "on":
    _own_mappings_for_large_blocks()
def rss():
    with open('/proc/self/statm') as fh:
        return int(fh.read().split()[1]) * 4096
def work():
    for size in (24, 40, 32, 48, 36):  # freed blocks of several sizes, in a thread: its own heap
        a = np.ones(size << 20, dtype=np.uint8)
        b = np.ones((size - 8) << 20, dtype=np.uint8)
        del a, b
before = rss()
t = threading.Thread(target=work)
t.start()
t.join()
print((rss() - before) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_go_back_to_the_system_when_freed() -> None:
    """With the command's setting, a worker thread's freed tensor-sized blocks do not stay resident
    (by default glibc raises its threshold as large blocks are freed and keeps later ones in the
    thread's heap: the RSS growth the compare CLI had with two workers)."""
    out = subprocess.run([sys.executable, "-c", _FREED, "on"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 8, f"{out.stdout.strip()} MiB still resident after freeing"
