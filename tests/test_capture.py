"""Capture semantics (SPEC §3) through the default pt store."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ilstore
from ilstore.demo import DEMO_PROMPT, tiny_llama
from support import Thrice


def _cfg(out_dir: Path, **kw: Any) -> dict[str, Any]:
    return {"output_dir": str(out_dir), "run_id": kw.pop("run_id", "run"), **kw}


def _calls(run_dir: Path, step: int = 0) -> list[tuple[str, int]]:
    with ilstore.open_run(run_dir) as run:
        return [(c.module, c.call) for c in run.calls(step)]


def test_call_selectors(out_dir: Path) -> None:
    x = torch.randn(2, 4)
    cases = {
        "lin:1": [("lin", 1)],
        "lin:0,2": [("lin", 0), ("lin", 2)],
        "lin:1-2": [("lin", 1), ("lin", 2)],
        "(?:lin)": [("lin", 0), ("lin", 1), ("lin", 2)],
        "^(?:lin|other)$:0": [("lin", 0), ("other", 0)],
    }
    for i, (pattern, expected) in enumerate(cases.items()):
        model = Thrice()
        with ilstore.capture(model, _cfg(out_dir, run_id=f"r{i}", module_call_match=pattern)) as cap:
            model(x)
        assert _calls(cap.run_dir) == expected, pattern
    # exactly call 1: its inputs are the output of call 0, its outputs the input of call 2
    model = Thrice()
    with ilstore.capture(model, _cfg(out_dir, run_id="one", module_call_match="lin:1")) as cap:
        model(x)
    c0 = model.lin(x)
    c1 = model.lin(c0)
    with ilstore.open_run(cap.run_dir) as run:
        keys = run.keys(0)
        assert [(k.module, k.call, k.kind, k.path) for k in keys] == [("lin", 1, "inputs", ("0",)),
                                                                      ("lin", 1, "outputs", ())]
        assert torch.equal(run.load(keys[0]), c0) and torch.equal(run.load(keys[1]), c1)
    assert sorted(os.listdir(cap.run_dir / "step_0")) == ["lin_1", "module_calls.txt"]
    assert sorted(os.listdir(cap.run_dir / "step_0" / "lin_1")) == ["inputs.json", "inputs_0_cpu.pt", "outputs.json",
                                                                    "outputs_cpu.pt"]


def test_object_selector_and_union(out_dir: Path) -> None:
    model = Thrice()
    with ilstore.capture(model, _cfg(out_dir, module_call_match=[{"pattern": "^lin$", "calls": [2]}, "lin:0"])) as cap:
        model(torch.randn(1, 4))
    assert _calls(cap.run_dir) == [("lin", 0), ("lin", 2)]


class InPlace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return x + 1


class Root(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inplace = InPlace()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inplace(x)


@pytest.mark.parametrize("post", [False, True])
def test_inplace_input_captured_before_call(out_dir: Path, post: bool) -> None:
    x = torch.arange(4.0)
    with ilstore.capture(Root(), _cfg(out_dir, log_post_fwd_inputs=post)) as cap:
        out = cap.model(x)
    with ilstore.open_run(cap.run_dir) as run:
        before = run.load(ilstore.TensorKey(0, "inplace", 0, "inputs", ("0",)))
        assert torch.equal(before, torch.arange(4.0))
        assert torch.equal(run.load(ilstore.TensorKey(0, "inplace", 0, "outputs")), out)
        post_keys = [k for k in run.keys(0) if k.kind == "post_fwd_inputs"]
        if post:
            assert [k.path for k in post_keys] == [("0",)]
            assert torch.equal(run.load(post_keys[0]), torch.arange(4.0) * 2)
            assert (cap.run_dir / "step_0" / "inplace" / "post_fwd_inputs_0_cpu.pt").is_file()
        else:
            assert post_keys == []


class Slicer(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_view_snapshot_is_small(out_dir: Path) -> None:
    big = torch.randn(1000, 1024)
    root = nn.Sequential(Slicer())
    with ilstore.capture(root, _cfg(out_dir, log_inputs=False)) as cap:
        root(big[500:501])
    f = cap.run_dir / "step_0" / "0" / "outputs_cpu.pt"
    size = f.stat().st_size
    assert 4096 <= size < 8 * 1024, size  # about 4 KB, not the 4 MB of the base storage
    t = torch.load(f, weights_only=True)
    assert torch.equal(t, big[500:501]) and t.untyped_storage().nbytes() == 4096


def test_noncontiguous_snapshot(out_dir: Path) -> None:
    x = torch.randn(8, 6)
    root = nn.Sequential(Slicer())
    with ilstore.capture(root, _cfg(out_dir, log_inputs=False)) as cap:
        root(x.t()[::2])
    with ilstore.open_run(cap.run_dir) as run:
        t = run.load(run.keys(0)[0])
    assert torch.equal(t, x.t()[::2]) and t.is_contiguous()


def test_max_tensor_size(out_dir: Path) -> None:
    model = tiny_llama()
    ids = torch.tensor(DEMO_PROMPT)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        with ilstore.capture(model, _cfg(out_dir, max_tensor_size=600)) as cap:
            got = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(ref, got)
    with ilstore.open_run(cap.run_dir) as run:
        keys = run.keys(0)
        skipped = [k for k in keys if not run.meta(k)["stored"]]
        stored = [k for k in keys if run.meta(k)["stored"]]
        assert skipped and stored
        for k in skipped:
            meta = run.meta(k)
            assert meta["numel"] > 600 and "max_tensor_size" in meta["reason"]
            assert meta["shape"] and meta["dtype"].startswith("torch.")
            if meta["dtype"] == "torch.float32":
                stats = {"min", "max", "mean", "std", "abs_max", "l2_norm", "nan_count", "inf_count"}
                assert stats <= set(meta["stats"])
            with pytest.raises(KeyError, match="not stored"):
                run.load(k)
        logits = next(k for k in keys if k.module == "lm_head" and k.kind == "outputs")
        assert logits in skipped
        assert run.meta(logits)["stats"]["max"] == pytest.approx(float(ref.max()))
    n_files = sum(f.endswith(".pt") for _, _, fs in os.walk(cap.run_dir) for f in fs)
    assert n_files == len(stored)


def test_stats_mode(out_dir: Path) -> None:
    model = tiny_llama()
    with torch.no_grad(), ilstore.capture(model, _cfg(out_dir, mode="stats")) as cap:
        model(input_ids=torch.tensor(DEMO_PROMPT), use_cache=False)
    assert not [f for _, _, fs in os.walk(cap.run_dir) for f in fs if f.endswith(".pt")]
    with ilstore.open_run(cap.run_dir) as run:
        metas = [run.meta(k) for k in run.keys(0)]
    assert metas and all(m["stored"] is False and m["reason"] == "mode=stats" and "stats" in m for m in metas)


def test_statistics_values(out_dir: Path) -> None:
    x = torch.tensor([[1.0, -3.0, float("nan")], [float("inf"), 2.0, 0.0]])
    root = nn.Sequential(Slicer())
    with ilstore.capture(root, _cfg(out_dir, log_inputs=False)) as cap:
        root(x)
    with ilstore.open_run(cap.run_dir) as run:
        s = run.meta(run.keys(0)[0])["stats"]
    fin = torch.tensor([1.0, -3.0, 2.0, 0.0], dtype=torch.float64)
    assert s["nan_count"] == 1 and s["inf_count"] == 1
    assert s["min"] == -3.0 and s["max"] == 2.0 and s["abs_max"] == 3.0
    assert s["mean"] == pytest.approx(float(fin.mean())) and s["std"] == pytest.approx(float(fin.std(correction=0)))
    assert s["l2_norm"] == pytest.approx(float(fin.norm()))


@dataclasses.dataclass
class Out:
    hidden: torch.Tensor
    extra: list[Any]


class Fancy(nn.Module):
    def forward(self, x: torch.Tensor, *, scale: float = 1.0, mask: torch.Tensor | None = None) -> Any:
        return {"a": x * scale, "b": (x + 1, [x + 2, "tag", None]), "c": Out(x - 1, [3, 4.5])}


class FancyRoot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fancy = Fancy()

    def forward(self, x: torch.Tensor) -> Any:
        return self.fancy(x, scale=2.0, mask=x > 0)


def test_kwargs_nested_outputs_and_values(out_dir: Path) -> None:
    x = torch.randn(3)
    with ilstore.capture(FancyRoot(), _cfg(out_dir)) as cap:
        out = cap.model(x)
    d = cap.run_dir / "step_0" / "fancy"
    assert sorted(os.listdir(d)) == sorted([
        "inputs.json", "inputs_0_cpu.pt", "inputs_mask_cpu.pt", "outputs.json", "outputs_a_cpu.pt",
        "outputs_b_0_cpu.pt", "outputs_b_1_0_cpu.pt", "outputs_c_hidden_cpu.pt"])
    with ilstore.open_run(cap.run_dir) as run:
        call = run.calls(0)[0]
        inputs = run.structure(call, "inputs")
        assert inputs["kwargs"]["scale"] == 2.0 and inputs["kwargs"]["mask"]["dtype"] == "torch.bool"
        outputs = run.structure(call, "outputs")
        assert outputs["items"]["b"]["items"][1]["items"][1:] == ["tag", None]
        assert outputs["items"]["c"]["class"] == "Out" and outputs["items"]["c"]["items"]["extra"]["items"] == [3, 4.5]
        assert torch.equal(run.load(ilstore.TensorKey(0, "fancy", 0, "outputs", ("b", "1", "0"))), out["b"][1][0])
        assert torch.equal(run.load(ilstore.TensorKey(0, "fancy", 0, "inputs", ("mask",))), x > 0)


def test_hf_model_output_and_keyword_inputs(out_dir: Path) -> None:
    model = tiny_llama()
    with torch.no_grad(), ilstore.capture(model, _cfg(out_dir, module_call_match="^model$")) as cap:
        model(input_ids=torch.tensor(DEMO_PROMPT), use_cache=False)
    with ilstore.open_run(cap.run_dir) as run:
        keys = {(k.kind, k.path) for k in run.keys(0)}
    assert ("inputs", ("input_ids",)) in keys and ("outputs", ("last_hidden_state",)) in keys


def test_non_perturbation_two_steps(out_dir: Path) -> None:
    ids = torch.tensor(DEMO_PROMPT)
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_llama(dtype)
        with torch.no_grad():
            ref0 = model(input_ids=ids, use_cache=False).logits
            ref1 = model(input_ids=ids[:, :-3], use_cache=False).logits
            cfg = _cfg(out_dir, run_id=f"np-{dtype}", log_step_ids=[], log_post_fwd_inputs=True)
            with ilstore.capture(model, cfg) as cap:
                got0 = model(input_ids=ids, use_cache=False).logits
                got1 = model(input_ids=ids[:, :-3], use_cache=False).logits
        for ref, got in ((ref0, got0), (ref1, got1)):  # bitwise, NaN-safe
            assert torch.equal(ref.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                               got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
        assert ilstore.open_run(cap.run_dir).steps() == [0, 1]


def test_step_filter_and_counter(out_dir: Path) -> None:
    model = Thrice()
    with ilstore.capture(model, _cfg(out_dir, log_step_ids=[1, 3])) as cap:
        for _ in range(5):
            model(torch.randn(1, 4))
    assert cap.step_index == 5
    run = ilstore.open_run(cap.run_dir)
    assert run.steps() == [1, 3] and run.status == "complete"
    assert sorted(p.name for p in cap.run_dir.iterdir()) == ["ilstore.json", "stats.f64", "stats_keys.jsonl", "step_1",
                                                               "step_3", "steps.jsonl"]
    assert run.manifest["config"]["log_step_ids"] == [1, 3]


def test_manual_step(out_dir: Path) -> None:
    model = Thrice()
    with ilstore.capture(model, _cfg(out_dir, log_step_ids=[]), manual_step=True) as cap:
        model(torch.randn(1, 4))
        model(torch.randn(1, 4))
        model.other(torch.randn(1, 4))  # a separate call, same step
        assert cap.step() == 1
        model(torch.randn(1, 4))
    run = ilstore.open_run(cap.run_dir)
    assert run.steps() == [0, 1]
    assert [c for c in _calls(cap.run_dir, 0) if c[0] == "other"] == [("other", 0), ("other", 1), ("other", 2)]
    assert len(_calls(cap.run_dir, 1)) == 4


def test_step_requires_manual_mode(out_dir: Path) -> None:
    with ilstore.capture(Thrice(), _cfg(out_dir)) as cap:
        with pytest.raises(ilstore.StoreError, match="manual_step=True"):
            cap.step()


def test_hooks_removed_on_exit_and_exception(out_dir: Path) -> None:
    model = Thrice()
    with ilstore.capture(model, _cfg(out_dir, run_id="a")):
        assert model.lin._forward_hooks and model._forward_pre_hooks
    assert not model.lin._forward_hooks and not model.lin._forward_pre_hooks and not model._forward_hooks
    with pytest.raises(RuntimeError, match="boom"):
        with ilstore.capture(model, _cfg(out_dir, run_id="b")):
            raise RuntimeError("boom")
    assert not model.lin._forward_hooks and not model._forward_pre_hooks
    assert ilstore.open_run(out_dir / "b").status == "failed"


def test_disabled_registers_nothing(out_dir: Path) -> None:
    model = Thrice()
    with ilstore.capture(model, _cfg(out_dir, enabled=False)) as cap:
        assert not model.lin._forward_hooks and not model._forward_pre_hooks
        model(torch.randn(1, 4))
    assert cap.run_dir is None and not any(out_dir.iterdir())


def test_only_matching_modules_hooked(out_dir: Path) -> None:
    model = Thrice()
    with ilstore.capture(model, _cfg(out_dir, module_call_match="^other$")) as cap:
        assert cap.hooked_modules == ["other"] and not model.lin._forward_pre_hooks
    with pytest.warns(ilstore.IlstoreWarning, match="matches no module"):
        ilstore.capture(model, _cfg(out_dir, run_id="none", module_call_match="nothing")).close()


def test_shared_module_hooked_once(out_dir: Path) -> None:
    lin = nn.Linear(2, 2)
    root = nn.Sequential(lin, lin)
    with ilstore.capture(root, _cfg(out_dir)) as cap:
        root(torch.randn(1, 2))
    assert cap.hooked_modules == ["0"]
    assert _calls(cap.run_dir) == [("0", 0), ("0", 1)]


def test_device_filter_skips_other_devices(out_dir: Path) -> None:
    root = nn.Sequential(Slicer())
    with ilstore.capture(root, _cfg(out_dir, device_names=["cuda"])) as cap:
        root(torch.randn(3))
    with ilstore.open_run(cap.run_dir) as run:
        metas = [run.meta(k) for k in run.keys(0)]
    assert metas and all(m["stored"] is False and "device" in m["reason"] for m in metas)


def test_existing_run_is_never_overwritten(out_dir: Path) -> None:
    model = Thrice()
    with ilstore.capture(model, _cfg(out_dir)):
        model(torch.randn(1, 4))
    before = (out_dir / "run" / "ilstore.json").read_bytes()
    with pytest.raises(ilstore.StoreError, match="already exists"):
        ilstore.capture(model, _cfg(out_dir))
    assert (out_dir / "run" / "ilstore.json").read_bytes() == before


class Named(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


@pytest.mark.parametrize("name", ["..", "../../escape", "a/b", "/abs", ".hidden", "x\\y", "..%2F"])
def test_module_names_cannot_escape(out_dir: Path, name: str) -> None:
    root = nn.Module()
    root._modules[name] = Named()  # bypasses add_module's checks, as hostile code could
    root.forward = lambda x: root._modules[name](x)  # type: ignore[method-assign]
    run_dir = out_dir / "inner" / "run"
    with ilstore.capture(root, {"output_dir": str(out_dir / "inner"), "run_id": "run"}) as cap:
        root(torch.ones(2))
    written = [Path(dp) / f for dp, _, fs in os.walk(out_dir) for f in fs]
    assert written and all(run_dir.resolve() in p.resolve().parents for p in written), written
    with ilstore.open_run(cap.run_dir) as run:
        assert [c.module for c in run.calls(0)] == [name]
        assert torch.equal(run.load(run.keys(0)[-1]), torch.ones(2) * 2)


def test_ambiguous_dir_names_use_metadata(out_dir: Path) -> None:
    class R(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.fc_1 = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc_1(self.fc(x)))

    model = R()
    x = torch.randn(1, 2)
    with ilstore.capture(model, _cfg(out_dir)) as cap:
        model(x)
    with ilstore.open_run(cap.run_dir) as run:
        assert [(c.module, c.call) for c in run.calls(0)] == [("fc", 0), ("fc_1", 0), ("fc", 1)]
        a = model.fc(x)
        b = model.fc_1(a)
        assert torch.equal(run.load(ilstore.TensorKey(0, "fc_1", 0, "outputs")), b)
        assert torch.equal(run.load(ilstore.TensorKey(0, "fc", 1, "outputs")), model.fc(b))


class Flaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.lin(x)
        if self.calls == 2:
            raise ValueError("model failed")
        return y


def test_step_whose_forward_raised_is_not_complete(out_dir: Path) -> None:
    model = Flaky()
    with ilstore.capture(model, _cfg(out_dir, log_step_ids=[])) as cap:
        model(torch.randn(1, 2))
        with pytest.raises(ValueError):
            model(torch.randn(1, 2))
        model(torch.randn(1, 2))
    with ilstore.open_run(cap.run_dir) as run:
        assert run.steps() == [0, 2] and run.incomplete_steps() == [1] and run.status == "complete"
        assert [c.module for c in run.calls(2)] == ["lin"]


def test_pause_resume_manual_steps(out_dir: Path) -> None:
    model = Thrice()
    with ilstore.capture(model, _cfg(out_dir, log_step_ids=[]), manual_step=True) as cap:
        cap.pause()
        model(torch.randn(1, 4))  # e.g. an engine's warm-up run: not logged, not counted
        cap.resume()
        model.other(torch.randn(1, 4))
        cap.step()
        with pytest.warns(ilstore.IlstoreWarning, match="no hooked module ran"):
            cap.step()
    assert _calls(cap.run_dir, 0) == [("other", 0)]
    assert ilstore.open_run(cap.run_dir).steps() == [0]


def test_warns_when_a_step_ends_without_any_hook(out_dir: Path) -> None:
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # like a compiled region: hooks never fire
            return x * 2

    model = Skips()
    with ilstore.capture(model, _cfg(out_dir)):
        with pytest.warns(ilstore.IlstoreWarning, match="step 0 ended and no hooked module ran"):
            model(torch.ones(2))


def test_attributes_exist_whether_enabled_or_not(out_dir: Path) -> None:
    model = Thrice()
    for enabled in (False, True):
        with ilstore.capture(model, _cfg(out_dir, run_id=f"e{enabled}", enabled=enabled)) as cap:
            assert (cap.rank, cap.world_size, cap.error, cap.step_index) == (0, 1, None, 0)
            assert (cap.run_dir is None) is not enabled and cap._step is None  # no step before a forward
            model(torch.randn(1, 4))
            assert cap._step is None and cap.step_index == (1 if enabled else 0)  # the step ended with its forward


def test_engine_capture_records_only_live_steps(out_dir: Path) -> None:
    from ilstore.engine_capture import EngineCapture
    from ilstore.integrations import vllm

    assert ilstore.EngineCapture is EngineCapture is vllm.EngineCapture  # where it lived first still works
    model = Thrice()
    cap = EngineCapture(model, _cfg(out_dir, log_step_ids=[]), manual_step=True)
    model(torch.randn(1, 4))  # warm-up outside an engine step: neither logged nor counted
    assert not cap.live and cap.step_index == 0
    for _ in range(2):
        cap.begin_engine_step()
        assert cap.live
        model.other(torch.randn(1, 4))
        cap.end_engine_step()
    cap.end_engine_step()  # no live step: nothing happens
    cap.close()
    assert cap.step_index == 2 and not cap.live
    with ilstore.open_run(cap.run_dir) as run:
        assert run.steps() == [0, 1]
    assert _calls(cap.run_dir, 1) == [("other", 0)]


def test_summarize_run_counts_what_ls_prints(out_dir: Path) -> None:
    from ilstore.summary import format_summary, human_bytes, summarize_run

    model = Thrice()
    with ilstore.capture(model, _cfg(out_dir, run_id="stats", mode="stats")) as cap:
        model(torch.randn(1, 4))
    (step,) = summarize_run(cap.run_dir).steps
    assert (step.tensors, step.stored, step.nbytes) == (8, 0, 0)  # bytes count stored bodies only
    with ilstore.capture(model, _cfg(out_dir)) as cap:
        model(torch.randn(1, 4))  # lin runs three times, other once; [1, 4] float32 tensors: 16 bytes each
    summary = summarize_run(cap.run_dir)
    assert (summary.backend, summary.status, summary.incomplete_steps) == ("pt", "complete", ())
    (step,) = summary.steps
    assert [(c.module, c.call, c.tensors, c.stored, c.nbytes) for c in step.calls] == [
        ("lin", 0, 2, 2, 32), ("lin", 1, 2, 2, 32), ("lin", 2, 2, 2, 32), ("other", 0, 2, 2, 32)]
    assert (step.tensors, step.stored, step.nbytes) == (8, 8, 128)
    assert summary.to_dict()["steps"][0]["bytes"] == 128 and summary.to_dict()["run_dir"] == str(cap.run_dir)
    assert format_summary(summary).splitlines()[:2] == [f"run {cap.run_dir}", "backend pt, status complete, 1 step(s)"]
    assert "\nstep 0\nmodule call" in format_summary(summary, show_calls=True)
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 2**30)] == ["0 B", "1023 B", "1.5 KiB", "5.0 GiB"]
