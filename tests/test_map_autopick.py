"""Picking a shipped name map from the runs' manifests, and ``--map NAME`` (no vLLM needed).

Two tiny models stand in for vLLM's and Hugging Face's Llama: their classes claim the modules and
config architectures of the real ones, so capture records the ``model`` entry the real engines
would, and the two runs differ the way the shipped Llama map knows how to align (vLLM's
``logits_processor`` is HF's ``lm_head``, seen at the last position only).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import ilstore
from ilstore_compare import NameMap, NameMapError, compare
from ilstore_compare.cli import compare_cmd
from ilstore_compare.maps import load_shipped, pick_map, resolve_map, shipped_maps
from ilstore_compare.options import CompareOptions
from ilstore_compare.report_json import validate_report

ROOT = Path(__file__).resolve().parent.parent
MAPS = ROOT / "ilstore_compare" / "maps"


class _VllmLlama(nn.Module):
    """vLLM's way: ``logits_processor`` computes the logits of the last token only."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.config = SimpleNamespace(architectures=["LlamaForCausalLM"])
        self.logits_processor = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(x[:, -1])


class _HfLlama(nn.Module):
    """Hugging Face's way: ``lm_head`` on every position."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.config = SimpleNamespace(architectures=["LlamaForCausalLM"])
        self.lm_head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)


# Capture records the class's module and name: make them the real engines'.
_VllmLlama.__module__, _VllmLlama.__qualname__ = "vllm.model_executor.models.llama", "LlamaForCausalLM"
_HfLlama.__module__, _HfLlama.__qualname__ = "transformers.models.llama.modeling_llama", "LlamaForCausalLM"


def _capture(model: nn.Module, out: Path, run_id: str) -> Path:
    torch.manual_seed(1)
    x = torch.randn(1, 3, 4)
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(out), "run_id": run_id}) as cap:
        model(x)
    return cap.run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("autopick")
    torch.manual_seed(0)
    head = nn.Linear(4, 6)
    return _capture(_VllmLlama(head), out, "vllm"), _capture(_HfLlama(head), out, "hf")


def _copy_without_model(run: Path, dest: Path) -> Path:
    """The run as ilstore wrote it before manifests recorded the model."""
    import shutil

    shutil.copytree(run, dest)
    manifest = json.loads((dest / "ilstore.json").read_text())
    del manifest["model"]
    (dest / "ilstore.json").write_text(json.dumps(manifest))
    return dest


def _invoke(*args: str | Path) -> Any:
    return CliRunner().invoke(compare_cmd, [str(a) for a in args], catch_exceptions=False)


def test_capture_records_what_the_pick_reads(runs: tuple[Path, Path]) -> None:
    vllm, hf = (json.loads((r / "ilstore.json").read_text())["model"] for r in runs)
    assert vllm == {"class": "vllm.model_executor.models.llama.LlamaForCausalLM", "architecture": "LlamaForCausalLM"}
    assert hf["class"].startswith("transformers.") and hf["architecture"] == "LlamaForCausalLM"


def test_the_shipped_map_is_picked_without_map(runs: tuple[Path, Path]) -> None:
    result = compare(*runs, rtol=1e-5, atol=1e-6)
    assert result.notes[0].startswith("using the shipped map llama_vllm_to_hf for vllm LlamaForCausalLM (dir1) "
                                      "and transformers LlamaForCausalLM (dir2)")
    assert result.options.name_map == load_shipped("llama_vllm_to_hf").to_dict()
    assert result.options.squeeze_shapes  # as the picked map says
    # the map renamed vLLM's logits_processor and took HF's last position: paired and equal
    (logits,) = [t for t in result.tensors if t.key.kind == "outputs"]
    assert logits.key.module == "lm_head" and logits.renamed_from == "logits_processor"
    assert logits.status == "match" and (logits.shape1, logits.shape2) == ((1, 6), (1, 6))
    s = result.summary
    assert (s.only_in_dir1, s.only_in_dir2, s.calls_only_in_dir1, s.calls_only_in_dir2) == (0, 0, 0, 0)
    assert result.exit_code == 0 and s.compared == s.matched == 2


def test_without_the_pick_the_runs_do_not_pair(runs: tuple[Path, Path], tmp_path: Path) -> None:
    off = compare(*runs, auto_map=False)
    assert off.options.name_map is None and off.notes == ()
    assert (off.summary.only_in_dir1, off.summary.only_in_dir2, off.exit_code) == (2, 2, 1)
    # a run captured before manifests recorded the model gets no pick
    old = _copy_without_model(runs[0], tmp_path / "old")
    legacy = compare(old, runs[1])
    assert legacy.options.name_map is None and legacy.notes == () and legacy.summary.only_in_dir1 == 2


def test_swapped_runs_get_no_map_and_a_hint(runs: tuple[Path, Path]) -> None:
    result = compare(runs[1], runs[0])
    assert result.options.name_map is None and result.exit_code == 1
    assert result.notes[0] == ("no shipped map for transformers LlamaForCausalLM (dir1) and vllm LlamaForCausalLM "
                               "(dir2): module names and layouts are compared as they are; the shipped map "
                               "llama_vllm_to_hf applies with --dir1 and --dir2 swapped")


def test_runs_of_one_engine_get_no_map_and_no_note(runs: tuple[Path, Path]) -> None:
    result = compare(runs[1], runs[1])
    assert result.options.name_map is None and result.notes == () and result.exit_code == 0


def test_an_explicit_map_wins(runs: tuple[Path, Path]) -> None:
    result = compare(*runs, name_map={"rules": [["^logits_processor$", "head"]]})
    assert result.options.name_map == {"apply_to": "dir2", "rules": [["^logits_processor$", "head"]]}
    assert not any("shipped map" in n for n in result.notes) and result.exit_code == 1


def test_cli_picks_the_map_and_says_so(runs: tuple[Path, Path]) -> None:
    res = _invoke("--dir1", runs[0], "--dir2", runs[1], "--rtol", "1e-5", "--atol", "1e-6", "--format", "json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    validate_report(data)
    assert data["options"]["name_map"]["architectures"] == ["LlamaForCausalLM"]
    assert any(n.startswith("using the shipped map llama_vllm_to_hf") for n in data["notes"])
    md = _invoke("--dir1", runs[0], "--dir2", runs[1], "--rtol", "1e-5", "--atol", "1e-6")
    assert md.exit_code == 0 and "using the shipped map llama_vllm_to_hf" in md.stdout
    off = _invoke("--dir1", runs[0], "--dir2", runs[1], "--no-auto-map", "--format", "json")
    assert off.exit_code == 1 and json.loads(off.stdout)["options"]["name_map"] is None


@pytest.mark.parametrize("name", ["llama_vllm_to_hf", "llama_vllm_to_hf.json"])
def test_map_by_name(runs: tuple[Path, Path], name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no file of that name here: the shipped map
    old = _copy_without_model(runs[0], tmp_path / "old")  # no pick: the name does the work
    res = _invoke("--dir1", old, "--dir2", runs[1], "--map", name, "--rtol", "1e-5", "--atol", "1e-6",
                  "--format", "json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["options"]["name_map"] == load_shipped("llama_vllm_to_hf").to_dict()
    assert not any("shipped map" in n for n in data["notes"])
    assert compare(old, runs[1], name_map=name, rtol=1e-5, atol=1e-6).exit_code == 0


def test_a_file_of_that_name_wins_over_the_shipped_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llama_vllm_to_hf").write_text(json.dumps({"rules": [["a", "b"]]}))
    nmap = resolve_map("llama_vllm_to_hf")
    assert nmap is not None and nmap.to_dict() == {"apply_to": "dir2", "rules": [["a", "b"]]}


def test_an_unknown_map_name_says_what_exists(runs: tuple[Path, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = _invoke("--dir1", runs[0], "--dir2", runs[1], "--map", "llama_vllm_to_fh")
    assert res.exit_code == 2 and res.stdout == ""
    assert "llama_vllm_to_fh: no such map file, and no shipped map of that name; did you mean the shipped map " \
           "'llama_vllm_to_hf'?" in res.stderr
    with pytest.raises(NameMapError, match=r"missing/x\.json: no such map file"):
        resolve_map("missing/x.json")


def test_squeeze_follows_the_picked_map_unless_given() -> None:
    llama = load_shipped("llama_vllm_to_hf")
    assert CompareOptions().squeeze_follows_map and not CompareOptions().squeeze_shapes
    # the CLI adds keep_going on top of the parsed options: squeeze still follows the map
    assert CompareOptions.create(CompareOptions(), keep_going=True).with_map(llama).squeeze_shapes
    given = CompareOptions(squeeze_shapes=False)
    assert not given.squeeze_follows_map and not CompareOptions.create(given, rtol=1.0).with_map(llama).squeeze_shapes


# -- the map format's additions ------------------------------------------------------------------
_VLLM = {"class": "vllm.model_executor.models.qwen2.Qwen2ForCausalLM", "architecture": "Qwen2ForCausalLM"}
_HF = {"class": "transformers.models.qwen2.modeling_qwen2.Qwen2ForCausalLM", "architecture": "Qwen2ForCausalLM"}


def test_applies_to_reads_architecture_and_engine() -> None:
    m = NameMap.from_dict({"rules": [], "architectures": ["Qwen2ForCausalLM"],
                           "engines": {"dir1": "vllm", "dir2": "transformers"}})
    assert m.applies_to(_VLLM, _HF)
    assert not m.applies_to(_HF, _VLLM)  # sides matter
    assert not m.applies_to(_VLLM, {**_HF, "architecture": "LlamaForCausalLM"})
    assert not m.applies_to(_VLLM, None) and not m.applies_to({"architecture": "Qwen2ForCausalLM"}, _HF)
    assert not NameMap.from_dict({"rules": []}).applies_to(_VLLM, _HF)  # a map that does not say
    assert NameMap.from_dict(m.to_dict()) == m


@pytest.mark.parametrize(("extra", "message"), [
    ({"architectures": ["X"]}, r"\"architectures\" needs \"engines\" too"),
    ({"engines": {"dir1": "vllm", "dir2": "transformers"}}, r"\"engines\" needs \"architectures\" too"),
    ({"architectures": [], "engines": {"dir1": "a", "dir2": "b"}}, r"non-empty list of architecture names"),
    ({"architectures": "X", "engines": {"dir1": "a", "dir2": "b"}}, r"non-empty list of architecture names"),
    ({"architectures": ["X"], "engines": ["vllm"]}, r"\"engines\" must be an object"),
    ({"architectures": ["X"], "engines": {"dri1": "a", "dir2": "b"}}, r"unknown key 'dri1'; did you mean 'dir1'"),
    ({"architectures": ["X"], "engines": {"dir1": "vllm"}}, r"engines\.dir2 must be the top-level package"),
    ({"architectures": ["X"], "engines": {"dir1": "vllm.models", "dir2": "b"}}, r"engines\.dir1 must be"),
    ({"architecture": ["X"]}, r"unknown key 'architecture'; did you mean 'architectures'"),
])
def test_bad_applies_declarations(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(NameMapError, match=message):
        NameMap.from_dict({"rules": [], **extra}, "m.json")


def test_every_shipped_map_declares_its_runs_and_no_two_overlap() -> None:
    maps = shipped_maps()
    assert {"llama_vllm_to_hf", "qwen2_vllm_to_hf", "mixtral_vllm_to_hf"} <= set(maps)
    assert sorted(p.stem for p in MAPS.glob("*.json")) == sorted(maps)
    for name, m in maps.items():
        assert m.architectures and set(m.engines) == {"dir1", "dir2"}, name
        for arch in m.architectures:
            models = [{"class": f"{m.engines[side]}.models.{arch}", "architecture": arch} for side in ("dir1", "dir2")]
            pick = pick_map({"model": models[0]}, {"model": models[1]})
            assert pick.name == name and pick.map is m, (name, arch)
