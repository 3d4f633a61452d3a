"""Stepping for every entry point: calls outside a root forward, and the root's own calls (issue 15)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import ilstore
from ilstore import IlstoreWarning


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return T5ForConditionalGeneration(cfg).eval()


def _modules(run_dir: Path) -> dict[int, list[str]]:
    with ilstore.open_run(run_dir) as run:
        return {s: [c.module for c in run.calls(s)] for s in run.steps()}


def test_generate_of_an_encoder_decoder_model_captures_the_encoder_in_step_0(tmp_path: Path) -> None:
    model = _t5()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IlstoreWarning)  # no warning: nothing is lost
        with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "t5",
                                                      "log_step_ids": []}) as cap:
            captured = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(plain, captured)
    steps = _modules(cap.run_dir)
    assert sorted(steps) == [0, 1, 2]
    assert steps[0][0] == "encoder" and "encoder.block.1.layer.1.DenseReluDense.wo" in steps[0]
    assert "decoder" in steps[0] and "lm_head" in steps[0]  # the first decoder forward joins the encoder's step
    assert all(not m.startswith("encoder") for s in (1, 2) for m in steps[s])


def test_calls_outside_forward_ignore_keeps_the_old_stepping(tmp_path: Path) -> None:
    model = _t5()
    ids = torch.tensor([[5, 6, 7]])
    with pytest.warns(IlstoreWarning, match="encoder was called outside a forward of the root module"):
        with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "t5", "log_step_ids": [],
                                                      "calls_outside_forward": "ignore"}) as cap:
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    steps = _modules(cap.run_dir)
    assert sorted(steps) == [0, 1] and all(not m.startswith("encoder") for ms in steps.values() for m in ms)


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_calls_after_the_last_forward_are_a_last_step(tmp_path: Path) -> None:
    model = Two()
    with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "r", "log_step_ids": []}) as cap:
        model(torch.ones(1, 2))
        model.b(torch.zeros(1, 2))  # outside any root forward, and no forward follows
    assert _modules(cap.run_dir) == {0: ["a", "b"], 1: ["b"]}


@pytest.mark.parametrize("backend", ["pt", "safetensors", "hdf5"])
def test_a_module_without_submodules_is_captured_itself(tmp_path: Path, backend: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IlstoreWarning)
        with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "lin",
                                                      "backend": backend}) as cap:
            y = model(x)
    with ilstore.open_run(cap.run_dir) as run:
        keys = run.keys(0)
        assert [k.display() for k in keys] == ["step 0 (root) inputs[0]", "step 0 (root) outputs"]
        assert torch.equal(run.load(keys[0]), x) and torch.equal(run.load(keys[1]), y)
    assert model.get_submodule(keys[0].module) is model


def test_capture_root_adds_the_root_beside_its_submodules(tmp_path: Path) -> None:
    model = Two()
    with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "r", "capture_root": True}) as cap:
        model(torch.ones(1, 2))
    assert _modules(cap.run_dir) == {0: ["", "a", "b"]}
    with ilstore.open_run(cap.run_dir) as run:  # the root's call encloses its children's
        assert [c.module for c in run.call_ends(0)] == ["a", "b", ""]


def test_the_warning_says_what_is_true(tmp_path: Path) -> None:
    with pytest.warns(IlstoreWarning, match=r"the model has no submodules and capture_root is false"):
        ilstore.capture(nn.Linear(2, 2), {"output_dir": str(tmp_path), "capture_root": False}).close()
    with pytest.warns(IlstoreWarning, match=r"module_call_match \['nothing'\] matches no module"):
        ilstore.capture(Two(), {"output_dir": str(tmp_path), "module_call_match": "nothing"}).close()


def test_the_manifest_names_the_model(tmp_path: Path) -> None:
    import json

    from ilstore.demo import tiny_llama

    with ilstore.capture(tiny_llama(), {"output_dir": str(tmp_path), "run_id": "m"}) as cap:
        pass
    manifest = json.loads((cap.run_dir / "ilstore.json").read_text())
    assert manifest["model"] == {"class": "transformers.models.llama.modeling_llama.LlamaForCausalLM",
                                 "architecture": "LlamaForCausalLM"}
    with ilstore.capture(Two(), {"output_dir": str(tmp_path), "run_id": "t"}) as cap:
        pass
    assert json.loads((cap.run_dir / "ilstore.json").read_text())["model"]["architecture"] == "Two"


def test_a_missing_optional_dependency_names_the_extra(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"  # as if transformers were not installed
            "from ilstore.cli import main\n"
            f"sys.argv = ['ilstore', 'demo', '--output-dir', {str(tmp_path)!r}]\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "needs the Python package 'transformers'" in proc.stderr and "pip install 'ilstore[hf]'" in proc.stderr
