"""ilstore-compare answers --help, usage errors and map (config) errors without importing torch,
h5py, safetensors or numba (issue 18: start-up is most of a short answer's time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "h5py", "safetensors", "numba")

_DRIVER = """
import json, sys
from ilstore_compare.cli import main
cases, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
codes = []
for args in cases:
    sys.argv = ['ilstore-compare', *args]
    try:
        main()
        codes.append(0)
    except SystemExit as exc:
        codes.append(exc.code)
print(json.dumps({'codes': codes, 'heavy': [m for m in heavy if m in sys.modules]}))
"""


def test_help_usage_and_map_errors_import_nothing_heavy(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"rules": [')
    bad_key = tmp_path / "key.json"
    bad_key.write_text('{"renames": {}}')
    d = str(tmp_path)
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
    ]
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps([args for args, _ in cases]),
                           json.dumps(HEAVY)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["codes"] == [code for _, code in cases], proc.stderr
    assert out["heavy"] == []
    for needle in ("--dir1", "--bogus", "pdf", "bad.json", "renames", "no_such_shipped_map",
                   "no_such_run: no such run directory"):
        assert needle in proc.stderr
