"""CUDA capture: pinned host snapshots with non-blocking copies, device statistics read back once per step
(runs only where a GPU is present)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ilstore
from ilstore.demo import DEMO_PROMPT, tiny_llama
from ilstore.device_stats import count_cuda_syncs

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


# -- in_graph: CUDA graphs and compiled models (issue 16) ---------------------------------------

class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 64)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        return self.fc2(self.act(h) + h)  # act twice: two calls of one module per step


def test_cuda_graph_replays_become_steps_with_in_graph(out_dir: Path) -> None:
    torch.manual_seed(0)
    model = _Net().cuda()
    xs = [torch.randn(8, 64, device="cuda") for _ in range(4)]
    with torch.no_grad():
        expected = [{"fc1": model.fc1(x), "fc2": model(x)} for x in xs]
        with ilstore.capture(model, {"output_dir": str(out_dir), "run_id": "g", "log_step_ids": [],
                                     "in_graph": True}) as cap:
            static = xs[0].clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                model(static)  # warm-up: an ordinary step 0
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = model(static)  # captured: records nothing
            outs = []
            for x in xs[1:]:
                static.copy_(x)
                graph.replay()  # each replay: one step, drained after it
                outs.append(out.clone())
    assert cap.run_dir is not None
    with ilstore.open_run(cap.run_dir) as run:
        assert run.steps() == [0, 1, 2, 3]
        def calls(step: int) -> set[str]:
            return {str(k).split("/", 2)[2] for k in run.keys(step=step)}  # "r0/s3/fc1/0/..." less rank and step

        assert calls(3) == calls(0)
        for step, (x, want, got) in enumerate(zip(xs[1:], expected[1:], outs, strict=True), start=1):
            assert torch.equal(run.load(ilstore.TensorKey(step, "fc1", 0, "inputs", ("0",))), x.cpu())
            assert torch.equal(run.load(ilstore.TensorKey(step, "fc2", 0, "outputs")), got.cpu())
            torch.testing.assert_close(run.load(ilstore.TensorKey(step, "fc1", 0, "outputs")), want["fc1"].cpu())
            torch.testing.assert_close(got, want["fc2"])
            assert run.load(ilstore.TensorKey(step, "act", 1, "outputs")).shape == (8, 64)


# inductor's hints on a GPU (TF32 not enabled, online softmax off) are raised inside it as errors
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_fullgraph_on_cuda_with_in_graph(out_dir: Path) -> None:
    model = tiny_llama().cuda()
    ids = torch.tensor(DEMO_PROMPT, device="cuda")
    with torch.no_grad():
        with ilstore.capture(model, {"output_dir": str(out_dir), "run_id": "eager", "log_step_ids": []}) as ref:
            for k in range(2):
                model(input_ids=ids[:, : 8 + k], use_cache=False)
        torch._dynamo.reset()
        plain = torch.compile(model, fullgraph=True)
        expected = [plain(input_ids=ids[:, : 8 + k], use_cache=False).logits for k in range(2)]
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        with ilstore.capture(compiled, {"output_dir": str(out_dir), "run_id": "compiled", "log_step_ids": [],
                                        "in_graph": True}) as cap:
            got = [compiled(input_ids=ids[:, : 8 + k], use_cache=False).logits for k in range(2)]
    # On CUDA the taps change inductor's fusions: on the H200 (torch 2.11) the logits moved by at most
    # 1.2e-7 (fp32), the size of compiled vs eager; two plain compilations agree bitwise. (CPU: bitwise.)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert cap.run_dir is not None and ref.run_dir is not None
    with ilstore.open_run(cap.run_dir) as run, ilstore.open_run(ref.run_dir) as eager:
        assert {str(k) for k in run.keys()} == {str(k) for k in eager.keys()}
        for step, logits in enumerate(got):
            assert torch.equal(run.load(ilstore.TensorKey(step, "lm_head", 0, "outputs")), logits.cpu())
    from ilstore_compare import compare

    result = compare(cap.run_dir, ref.run_dir, rtol=1e-4, atol=1e-4)
    assert result.verdict == "match", result.first_divergence


# -- mode "stats": device statistics read back once per step (issue 13) -------------------------

def test_stats_mode_reads_device_statistics_back_once_per_step(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama().cuda()
    ids = torch.tensor(DEMO_PROMPT, device="cuda")

    def forward() -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits

    config = {"output_dir": str(out_dir), "mode": "stats", "log_step_ids": []}
    with torch.no_grad():
        ref = forward().cpu()
        plain = count_cuda_syncs(forward)
        monkeypatch.setenv("ILSTORE_DEVICE_STATS_BYTES", "0")
        with ilstore.capture(model, {**config, "run_id": "per_tensor"}) as cap:
            forward()
            per_tensor = count_cuda_syncs(forward)
        monkeypatch.delenv("ILSTORE_DEVICE_STATS_BYTES")
        with ilstore.capture(model, {**config, "run_id": "per_step"}) as cap:
            forward()
            per_step = count_cuda_syncs(forward)
            got = forward().cpu()
            deferred = cap._deferred
            assert deferred is not None and deferred.reads == 3 and deferred.early_reads == 0
    assert torch.equal(ref, got)
    with ilstore.open_run(out_dir / "per_step") as b:  # tensors with NaN/Inf read their copy again (a few syncs)
        nonfinite = sum(1 for call in b.calls(1) for kind in ("inputs", "outputs")
                        for _, node in b.tensor_nodes(call, kind)
                        if node.get("stats", {}).get("nan_count") or node.get("stats", {}).get("inf_count"))
    # one read-back a step, a second one when a tensor's mean dominates its spread
    assert per_step <= plain + 1 + deferred.second_reads + 12 * nonfinite, (plain, per_step, per_tensor, nonfinite)
    assert per_tensor > plain + 20, (plain, per_step, per_tensor)
    with ilstore.open_run(out_dir / "per_tensor") as a, ilstore.open_run(out_dir / "per_step") as b:
        assert a.steps() == [0, 1] and b.steps() == [0, 1, 2]
        for step in a.steps():
            assert a.calls(step) == b.calls(step)
            for call in a.calls(step):
                for kind in ("inputs", "outputs"):
                    assert a.structure(call, kind) == b.structure(call, kind), (call, kind)  # bit for bit
