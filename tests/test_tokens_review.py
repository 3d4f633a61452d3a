"""Token alignment of runs without ``ilstore.batch`` records or an attention mask (Hugging Face one
prompt at a time; vLLM captured without the record): the positions the run recorded decide which
request a step's tokens belong to. Guessing (a one-token step continues its row's request) misread
a new one-token prompt, fed at position 0, as a decode step of the previous request: its tokens
were then compared with another request's (a false mismatch), or its request was never compared.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import ilstore
import ilstore_compare
from ilstore.engine_capture import EngineCapture
from ilstore.integrations.vllm_batch import BATCH_FORMAT, BATCH_MODULE
from ilstore_compare.cli import compare_cmd
from ilstore_compare.tokens import PAST_END, batched_steps
from ilstore_compare.tokens_view import TokenAlignmentError, read_composition

MAP = {"squeeze_shapes": True}


class Body(nn.Module):
    """Every row depends on its token id and position only: aligned tokens compare equal."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 8)
        self.pos = nn.Embedding(32, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.embed(input_ids) + self.pos(position_ids)))


class Model(nn.Module):
    """Hands ``body`` the ids and positions by keyword, as Hugging Face's causal LMs hand their
    ``model`` ``input_ids=``/``position_ids=`` (``keyword=False``: positionally, nothing named)."""

    def __init__(self, keyword: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = Body()
        self.head = nn.Linear(8, 6)
        self.keyword = keyword

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                last: torch.Tensor | None = None) -> torch.Tensor:
        if self.keyword:
            h = self.body(input_ids=input_ids, position_ids=position_ids)
        else:
            h = self.body(input_ids, position_ids)
        return self.head(h[last] if last is not None else h[:, -1:])


Step = list[tuple[str, int, list[int]]]  # (request, first position, token ids) per scheduled request


def packed_run(out: Path, run_id: str, schedule: list[Step], *, record: bool = True) -> Path:
    """A vLLM-like run: each step packs its requests' tokens into one flat batch."""
    model = Model()
    cap = EngineCapture(model, {"output_dir": str(out), "run_id": run_id, "log_step_ids": []}, manual_step=True)
    for step in schedule:
        ids = [t for _, _, toks in step for t in toks]
        pos = [p0 + i for _, p0, toks in step for i in range(len(toks))]
        starts = [0]
        for _, _, toks in step:
            starts.append(starts[-1] + len(toks))
        cap.begin_engine_step()
        if record:
            assert cap.record_call(BATCH_MODULE, request_ids=[r for r, _, _ in step], query_start_loc=starts,
                                   positions=pos, input_ids=ids, format=BATCH_FORMAT)
        with torch.no_grad():
            model(torch.tensor(ids), torch.tensor(pos), last=torch.tensor(starts[1:]) - 1)
        cap.end_engine_step()
    cap.close()
    assert cap.run_dir is not None
    return cap.run_dir


def single_run(out: Path, run_id: str, steps: list[tuple[int, list[int]]], *, keyword: bool = True) -> Path:
    """A Hugging Face-like run, one sequence at a time, no mask: each step ``(first position, ids)``."""
    model = Model(keyword)
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(out), "run_id": run_id, "log_step_ids": []}):
        for p0, ids in steps:
            model(torch.tensor([ids]), torch.arange(p0, p0 + len(ids))[None])
    return out / run_id


def _compare(a: Path, b: Path, **options: object) -> ilstore_compare.CompareResult:
    return ilstore_compare.compare(a, b, name_map=MAP, align_tokens=True, rtol=1e-6, atol=1e-7, **options)


def _positions(run: Path) -> list[list[tuple[str, tuple[int, ...]]]]:
    with ilstore.open_run(run) as reader:
        return [[(r.request, r.positions) for r in s.requests] for s in read_composition(reader, "dir2").steps]


# a = [3, 4, 5] and its decode 20; then a NEW one-token prompt z = [7] at position 0, and its decode 30
A_THEN_Z = [(0, [3, 4, 5]), (3, [20]), (0, [7]), (1, [30])]


def test_a_new_one_token_prompt_is_a_new_request(tmp_path: Path) -> None:
    single = single_run(tmp_path, "single", A_THEN_Z)
    assert _positions(single) == [[("s0r0", (0, 1, 2))], [("s0r0", (3,))], [("s2r0", (0,))], [("s2r0", (1,))]]
    # the packed run schedules both prompts at once: every token aligns, and compares equal
    packed = packed_run(tmp_path, "packed", [[("a", 0, [3, 4, 5]), ("z", 0, [7])], [("a", 3, [20]), ("z", 1, [30])]])
    result = _compare(packed, single)
    t = result.token_alignment
    assert t is not None and t.complete and t.aligned == 6
    assert {(r.request1, r.request2, r.how) for r in t.requests} == {("a", "s0r0", "exact"), ("z", "s2r0", "exact")}
    assert "positions from body inputs[position_ids]" in t.source2
    assert result.exit_code == 0 and result.summary.mismatched == 0 and result.summary.compared > 0


def test_a_new_prompt_is_not_compared_with_another_requests_tokens(tmp_path: Path) -> None:
    # dir1 feeds 7 and 30 as a's decodes (positions 4 and 5); dir2 feeds them as a new prompt at
    # positions 0 and 1: not the same tokens, so not aligned (was: 'exact', complete, and a mismatch)
    packed = packed_run(tmp_path, "packed", [[("a", 0, [3, 4, 5])], [("a", 3, [20])], [("a", 4, [7])],
                                             [("a", 5, [30])]])
    single = single_run(tmp_path, "single", A_THEN_Z)
    result = _compare(packed, single)
    t = result.token_alignment
    assert t is not None and not t.complete and t.aligned == 4
    assert [(r.request1, r.request2, r.how, r.aligned) for r in t.requests] == [
        ("a", "s0r0", "prefix", 4), (None, "s2r0", "unmatched", 0)]
    assert ("dir1", PAST_END, 2) in t.not_aligned
    assert result.summary.mismatched == 0 and result.exit_code == 1 and result.verdict == "incomplete"
    allowed = _compare(packed, single, allow_unaligned=True)
    assert allowed.exit_code == 0 and allowed.summary.mismatched == 0


def test_a_packed_run_without_records_reads_its_recorded_positions(tmp_path: Path) -> None:
    # vLLM captured without ilstore.batch: 1-D ids, one sequence per step, positions by keyword
    flat = packed_run(tmp_path, "flat", [[("a", 0, [3, 4, 5])], [("a", 3, [20])], [("z", 0, [7])], [("z", 1, [30])]],
                      record=False)
    assert _positions(flat) == [[("s0", (0, 1, 2))], [("s0", (3,))], [("s2", (0,))], [("s2", (1,))]]
    result = _compare(flat, single_run(tmp_path, "single", A_THEN_Z))
    t = result.token_alignment
    assert t is not None and t.complete and result.exit_code == 0, t
    assert "one request (no ilstore.batch record), positions from body inputs[position_ids]" in t.source1


def test_without_recorded_positions_the_guess_is_said(tmp_path: Path) -> None:
    # nothing named position_ids/positions: the old guess (a one-token step continues its row's
    # request) still reads z as a's decode, and the alignment's source says the positions are guessed
    single = single_run(tmp_path, "single", A_THEN_Z, keyword=False)
    assert _positions(single) == [[("s0r0", (0, 1, 2))], [("s0r0", (3,))], [("s0r0", (4,))], [("s0r0", (5,))]]
    packed = packed_run(tmp_path, "packed", [[("a", 0, [3, 4, 5])], [("a", 3, [20])]])
    t = _compare(packed, single).token_alignment
    assert t is not None and "positions not recorded" in t.source2 and "guessed" in t.source2


def test_positions_that_are_not_consecutive_are_a_user_error(tmp_path: Path) -> None:
    # two prompts in one row (or padding without a mask): the row is not one sequence
    model = Model()
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "bad", "log_step_ids": []}):
        model(torch.tensor([[3, 4, 7]]), torch.tensor([[0, 1, 0]]))
    packed = packed_run(tmp_path, "packed", [[("a", 0, [3, 4]), ("z", 0, [7])]])
    with pytest.raises(TokenAlignmentError, match=r"step 0: the positions at .*position_ids.* are not consecutive"):
        _compare(packed, tmp_path / "bad")
    res = CliRunner().invoke(compare_cmd, ["--dir1", str(packed), "--dir2", str(tmp_path / "bad"), "--align-tokens"])
    assert res.exit_code == 2 and "not consecutive" in res.output and "Traceback" not in res.output


def test_recorded_positions_start_a_request_at_0_or_past_a_gap() -> None:
    steps = [(0, [[3, 4, 5]], None, [[0, 1, 2]]),
             (1, [[20]], None, [[3]]),  # continues
             (2, [[4, 5]], None, [[1, 2]]),  # recomputed positions of the same request: continues
             (3, [[9]], None, [[7]]),  # past the request's next position (4): a new request
             (4, [[8]], None, [[0]])]  # position 0: a new request
    got = [(r.request, r.positions) for s in batched_steps(steps) for r in s.requests]
    assert got == [("s0r0", (0, 1, 2)), ("s0r0", (3,)), ("s0r0", (1, 2)), ("s3r0", (7,)), ("s4r0", (0,))]
    # [1, S] positions are shared by every row
    shared = batched_steps([(0, [[3, 4], [5, 6]], None, [[0, 1]]), (1, [[7], [8]], None, [[0]])])
    assert [[(r.request, r.positions) for r in s.requests] for s in shared] == [
        [("s0r0", (0, 1)), ("s0r1", (0, 1))], [("s1r0", (0,)), ("s1r1", (0,))]]
