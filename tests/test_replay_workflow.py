"""The replay workflow end to end with real captures: bf16 against fp32, the float64 oracle, mismatches."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import ilstore
from ilstore.demo import DEMO_PROMPT, tiny_llama
from ilstore_compare import compare
from ilstore_compare.cli import compare_cmd
from ilstore_compare.report_json import validate_report

EXAMPLE = Path(__file__).parent.parent / "examples" / "replay_workflow.py"
PERTURBED = "model.layers.0.mlp.down_proj"


def _run(out: Path, run_id: str, dtype: torch.dtype, *, perturb: float | None = None,
         prompts: list[list[list[int]]] | None = None, **cfg: Any) -> Path:
    model = tiny_llama(dtype)
    if perturb is not None:
        model.get_submodule(PERTURBED).register_forward_hook(lambda m, a, o: o * (1 + perturb))
    config = {"output_dir": str(out), "run_id": run_id, "log_step_ids": [], **cfg}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        for ids in prompts or [DEMO_PROMPT]:
            model(input_ids=torch.tensor(ids), use_cache=False)
    assert cap.run_dir is not None
    return cap.run_dir


def test_bf16_against_fp32_ranks_by_measurement_not_by_threshold(tmp_path: Path) -> None:
    fp32 = _run(tmp_path, "fp32", torch.float32)
    bf16 = _run(tmp_path, "bf16", torch.bfloat16)
    replay = _run(tmp_path, "replay", torch.bfloat16, replay_from=str(fp32))
    result = compare(bf16, fp32, rtol=1e-2, atol=1e-2, replay=replay)
    local = result.local
    assert local is not None and local.source == "replay"
    with ilstore.open_run(replay) as run:
        selected = {(c.step, c.module, c.call) for c in run.calls(0)}
    listed = {(e.call.step, e.call.module, e.call.call) for e in local.errors}
    assert listed == selected  # every selected call is measured or listed with a reason
    assert all(e.replayed and e.compared for e in local.errors) and not local.not_compared
    # the tolerance alone blames a layer norm deep in the model; measured, no call adds error beyond
    # the tolerance on its own (bf16 rounding accumulates), and the largest local errors are elsewhere
    guess = result.threshold_divergence
    assert guess is not None and guess.module == "model.layers.1.post_attention_layernorm"
    assert result.first_divergence is None
    top = [e.call.module for e in local.errors[:5]]
    assert guess.module not in top
    assert [d.module for d in result.introduced[:1]] != top[:1]
    assert all(0 < (e.rel_l2 or 0) < 1e-2 for e in local.errors if e.call.module != "model.embed_tokens")


def test_the_oracle_flags_only_the_perturbed_bf16_module(tmp_path: Path) -> None:
    oracle = _run(tmp_path, "oracle", torch.float64)
    reference = _run(tmp_path, "reference", torch.bfloat16, replay_from=str(oracle))  # a correct bf16 model
    candidate = _run(tmp_path, "candidate", torch.bfloat16, perturb=2e-2, replay_from=str(oracle))
    result = compare(candidate, reference, oracle=oracle)
    o = result.oracle
    assert o is not None and result.exit_code == 1
    assert [c.call.module for c in o.flagged] == [PERTURBED]
    assert not o.not_evaluated
    calls = {c.call.module: c for c in o.calls}
    assert calls[PERTURBED].ratio is not None and calls[PERTURBED].ratio > 2
    # the MLP's output is its down projection's: same error, explained by the flagged child
    mlp = calls["model.layers.0.mlp"]
    assert mlp.ratio == calls[PERTURBED].ratio and not mlp.flagged
    assert "carries the error of model.layers.0.mlp.down_proj" in (mlp.reason or "")
    # every other call computes exactly what the correct bf16 model computes from the same inputs
    others = [c for c in o.calls if c.call.module not in (PERTURBED, "model.layers.0.mlp", "model.layers.0")]
    assert others and all(c.candidate_rel_l2 == c.reference_rel_l2 for c in others)
    # and against the reference alone, without the oracle, bf16 rounding differences are everywhere
    plain = compare(candidate, reference, exact=True)
    assert plain.summary.mismatched >= 2


def test_a_longer_prompt_is_reported_per_call_and_fails_closed(tmp_path: Path) -> None:
    ref = _run(tmp_path, "ref", torch.float32)
    longer = [DEMO_PROMPT[0] + [17]]
    replay = _run(tmp_path, "replay", torch.float32, prompts=[longer, DEMO_PROMPT], replay_from=str(ref))
    out = tmp_path / "report.json"
    res = CliRunner().invoke(compare_cmd, ["--dir1", str(replay), "--dir2", str(ref), "--output", str(out)])
    assert res.exit_code == 1, res.output
    data = json.loads(out.read_text())
    assert validate_report(data) == []
    entries = data["local_errors"]
    step0 = [e for e in entries if e["step"] == 0]
    assert len(step0) == 31 and all(not e["replayed"] and "shape differs" in e["reason"] for e in step0)
    step1 = [e for e in entries if e["step"] == 1]
    assert step1 and all("step 1 is not in the reference (stepping mismatch)" in e["reason"] for e in step1)
    assert all(e["rel_l2"] is None for e in step1)


def test_the_example_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("replay_workflow", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--output-dir", str(tmp_path), "--backend", "safetensors"]) == 0
    out = capsys.readouterr().out
    assert "by the tolerance alone, the first divergence: step 0 model.layers.1.post_attention_layernorm" in out
    ranked = out.split("the five calls with the largest local error:\n")[1].splitlines()
    assert len([line for line in ranked if line.startswith("  rel-L2 ")]) == 5
    with ilstore.open_run(tmp_path / "bf16_replay") as run:
        assert run.manifest is not None and run.manifest["replayed_from"]["run_id"] == "fp32"
