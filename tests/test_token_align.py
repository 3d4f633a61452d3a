"""Token alignment (``--align-tokens``) on synthetic runs: packed (vLLM-style, with ``ilstore.batch``
records written through :meth:`ilstore.EngineCapture.record_call`) against padded (``[B, S]`` with an
attention mask, left or right padding) and one-by-one runs of a small model whose every row depends on
its token id and position only, so aligned tokens compare equal and misaligned ones do not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import ilstore
import ilstore_compare
from compare_helpers import need_backend
from ilstore.engine_capture import EngineCapture
from ilstore.integrations.vllm_batch import BATCH_FORMAT, BATCH_MODULE, check_composition
from ilstore_compare.cli import compare_cmd
from ilstore_compare.report_json import validate_report
from ilstore_compare.report_md import render_markdown
from ilstore_compare.tokens import DIVERGED, NO_REQUEST, PAST_END
from ilstore_compare.tokens_view import TokenAlignmentError

PROMPTS = {"a": [3, 4, 5, 6, 7], "b": [8, 9], "c": [10, 11, 12]}
GENERATED = {"a": [20, 21], "b": [23, 24], "c": [26, 27]}  # fed back in decode steps
MAP = {"squeeze_shapes": True,
       "unaligned": [{"tensor": "inputs/attention_mask", "side": "dir2", "reason": "padding mask (batched run only)"}]}


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 8)
        self.pos = nn.Embedding(32, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(torch.tanh(self.embed(input_ids) + self.pos(positions)))


class Tiny(nn.Module):
    """``head`` sees one row per request (packed: the given rows; batched: the last column)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = Body()
        self.head = nn.Linear(8, 6)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor | None = None,
                last: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(input_ids, positions, attention_mask=attention_mask)
        return self.head(h[last] if last is not None else h[:, -1:])


def _sequences(prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    return {r: p + GENERATED[r] for r, p in prompts.items()}


def packed_run(out: Path, run_id: str, schedule: list[list[tuple[str, int, int]]], *, backend: str = "pt",
               prompts: dict[str, list[int]] = PROMPTS, record: bool = True,
               perturb: tuple[int, int] | None = None) -> Path:
    """A vLLM-like run: each step packs ``(request, first position, count)`` slices of the sequences;
    ``perturb=(step, row)`` adds 1e-3 to that packed row of ``body.proj``'s output."""
    seqs = _sequences(prompts)
    model = Tiny()
    steps_done = [0]

    def nudge(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        if perturb is not None and steps_done[0] == perturb[0]:
            out = out.clone()
            out[perturb[1]] += 1e-3
        return out

    model.body.proj.register_forward_hook(nudge)  # before capture's hooks: they record the nudged output
    cap = EngineCapture(model, {"output_dir": str(out), "run_id": run_id, "backend": backend, "log_step_ids": []},
                        manual_step=True)
    for step in schedule:
        ids, pos, starts, req_ids = [], [], [0], []
        for rid, p0, n in step:
            ids += seqs[rid][p0:p0 + n]
            pos += list(range(p0, p0 + n))
            starts.append(starts[-1] + n)
            req_ids.append(rid)
        cap.begin_engine_step()
        if record:
            assert cap.record_call(BATCH_MODULE, request_ids=req_ids, query_start_loc=starts, positions=pos,
                                   input_ids=ids, format=BATCH_FORMAT)
        with torch.no_grad():
            model(torch.tensor(ids), torch.tensor(pos), last=torch.tensor(starts[1:]) - 1)
        cap.end_engine_step()
        steps_done[0] += 1
    cap.close()
    assert cap.run_dir is not None
    return cap.run_dir


def padded_run(out: Path, run_id: str, order: list[str], *, side: str = "left", decode: int = 2,
               prompts: dict[str, list[int]] = PROMPTS) -> Path:
    """A Hugging Face-like run: one padded prefill of every prompt, then ``decode`` one-token steps."""
    seqs = _sequences(prompts)
    width = max(len(prompts[r]) for r in order)
    ids, mask = [], []
    for r in order:
        pad = width - len(prompts[r])
        row, m = prompts[r], [1] * len(prompts[r])
        ids.append([0] * pad + row if side == "left" else row + [0] * pad)
        mask.append([0] * pad + m if side == "left" else m + [0] * pad)
    model = Tiny()
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(out), "run_id": run_id, "log_step_ids": []}):
        m = torch.tensor(mask)
        pos = (m.cumsum(1) - 1).clamp(min=0)
        model(torch.tensor(ids), pos, attention_mask=m)
        for k in range(decode):
            m = torch.cat([m, torch.ones(len(order), 1, dtype=m.dtype)], 1)
            step_ids = torch.tensor([[seqs[r][len(prompts[r]) + k]] for r in order])
            model(step_ids, m.sum(1, keepdim=True) - 1, attention_mask=m)
    return out / run_id


def one_by_one_run(out: Path, run_id: str, order: list[str], decode: int = 2) -> Path:
    """One prompt at a time, no mask: a prefill step, then one-token decode steps, per prompt."""
    seqs = _sequences(PROMPTS)
    model = Tiny()
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(out), "run_id": run_id, "log_step_ids": []}):
        for r in order:
            n = len(PROMPTS[r])
            model(torch.tensor([PROMPTS[r]]), torch.arange(n)[None])
            for k in range(decode):
                model(torch.tensor([[seqs[r][n + k]]]), torch.tensor([[n + k]]))
    return out / run_id


# vLLM-like scheduling: a and b prefilled first, c joins while a and b decode, then everyone decodes.
SCHEDULE = [[("a", 0, 5), ("b", 0, 2)], [("a", 5, 1), ("b", 2, 1), ("c", 0, 3)],
            [("a", 6, 1), ("b", 3, 1), ("c", 3, 1)], [("c", 4, 1)]]
TOKENS = sum(len(p) + 2 for p in PROMPTS.values())  # every prompt token and both fed-back tokens


def _compare(a: Path, b: Path, **options: Any) -> ilstore_compare.CompareResult:
    return ilstore_compare.compare(a, b, name_map=MAP, align_tokens=True, rtol=1e-6, atol=1e-7, **options)


@pytest.mark.parametrize("side", ["left", "right"])
def test_packed_vs_padded_aligns_every_token(tmp_path: Path, side: str) -> None:
    packed = packed_run(tmp_path, "packed", SCHEDULE)
    padded = padded_run(tmp_path, "padded", ["c", "a", "b"], side=side)  # another order than vLLM's
    result = _compare(packed, padded, allow_unaligned=True)
    t = result.token_alignment
    assert t is not None and t.complete and t.aligned == t.tokens1 == t.tokens2 == TOKENS
    assert {(r.request1, r.request2, r.how) for r in t.requests} == {("a", "s0r1", "exact"), ("b", "s0r2", "exact"),
                                                                      ("c", "s0r0", "exact")}
    # one aligned step per request and packed step, in packed order
    assert [(s.step1, s.request1) for s in t.steps] == [(i, r) for i, step in enumerate(SCHEDULE) for r, _, _ in step]
    assert result.summary.mismatched == 0 and result.summary.compared > 80
    heads = [x for x in result.tensors if x.key.module == "head" and x.key.kind == "outputs"]
    # the head's row per request: compared wherever the batched run computed it for the same token
    # (left padding: the last column is every row's last token; right padding, in the prefill, only
    # the longest row's: the others are one-sided, see test_right_padding_leaves_last_rows_out)
    compared = [x for x in heads if x.status == "match"]
    assert len(heads) == len(t.steps) and len(compared) == (len(t.steps) if side == "left" else len(t.steps) - 2)
    if side == "left":
        assert result.summary.only_in_dir1 == result.summary.only_in_dir2 == 0
        assert result.exit_code == 0 and result.verdict == "match"
    embeds = {x.key.step: x for x in result.tensors if x.key.module == "body.embed" and x.key.kind == "outputs"}
    assert embeds[0].shape1 == (5, 8) and embeds[0].shape2 == (1, 5, 8) and embeds[0].squeezed


def test_right_padding_leaves_last_rows_out(tmp_path: Path) -> None:
    # right padded, the batched head's last column is padding for the shorter rows: not compared,
    # and the packed run's row for that request is then one-sided (the comparison says so)
    packed = packed_run(tmp_path, "packed", SCHEDULE)
    padded = padded_run(tmp_path, "padded", ["a", "b", "c"], side="right")
    result = _compare(packed, padded, allow_unaligned=True)
    assert result.token_alignment is not None and result.token_alignment.complete
    prefill_b = next(s for s in result.token_alignment.steps if s.request1 == "b" and s.step1 == 0)
    assert prefill_b.last1 is not None and prefill_b.last2 is None
    head = [x for x in result.tensors if x.key.module == "head" and x.key.step == prefill_b.step]
    assert {x.status for x in head} == {"only_in_dir1"} and result.exit_code == 1


def test_packed_vs_one_by_one(tmp_path: Path) -> None:
    packed = packed_run(tmp_path, "packed", SCHEDULE)
    single = one_by_one_run(tmp_path, "single", ["b", "c", "a"])
    result = _compare(packed, single)  # no mask in a one-by-one run: nothing declared unaligned
    t = result.token_alignment
    assert t is not None and t.complete and t.aligned == TOKENS
    step_a0 = next(s for s in t.steps if s.request1 == "a" and s.step1 == 0)
    assert step_a0.steps2 == (6,) and step_a0.positions == (0, 1, 2, 3, 4)  # b and c took steps 0-5
    assert result.exit_code == 0, render_markdown(result)
    assert result.summary.compared == result.summary.matched > 0


def test_packed_vs_packed_with_another_schedule(tmp_path: Path) -> None:
    other = [[("c", 0, 3), ("a", 0, 2)], [("a", 2, 3), ("c", 3, 1), ("b", 0, 2)],
             [("a", 5, 2), ("b", 2, 2), ("c", 4, 1)]]
    result = ilstore_compare.compare(packed_run(tmp_path, "p1", SCHEDULE), packed_run(tmp_path, "p2", other),
                                     align_tokens=True, rtol=1e-6, atol=1e-7)
    t = result.token_alignment
    assert t is not None and t.complete and result.summary.mismatched == 0
    # a's first 5 tokens came from two steps of the other run, which computed a's head row for
    # position 4 in its step 1, and never one for position 5 (fed with 6 in one step)
    a0 = next(s for s in t.steps if s.request1 == "a" and s.step1 == 0)
    a1 = next(s for s in t.steps if s.request1 == "a" and s.step1 == 1)
    assert a0.steps2 == (0, 1) and a0.last2 == (1, 0) and a1.last2 is None
    head = {x.key.step: x.status for x in result.tensors if x.key.module == "head" and x.key.kind == "outputs"}
    assert head[a0.step] == "match" and head[a1.step] == "only_in_dir1"
    assert result.exit_code == 1  # one-sided per-request rows


def test_a_perturbed_token_is_found_at_its_step(tmp_path: Path) -> None:
    # c's second prompt token (packed step 1, row 3) computed wrongly by body.proj in the packed run
    padded = padded_run(tmp_path, "padded", ["a", "b", "c"])
    assert _compare(packed_run(tmp_path, "packed", SCHEDULE), padded, allow_unaligned=True).exit_code == 0
    bad = packed_run(tmp_path, "bad", SCHEDULE, perturb=(1, 3))
    result = _compare(bad, padded, allow_unaligned=True)
    assert result.token_alignment is not None and result.token_alignment.complete
    first = result.first_divergence
    step = next(s for s in result.token_alignment.steps if s.step1 == 1 and s.request1 == "c")
    assert first is not None and (first.step, first.module, first.origin) == (step.step, "body.proj", "introduced")
    bad_steps = {t.key.step for t in result.tensors if t.status == "mismatch"}
    assert bad_steps == {step.step}  # c's later tokens do not depend on it in this model
    assert result.exit_code == 1


def test_mismatching_prompts_align_their_common_prefix(tmp_path: Path) -> None:
    padded = padded_run(tmp_path, "padded", ["a", "b", "c"])
    shifted = {**PROMPTS, "c": [10, 11, 13]}  # a token the padded run never saw
    bad = packed_run(tmp_path, "bad", SCHEDULE, prompts=shifted)
    result = _compare(bad, padded, allow_unaligned=True)
    t = result.token_alignment
    assert t is not None and not t.complete
    c = next(r for r in t.requests if r.request1 == "c")
    assert (c.how, c.aligned, c.diverges_at) == ("prefix", 2, 2)
    assert ("dir1", DIVERGED, 3) in t.not_aligned and ("dir2", DIVERGED, 3) in t.not_aligned
    assert t.aligned == TOKENS - 3
    # c's prefill step ends past the divergence: neither run's head row for it is compared
    c_prefill = next(s for s in t.steps if s.request1 == "c")
    assert c_prefill.positions == (0, 1) and c_prefill.last1 is None and c_prefill.last2 is None
    # what is aligned matches; exit 0 only because --allow-unaligned accepts the lost tokens
    assert result.summary.mismatched == 0 and result.exit_code == 0
    strict = _compare(bad, padded)
    assert strict.exit_code == 1 and "could not be aligned" in render_markdown(strict)


def test_a_request_missing_on_one_side(tmp_path: Path) -> None:
    packed = packed_run(tmp_path, "packed", SCHEDULE)
    padded = padded_run(tmp_path, "padded", ["a", "c"])  # b never ran
    result = _compare(packed, padded)
    t = result.token_alignment
    assert t is not None and not t.complete
    assert next(r for r in t.requests if r.request1 == "b").how == "unmatched"
    assert t.not_aligned == (("dir1", NO_REQUEST, 4),)
    assert t.aligned == TOKENS - 4 and not any(s.request1 == "b" for s in t.steps)
    assert result.summary.mismatched == 0 and result.exit_code == 1
    assert _compare(packed, padded, allow_unaligned=True).exit_code == 0  # the rest is complete
    # a shorter run: two decode steps less in the padded run
    short = padded_run(tmp_path, "short", ["a", "b", "c"], decode=0)
    lost = _compare(packed, short).token_alignment
    assert lost is not None and lost.not_aligned == (("dir1", PAST_END, 6),)


def test_report_and_cli(tmp_path: Path) -> None:
    packed = packed_run(tmp_path, "packed", SCHEDULE)
    padded = padded_run(tmp_path, "padded", ["a", "b", "c"])
    (tmp_path / "map.json").write_text(json.dumps(MAP))
    args = ["--dir1", str(packed), "--dir2", str(padded), "--map", str(tmp_path / "map.json"), "--align-tokens"]
    res = CliRunner().invoke(compare_cmd, [*args, "--allow-unaligned", "--format", "json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert validate_report(data) == []
    assert data["options"]["align_tokens"] is True
    tokens = data["token_alignment"]
    assert (tokens["aligned"], tokens["complete"], len(tokens["steps"])) == (TOKENS, True, 9)
    assert tokens["source1"].startswith(BATCH_MODULE) and "attention_mask" in tokens["source2"]
    md = CliRunner().invoke(compare_cmd, [*args, "--allow-unaligned"], catch_exceptions=False).stdout
    section = md.split("## Token alignment", 1)[1].split("\n## ", 1)[0]
    assert f"{TOKENS} token(s) aligned" in section and "| exact" in section
    # without the flag the steps do not line up: step 0 holds 7 packed tokens against 3 padded rows
    plain = CliRunner().invoke(compare_cmd, [*args[:-1], "--allow-unaligned"], catch_exceptions=False)
    assert plain.exit_code == 1


def test_record_in_every_backend_and_selection(tmp_path: Path) -> None:
    for backend in ("pt", "safetensors", "hdf5"):
        need_backend(backend)
        run_dir = packed_run(tmp_path, backend, SCHEDULE[:2], backend=backend)
        with ilstore.open_run(run_dir) as run:
            call = next(c for c in run.calls(1) if c.module == BATCH_MODULE)
            kwargs = run.structure(call, "inputs")["kwargs"]
            values = {k: v["items"] if isinstance(v, dict) else v for k, v in kwargs.items()}
            assert check_composition(values) == [] and values["request_ids"] == ["a", "b", "c"]
            assert values["query_start_loc"] == [0, 1, 2, 5] and values["positions"] == [5, 2, 0, 1, 2]
    # a selection without ilstore.batch records none; alignment then needs it and says so
    model = Tiny()
    cap = EngineCapture(model, {"output_dir": str(tmp_path), "run_id": "sel", "module_call_match": "body\\.proj"},
                        manual_step=True)
    cap.begin_engine_step()
    assert not cap.record_call(BATCH_MODULE, format=BATCH_FORMAT)
    model(torch.tensor([1, 2]), torch.tensor([0, 1]), last=torch.tensor([1]))
    cap.end_engine_step()
    cap.close()
    with ilstore.open_run(tmp_path / "sel") as run:
        assert [c.module for c in run.calls(0)] == ["body.proj"]
    with pytest.raises(TokenAlignmentError, match="no ilstore.batch record and no integer token ids"):
        ilstore_compare.compare(tmp_path / "sel", tmp_path / "sel", align_tokens=True, modules="proj")


def test_unreadable_composition_is_a_user_error(tmp_path: Path) -> None:
    packed = packed_run(tmp_path, "packed", SCHEDULE[:1], record=False)  # 1-D ids, no record: one request
    padded = padded_run(tmp_path, "padded", ["a", "b"], decode=0)
    t = _compare(packed, padded).token_alignment
    assert t is not None and "one request (no ilstore.batch record)" in t.source1
    assert [(r.how, r.aligned) for r in t.requests][:1] == [("prefix", 5)]  # "a b" read as one sequence
    # one prompt without records: the decode steps continue it
    single = packed_run(tmp_path, "single", [[("a", 0, 5)], [("a", 5, 1)], [("a", 6, 1)]], record=False)
    alone = _compare(single, padded_run(tmp_path, "alone", ["a"]), allow_unaligned=True)  # the mask
    assert alone.token_alignment is not None and alone.token_alignment.complete and alone.exit_code == 0
    assert alone.token_alignment.aligned == 7
    broken = tmp_path / "broken"
    model = Tiny()
    cap = EngineCapture(model, {"output_dir": str(broken), "run_id": "x"}, manual_step=True)
    cap.begin_engine_step()
    cap.record_call(BATCH_MODULE, request_ids=["a"], query_start_loc=[0, 2], positions=[0], input_ids=[1],
                    format=BATCH_FORMAT)
    model(torch.tensor([1, 2]), torch.tensor([0, 1]), last=torch.tensor([1]))
    cap.end_engine_step()
    cap.close()
    with pytest.raises(TokenAlignmentError, match="ilstore.batch record is unusable: 2 packed tokens"):
        _compare(broken / "x", padded)
    res = CliRunner().invoke(compare_cmd, ["--dir1", str(broken / "x"), "--dir2", str(padded), "--align-tokens"])
    assert res.exit_code == 2 and "ilstore.batch" in res.output


def test_batch_records_are_not_compared_as_module_calls(tmp_path: Path) -> None:
    # without --align-tokens, a run with ilstore.batch records compares with one without them
    # (another capture, or a selection that left them out) as before: they are run metadata
    with_records = packed_run(tmp_path, "with", SCHEDULE)
    without = packed_run(tmp_path, "without", SCHEDULE, record=False)
    for a, b in ((with_records, without), (without, with_records), (with_records, with_records)):
        result = ilstore_compare.compare(a, b)
        assert result.exit_code == 0 and result.summary.calls_only_in_dir1 == result.summary.calls_only_in_dir2 == 0
        assert BATCH_MODULE not in {c.call.module for c in result.calls}
    with ilstore.open_run(with_records) as run:
        assert run.calls(0)[0].module == BATCH_MODULE  # recorded first, before the model's calls


def test_the_plugin_reads_the_composition_from_the_runner(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # a stand-in for vLLM's V1 runner: what _prepare_inputs leaves behind (real vLLM: test_vllm_tokens.py)
    from types import SimpleNamespace

    from ilstore.integrations.vllm_batch import patch_prepare_inputs

    class Runner:
        def _prepare_inputs(self, scheduler_output: Any, counts: Any) -> str:
            ids = [5, 6, 7, 8]
            self.input_batch = SimpleNamespace(req_ids=["r1", "r0", None], num_reqs=2)
            self.input_ids = SimpleNamespace(gpu=torch.tensor(ids + [0] * 4, dtype=torch.int32))
            self.positions = torch.tensor([9, 0, 1, 2] + [0] * 4)
            return "prepared"

    class Broken:
        def _prepare_inputs(self, scheduler_output: Any, counts: Any) -> str:
            return "prepared"

    patch_prepare_inputs([Runner, Broken], "_cap", "__marker__")
    patch_prepare_inputs([Runner], "_cap", "__marker__")  # never twice
    wrapper = Runner._prepare_inputs
    assert hasattr(wrapper, "__marker__") and not hasattr(wrapper.__wrapped__, "__marker__")  # the original inside
    model = Tiny()
    runner, broken = Runner(), Broken()
    cap = EngineCapture(model, {"output_dir": str(tmp_path), "run_id": "r"}, manual_step=True)
    runner._cap = broken._cap = cap  # type: ignore[attr-defined]
    sched = SimpleNamespace(total_num_scheduled_tokens=4, num_scheduled_tokens={"r0": 3, "r1": 1})
    assert runner._prepare_inputs(sched, None) == "prepared"  # outside a step: nothing recorded
    cap.begin_engine_step()
    runner._prepare_inputs(sched, None)
    runner._prepare_inputs(sched, None)  # once per step
    with caplog.at_level("WARNING"):
        assert broken._prepare_inputs(sched, None) == "prepared"  # no state: a warning, the step goes on
    assert "cannot read the batch composition from Broken" in caplog.text
    model(torch.tensor([5, 6, 7, 8]), torch.tensor([9, 0, 1, 2]), last=torch.tensor([0, 3]))
    cap.end_engine_step()
    cap.close()
    with ilstore.open_run(tmp_path / "r") as run:
        calls = [c for c in run.calls(0) if c.module == BATCH_MODULE]
        assert len(calls) == 1 and run.calls(0)[0] == calls[0]
        kwargs = run.structure(calls[0], "inputs")["kwargs"]
    values = {k: v["items"] if isinstance(v, dict) else v for k, v in kwargs.items()}
    assert values == {"request_ids": ["r1", "r0"], "query_start_loc": [0, 1, 4], "positions": [9, 0, 1, 2],
                      "input_ids": [5, 6, 7, 8], "format": BATCH_FORMAT}
