"""Capture points traced into compiled graphs (config ``in_graph: true``, issue 16).

CPU only: torch.compile with inductor, and the CUDA-graph draining logic driven through a
stand-in graph object (tests/test_cuda.py replays real CUDA graphs where a GPU exists).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ilstore
from ilstore import in_graph
from ilstore.demo import DEMO_PROMPT, tiny_llama
from ilstore.errors import ConfigError
from ilstore.keys import TensorKey
from ilstore_compare import compare

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inductor's own torch.jit use


class _Pair(nn.Module):
    """Returns a tuple and takes a keyword tensor: the containers a tap must rebuild."""

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.cos() * scale, x.sin()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.pair = _Pair()
        self.act = nn.GELU()
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.fc1(x)
        c, s = self.pair(h, scale=torch.full_like(h, 0.5))
        h = self.act(c + s) + self.act(h)  # act called twice: two calls of one module per step
        return OrderedDict(out=self.fc2(h), hidden=h)


def _net() -> _Net:
    torch.manual_seed(0)
    return _Net()


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 16, generator=g) for n in (3, 5, 4)]


def _keys(run_dir: Path) -> set[str]:
    with ilstore.open_run(run_dir) as run:
        return {str(k) for k in run.keys()}


def _cfg(out: Path, run_id: str, **extra: Any) -> dict[str, Any]:
    return {"output_dir": str(out), "run_id": run_id, "log_step_ids": [], **extra}


def _run(model: Any, out: Path, run_id: str, **extra: Any) -> tuple[Path, list[torch.Tensor]]:
    """Three steps of ``model`` (plain or compiled) captured; the run and the model's outputs."""
    with torch.no_grad(), ilstore.capture(model, _cfg(out, run_id, **extra)) as cap:
        outs = [model(x)["out"] for x in _inputs()]
    assert cap.run_dir is not None
    return cap.run_dir, outs


def test_in_graph_on_an_eager_model_records_what_the_hooks_record(tmp_path: Path) -> None:
    model = _net()
    ref, _ = _run(model, tmp_path, "hooks")
    run, _ = _run(model, tmp_path, "taps", in_graph=True)
    assert _keys(run) == _keys(ref)
    assert "r0/s1/act/1/outputs" in _keys(run) and "r0/s0/pair/0/inputs/scale" in _keys(run)
    result = compare(run, ref, rtol=0, atol=0)
    assert result.verdict == "match" and result.summary.compared == len(_keys(ref))


def test_fullgraph_compile_keeps_the_taps_in_order_with_no_graph_break(tmp_path: Path) -> None:
    model = _net()
    ref, _ = _run(model, tmp_path, "eager")
    with torch.no_grad():
        plain = torch.compile(_net(), fullgraph=True)
        expected = [plain(x)["out"] for x in _inputs()]
        with ilstore.capture(model, _cfg(tmp_path, "explain", in_graph=True)):
            explained = torch._dynamo.explain(model)(_inputs()[0])
    compiled, got = _run(torch.compile(model, fullgraph=True), tmp_path, "compiled", in_graph=True)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    # the model's outputs are those of the compiled model without capture, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    with ilstore.open_run(compiled) as run:
        assert run.steps() == [0, 1, 2]
        for step, out in enumerate(got):  # what the compiled code computed, recorded as is
            assert torch.equal(run.load(TensorKey(step, "fc2", 0, "outputs")), out)
    result = compare(compiled, ref, rtol=1e-5, atol=1e-5)
    s = result.summary
    assert (s.only_in_dir1, s.only_in_dir2) == (0, 0) and result.verdict == "match", result.first_divergence


@pytest.mark.slow  # compiling the tiny Llama whole takes 1-2 minutes on 2 cores
def test_compiled_tiny_llama_in_graph_matches_eager(tmp_path: Path) -> None:
    """Issue 16's done-when for in_graph: fullgraph=True runs and every eager key is recorded."""
    from torch._dynamo.utils import counters

    ids = torch.tensor(DEMO_PROMPT)
    model = tiny_llama()
    with torch.no_grad():
        with ilstore.capture(model, _cfg(tmp_path, "eager")) as ref:
            for k in range(3):
                model(input_ids=ids[:, : 8 + k], use_cache=False)
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, fullgraph=True)
        with ilstore.capture(compiled, _cfg(tmp_path, "in_graph", in_graph=True)) as cap:
            logits = [compiled(input_ids=ids[:, : 8 + k], use_cache=False).logits for k in range(3)]
    assert not counters["graph_break"] and not counters["recompiles"]
    assert cap.run_dir is not None and ref.run_dir is not None
    assert _keys(cap.run_dir) == _keys(ref.run_dir)
    with ilstore.open_run(cap.run_dir) as run:
        for step, out in enumerate(logits):
            assert torch.equal(run.load(TensorKey(step, "lm_head", 0, "outputs")), out)
    result = compare(cap.run_dir, ref.run_dir, rtol=1e-5, atol=1e-5)
    assert result.verdict == "match", result.first_divergence


def test_in_graph_and_replay_do_not_combine(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="in_graph"):
        ilstore.capture(_net(), _cfg(tmp_path, "x", in_graph=True, replay_from=str(tmp_path)))


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: ilstore keeps a graph's taps on the object."""


def test_cuda_graph_draining_logic_on_cpu(tmp_path: Path) -> None:
    """Taps met while a graph is captured become static buffers; each replay is drained as one step.

    The capture is emulated: in_graph's capture switch is set, so the taps allocate buffers and
    copy into them instead of recording. A replay is emulated by writing new values into those
    buffers, as the recorded copies would, then telling ilstore the graph was replayed.
    """
    model = _net()
    xs = _inputs()
    with torch.no_grad(), ilstore.capture(model, _cfg(tmp_path, "graphs", in_graph=True)) as cap:
        model(xs[0])  # warm-up, outside any graph: an ordinary step 0
        graph = _FakeGraph()
        in_graph._capture_begin(graph)
        in_graph._local.capturing = True
        try:
            model(xs[1])  # the capture run records nothing
        finally:
            in_graph._local.capturing = None
            in_graph._capture_end(graph)
        taps = graph._ilstore_taps  # type: ignore[attr-defined]
        assert [t[1].split(in_graph._FIELD)[:2] for t in taps][:3] == [["", "root_pre"], ["fc1", "inputs"],
                                                                       ["fc1", "outputs"]]
        assert cap.step_index == 1 and taps[-1][1].split(in_graph._FIELD)[1] == "root_post"
        replays = []
        for k in range(3):
            for _token, _desc, buffers in taps:
                for b in buffers:
                    b.fill_(float(k + 1))
            in_graph._replayed(graph)
            replays.append(k + 1)
    in_graph._replayed(graph)  # a replay after the capture closed drains nothing
    assert cap.run_dir is not None
    with ilstore.open_run(cap.run_dir) as run:
        assert run.steps() == [0, 1, 2, 3]
        assert set(map(str, run.keys(step=0))) == {k.replace("s1/", "s0/") for k in map(str, run.keys(step=1))}
        for step, value in zip((1, 2, 3), replays, strict=True):
            out = run.load(TensorKey(step, "fc2", 0, "outputs"))
            assert torch.equal(out, torch.full_like(out, float(value)))
            assert torch.equal(run.load(TensorKey(step, "act", 1, "outputs")),
                               torch.full((xs[1].shape[0], 16), float(value)))


@pytest.mark.slow  # two compilations of the tiny Llama
def test_eager_vs_compiled_example(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("eager_vs_compiled", Path(__file__).parent.parent / "examples"
                                                  / "eager_vs_compiled.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "recorded on one side only" in out and "0 recorded on one side only" in out
    assert "first module whose outputs depart: step 0 model.layers." in out  # bf16: compiled numerics depart
    result = compare(tmp_path / "compiled", tmp_path / "eager", rtol=2e-2, atol=2e-2)
    assert result.verdict == "match", result.first_divergence  # ... by bfloat16 rounding, no more
