"""Real vLLM (the CPU build in .venv-vllm) against Hugging Face for more model families, through
the shipped name maps the comparer picks by itself.

For a Qwen2-style model (attention biases) and a Mixtral-style mixture of experts, built by
``scripts/build_tiny_model.py --arch``: one vLLM run of examples/offline_inference/llm_engine_example.py
(in-process, float32, one prompt, one token, every module captured) and a Hugging Face capture of
the same weights fed the token ids vLLM saw, compared without ``--map``. The manifests' ``model``
entries make the comparer pick ``qwen2_vllm_to_hf`` / ``mixtral_vllm_to_hf``; every tensor of
either run must then be compared or declared unaligned with a reason, none one-sided, and
everything compared must match within float32 tolerance. One vLLM run per family (~20-45 s each
on two cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ilstore
from support import require_vllm_python

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "offline_inference" / "llm_engine_example.py"
PROMPT = "Hello, my name is"
LAYERS = 2


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    return require_vllm_python()


def _vllm_and_hf_runs(python: Path, arch: str, out: Path) -> tuple[Path, Path]:
    """Build the tiny model, capture it in vLLM and in transformers; return (vLLM run, HF run)."""
    from transformers import AutoModelForCausalLM

    model_dir = out / f"tiny-{arch}"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_tiny_model.py"), str(model_dir), "--arch", arch],
                   check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "ILSTORE_CONFIG"}
    env.update(HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false",
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    config = json.dumps({"output_dir": str(out), "run_id": "vllm"})
    proc = subprocess.run([str(python), str(EXAMPLE), "--model", str(model_dir), "--dtype", "float32", "--max-tokens",
                           "1", "--prompt", PROMPT, "--intermediate-log-config", config],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr[-6000:]}"
    vllm_run, hf_run = out / "vllm", out / "hf"
    with ilstore.open_run(vllm_run) as run:
        ids = next(run.load(k) for k in run.keys(0) if k.module == "model.embed_tokens" and k.kind == "inputs")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(out), "run_id": "hf"}):
        model(ids.long()[None])
    return vllm_run, hf_run


@pytest.fixture(scope="module")
def qwen2_runs(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _vllm_and_hf_runs(vllm_python, "qwen2", tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def mixtral_runs(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _vllm_and_hf_runs(vllm_python, "mixtral", tmp_path_factory.mktemp("mixtral"))


def _attention_unaligned(layer: str, n: int) -> set[tuple[str, int, str, str]]:
    """What every family here shares with the Llama map: fused qkv, the attention kernel, rotary."""
    out = {(f"{layer}.self_attn.qkv_proj", 0, p, "dir1") for p in ("inputs/0", "outputs/0")}
    out |= {(f"{layer}.self_attn.attn", 0, p, "dir1") for p in ("inputs/0", "inputs/1", "inputs/2", "outputs")}
    out |= {("model.layers.0.self_attn.rotary_emb", n, p, "dir1")
            for p in ("inputs/0", "inputs/1", "inputs/2", "outputs/0", "outputs/1")}
    out |= {(f"{layer}.self_attn.{m}_proj", 0, p, "dir2") for m in "qkv" for p in ("inputs/0", "outputs")}
    out |= {(m, 0, f"inputs/position_embeddings/{i}", "dir2") for m in (layer, f"{layer}.self_attn") for i in "01"}
    out |= {(f"{layer}.{norm}", 0, "outputs/1", "dir1") for norm in ("input_layernorm", "post_attention_layernorm")
            if norm == "post_attention_layernorm" or n > 0}  # layer 0's input norm has no residual yet
    return out


def _dense_mlp_unaligned(layer: str) -> set[tuple[str, int, str, str]]:
    out = {(f"{layer}.mlp.gate_up_proj", 0, p, "dir1") for p in ("inputs/0", "outputs/0")}
    out |= {(f"{layer}.mlp.{m}_proj", 0, p, "dir2") for m in ("gate", "up") for p in ("inputs/0", "outputs")}
    return out | {(f"{layer}.mlp.act_fn", 0, p, "both") for p in ("inputs/0", "outputs")}  # SiluAndMul vs SiLU


def _moe_unaligned(layer: str) -> set[tuple[str, int, str, str]]:
    out = {(f"{layer}.mlp.experts", 0, "inputs/router_logits", "dir1")}  # the fused kernel routes itself
    out |= {(f"{layer}.mlp.experts", 0, f"inputs/top_k_{w}", "dir2") for w in ("index", "weights")}
    out |= {(f"{layer}.mlp.gate", 0, f"outputs/{i}", "dir2") for i in (1, 2)}  # HF's router: weights, indices
    return out | {(f"{layer}.mlp.experts.act_fn", 0, p, "dir2") for p in ("inputs/0", "outputs")}


def _check(runs: tuple[Path, Path], map_name: str, mlp: Any) -> dict[tuple[str, int, str], Any]:
    """Compare without a map; the checks both families share. Returns the entries by key."""
    import ilstore_compare

    result = ilstore_compare.compare(*runs, rtol=1e-4, atol=1e-5, allow_unaligned=True)
    assert result.notes[0].startswith(f"using the shipped map {map_name} for vllm "), result.notes
    assert result.options.name_map is not None and result.options.squeeze_shapes
    s = result.summary
    entries = {(t.key.module, t.key.call, "/".join([t.key.kind, *t.key.path])): t for t in result.tensors}
    assert len(entries) == len(result.tensors)
    # every tensor of either run is paired or declared unaligned: nothing one-sided, nothing skipped
    assert (s.only_in_dir1, s.only_in_dir2, s.not_compared, s.calls_only_in_dir1, s.calls_only_in_dir2) == (0,) * 5
    unaligned = {(m, c, p, t.presence) for (m, c, p), t in entries.items() if t.status == "unaligned"}
    expected = {("model", 0, "inputs/input_ids", "dir2"), ("model", 0, "outputs/last_hidden_state", "dir2"),
                ("model.norm", 0, "outputs/1", "dir1")}
    for n in range(LAYERS):
        expected |= _attention_unaligned(f"model.layers.{n}", n) | mlp(f"model.layers.{n}")
    # HF's model.rotary_emb (cos/sin tables) is HF-only; its argument names vary between families
    rotary = {u for u in unaligned if u[0] == "model.rotary_emb"}
    assert rotary and all(u[3] == "dir2" for u in rotary)
    assert unaligned - rotary == expected and s.unaligned == len(unaligned)
    assert all(t.note and t.note.startswith("unaligned[") for t in result.tensors if t.status == "unaligned")
    compared = {k: t for k, t in entries.items() if t.status != "unaligned"}
    assert s.compared == s.matched == len(compared) > 30 and s.mismatched == 0
    assert result.exit_code == 0 and result.verdict == "match" and result.first_divergence is None
    emb = entries[("model.embed_tokens", 0, "outputs")]  # a lookup: bit-identical
    assert emb.squeezed and emb.metrics is not None and emb.metrics.max_abs_diff == 0
    for module, path in [("model.layers.0", "outputs"), ("model.layers.1", "inputs/0"), ("model.layers.1", "outputs"),
                         ("model.layers.0.self_attn", "outputs/0"), ("model.layers.0.mlp", "outputs"),
                         ("model.norm", "outputs"), ("lm_head", "outputs")]:
        assert entries[(module, 0, path)].status == "match", (module, path)
    return entries


def test_qwen2_matches_hf_through_the_picked_map(qwen2_runs: tuple[Path, Path]) -> None:
    entries = _check(qwen2_runs, "qwen2_vllm_to_hf", _dense_mlp_unaligned)
    # the attention biases live inside the fused qkv projection; what follows it is compared
    for key in (("model.layers.0.self_attn", 0, "outputs/0"), ("model.layers.0.self_attn.o_proj", 0, "outputs"),
                ("model.layers.0.mlp.down_proj", 0, "outputs")):
        assert entries[key].status == "match", key


def test_mixtral_matches_hf_through_the_picked_map(mixtral_runs: tuple[Path, Path]) -> None:
    """The router logits and the mixture's output are compared; the routing inside is declared."""
    from click.testing import CliRunner

    from ilstore_compare.cli import compare_cmd
    from ilstore_compare.report_json import validate_report

    entries = _check(mixtral_runs, "mixtral_vllm_to_hf", _moe_unaligned)
    for n in range(LAYERS):
        moe = f"model.layers.{n}.mlp"
        gate = entries[(f"{moe}.gate", 0, "outputs/0")]  # router logits [T, experts] on both sides
        assert gate.status == "match" and gate.renamed_from == f"model.layers.{n}.block_sparse_moe.gate"
        assert gate.shape1 == gate.shape2 == (5, 4)
        for key in ((f"{moe}.gate", 0, "inputs/0"), (f"{moe}.experts", 0, "inputs/0"), (f"{moe}.experts", 0, "outputs"),
                    (moe, 0, "inputs/0"), (moe, 0, "outputs")):
            assert entries[key].status == "match", key

    # the command line picks the same map; the declarations keep exit 1 without --allow-unaligned
    args = ["--dir1", str(mixtral_runs[0]), "--dir2", str(mixtral_runs[1]), "--rtol", "1e-4", "--atol", "1e-5",
            "--format", "json"]
    res = CliRunner().invoke(compare_cmd, [*args, "--allow-unaligned"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    validate_report(data)
    assert data["options"]["name_map"]["architectures"] == ["MixtralForCausalLM"]
    assert data["notes"][0].startswith("using the shipped map mixtral_vllm_to_hf")
    assert CliRunner().invoke(compare_cmd, args, catch_exceptions=False).exit_code == 1
