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


# -- a tiny Llama parallelised with parallelize_module vs the same model in one process -------------
LLAMA_WORKER = Path(__file__).parent / "workers" / "tp_llama_worker.py"
#: Reduction-order tolerance of TP=2 vs TP=1 in float32 (row-wise partial sums all-reduced over 2
#: ranks vs one matmul): observed max abs diff 8.3e-7 on values of order 1 (docs/parallel.md).
TP_RTOL, TP_ATOL = 1e-5, 1e-6


def _llama(out_dir: Path, run_id: str, *extra: str, single: bool = False) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if single:
        cmd = [sys.executable, str(LLAMA_WORKER), str(out_dir), run_id, "--single"]
    else:
        torchrun = Path(sys.executable).parent / "torchrun"
        cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(28500 + (os.getpid() + len(run_id)) % 1000),
               str(LLAMA_WORKER), str(out_dir), run_id, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out_dir / run_id


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("llama")
    return {"tp1": _llama(out, "tp1", single=True), "tp2": _llama(out, "tp2"),
            "perturbed": _llama(out, "tp2-perturbed", "--perturb-rank", "1")}


def test_llama_layouts_recorded(llama_runs: dict[str, Path]) -> None:
    with ilstore.open_run(llama_runs["tp2"]) as run:
        def layout(module: str, kind: str, path: tuple[str, ...] = (), rank: int = 1) -> dict | None:
            return run.meta(ilstore.TensorKey(0, module, 0, kind, path, rank=rank)).get("layout")

        q = layout("model.layers.0.self_attn.q_proj", "outputs")  # from the DTensor weight
        assert q is not None and (q["kind"], q["dim"], q["sizes"], q["index"]) == ("shard", 2, [32, 32], 1)
        o_in = layout("model.layers.0.self_attn.o_proj", "inputs", ("0",))  # a DTensor input: local shard + placement
        assert o_in is not None and (o_in["kind"], o_in["source"], o_in["group"]) == ("shard", "dtensor", "tp")
        assert run.meta(ilstore.TensorKey(0, "model.layers.0.self_attn.o_proj", 0, "inputs", ("0",),
                                          rank=1))["shape"] == [2, 6, 32]
        assert layout("model.layers.0.mlp.down_proj", "outputs")["kind"] == "replicate"  # type: ignore[index]
        act = layout("model.layers.0.mlp.act_fn", "inputs", ("0",))  # annotated
        assert act is not None and (act["kind"], act["source"]) == ("shard", "annotation")
        assert layout("model.norm", "outputs") is None  # replicated: no layout needed


def test_llama_tp2_unshard_matches_tp1(llama_runs: dict[str, Path]) -> None:
    from click.testing import CliRunner

    from ilstore_compare.cli import compare_cmd

    runner = CliRunner()
    args = ["--dir1", str(llama_runs["tp2"]), "--dir2", str(llama_runs["tp1"]), "--format", "json"]
    res = runner.invoke(compare_cmd, [*args, "--unshard", "--rtol", str(TP_RTOL), "--atol", str(TP_ATOL)])
    assert res.exit_code == 0, res.output[-3000:]
    report = json.loads(res.output)
    s = report["summary"]
    assert s["compared"] == s["matched"] == s["tensors"] > 100 and s["calls"] == 62
    # not bitwise: the row-wise layers sum partial products in another order
    exact = json.loads(runner.invoke(compare_cmd, [*args, "--unshard", "--exact"]).output)
    assert exact["summary"]["mismatched"] > 0
    assert max(t["max_abs_diff"] for t in exact["tensors"] if t["max_abs_diff"] is not None) < TP_ATOL


def test_llama_perturbed_shard_found_in_the_logical_tensor(llama_runs: dict[str, Path]) -> None:
    from ilstore_compare.unshard import compare_unsharded

    result = compare_unsharded(llama_runs["perturbed"], llama_runs["tp1"], rtol=TP_RTOL, atol=TP_ATOL)
    assert result.exit_code == 1
    first = result.first_divergence
    assert first is not None and (first.module, first.origin, first.step) == ("model.layers.0.mlp.gate_proj",
                                                                              "introduced", 0)
    gate = next(t for t in result.tensors if t.key.module == "model.layers.0.mlp.gate_proj"
                and t.key.kind == "outputs" and t.key.step == 0)
    # rank 1's column 3 of its 64 is logical column 67, on each of the 2 x 6 tokens; every token's
    # difference is ~0.01, so which token holds the largest one depends on the machine's rounding
    assert gate.metrics is not None and gate.metrics.max_abs_diff_index is not None
    batch, token, column = gate.metrics.max_abs_diff_index
    assert column == 67 and 0 <= batch < 2 and 0 <= token < 6
    assert gate.metrics.mismatched == 12


def test_convert_unshard_of_the_llama_run(llama_runs: dict[str, Path], tmp_path: Path) -> None:
    from ilstore.convert import convert
    from ilstore_compare import compare

    out = convert(llama_runs["tp2"], tmp_path / "logical", to="safetensors", unshard=True)
    with ilstore.open_run(out) as run:
        assert run.manifest["world_size"] == 1 and "ranks" not in run.manifest
    assert compare(out, llama_runs["tp1"], rtol=TP_RTOL, atol=TP_ATOL).exit_code == 0


ALLREDUCE_WORKER = Path(__file__).parent / "workers" / "allreduce_worker.py"


def test_an_output_all_reduced_in_place_is_stored_as_reduced(tmp_path: Path) -> None:
    """Collectives change tensors in place without bumping their version counter: under
    torch.distributed the capture does not de-duplicate (it stored the partial sum, linked to the
    submodule's output, as the layer's output)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    result = tmp_path / "result"
    proc = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(27500 + os.getpid() % 1000),
                           str(ALLREDUCE_WORKER), str(tmp_path), str(result)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in (0, 1):
        found = json.loads(Path(f"{result}.{rank}").read_text())
        assert found == {"rank": rank, "dedup": False, "same_as": None, "stored_is_the_output": True,
                         "output_differs_from_partial": True}, found
