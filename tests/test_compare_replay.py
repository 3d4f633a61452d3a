"""Local error measured by replay, ``--replay`` side by side, and the oracle verdict (issue 14, compare side).

Replay runs are written the way a capture with ``replay_from`` writes them (``fake_replay``): every
call fed the reference's inputs reproduces the reference's outputs exactly, except the calls a
test makes compute differently.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import ilstore
from compare_helpers import BACKENDS, PERTURBED, Passthrough, fake_replay, llama_run, module_run, need_backend
from ilstore.convert import convert
from ilstore_compare import compare
from ilstore_compare.cli import compare_cmd
from ilstore_compare.metrics import compare_many, compare_tensors
from ilstore_compare.report_json import report_dict, validate_report
from ilstore_compare.report_md import render_markdown

UP = "model.layers.0.mlp.up_proj"
ACT = "model.layers.0.mlp.act_fn"


def invoke(*args: str | Path) -> object:
    return CliRunner().invoke(compare_cmd, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("replay")
    ref = llama_run(out, "ref")
    return {
        "ref": ref,
        "cand": llama_run(out, "cand", perturb=PERTURBED),
        "rep": fake_replay(ref, out, "rep", scale={PERTURBED: 1 + 1e-3}),
        "same": fake_replay(ref, out, "same"),
        "gaps": fake_replay(ref, out, "gaps", unreplayed={UP: "shape differs: live [1, 13, 64], reference [1, 12, 64]"},
                            random=frozenset({ACT})),
    }


# -- local error of a replay against its reference ------------------------------------------------
def test_local_errors_rank_the_perturbed_call_first_and_every_other_call_is_exactly_zero(runs: dict[str, Path]) -> None:
    result = compare(runs["rep"], runs["ref"])
    local = result.local
    assert local is not None and local.source == "dir1" and local.replayed_from["run_id"] == "ref"
    top, rest = local.errors[:2], local.errors[2:]
    assert [(e.call.step, e.call.module) for e in top] == [(0, PERTURBED), (1, PERTURBED)]
    assert all(math.isclose(e.rel_l2 or 0, 1e-3, rel_tol=1e-3) and e.exceeds for e in top)
    assert rest and all(e.compared and e.rel_l2 == 0.0 and e.max_abs_diff == 0.0 and e.mismatched == 0 for e in rest)
    assert all(e.max_ulp == 0 for e in rest) and top[0].max_ulp is not None and top[0].max_ulp > 0
    # the first divergence is the measured one
    first = result.first_divergence
    assert first is not None and (first.basis, first.module, first.step) == ("measured", PERTURBED, 0)
    assert result.threshold_divergence is not None and result.threshold_divergence.basis == "threshold"
    assert result.exit_code == 1
    data = report_dict(result)
    assert validate_report(data) == []
    items = data["local_errors"]
    assert [i["rel_l2"] for i in items] == sorted((i["rel_l2"] for i in items), reverse=True)
    assert set(items[0]) >= {"rank", "step", "module", "call", "rel_l2", "max_abs_diff", "max_ulp", "replayed",
                             "reason", "container"}
    containers = {i["module"] for i in items if i["container"]}
    assert "model.layers.1.mlp" in containers and PERTURBED not in containers


def test_identical_replay_matches_with_exit_0(runs: dict[str, Path]) -> None:
    result = compare(runs["same"], runs["ref"])
    assert result.local is not None and result.local.errors
    assert all(e.rel_l2 == 0.0 and e.compared for e in result.local.errors)
    assert result.first_divergence is None and result.exit_code == 0 and result.verdict == "match"


def test_unreplayed_call_is_listed_with_its_reason_and_fails_closed(runs: dict[str, Path], tmp_path: Path) -> None:
    result = compare(runs["gaps"], runs["ref"])
    assert result.summary.mismatched == 0  # every value matches: only the replay records tell
    assert result.verdict == "incomplete" and result.exit_code == 1
    local = result.local
    assert local is not None
    missing = {(e.call.step, e.call.module): e for e in local.not_compared}
    assert set(missing) == {(0, UP), (1, UP)}
    assert all(not e.replayed and e.rel_l2 is None and "shape differs" in (e.reason or "") for e in missing.values())
    assert set(local.errors[-2:]) == set(missing.values())  # after every measured call
    randoms = [e for e in local.errors if e.call.module == ACT]
    assert randoms and all(e.compared and e.random and "random" in (e.reason or "") for e in randoms)
    md = render_markdown(result)
    assert "### Calls not replayed or not measured" in md and "shape differs: live [1, 13, 64]" in md
    assert "could not be replayed or measured" in md.split("\n", 3)[2]
    out = tmp_path / "r.json"
    res = invoke("--dir1", runs["gaps"], "--dir2", runs["ref"], "--output", out)
    assert res.exit_code == 1
    data = json.loads(out.read_text())
    assert validate_report(data) == [] and data["replay"]["not_compared"] == 2
    tail = data["local_errors"][-2:]
    assert all(i["rel_l2"] is None and i["replayed"] is False and i["compared"] is False for i in tail)


def test_plain_comparison_has_no_local_errors(runs: dict[str, Path]) -> None:
    result = compare(runs["cand"], runs["ref"])
    assert result.local is None and result.oracle is None and result.first_divergence is not None
    data = report_dict(result)
    assert "local_errors" not in data and "oracle" not in data and validate_report(data) == []
    assert data["first_divergence"]["basis"] == "threshold"


def test_replay_of_another_run_gives_no_local_error(runs: dict[str, Path]) -> None:
    result = compare(runs["rep"], runs["cand"])
    assert result.local is None
    assert any("dir1 is a replay of run ref" in n for n in result.notes)


def test_local_error_of_several_outputs_is_that_of_their_concatenation() -> None:
    torch.manual_seed(0)
    a = [torch.randn(3, 5), torch.randn(7)]
    b = [x + 1e-3 * torch.randn_like(x) for x in a]
    many = compare_many(zip(a, b, strict=True), rtol=1e-5, atol=1e-8)
    one = compare_tensors(torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b]), rtol=1e-5,
                          atol=1e-8)
    assert (many.rel_l2, many.max_abs_diff, many.max_ulp, many.mismatched) == (
        one.rel_l2, one.max_abs_diff, one.max_ulp, one.mismatched)


@pytest.mark.parametrize("backend", BACKENDS)
def test_local_errors_are_the_same_whatever_the_backends(runs: dict[str, Path], tmp_path: Path,
                                                         backend: str) -> None:
    need_backend(backend)
    ref = tmp_path / "ref_conv"
    convert(runs["ref"], ref, to=backend)  # keeps the run id (config) under another directory name
    rep = fake_replay(ref, tmp_path, "rep", backend=backend, scale={PERTURBED: 1 + 1e-3},
                      unreplayed={UP: "call not in the reference"})
    expected = report_dict(compare(runs["rep"], runs["ref"]))["local_errors"]
    got = report_dict(compare(rep, ref))["local_errors"]
    strip = {UP: "call not in the reference"}
    assert [i for i in got if i["module"] not in strip] == [i for i in expected if i["module"] not in strip]
    assert [(i["module"], i["reason"]) for i in got if i["module"] in strip] == [(UP, strip[UP])] * 2


# -- --replay: propagated and local error side by side --------------------------------------------
CHAIN_INPUT = 1.0 + 0.01 * torch.arange(8, dtype=torch.float32)


class Shift(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - 0.99


class Chain(nn.Module):
    """``a`` then ``b`` (cancellation: amplifies a relative error ~100x) then ``c``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = Passthrough(), Shift(), Passthrough()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))


def _chain_run(out: Path, run_id: str, perturb: dict[str, float]) -> Path:
    model = Chain()
    for name, factor in perturb.items():  # registered before capture's hooks: capture sees the perturbed output
        model.get_submodule(name).register_forward_hook(lambda m, a, out, f=factor: out * f)
    return module_run(out, run_id, model, CHAIN_INPUT)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``a`` errs by 4e-6 (below rtol 1e-5) and ``b`` amplifies it past the tolerance; ``c`` errs by 1e-3."""
    out = tmp_path_factory.mktemp("chain")
    errors = {"a": 1 + 4e-6, "c": 1 + 1e-3}
    ref = _chain_run(out, "ref", {})
    return {"ref": ref, "cand": _chain_run(out, "cand", errors), "rep": fake_replay(ref, out, "rep", scale=errors)}


def test_replay_option_puts_local_beside_propagated_error_and_measures_the_first_divergence(
        chain: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = invoke("--dir1", chain["cand"], "--dir2", chain["ref"], "--replay", chain["rep"], "--output", out)
    assert res.exit_code == 1, res.output
    data = json.loads(out.read_text())
    assert validate_report(data) == [] and data["replay"]["source"] == "replay"
    # the tolerance alone blames b, whose inputs match within it: the cancellation there pushes
    # a's error past the tolerance; replay measures b exact and c, where the error is introduced
    assert data["threshold_divergence"]["module"] == "b" and data["threshold_divergence"]["origin"] == "introduced"
    assert (data["first_divergence"]["module"], data["first_divergence"]["basis"]) == ("c", "measured")
    assert [i["module"] for i in data["local_errors"]] == ["c", "a", "b"]
    calls = {c["module"]: c for c in data["calls"]}
    assert calls["b"]["output_rel_l2"] > 1e-5 > calls["a"]["output_rel_l2"] and calls["b"]["local_rel_l2"] == 0.0
    assert math.isclose(calls["c"]["local_rel_l2"], 1e-3, rel_tol=1e-3) and calls["a"]["replayed"] is True
    md = invoke("--dir1", chain["cand"], "--dir2", chain["ref"], "--replay", chain["rep"]).stdout
    section = md.split("## First divergence", 1)[1]
    assert section.lstrip().startswith("step 0, c — measured by replay")
    assert "the tolerance alone would point at: step 0, b — introduced" in section
    assert "## Local error (where error is introduced, measured)" in md
    step = md.split("## Step 0", 1)[1]
    header = next(line for line in step.split("\n") if line.startswith("| module call"))
    assert "out rel L2" in header and "local rel L2" in header and "replay" in header
    html = invoke("--dir1", chain["cand"], "--dir2", chain["ref"], "--replay", chain["rep"], "--format", "html")
    assert html.exit_code == 1 and "Local error (where error is introduced, measured)" in html.stdout


def test_replay_option_with_a_replay_of_another_reference_is_exit_2(chain: dict[str, Path],
                                                                    runs: dict[str, Path]) -> None:
    res = invoke("--dir1", chain["cand"], "--dir2", chain["cand"], "--replay", chain["rep"])
    assert res.exit_code == 2 and res.stdout == ""
    assert "--replay:" in res.stderr and str(chain["rep"]) in res.stderr and "run ref" in res.stderr
    assert f"--dir2 {chain['cand']} is run cand" in res.stderr
    not_replay = invoke("--dir1", chain["cand"], "--dir2", chain["ref"], "--replay", chain["cand"])
    assert not_replay.exit_code == 2 and "not a replay run" in not_replay.stderr
    missing = invoke("--dir1", chain["cand"], "--dir2", chain["ref"], "--replay", chain["ref"].parent / "nope")
    assert missing.exit_code == 2 and "--replay:" in missing.stderr and "no such run directory" in missing.stderr


def test_replay_option_fails_closed_on_calls_not_replayed(chain: dict[str, Path], tmp_path: Path) -> None:
    stats = "the reference kept only statistics (mode=stats)"
    rep = fake_replay(chain["ref"], tmp_path, "gaps", unreplayed={"b": stats})
    result = compare(chain["ref"], chain["ref"], replay=rep)
    assert result.summary.mismatched == 0 and result.exit_code == 1 and result.verdict == "incomplete"
    assert result.local is not None
    assert [(e.call.module, e.reason) for e in result.local.not_compared] == [("b", stats)]
    # a call compared between dir1 and dir2 that the replay run did not capture at all
    part = module_run(tmp_path, "part", Chain(), CHAIN_INPUT, module_call_match=["^a$", "^b$"])
    partial = fake_replay(part, tmp_path, "partial", source={"path": str(chain["ref"]), "run_id": "ref"})
    lacking = compare(chain["ref"], chain["ref"], replay=partial)
    assert lacking.exit_code == 1 and lacking.verdict == "incomplete" and lacking.local is not None
    assert [(e.call.module, e.replayed, e.reason) for e in lacking.local.not_compared] == [
        ("c", False, "not in the replay run (it did not capture this call)")]


# -- the oracle verdict ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory, runs: dict[str, Path]) -> dict[str, Path]:
    """Replays of a candidate and a reference from one oracle: both err by 1e-4 in every call; the
    candidate's PERTURBED by 1e-3."""
    out = tmp_path_factory.mktemp("oracle")
    oracle_run = runs["ref"]
    with ilstore.open_run(oracle_run) as r:
        modules = {c.module for s in r.steps() for c in r.calls(s)}
    noise = {m: 1 + 1e-4 for m in modules}
    return {"oracle": oracle_run, "ref": fake_replay(oracle_run, out, "ref_rep", scale=noise),
            "cand": fake_replay(oracle_run, out, "cand_rep", scale={**noise, PERTURBED: 1 + 1e-3}),
            "good": fake_replay(oracle_run, out, "good_rep", scale={m: 1 + 1.5e-4 for m in modules}),
            "gaps": fake_replay(oracle_run, out, "gaps_rep", scale=noise, unreplayed={UP: "call not in the reference"}),
            "other": fake_replay(runs["cand"], out, "other_rep")}


def test_oracle_flags_only_the_perturbed_call(oracle: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.json"
    res = invoke("--dir1", oracle["cand"], "--dir2", oracle["ref"], "--oracle", oracle["oracle"], "--output", out)
    assert res.exit_code == 1, res.output
    data = json.loads(out.read_text())
    assert validate_report(data) == []
    o = data["oracle"]
    assert o["factor"] == 2.0 and o["run_id"] == "ref" and o["verdict"] == "mismatch"
    assert {(f["step"], f["module"]) for f in o["flagged"]} == {(0, PERTURBED), (1, PERTURBED)}
    assert all(c["evaluated"] for c in o["calls"]) and o["not_evaluated"] == 0
    flagged = [c for c in o["calls"] if c["flagged"]]
    assert all(c["module"] == PERTURBED and c["ratio"] > 2 for c in flagged)
    assert all(c["ratio"] is not None and c["ratio"] < 1.01 for c in o["calls"] if not c["flagged"])
    md = invoke("--dir1", oracle["cand"], "--dir2", oracle["ref"], "--oracle", oracle["oracle"]).stdout
    assert "## Oracle verdict" in md and "### Flagged calls" in md and "FLAGGED" in md
    assert md.split("\n")[2].startswith("**ORACLE: 2 call(s) flagged")


def test_oracle_decides_the_exit_status(oracle: dict[str, Path]) -> None:
    # 1.5x the reference's error everywhere: within K=2, so exit 0 though dir1 and dir2 differ
    good = compare(oracle["good"], oracle["ref"], oracle=oracle["oracle"])
    assert good.summary.mismatched > 0 and good.oracle is not None and not good.oracle.flagged
    assert good.exit_code == 0 and good.verdict == "match"
    strict = compare(oracle["good"], oracle["ref"], oracle=oracle["oracle"], oracle_factor=1.2)
    assert strict.exit_code == 1 and strict.oracle is not None and strict.oracle.flagged
    gaps = compare(oracle["gaps"], oracle["ref"], oracle=oracle["oracle"])
    assert gaps.oracle is not None and gaps.exit_code == 1 and gaps.verdict == "incomplete"
    assert {c.call.module for c in gaps.oracle.not_evaluated} == {UP}
    assert all("candidate: call not in the oracle" in (c.reason or "") for c in gaps.oracle.not_evaluated)


def test_oracle_with_a_replay_of_another_run_is_exit_2(oracle: dict[str, Path]) -> None:
    res = invoke("--dir1", oracle["cand"], "--dir2", oracle["other"], "--oracle", oracle["oracle"])
    assert res.exit_code == 2
    assert "--oracle:" in res.stderr and str(oracle["other"]) in res.stderr and "run cand" in res.stderr
    assert "is run ref" in res.stderr


@pytest.mark.parametrize("args, message", [
    (["--oracle-factor", "3"], "--oracle-factor: needs an oracle run"),
    (["--oracle", "X", "--oracle-factor", "0"], "--oracle-factor: must be a finite number > 0"),
    (["--oracle", "X", "--replay", "Y"], "--oracle: cannot be combined with replay"),
])
def test_bad_replay_options_are_exit_2(runs: dict[str, Path], args: list[str], message: str) -> None:
    res = invoke("--dir1", runs["rep"], "--dir2", runs["ref"], *args)
    assert res.exit_code == 2 and message in res.stderr


def test_a_replay_of_a_same_named_run_elsewhere_is_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two references with one run id in two output_dirs (a reviewer's runs/fp32 and runs2/fp32):
    a replay of the first compared with the second measured its "local errors" against inputs
    the second never saw. The replay's absolute path decides while it is there; once the runs are
    moved, the run id does (nothing else is left to tell them apart)."""
    ref = _chain_run(tmp_path / "runs", "ref", {})
    other = _chain_run(tmp_path / "runs2", "ref", {"a": 1.5})
    cand = _chain_run(tmp_path / "runs", "cand", {"c": 1 + 1e-3})
    rep = fake_replay(ref, tmp_path / "runs", "rep", scale={"c": 1 + 1e-3})
    res = invoke("--dir1", cand, "--dir2", other, "--replay", rep)
    assert res.exit_code == 2 and res.stdout == "", res.output
    assert f"was replayed from run ref ({ref})" in res.stderr and f"--dir2 {other} is run ref" in res.stderr
    assert invoke("--dir1", cand, "--dir2", ref, "--replay", rep).exit_code == 1
    monkeypatch.chdir(tmp_path)  # a relative path (an older replay's record): the run id decides
    relative = fake_replay(ref, tmp_path / "runs", "rep_rel", source={"path": "runs/ref", "run_id": "ref"})
    assert invoke("--dir1", cand, "--dir2", other, "--replay", relative).exit_code == 1
    moved = tmp_path / "moved"
    moved.mkdir()
    ref.rename(moved / "ref")
    assert invoke("--dir1", cand, "--dir2", moved / "ref", "--replay", rep).exit_code == 1


# -- end to end: a real capture with replay_from ----------------------------------------------------
def test_end_to_end_with_a_replay_from_capture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = llama_run(tmp_path, "ref", log_step_ids=[0])  # the replay logs a step the reference lacks
    monkeypatch.chdir(tmp_path)
    rep = llama_run(tmp_path, "rep", perturb=PERTURBED, replay_from="ref")
    result = compare(rep, ref)
    local = result.local
    assert local is not None and local.source == "dir1" and local.replayed_from["run_id"] == "ref"
    assert local.replayed_from["path"] == str(ref.absolute())  # absolute, whatever replay_from said
    assert (local.errors[0].call.step, local.errors[0].call.module) == (0, PERTURBED)
    step0 = [e for e in local.errors if e.call.step == 0]
    assert all(e.replayed and e.compared for e in step0)
    # only the perturbed leaf and the containers its output flows into carry an error; every other call is exact
    assert {e.call.module for e in step0 if e.rel_l2} == {PERTURBED, "model.layers.1.mlp", "model.layers.1"}
    assert all(e.container for e in step0 if e.rel_l2 and e.call.module != PERTURBED)
    step1 = [e for e in local.errors if e.call.step == 1]
    assert step1 and all(not e.compared and "stepping mismatch" in (e.reason or "") for e in step1)
    assert result.exit_code == 1 and result.first_divergence is not None
    assert (result.first_divergence.module, result.first_divergence.basis) == (PERTURBED, "measured")
    assert validate_report(report_dict(result)) == []
