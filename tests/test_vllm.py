"""Real vLLM (the CPU build in .venv-vllm, see scripts/setup_vllm.sh) with the ilstore plug-in.

Each test runs examples/offline_inference/llm_engine_example.py through .venv-vllm/bin/python
in a subprocess, on the tiny Llama of scripts/build_tiny_model.py, and reads the dump here with
``ilstore.open_run``. Coverage, chosen to keep this tier to a few minutes on two cores (an
in-process run takes ~15 s, a multi-process one ~40 s):

* the three documented uses with the ``pt`` backend, each in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and multi-process (vLLM's default: engine core and
  worker in their own processes, where the plug-in must load and close the run by itself);
* the third use (a config file, steps 0 and 1, call selectors) with ``safetensors`` and
  ``hdf5`` in-process: the plug-in hands records to the store interface and does nothing
  backend specific, and the backends have their own conformance suite;
* a compiled engine (warm-up runs the model outside any step: not logged, and a warning);
* a bad config (exit status 2), and vLLM against Hugging Face on the same weights.

Every run with capture on must generate the same tokens as the run with capture off.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import ilstore
from ilstore.store.base import StoreReader

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
EXAMPLE = ROOT / "examples" / "offline_inference" / "llm_engine_example.py"
LLAMA_MAP = ROOT / "ilstore_compare" / "maps" / "llama_vllm_to_hf.json"
DEFAULT_OUTPUT_DIR = Path("/tmp/vllm_intermediates")  # the config's default output_dir
# Greedy, 3 tokens whatever they are: prefill (step 0) and two decode steps.
GENERATION = ["--dtype", "float32", "--max-tokens", "3", "--ignore-eos"]
MODES = ["in-process", "multi-process"]
USE3_MATCH = ["layers\\.0\\.(?!.*rotary_emb).*", "rotary_emb:0", "embed_tokens", "model\\.norm"]


@dataclass
class Generation:
    tokens: dict[str, list[int]]  # prompt -> generated token ids
    run_dir: Path | None
    stderr: str


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    if not VLLM_PYTHON.exists():
        message = f"{VLLM_PYTHON} is missing: run `bash scripts/setup_vllm.sh` first"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return VLLM_PYTHON


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_tiny_model.py"), str(out)], check=True,
                   capture_output=True, timeout=300)
    return out


def _example(python: Path, model: Path, *args: str, mode: str = "in-process", expect: int = 0) -> Generation:
    env = {k: v for k, v in os.environ.items() if k not in ("ILSTORE_CONFIG", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    env.update(HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    if mode == "in-process":
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    proc = subprocess.run([str(python), str(EXAMPLE), "--model", str(model), *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == expect, f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr[-6000:]}"
    tokens: dict[str, list[int]] = {}
    run_dir = None
    for line in proc.stdout.splitlines():
        if " -> token ids " in line:
            prompt, ids = line.split(" -> token ids ")
            tokens[ast.literal_eval(prompt)] = json.loads(ids)
        elif line.startswith("ilstore run: "):
            run_dir = Path(line.removeprefix("ilstore run: "))
    return Generation(tokens, run_dir, proc.stderr)


@pytest.fixture(scope="session")
def baseline(vllm_python: Path, tiny_model: Path) -> dict[str, list[int]]:
    """Tokens generated with capture off (and the plug-in installed)."""
    gen = _example(vllm_python, tiny_model, *GENERATION)
    assert len(gen.tokens) == 3 and all(len(t) == 3 for t in gen.tokens.values()) and gen.run_dir is None
    return gen.tokens


@pytest.fixture(scope="session")
def prompt_lengths(tiny_model: Path, baseline: dict[str, list[int]]) -> list[int]:
    """Token count of each prompt, in the order the example submits them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    return [len(tok(p).input_ids) for p in baseline]


def _check_prefill_step(run: StoreReader, lengths: list[int], mode: str) -> None:
    """Step 0 is the prefill of the requests that had reached the engine: all of them in-process.

    In multi-process mode requests travel to the engine-core process one by one, so the first
    step may hold only the first few; with greedy decoding the tokens are the same anyway.
    """
    tokens = _output_shape(run, 0, "model.embed_tokens")[0]
    if mode == "in-process":
        assert tokens == sum(lengths)
    else:
        assert tokens in {sum(lengths[:k]) for k in range(1, len(lengths) + 1)}


def _modules(run: StoreReader, step: int) -> set[str]:
    return {c.module for c in run.calls(step)}


def _output_shape(run: StoreReader, step: int, module: str) -> list[int]:
    key = next(k for k in run.keys(step) if k.module == module and k.kind == "outputs")
    return list(run.meta(key)["shape"])


def _open_default_run(gen: Generation) -> StoreReader:
    # Uses 1 and 2 name no output_dir: the run goes under the default; the test removes it.
    assert gen.run_dir is not None and gen.run_dir.parent == DEFAULT_OUTPUT_DIR
    return ilstore.open_run(gen.run_dir)


@pytest.mark.parametrize("mode", MODES)
def test_use1_everything(vllm_python: Path, tiny_model: Path, baseline: dict[str, list[int]],
                         prompt_lengths: list[int], mode: str) -> None:
    gen = _example(vllm_python, tiny_model, *GENERATION, "--intermediate-log-config",
                   '{"enabled": true, "backend": "pt"}', mode=mode)
    try:
        assert gen.tokens == baseline
        with _open_default_run(gen) as run:
            assert run.status == "complete" and run.steps() == [0]  # log_step_ids defaults to [0]
            assert run.manifest is not None and run.manifest["backend"] == "pt"
            modules = _modules(run, 0)
            assert {"model.embed_tokens", "model.layers.0", "model.layers.1.mlp.down_proj", "model.norm",
                    "logits_processor"} <= modules
            _check_prefill_step(run, prompt_lengths, mode)
            # compute_logits runs after the forward: its call belongs to the same step, one row
            # per sequence (the last token of each prefilled prompt)
            tokens = _output_shape(run, 0, "model.embed_tokens")[0]
            sequences = [sum(prompt_lengths[:k]) for k in range(1, 4)].index(tokens) + 1
            assert _output_shape(run, 0, "logits_processor") == [sequences, 1000]
            assert run.calls(0)[-1].module == "logits_processor"
    finally:
        if gen.run_dir is not None:
            shutil.rmtree(gen.run_dir, ignore_errors=True)


@pytest.mark.parametrize("mode", MODES)
def test_use2_first_layer(vllm_python: Path, tiny_model: Path, baseline: dict[str, list[int]], mode: str) -> None:
    gen = _example(vllm_python, tiny_model, *GENERATION, "--intermediate-log-config",
                   '{"enabled": true, "module_call_match": "layers\\\\.0\\\\.", "backend": "pt"}', mode=mode)
    try:
        assert gen.tokens == baseline
        with _open_default_run(gen) as run:
            assert run.status == "complete" and run.steps() == [0]
            modules = _modules(run, 0)
            assert all("layers.0." in m for m in modules)
            assert {"model.layers.0.self_attn", "model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp"} <= modules
            # vLLM shares one rotary embedding between layers, named after layer 0: layer 1's call
            # is call 1 of the same module.
            rotary = [c.call for c in run.calls(0) if c.module.endswith("rotary_emb")]
            assert rotary == [0, 1]
    finally:
        if gen.run_dir is not None:
            shutil.rmtree(gen.run_dir, ignore_errors=True)


def _use3(tmp_path: Path, backend: str) -> Path:
    cfg = {"output_dir": str(tmp_path / "runs"), "module_call_match": USE3_MATCH, "log_step_ids": [0, 1],
           "device_names": ["cpu"], "backend": backend}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("mode, backend", [("in-process", "pt"), ("multi-process", "pt"), ("in-process", "safetensors"),
                                           ("in-process", "hdf5")])
def test_use3_config_file(vllm_python: Path, tiny_model: Path, baseline: dict[str, list[int]],
                          prompt_lengths: list[int], tmp_path: Path, mode: str, backend: str) -> None:
    cfg = _use3(tmp_path, backend)
    gen = _example(vllm_python, tiny_model, *GENERATION, "--intermediate-log-config-path", str(cfg), mode=mode)
    assert gen.tokens == baseline
    assert gen.run_dir is not None and gen.run_dir.parent == tmp_path / "runs"
    with ilstore.open_run(gen.run_dir) as run:
        assert run.manifest is not None and run.manifest["backend"] == backend
        assert run.status == "complete" and run.steps() == [0, 1]  # three engine steps ran; two asked for
        expected = {"model.embed_tokens", "model.norm", "model.layers.0.self_attn.rotary_emb",
                    *(f"model.layers.0.{m}" for m in ("input_layernorm", "self_attn", "self_attn.qkv_proj",
                                                      "self_attn.attn", "self_attn.o_proj", "post_attention_layernorm",
                                                      "mlp", "mlp.gate_up_proj", "mlp.act_fn", "mlp.down_proj"))}
        _check_prefill_step(run, prompt_lengths, mode)
        if mode == "in-process":
            assert _output_shape(run, 1, "model.embed_tokens")[0] == len(baseline)  # one token a sequence
        for step in (0, 1):
            assert _modules(run, step) == expected
            assert [c.call for c in run.calls(step) if c.module.endswith("rotary_emb")] == [0]
            ids = next(k for k in run.keys(step) if k.module == "model.embed_tokens" and k.kind == "inputs")
            assert run.load(ids).dtype in (torch.int32, torch.int64) and run.meta(ids)["device"] == "cpu"
        norm = [k for k in run.keys(1) if k.module == "model.norm" and k.kind == "outputs"]
        assert torch.isfinite(run.load(norm[0])).all()


def test_compiled_warm_up_is_not_a_step(vllm_python: Path, tiny_model: Path, baseline: dict[str, list[int]],
                                        tmp_path: Path) -> None:
    # Compiled, vLLM's CPU runner warms up with a dummy forward and a dummy sampler run (128
    # rows) before the first scheduled step; modules inside the compiled region never fire, the
    # logits processor runs outside it and does.
    cfg = json.dumps({"output_dir": str(tmp_path), "run_id": "compiled", "module_call_match": "logits_processor",
                      "log_step_ids": [0, 1]})
    gen = _example(vllm_python, tiny_model, *GENERATION, "--no-enforce-eager", "--intermediate-log-config", cfg)
    assert gen.tokens == baseline
    assert "IlstoreWarning" in gen.stderr and "compiled or with CUDA graphs" in gen.stderr
    with ilstore.open_run(tmp_path / "compiled") as run:
        assert run.steps() == [0, 1]
        for step in (0, 1):
            assert [(c.module, c.call) for c in run.calls(step)] == [("logits_processor", 0)]
            assert _output_shape(run, step, "logits_processor") == [len(baseline), 1000]


def test_bad_config_exits_2(vllm_python: Path, tiny_model: Path) -> None:
    gen = _example(vllm_python, tiny_model, "--intermediate-log-config", '{"log_step_id": [0]}', expect=2)
    assert "log_step_id" in gen.stderr and "did you mean 'log_step_ids'" in gen.stderr


def test_matches_hugging_face(vllm_python: Path, tiny_model: Path, tmp_path: Path) -> None:
    """vLLM and transformers on the same float32 weights agree on embeddings and layer 0.

    Compared with ``open_run`` and torch here, after renaming vLLM's names with the shipped map:
    the comparer pairs tensors only when shapes and paths agree, and vLLM flattens
    (batch, seq) into tokens and returns some outputs as tuples (see docs/vllm.md).
    """
    from transformers import AutoModelForCausalLM

    from ilstore_compare import NameMap

    match = ["embed_tokens", "layers\\.0$", "layers\\.0\\.(self_attn|mlp)$", "model\\.norm$", "logits_processor",
             "lm_head"]
    cfg = {"output_dir": str(tmp_path), "run_id": "vllm", "module_call_match": match}
    _example(vllm_python, tiny_model, "--dtype", "float32", "--max-tokens", "1", "--prompt", "Hello, my name is",
             "--intermediate-log-config", json.dumps(cfg))
    name_map = NameMap.load(LLAMA_MAP)
    with ilstore.open_run(tmp_path / "vllm") as run:
        vllm = {(name_map.rename(k.module), k.kind, k.path): run.load(k) for k in run.keys(0)}
    input_ids = vllm[("model.embed_tokens", "inputs", ("0",))]

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    with torch.no_grad(), ilstore.capture(model, {**cfg, "run_id": "hf"}):
        model(input_ids.long()[None])
    with ilstore.open_run(tmp_path / "hf") as run:
        hf = {(k.module, k.kind, k.path): run.load(k)[0] for k in run.keys(0)}  # drop the batch dimension

    layer0 = vllm[("model.layers.0", "outputs", ("0",))] + vllm[("model.layers.0", "outputs", ("1",))]
    pairs = {  # vLLM tensor, HF tensor
        "embeddings": (vllm[("model.embed_tokens", "outputs", ())], hf[("model.embed_tokens", "outputs", ())]),
        "layer 0 attention": (vllm[("model.layers.0.self_attn", "outputs", ())],
                              hf[("model.layers.0.self_attn", "outputs", ("0",))]),
        "layer 0 MLP": (vllm[("model.layers.0.mlp", "outputs", ())], hf[("model.layers.0.mlp", "outputs", ())]),
        # vLLM's decoder layer returns (mlp output, residual); HF adds them
        "layer 0 output": (layer0, hf[("model.layers.0", "outputs", ())]),
        "final norm": (vllm[("model.norm", "outputs", ("0",))], hf[("model.norm", "outputs", ())]),
        # vLLM computes logits for the last token of each sequence only
        "logits": (vllm[("lm_head", "outputs", ())][-1], hf[("lm_head", "outputs", ())][-1]),
    }
    for what, (ours, ref) in pairs.items():
        assert ours.dtype == ref.dtype == torch.float32, what
        assert ours.shape == ref.shape, what
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")
    assert torch.equal(pairs["embeddings"][0], pairs["embeddings"][1])  # a lookup: bit-identical
