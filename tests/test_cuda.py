"""CUDA capture: pinned host snapshots with non-blocking copies (runs only where a GPU is present)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ilstore
from ilstore.demo import DEMO_PROMPT, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("backend", ["pt", "safetensors", "hdf5"])
def test_cuda_capture_matches_device_values_and_does_not_perturb(out_dir: Path, backend: str) -> None:
    model = tiny_llama().cuda()
    ids = torch.tensor(DEMO_PROMPT, device="cuda")
    seen: dict[str, torch.Tensor] = {}
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda m, a, o: seen.__setitem__("down", o.detach().cpu()))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.cpu()
        with ilstore.capture(model, {"output_dir": str(out_dir), "run_id": "r", "backend": backend}) as cap:
            got = model(input_ids=ids, use_cache=False).logits.cpu()
    handle.remove()
    assert torch.equal(ref, got)
    with ilstore.open_run(cap.run_dir) as run:
        key = ilstore.TensorKey(0, "model.layers.1.mlp.down_proj", 0, "outputs")
        assert run.meta(key)["device"] == "cuda:0"
        assert torch.equal(run.load(key), seen["down"])
        if backend == "pt":
            assert (cap.run_dir / "step_0" / "model.layers.1.mlp.down_proj" / "outputs_cuda_0.pt").is_file()
