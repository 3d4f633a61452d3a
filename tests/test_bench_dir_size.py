"""``_bench_common.dir_size``: bytes of each inode once (hard links are de-duplicated tensors), and
every file name, in nested directories."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_dir_size_counts_each_inode_once_and_every_name(tmp_path: Path) -> None:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    dir_size = importlib.import_module("_bench_common").dir_size
    (tmp_path / "step_0" / "0").mkdir(parents=True)
    (tmp_path / "step_0" / "1").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "ilstore.json").write_bytes(b"x" * 10)
    (tmp_path / "step_0" / "0" / "outputs_cpu.pt").write_bytes(b"y" * 100)
    os.link(tmp_path / "step_0" / "0" / "outputs_cpu.pt", tmp_path / "step_0" / "1" / "inputs_0_cpu.pt")
    (tmp_path / "step_0" / "1" / "outputs.json").write_bytes(b"z" * 1000)
    assert dir_size(tmp_path) == (1110, 4)
    assert dir_size(tmp_path / "empty") == (0, 0)
