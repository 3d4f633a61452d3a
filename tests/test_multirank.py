"""Multi-rank capture under torchrun (2 ranks, gloo, CPU): one run directory, ranks kept apart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ilstore

WORKER = Path(__file__).parent / "workers" / "tp_worker.py"
pytestmark = pytest.mark.slow


def _torchrun(out_dir: Path, tag: str, *extra: str) -> dict:
    result = out_dir / f"{tag}.json"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 1000),
                           str(WORKER), str(out_dir), str(result), *extra],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(result.read_text())


def _full_model_outputs(step: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    up, down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
    x = torch.arange(16.0).reshape(2, 8) / 10 + step
    h = up(x)
    return {"x": x, "up": h, "down": down(torch.relu(h))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("ranks")
    return {"a": _torchrun(out, "a"), "b": _torchrun(out, "b"), "p": _torchrun(out, "p", "--perturb-rank", "1")}


def test_one_run_dir_both_ranks(runs: dict[str, dict]) -> None:
    run_dir = Path(runs["a"]["run_dir"])
    manifest = json.loads((run_dir / "ilstore.json").read_text())
    assert manifest["layout"] == "ranks" and manifest["ranks"] == [0, 1] and manifest["world_size"] == 2
    assert sorted(p.name for p in run_dir.iterdir()) == ["ilstore.json", "rank_0", "rank_1"]
    with ilstore.open_run(run_dir) as run:
        assert run.status == "complete" and run.steps() == [0, 1]
        calls = run.calls(0)
        assert [(c.rank, c.module) for c in calls] == [(0, "up"), (0, "act"), (0, "down"),
                                                       (1, "up"), (1, "act"), (1, "down")]
        for step in (0, 1):
            full = _full_model_outputs(step)
            for rank in (0, 1):
                up = run.load(ilstore.TensorKey(step, "up", 0, "outputs", rank=rank))
                torch.testing.assert_close(up, full["up"][:, rank * 8:(rank + 1) * 8])
                down = run.load(ilstore.TensorKey(step, "down", 0, "outputs", rank=rank))
                torch.testing.assert_close(down, full["down"])
                assert run.meta(ilstore.TensorKey(step, "down", 0, "outputs", rank=rank))["device"] == "cpu"
    for rank in (0, 1):
        sub = json.loads((run_dir / f"rank_{rank}" / "ilstore.json").read_text())
        assert sub["rank"] == rank and sub["world_size"] == 2 and sub["config"]["run_id"] == run_dir.name


def test_compare_pairs_rank_with_rank(runs: dict[str, dict]) -> None:
    compare = pytest.importorskip("ilstore_compare").compare
    same = compare(runs["a"]["run_dir"], runs["b"]["run_dir"])
    assert same.exit_code == 0
    diff = compare(runs["p"]["run_dir"], runs["a"]["run_dir"])
    assert diff.exit_code == 1
    first = diff.first_divergence
    assert first is not None and first.rank == 1 and first.module == "up" and first.origin == "introduced"
