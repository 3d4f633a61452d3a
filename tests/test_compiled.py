"""Capture of a torch.compile'd model (issue 16, default mode): ilstore's hooks are opaque to dynamo."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import ilstore
from ilstore import IlstoreWarning
from ilstore.demo import DEMO_PROMPT, tiny_llama
from ilstore_compare import compare

# inductor itself uses deprecated torch.jit APIs on this torch version
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _steps(model: torch.nn.Module) -> None:
    ids = torch.tensor(DEMO_PROMPT)
    with torch.no_grad():
        for k in range(3):  # three prompt lengths: dynamo's dynamic shapes, no recompilation per step
            model(input_ids=ids[:, : 8 + k], use_cache=False)


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_llama()
    out = tmp_path_factory.mktemp("eager")
    with ilstore.capture(model, {"output_dir": str(out), "run_id": "eager", "log_step_ids": []}) as cap:
        _steps(model)
    assert cap.run_dir is not None
    return cap.run_dir


@pytest.mark.slow  # inductor compiles the tiny Llama: ~25 s
def test_a_compiled_model_records_what_eager_records_without_recompiling(tmp_path: Path, eager_run: Path) -> None:
    from torch._dynamo.utils import counters

    model = tiny_llama()
    compiled = torch.compile(model)  # inductor, CPU
    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "compiled", "log_step_ids": []}) as cap:
            _steps(compiled)
    messages = [str(w.message) for w in caught]
    # no ilstore frame is traced: dynamo neither recompiles for ilstore's state nor meets its code
    assert not counters["recompiles"], dict(counters["recompiles"])
    assert counters["graph_break"] and all("torch.compiler.disable" in reason for reason in counters["graph_break"])
    assert not [m for m in messages if "lru_cache" in m or "recompile" in m]
    ours = [m for m in messages if m.startswith("ilstore:")]
    assert len(ours) == 1 and "torch.compile split the model's graphs at ilstore's hooks" in ours[0]
    assert "while compiling step 0" in ours[0]
    result = compare(cap.run_dir, eager_run, rtol=1e-5, atol=1e-5)
    s = result.summary
    assert (s.only_in_dir1, s.only_in_dir2, s.calls_only_in_dir1, s.calls_only_in_dir2) == (0, 0, 0, 0)
    assert s.compared == len(ilstore.open_run(eager_run).keys()) and result.verdict == "match", result.first_divergence


@pytest.mark.slow  # an inductor compile: ~17 s
def test_capture_attached_to_the_compiled_wrapper_uses_the_eager_names(tmp_path: Path, eager_run: Path) -> None:
    model = tiny_llama()
    compiled = torch.compile(model, backend="eager")  # dynamo only: the names are what this checks
    torch._dynamo.reset()
    with pytest.warns(IlstoreWarning, match="split the model's graphs"):
        with ilstore.capture(compiled, {"output_dir": str(tmp_path), "run_id": "wrapper", "log_step_ids": []}) as cap:
            _steps(compiled)
    with ilstore.open_run(cap.run_dir) as run, ilstore.open_run(eager_run) as eager:
        assert run.keys() == eager.keys()
        assert run.manifest is not None and run.manifest["model"]["architecture"] == "LlamaForCausalLM"
    assert compare(cap.run_dir, eager_run, exact=True).verdict == "match"


def test_fullgraph_compilation_needs_hooks_that_step_aside(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    expected = model(x)
    torch._dynamo.reset()
    with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "break"}):
        with pytest.raises(Exception, match="(?i)graph break|torch.compiler.disable"):
            torch.compile(model, fullgraph=True, backend="eager")(x)  # a graph break is an error there
    torch._dynamo.reset()
    with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "skip"}, in_compiled="skip") as cap:
        got = torch.compile(model, fullgraph=True, backend="eager")(x)  # the hooks vanish from the graph
        assert torch.equal(got, expected)
        model(x)  # an eager call is recorded as usual
    with ilstore.open_run(cap.run_dir) as run:
        assert run.steps() == [0] and [c.module for c in run.calls(0)] == ["0", "1", "2"]


def test_a_capture_of_an_eager_model_does_not_import_dynamo() -> None:
    """Wrapping the hooks for dynamo needs dynamo (a second or more to import); without compile, no cost."""
    import subprocess
    import sys

    code = ("import sys, tempfile, torch, ilstore\n"
            "m = torch.nn.Sequential(torch.nn.Linear(2, 2))\n"
            "with ilstore.capture(m, {'output_dir': tempfile.mkdtemp()}):\n    m(torch.ones(1, 2))\n"
            "print('DYNAMO', 'torch._dynamo' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "DYNAMO False" in proc.stdout, proc.stderr
