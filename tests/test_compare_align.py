"""Aligning runs of different layouts: size-1 squeezing, the map's path rules and unaligned
declarations, map validation, and the first-divergence table (no vLLM needed)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from compare_helpers import ENGINE_MAP, Toy, by_status, engine_runs, module_run
from ilstore_compare import NameMap, NameMapError, compare
from ilstore_compare.cli import compare_cmd
from ilstore_compare.report_json import report_dict, validate_report
from ilstore_compare.report_md import render_markdown

ROOT = Path(__file__).resolve().parent.parent
LLAMA_MAP = ROOT / "ilstore_compare" / "maps" / "llama_vllm_to_hf.json"


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return engine_runs(tmp_path_factory.mktemp("engines"))


def _entries(result: Any) -> dict[tuple[str, str], Any]:
    return {(t.key.module, "/".join([t.key.kind, *t.key.path])): t for t in result.tensors}


def _invoke(*args: str | Path) -> Any:
    return CliRunner().invoke(compare_cmd, [str(a) for a in args], catch_exceptions=False)


def _with(**changes: Any) -> dict[str, Any]:
    m = copy.deepcopy(ENGINE_MAP)
    m.update(changes)
    return m


# -- squeezing ----------------------------------------------------------------------------------
def test_size1_shapes_are_a_shape_mismatch_by_default_with_a_hint(engines: tuple[Path, Path]) -> None:
    result = compare(*engines)
    e = _entries(result)
    emb = e[("embed", "outputs")]
    assert emb.status == "shape_mismatch" and not emb.squeezed and (emb.shape1, emb.shape2) == ((5, 4), (1, 5, 4))
    assert emb.note is not None and "--squeeze-shapes" in emb.note
    real = e[("act", "inputs/0")]  # [5, 8] vs [1, 5, 4]: a real difference, no hint
    assert real.status == "shape_mismatch" and real.note is None
    assert result.summary.squeezed == 0 and not result.options.squeeze_shapes


def test_squeeze_shapes_compares_the_values_and_flags_the_entry(engines: tuple[Path, Path]) -> None:
    result = compare(*engines, squeeze_shapes=True)
    e = _entries(result)
    for key in [("embed", "inputs/0"), ("embed", "outputs"), ("block", "inputs/0"), ("head", "inputs/0")]:
        assert e[key].status == "match" and e[key].squeezed and e[key].metrics is not None, key
    assert e[("embed", "outputs")].metrics.max_abs_diff == 0  # a lookup: bit-identical
    assert e[("act", "inputs/0")].status == "shape_mismatch" and not e[("act", "inputs/0")].squeezed
    assert e[("head", "outputs")].status == "shape_mismatch"  # [1, 6] vs [1, 5, 6]: not a size-1 difference
    assert result.summary.squeezed == sum(t.squeezed for t in result.tensors) >= 4
    data = report_dict(result)
    assert validate_report(data) == [] and data["options"]["squeeze_shapes"] is True
    assert any(t["squeezed"] for t in data["tensors"]) and data["summary"]["squeezed"] == result.summary.squeezed
    assert "[5, 4] vs [1, 5, 4] (squeezed)" in render_markdown(result, verbose=True)


def test_squeezed_mismatch_is_reported_in_the_reference_shape(tmp_path: Path) -> None:
    run1 = module_run(tmp_path, "one", Toy(), torch.tensor([1]), torch.tensor([[1.0], [2.0], [3.0]]), torch.ones(2))
    run2 = module_run(tmp_path, "two", Toy(), torch.tensor([1]), torch.tensor([[1.0, 2.0, 3.5]]), torch.ones(2))
    assert _entries(compare(run1, run2))[("shaped", "outputs")].status == "shape_mismatch"
    result = compare(run1, run2, squeeze_shapes=True)
    shaped = _entries(result)[("shaped", "outputs")]  # [3, 1] vs [1, 3]: same elements, same order
    assert shaped.status == "mismatch" and shaped.squeezed and shaped.metrics is not None
    assert shaped.metrics.max_abs_diff == 0.5 and shaped.metrics.max_abs_diff_index == (0, 2)
    assert result.first_divergence is not None and result.first_divergence.module == "shaped"


def test_the_map_turns_squeezing_on_and_the_option_overrides_it(engines: tuple[Path, Path]) -> None:
    on = compare(*engines, name_map=ENGINE_MAP)
    assert on.options.squeeze_shapes and on.summary.squeezed > 0
    off = compare(*engines, name_map=ENGINE_MAP, squeeze_shapes=False)
    assert not off.options.squeeze_shapes and off.summary.squeezed == 0
    assert _entries(off)[("embed", "outputs")].status == "shape_mismatch"


# -- path rules and unaligned declarations ------------------------------------------------------
def test_map_aligns_every_tensor_or_declares_it(engines: tuple[Path, Path]) -> None:
    result = compare(*engines, name_map=ENGINE_MAP)
    e = _entries(result)
    s = result.summary
    assert (s.only_in_dir1, s.only_in_dir2, s.not_compared, s.mismatched) == (0, 0, 0, 0)
    assert {k for k, t in e.items() if t.status == "unaligned"} == {
        ("fused", "inputs/0"), ("fused", "outputs"), ("a", "inputs/0"), ("a", "outputs"), ("b", "inputs/0"),
        ("b", "outputs"), ("act", "inputs/0"), ("act", "outputs")}
    assert s.unaligned == 8 and s.calls_unaligned == 4 and (s.calls_only_in_dir1, s.calls_only_in_dir2) == (0, 0)
    assert {t.presence for t in by_status(result, "unaligned") if t.key.module == "act"} == {"both"}
    assert e[("fused", "outputs")].presence == "dir1" and e[("a", "outputs")].presence == "dir2"
    assert e[("act", "outputs")].note == "unaligned[2]: same name, different function"
    # the residual block: vLLM's (delta, residual) summed, compared with HF's single output
    block = e[("block", "outputs")]
    assert block.status == "match" and block.alignment == ("dir1 outputs[0] + outputs[1] as outputs (path_rules[0])",)
    assert ("block", "outputs/0") not in e and ("block", "outputs/1") not in e
    assert e[("proj", "outputs")].alignment == ("dir1 outputs[0] as outputs (path_rules[1])",)
    head = e[("head", "outputs")]  # HF's logits at the last position only
    assert head.status == "match" and (head.shape1, head.shape2) == ((1, 6), (1, 6))
    assert head.alignment == ("dir2 outputs at index -1 of dim -2 (path_rules[2])",)
    # declared, but not compared: the exit status fails closed unless the caller accepts them
    assert result.verdict == "incomplete" and result.exit_code == 1
    accepted = compare(*engines, name_map=ENGINE_MAP, allow_unaligned=True)
    assert accepted.verdict == "match" and accepted.exit_code == 0 and accepted.summary.unaligned == 8
    calls = {c.call.module: c for c in accepted.calls}
    assert calls["fused"].verdict == "unaligned" and calls["fused"].presence == "dir1"
    assert calls["act"].verdict == "unaligned" and calls["act"].unaligned_tensors == 2
    assert calls["embed"].verdict == "match" and calls["embed"].unaligned_tensors == 0


def test_undeclared_tensors_stay_one_sided(engines: tuple[Path, Path]) -> None:
    result = compare(*engines, name_map=_with(unaligned=[]), allow_unaligned=True)
    assert {t.key.module for t in by_status(result, "only_in_dir1")} == {"fused"}
    assert {t.key.module for t in by_status(result, "only_in_dir2")} == {"a", "b"}
    assert result.summary.calls_only_in_dir1 == 1 and result.summary.calls_only_in_dir2 == 2
    assert _entries(result)[("act", "outputs")].status == "mismatch"  # silu(gate) * up vs silu(gate)
    assert result.exit_code == 1 and result.verdict == "mismatch"
    # a declaration for the other side does not cover a one-sided tensor
    wrong_side = _with(unaligned=[{"module": "^fused$", "side": "dir2", "reason": "x"}])
    assert {t.key.module for t in by_status(compare(*engines, name_map=wrong_side), "only_in_dir1")} == {"fused"}


def test_first_matching_rule_takes_a_tensor(engines: tuple[Path, Path]) -> None:
    # the sum needs both outputs; with the move first, the move takes outputs[0] and the sum never applies
    move = {"module": "^block$", "path": "outputs/0", "to": "outputs"}
    move_first = _with(path_rules=[move, *ENGINE_MAP["path_rules"]])
    e = _entries(compare(*engines, name_map=move_first))
    assert e[("block", "outputs")].status == "mismatch"  # delta alone is not delta + residual
    assert e[("block", "outputs")].alignment == ("dir1 outputs[0] as outputs (path_rules[0])",)
    assert e[("block", "outputs/1")].status == "only_in_dir1"
    sum_first = _with(path_rules=[*ENGINE_MAP["path_rules"], move])
    assert _entries(compare(*engines, name_map=sum_first))[("block", "outputs")].status == "match"


def test_path_rule_collision_is_an_error(engines: tuple[Path, Path]) -> None:
    clash = _with(path_rules=[{"module": "^block$", "path": "outputs/1", "to": "outputs/0"}])
    with pytest.raises(NameMapError) as err:
        compare(*engines, name_map=clash)
    message = str(err.value)
    assert "dir1 step 0 block" in message and "path_rules[0]" in message and "outputs[0]" in message


def test_sum_and_select_need_the_bodies(tmp_path: Path) -> None:
    stats, full = engine_runs(tmp_path / "stats", mode="stats")[0], engine_runs(tmp_path / "full")[1]
    result = compare(stats, full, name_map=ENGINE_MAP, allow_stats_only=True, allow_unaligned=True)
    e = _entries(result)
    block = e[("block", "outputs")]
    assert block.status == "not_compared" and block.note is not None and "a sum rule needs every body" in block.note
    head = e[("head", "outputs")]  # dir1's statistics against those of dir2's selected slice
    assert head.status == "stats_only_match"
    assert result.exit_code == 1 and result.summary.not_compared == 1


def test_select_out_of_range_is_not_compared(engines: tuple[Path, Path]) -> None:
    bad = _with(path_rules=[*ENGINE_MAP["path_rules"][:2], {"module": "^head$", "side": "dir2", "path": "outputs",
                                                            "select": {"dim": 5, "index": 0}}])
    head = _entries(compare(*engines, name_map=bad))[("head", "outputs")]
    assert head.status == "not_compared" and head.note is not None and "dim 5 is out of range" in head.note


def test_reports_show_the_declarations(engines: tuple[Path, Path], tmp_path: Path) -> None:
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(ENGINE_MAP))
    res = _invoke("--dir1", engines[0], "--dir2", engines[1], "--map", map_file)
    assert res.exit_code == 1 and "INCOMPLETE" in res.stdout and "--allow-unaligned accepts them" in res.stdout
    section = res.stdout.split("## Declared unaligned by the map", 1)[1].split("\n## ", 1)[0]
    assert "unaligned[0]" in section and "dir1 only" in section and "a and b in one projection" in section
    assert "unaligned[2]" in section and "| both " in section
    assert "unaligned, only in dir1" in res.stdout  # the fused call in the step table
    ok = _invoke("--dir1", engines[0], "--dir2", engines[1], "--map", map_file, "--allow-unaligned", "-o",
                 tmp_path / "r.json")
    assert ok.exit_code == 0 and "8 declared unaligned" in ok.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert validate_report(data) == [] and data["options"]["allow_unaligned"] is True
    assert data["summary"]["unaligned"] == 8 and data["summary"]["calls_unaligned"] == 4
    fused = [t for t in data["tensors"] if t["module"] == "fused"]
    assert fused and all(t["status"] == "unaligned" and t["presence"] == "dir1" for t in fused)
    assert _invoke("--dir1", engines[0], "--dir2", engines[1], "--map", map_file, "--no-squeeze-shapes",
                   "--allow-unaligned").exit_code == 1
    html = _invoke("--dir1", engines[0], "--dir2", engines[1], "--map", map_file, "--format", "html").stdout
    assert "<h2>Declared unaligned by the map</h2>" in html


def test_squeeze_shapes_flag(engines: tuple[Path, Path]) -> None:
    plain = _invoke("--dir1", engines[0], "--dir2", engines[1], "--modules", "^embed$")
    assert plain.exit_code == 1 and "shape_mismatch" in plain.stdout
    squeezed = _invoke("--dir1", engines[0], "--dir2", engines[1], "--modules", "^embed$", "--squeeze-shapes")
    assert squeezed.exit_code == 0, squeezed.stdout


# -- the first-divergence table -------------------------------------------------------------------
def test_first_divergence_table_lists_each_tensor_of_the_call_once(engines: tuple[Path, Path]) -> None:
    # regression: the vLLM-vs-HF report listed model.embed_tokens inputs[0] twice
    result = compare(*engines)  # no map: the embedding call differs in shape on both sides
    assert result.first_divergence is not None and result.first_divergence.module == "embed"
    section = render_markdown(result).split("## First divergence", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.split("|")[1:4]] for line in section.splitlines() if line.startswith("| embed ")]
    assert rows == [["embed", "inputs[0]", "shape_mismatch"], ["embed", "outputs", "shape_mismatch"]]


# -- the map file ---------------------------------------------------------------------------------
def test_map_round_trips_and_old_maps_still_load() -> None:
    m = NameMap.from_dict(ENGINE_MAP)
    assert NameMap.from_dict(m.to_dict()).to_dict() == m.to_dict()
    assert m.squeeze_shapes and [r.side for r in m.path_rules] == ["dir1", "dir1", "dir2"]
    old = NameMap.from_dict({"rules": [["^a$", "b"]], "apply_to": "dir1", "comment": "x"})
    assert old.rename("a") == "b" and old.path_rules == () and old.unaligned == () and not old.squeeze_shapes
    assert NameMap.from_dict({"path_rules": [{"module": "x", "path": "outputs[0]", "to": "outputs"}]}).rules == ()
    shipped = NameMap.load(LLAMA_MAP)
    assert shipped.apply_to == "dir1" and shipped.squeeze_shapes and shipped.path_rules and shipped.unaligned


@pytest.mark.parametrize("data,message", [
    ({}, "the map says nothing"),
    ({"path_rule": []}, "did you mean 'path_rules'"),
    ({"path_rules": {}}, "\"path_rules\" must be a list"),
    ({"path_rules": ["x"]}, "path_rules[0]: expected an object"),
    ({"path_rules": [{"path": "outputs/0", "to": "outputs"}]}, "path_rules[0]: \"module\" must be a non-empty regex"),
    ({"path_rules": [{"module": "(", "path": "outputs/0", "to": "outputs"}]}, "path_rules[0]: bad regex"),
    ({"path_rules": [{"module": "x", "pth": "outputs/0"}]}, "path_rules[0]: unknown key 'pth'; did you mean 'path'"),
    ({"path_rules": [{"module": "x", "to": "outputs"}]}, "either \"path\""),
    ({"path_rules": [{"module": "x", "path": "outputs", "sum": ["inputs/0", "inputs/1"], "to": "x"}]}, "not both"),
    ({"path_rules": [{"module": "x", "path": "output/0", "to": "outputs"}]}, "did you mean 'outputs'"),
    ({"path_rules": [{"module": "x", "path": "outputs/0", "to": ""}]}, "path_rules[0]: to: expected a tensor path"),
    ({"path_rules": [{"module": "x", "path": "outputs/0"}]}, "changes nothing"),
    ({"path_rules": [{"module": "x", "path": "outputs/0", "to": "outputs/0"}]}, "changes nothing"),
    ({"path_rules": [{"module": "x", "sum": ["inputs/0"], "to": "inputs/0"}]}, "at least two"),
    ({"path_rules": [{"module": "x", "sum": ["inputs/0", "inputs/0"], "to": "inputs/0"}]}, "lists a tensor twice"),
    ({"path_rules": [{"module": "x", "sum": ["inputs/0", "inputs/1"]}]}, "needs \"to\""),
    ({"path_rules": [{"module": "x", "sum": ["inputs/0", "inputs/1"], "to": "inputs/0",
                      "select": {"dim": 0, "index": 0}}]}, "not to a \"sum\""),
    ({"path_rules": [{"module": "x", "path": "outputs", "select": {"dim": -2}}]}, "select must be"),
    ({"path_rules": [{"module": "x", "path": "outputs", "select": {"dim": "a", "index": 0}}]}, "select must be"),
    ({"path_rules": [{"module": "x", "path": "outputs/0", "to": "outputs", "side": "dir3"}]}, "side must be"),
    ({"unaligned": [{"module": "x"}]}, "unaligned[0]: \"reason\" is required"),
    ({"unaligned": [{"reason": "y"}]}, "unaligned[0]: give \"module\""),
    ({"unaligned": [{"module": "x", "reason": "y", "side": "left"}]}, "unaligned[0]: side must be one of"),
    ({"unaligned": [{"module": "x", "tensor": "[", "reason": "y"}]}, "unaligned[0]: bad regex"),
    ({"unaligned": [{"module": "x", "reasn": "y"}]}, "did you mean 'reason'"),
    ({"rules": [], "squeeze_shapes": "yes"}, "squeeze_shapes must be true or false"),
])
def test_bad_maps_are_rejected_naming_the_entry(data: dict[str, Any], message: str) -> None:
    with pytest.raises(NameMapError) as err:
        NameMap.from_dict(data, "m.json")
    assert str(err.value).startswith("m.json: ") and message in str(err.value), str(err.value)


@pytest.mark.parametrize("content,message", [
    ('{"path_rules": [{"module": "x", "path": "outputs/0"}]}', "path_rules[0]: the rule changes nothing"),
    ('{"unaligned": [{"module": "fused"}]}', "unaligned[0]: \"reason\" is required"),
    ('{"apply_to": "dir1", "path_rules": [{"module": "^block$", "path": "outputs/1", "to": "outputs/0"}]}',
     "dir1 step 0 block: path_rules[0] and outputs[0] both land on outputs[0]"),
])
def test_bad_map_file_exits_2(engines: tuple[Path, Path], tmp_path: Path, content: str, message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    res = _invoke("--dir1", engines[0], "--dir2", engines[1], "--map", bad)
    assert res.exit_code == 2 and message in res.stderr and "Traceback" not in res.output, res.output
    if "land" not in message:  # validation errors name the file; collisions name the run and call
        assert str(bad) in res.stderr


def test_introduced_table_names_the_differing_tensors_only() -> None:
    from ilstore.keys import TensorKey
    from ilstore_compare.report_common import introduced_rows
    from ilstore_compare.result import Divergence

    keys = [TensorKey(0, "model.layers.0 mlp", 2, "outputs", ("0",), rank=1), TensorKey(0, "x", 0, "post_fwd_inputs")]
    rows = introduced_rows([Divergence(0, k.module, k.call, k.rank, "introduced", 0.1, 0.0, None, (k.display(),))
                            for k in keys])
    assert [row[-1] for row in rows] == ["outputs[0]", "post_fwd_inputs"]
    assert rows[0][1] == "rank1 model.layers.0 mlp#2"


class _Outs(torch.nn.Module):
    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return xs


class _Root(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = _Outs()

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.c(*xs)


def test_a_sum_promotes_mixed_dtypes_and_side_any_covers_a_pair(tmp_path: Path) -> None:
    # as documented: a sum adds with torch's type promotion (fp16 + fp32 in fp32, where 1 + 1e-4 is
    # not 1); side "any" declares a tensor present in both runs too, which is then not compared
    one = module_run(tmp_path, "one", _Root(), torch.ones(3, dtype=torch.float16), torch.full((3,), 1e-4))
    two = module_run(tmp_path, "two", _Root(), torch.full((3,), 1.0001))
    rule = {"module": "^c$", "sum": ["outputs/0", "outputs/1"], "to": "outputs/0"}
    summed = {"apply_to": "dir1", "path_rules": [rule]}
    out = _entries(compare(one, two, name_map=summed, rtol=0, atol=0))[("c", "outputs/0")]
    assert out.status == "match" and out.metrics is not None and out.metrics.max_abs_diff == 0
    declared = {"unaligned": [{"module": "^c$", "tensor": "outputs/0", "reason": "r"}]}
    both = _entries(compare(two, two, name_map=declared))[("c", "outputs/0")]
    assert both.status == "unaligned" and both.metrics is None and both.shape1 == both.shape2 == (3,)
