"""vLLM's packed batches against a Hugging Face padded batch, token by token (``--align-tokens``).

vLLM (the CPU build in .venv-vllm, in-process) generates for three prompts of different lengths:
step 0 packs the three prefills into one flat batch, steps 1-3 decode one token per request.
transformers' ``generate`` runs the same prompts (the token ids vLLM's plug-in recorded in its
``ilstore.batch`` records), left-padded into one ``[3, S]`` batch, on the same float32 weights.
The aligned comparison, with the shipped map picked from the manifests, must cover every prompt
token and every fed-back generated token of every request and exit 0.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ilstore
import ilstore_compare
from ilstore.integrations.vllm_batch import BATCH_MODULE
from ilstore_compare.cli import compare_cmd
from ilstore_compare.report_json import validate_report
from support import require_vllm_python

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "offline_inference" / "llm_engine_example.py"
PROMPTS = ["Hello, my name is", "The capital of France is a city that many people", "The future"]
NEW_TOKENS = 4  # a prefill and three decode steps


def _vllm_run(python: Path, model: Path, out: Path) -> dict[str, list[int]]:
    env = {k: v for k, v in os.environ.items() if k != "ILSTORE_CONFIG"}
    env.update(HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false",
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    cfg = {"output_dir": str(out), "run_id": "vllm", "log_step_ids": list(range(NEW_TOKENS))}
    args = [str(python), str(EXAMPLE), "--model", str(model), "--dtype", "float32", "--max-tokens", str(NEW_TOKENS),
            "--ignore-eos", "--intermediate-log-config", json.dumps(cfg)]
    for p in PROMPTS:
        args += ["--prompt", p]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    tokens = {}
    for line in proc.stdout.splitlines():
        if " -> token ids " in line:
            prompt, ids = line.split(" -> token ids ")
            tokens[ast.literal_eval(prompt)] = json.loads(ids)
    assert len(tokens) == len(PROMPTS)
    return tokens


def _recorded_prompts(run_dir: Path) -> dict[str, list[int]]:
    """Each request's prompt ids, from step 0's ilstore.batch record (every prompt is prefilled there)."""
    with ilstore.open_run(run_dir) as run:
        call = next(c for c in run.calls(0) if c.module == BATCH_MODULE)
        kwargs = run.structure(call, "inputs")["kwargs"]
    values = {k: v["items"] if isinstance(v, dict) else v for k, v in kwargs.items()}
    starts, ids, pos = values["query_start_loc"], values["input_ids"], values["positions"]
    out = {}
    for i, rid in enumerate(values["request_ids"]):
        assert pos[starts[i]:starts[i + 1]] == list(range(starts[i + 1] - starts[i]))  # a whole prefill
        out[rid] = ids[starts[i]:starts[i + 1]]
    return out


def test_packed_vllm_vs_padded_hf(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    python = require_vllm_python()
    model_dir = tmp_path / "tiny-llama"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_tiny_model.py"), str(model_dir)], check=True,
                   capture_output=True, timeout=300)
    generated = _vllm_run(python, model_dir, tmp_path)
    vllm_run, hf_run = tmp_path / "vllm", tmp_path / "hf"
    prompts = _recorded_prompts(vllm_run)
    # the example submits requests "0", "1", "2" in PROMPTS order (vLLM appends a suffix: "0-8eda41ba")
    order = sorted(prompts, key=lambda r: int(r.split("-")[0]))
    lengths = [len(prompts[r]) for r in order]
    assert len(set(lengths)) == 3, lengths  # three different lengths
    with ilstore.open_run(vllm_run) as run:
        assert run.steps() == [0, 1, 2, 3]
        packed = [next(k for k in run.keys(s) if k.module == "model.embed_tokens" and k.kind == "inputs")
                  for s in run.steps()]
        assert [run.meta(k)["shape"] for k in packed] == [[sum(lengths)], [3], [3], [3]]

    # Hugging Face: the same ids, left-padded into one batch, generate() with greedy decoding
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(prompts[r])) + prompts[r] for r in order])
    mask = torch.tensor([[0] * (width - len(prompts[r])) + [1] * len(prompts[r]) for r in order])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "hf", "log_step_ids": []}):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0)
    assert [out[i, width:].tolist() for i in range(3)] == [generated[p] for p in PROMPTS]  # same greedy tokens

    result = ilstore_compare.compare(vllm_run, hf_run, align_tokens=True, rtol=1e-4, atol=1e-5, allow_unaligned=True)
    assert any("llama_vllm_to_hf" in n for n in result.notes)  # the shipped map, picked from the manifests
    t = result.token_alignment
    fed = sum(lengths) + 3 * (NEW_TOKENS - 1)  # every prompt token, and each generated token fed back
    assert t is not None and t.complete and t.aligned == t.tokens1 == t.tokens2 == fed
    assert sorted((r.request1, r.how, r.aligned) for r in t.requests) == [
        (r, "exact", len(prompts[r]) + NEW_TOKENS - 1) for r in order]
    assert t.source1 == f"{BATCH_MODULE} records" and "attention_mask" in t.source2
    assert len(t.steps) == 3 * NEW_TOKENS  # one per request and vLLM step
    s = result.summary
    assert (s.only_in_dir1, s.only_in_dir2, s.not_compared, s.calls_only_in_dir1, s.calls_only_in_dir2) == (0,) * 5
    assert s.mismatched == 0 and s.compared == s.matched > 30 * len(t.steps)
    assert result.exit_code == 0 and result.verdict == "match"
    # the logits of every request at every step, vLLM's row against HF's last position
    logits = [x for x in result.tensors if x.key.module == "lm_head" and x.key.kind == "outputs"]
    assert len(logits) == len(t.steps) and all(x.status == "match" for x in logits)
    assert all(x.shape1 == (1, 1000) for x in logits)
    embeds = {x.key.step: x for x in result.tensors if x.key.module == "model.embed_tokens" and x.key.kind == "outputs"}
    assert all(e.metrics is not None and e.metrics.max_abs_diff == 0 for e in embeds.values())

    res = CliRunner().invoke(compare_cmd, ["--dir1", str(vllm_run), "--dir2", str(hf_run), "--align-tokens",
                                           "--allow-unaligned", "--rtol", "1e-4", "--atol", "1e-5", "--format",
                                           "json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output[-3000:]
    data = json.loads(res.stdout)
    assert validate_report(data) == [] and data["token_alignment"]["aligned"] == fed
    # without --align-tokens the packed step 0 cannot pair with the padded batch
    res = CliRunner().invoke(compare_cmd, ["--dir1", str(vllm_run), "--dir2", str(hf_run), "--allow-unaligned",
                                           "--rtol", "1e-4", "--atol", "1e-5"], catch_exceptions=False)
    assert res.exit_code == 1
