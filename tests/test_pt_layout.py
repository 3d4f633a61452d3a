"""The documented pt tree, the manifest, the record key and `ilstore ls`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import ilstore
from ilstore.cli import cli
from ilstore.demo import DEMO_PROMPT, tiny_llama
from ilstore.keys import TensorKey
from ilstore.store.pt import module_dir_name, tensor_file_name
from support import VLLM_RUN, Thrice


def _capture_llama(out_dir: Path, run_id: str = "llama") -> Path:
    model = tiny_llama()
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(out_dir), "run_id": run_id,
                                                  "log_step_ids": [0, 1]}) as cap:
        model(input_ids=torch.tensor(DEMO_PROMPT), use_cache=False)
        model(input_ids=torch.tensor(DEMO_PROMPT), use_cache=False)
    assert cap.run_dir is not None
    return cap.run_dir


def test_manifest(out_dir: Path) -> None:
    run_dir = _capture_llama(out_dir)
    m = json.loads((run_dir / "ilstore.json").read_text())
    assert m["format"] == "ilstore" and m["format_version"] == 3 and m["backend"] == "pt"
    assert m["status"] == "complete" and m["journal"] == "steps.jsonl" and m["world_size"] == 1
    assert m["torch_version"] == torch.__version__ and m["ilstore_version"] == ilstore.__version__
    assert m["config"]["log_step_ids"] == [0, 1] and m["config"]["run_id"] == "llama"
    assert not {"steps", "calls", "call_ends", "current_step"} & m.keys()  # format 2: they are in the journal
    lines = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1]
    assert lines[0]["calls"][0] == ["model", 0] and len(lines[0]["calls"]) == 31
    assert lines[0]["call_ends"][-1] == ["lm_head", 0] and lines[0]["call_ends"][-2] == ["model", 0]
    assert lines[1]["calls_as"] == 0 and "calls" not in lines[1]  # the same call order, not repeated
    assert lines[0]["totals"] == {"module_calls": 31, "tensors": 82, "stored": 82, "bytes": lines[0]["totals"]["bytes"]}
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".partial")]


def test_tensor_json_and_files(out_dir: Path) -> None:
    run_dir = _capture_llama(out_dir)
    d = run_dir / "step_0" / "model.layers.0.mlp.down_proj"
    doc = json.loads((d / "outputs.json").read_text())
    assert doc["type"] == "tensor" and doc["shape"] == [1, 12, 64] and doc["dtype"] == "torch.float32"
    assert doc["numel"] == 768 and doc["device"] == "cpu" and doc["file"] == "outputs_cpu.pt"
    assert doc["ilstore"] == {"module": "model.layers.0.mlp.down_proj", "call": 0, "step": 0, "rank": 0,
                              "kind": "outputs"}
    inputs = json.loads((d / "inputs.json").read_text())
    assert inputs["type"] == "tuple" and inputs["items"][0]["file"] == "inputs_0_cpu.pt"
    t = torch.load(d / "outputs_cpu.pt", weights_only=True)
    assert t.shape == (1, 12, 64)
    for _dp, _dn, files in os.walk(run_dir):
        for f in files:
            if f.endswith(".pt"):
                assert isinstance(torch.load(Path(_dp) / f, weights_only=True), torch.Tensor)
    order = (run_dir / "step_0" / "module_calls.txt").read_text().split()
    assert order[:3] == ["model", "model.embed_tokens", "model.rotary_emb"] and order[-1] == "lm_head"


def test_names() -> None:
    assert module_dir_name("model.layers.0", 0) == "model.layers.0"
    assert module_dir_name("model.layers.0", 2) == "model.layers.0_2"
    assert module_dir_name("../x", 0) == "%2E%2E%2Fx"
    assert tensor_file_name("outputs", (), "cuda:0") == "outputs_cuda_0.pt"
    assert tensor_file_name("inputs", ("3", "1"), "cpu") == "inputs_3_1_cpu.pt"


@given(st.integers(0, 10**6), st.text(min_size=1), st.integers(0, 1000),
       st.sampled_from(["inputs", "outputs", "post_fwd_inputs"]), st.lists(st.text(), max_size=4), st.integers(0, 64))
def test_key_string_round_trip(step: int, module: str, call: int, kind: str, path: list[str], rank: int) -> None:
    key = TensorKey(step, module, call, kind, tuple(path), rank)
    text = str(key)
    assert TensorKey.parse(text) == key
    assert text.count("/") == 4 + len(path)


def test_reader_order_and_meta_without_loading(out_dir: Path) -> None:
    run_dir = _capture_llama(out_dir)
    with ilstore.open_run(run_dir) as run:
        keys = run.keys(0)
        assert keys[0].module == "model" and keys[0].kind == "inputs"
        assert keys[-1] == TensorKey(0, "lm_head", 0, "outputs")
        modules = []
        for k in keys:
            if not modules or modules[-1] != k.module:
                modules.append(k.module)
        assert modules == [c.module for c in run.calls(0)]
        # metadata comes from JSON only: removing a tensor file does not affect meta()
        os.remove(run_dir / "step_0" / "lm_head" / "outputs_cpu.pt")
        assert run.meta(keys[-1])["shape"] == [1, 12, 128]
        try:
            run.load(keys[-1])
        except ilstore.CorruptFileError as exc:
            assert "outputs_cpu.pt" in str(exc)
        else:
            raise AssertionError("load of a deleted file must fail")


def test_ls_cli(out_dir: Path) -> None:
    run_dir = _capture_llama(out_dir)
    result = CliRunner().invoke(cli, ["ls", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "status complete" in result.output and "2 step(s)" in result.output
    lines = [ln.split() for ln in result.output.splitlines() if ln.strip().startswith(("0 ", "1 "))]
    assert lines[0][:4] == ["0", "31", "82", "82"]
    calls = CliRunner().invoke(cli, ["ls", str(run_dir), "--calls"])
    assert "model.layers.1.mlp.down_proj" in calls.output
    data = json.loads(CliRunner().invoke(cli, ["ls", str(run_dir), "--json"]).output)
    assert data["steps"][0]["stored"] == 82 and data["steps"][0]["bytes"] > 0
    fixture = CliRunner().invoke(cli, ["ls", str(VLLM_RUN)])
    assert fixture.exit_code == 0 and "status unknown" in fixture.output


def test_ls_incomplete_run(out_dir: Path) -> None:
    model = Thrice()
    cap = ilstore.capture(model, {"output_dir": str(out_dir), "run_id": "cut", "log_step_ids": []})
    try:
        model(torch.randn(1, 4))
        cap._begin_step()  # a step that starts and never ends, as in a killed process
        cap._pre("lin", None, model.lin, (torch.randn(1, 4),), {})
        cap.flush()  # what the writer thread had written when the process died
        result = CliRunner().invoke(cli, ["ls", str(cap.run_dir)])
        assert result.exit_code == 0
        assert "status running" in result.output
        assert "incomplete step(s), cut before they finished: [1]" in result.output
    finally:  # this process lives on: its writer thread and the run's open files (stats.f64...) end here
        cap.close("failed")


def test_ls_errors(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["ls", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "missing" in result.output and "no such run directory" in result.output
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["ls", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "not a run directory" in result.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ilstore.json").write_text("{not json")
    result = CliRunner().invoke(cli, ["ls", str(bad)])
    assert result.exit_code == 2 and "ilstore.json" in result.output


def test_demo_cli(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["demo", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name in ("fp32", "bf16", "bf16_replay"):
        assert ilstore.open_run(tmp_path / name).steps() == [0, 1]
    assert "by the tolerance alone, the first divergence is step" in result.output
    assert "the five calls with the largest local error" in result.output
    assert "## Local error (where error is introduced, measured)" in (tmp_path / "report.md").read_text()
    # rerunnable: the demo replaces its own earlier runs
    again = CliRunner().invoke(cli, ["demo", "--output-dir", str(tmp_path)])
    assert again.exit_code == result.exit_code


def test_python_dash_m(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ilstore", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "validate-config" in proc.stdout and "ls" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "ilstore", "validate-config", '{"mode": 1}'], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "mode:" in bad.stderr and "Traceback" not in bad.stderr
