"""``ilstore --help``, ``ilstore validate-config`` and ``ilstore ls`` of a missing run answer
without importing torch or h5py (as ilstore-compare's start-up does, issue 18): a config is
checked before a long job starts, and the check should take the time of reading JSON, not of
importing torch.

A built-in backend is valid by name; only ``backend_options`` need its writer class (and so
torch), and a plug-in backend's name needs its entry point loaded.
"""

from __future__ import annotations

from pathlib import Path

from support import run_cli_cases

HEAVY = ("torch", "h5py", "safetensors", "numpy")


def test_help_and_config_errors_import_nothing_heavy(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"backend": "hdf5", "modee": "stats"}')
    cases = [
        (["--help"], 0),
        (["validate-config", "--help"], 0),
        (["validate-config", str(bad)], 2),
        (["validate-config", '{"backend": "hdf6"}'], 2),
        (["validate-config", '{"log_step_ids": [0, 1], "backend": "safetensors"}'], 0),
        (["validate-config", '{"mode": "stats", "output_dir": 3}'], 2),
        (["validate-config", str(tmp_path / "missing.json")], 2),
        (["ls", str(tmp_path / "no_such_run")], 2),
        (["ls", str(bad)], 2),
    ]
    codes, heavy, stderr = run_cli_cases("ilstore.cli", "ilstore", [args for args, _ in cases], HEAVY)
    assert codes == [code for _, code in cases], stderr
    assert heavy == []
    for needle in ("bad.json", "modee", "did you mean 'mode'", "'hdf6'", "output_dir", "missing.json",
                   "no_such_run: no such run directory", "bad.json: not a directory"):
        assert needle in stderr


def test_backend_options_are_still_checked_by_the_backend() -> None:
    # The writer class validates options; loading it may import torch, and must still reject.
    cases = [
        (["validate-config", '{"backend": "hdf5", "backend_options": {"compression": "zstd"}}'], 2),
        (["validate-config", '{"backend": "pt", "backend_options": {"structure_list": 1}}'], 2),
        (["validate-config", '{"backend": "safetensors", "backend_options": {"shard_size_mb": 8}}'], 0),
    ]
    codes, _, stderr = run_cli_cases("ilstore.cli", "ilstore", [args for args, _ in cases], ())
    assert codes == [code for _, code in cases], stderr
    assert "backend_options.compression" in stderr and "backend_options.structure_list" in stderr
