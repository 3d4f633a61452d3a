"""The ilstore-compare command: exit codes, report formats, the fixture dump, corrupt files, map files."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ilstore
from compare_helpers import PERTURBED, Named, llama_run, module_run, need_backend
from ilstore_compare.cli import compare_cmd
from ilstore_compare.report_json import validate_report
from support import VLLM_DUMP, VLLM_RUN, fixture_inputs, fixture_model


def invoke(*args: str | Path) -> object:
    return CliRunner().invoke(compare_cmd, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("cli")
    return {"a": llama_run(out, "a"), "b": llama_run(out, "b"), "p": llama_run(out, "p", perturb=PERTURBED)}


def test_identical_runs_exit_0_with_markdown_on_stdout(runs: dict[str, Path]) -> None:
    res = invoke("--dir1", runs["a"], "--dir2", runs["b"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("# ilstore compare report") and "MATCH" in res.stdout
    # identical runs: both steps have the same call table (all zeros), so they share one
    assert "## Steps 0–1" in res.stdout and "model.layers.1.mlp.down_proj" in res.stdout
    assert "No module call has differing outputs." in res.stdout
    assert res.stderr == ""


def test_perturbed_run_exit_1_and_names_first_divergence(runs: dict[str, Path]) -> None:
    res = invoke("--dir1", runs["a"], "--dir2", runs["p"])
    assert res.exit_code == 1
    section = res.stdout.split("## First divergence", 1)[1]
    assert section.lstrip().startswith(f"step 0, {PERTURBED} — introduced")
    assert "## Where error is introduced" in res.stdout
    verbose = invoke("--dir1", runs["a"], "--dir2", runs["p"], "--verbose")
    assert "## Tensor details" in verbose.stdout and len(verbose.stdout) > len(res.stdout)


def test_json_report_validates_and_names_first_divergence(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    res = invoke("--dir1", runs["a"], "--dir2", runs["p"], "--output", out)
    assert res.exit_code == 1 and str(out) in res.stdout
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert validate_report(data) == []
    assert data["first_divergence"]["step"] == 0 and data["first_divergence"]["module"] == PERTURBED
    assert data["first_divergence"]["call"] == 0 and data["first_divergence"]["origin"] == "introduced"
    s = data["summary"]
    assert s["mismatched"] > 0 and s["only_in_dir1"] == s["only_in_dir2"] == 0 and s["compared"] == len(data["tensors"])
    entry = data["tensors"][0]
    keys = {"step", "module", "call", "kind", "path", "status", "max_abs_diff", "rel_l2", "cosine_similarity"}
    assert keys <= set(entry)
    stdout = invoke("--dir1", runs["a"], "--dir2", runs["b"], "--format", "json")
    assert stdout.exit_code == 0 and validate_report(json.loads(stdout.stdout)) == []


def test_json_report_with_nan_and_inf_is_strict(tmp_path: Path) -> None:
    x = torch.tensor([float("inf"), float("nan"), 0.0])
    run1 = module_run(tmp_path, "one", Named("attn"), torch.ones(1, 4))
    run2 = module_run(tmp_path, "two", Named("attn"), torch.ones(1, 4))
    # a reference that is all zero while dir1 is not gives an infinite rel L2 -> null
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Identity())
    z1 = module_run(tmp_path, "z1", lin, torch.ones(3))
    z2 = module_run(tmp_path, "z2", lin, torch.zeros(3))
    nan1 = module_run(tmp_path, "n1", lin, x)
    nan2 = module_run(tmp_path, "n2", lin, torch.zeros(3))
    for d1, d2 in ((z1, z2), (nan1, nan2), (run1, run2)):
        res = invoke("--dir1", d1, "--dir2", d2, "--format", "json")
        assert res.exit_code in (0, 1)
        data = json.loads(res.stdout)  # json.loads accepts NaN: check the text too
        assert "NaN" not in res.stdout and "Infinity" not in res.stdout
        assert validate_report(data) == []
    data = json.loads(invoke("--dir1", z1, "--dir2", z2, "--format", "json").stdout)
    assert data["tensors"][0]["rel_l2"] is None and data["tensors"][0]["max_abs_diff"] == 1.0


def test_html_report_is_one_self_contained_file_with_the_plot(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    res = invoke("--dir1", runs["a"], "--dir2", runs["p"], "--output", out)
    assert res.exit_code == 1
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<svg" in html and "<circle" in html
    assert "first divergence" in html and PERTURBED in html
    assert not re.search(r"<(script|link|img|iframe)\b", html, re.I)
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", html, re.I)
    assert "http" not in html
    assert invoke("--dir1", runs["a"], "--dir2", runs["b"], "--format", "html").stdout.startswith("<!DOCTYPE html>")


def test_format_follows_output_extension(runs: dict[str, Path], tmp_path: Path) -> None:
    for name, start in (("r.md", "# ilstore"), ("r.json", "{"), ("r.html", "<!DOCTYPE"), ("r.txt", "# ilstore")):
        assert invoke("--dir1", runs["a"], "--dir2", runs["b"], "-o", tmp_path / name).exit_code == 0
        assert (tmp_path / name).read_text().startswith(start)
    invoke("--dir1", runs["a"], "--dir2", runs["b"], "-o", tmp_path / "x.md", "--format", "json")
    assert (tmp_path / "x.md").read_text().startswith("{")


def test_fixture_dump_against_ilstore_capture(tmp_path: Path) -> None:
    model = fixture_model()
    with torch.no_grad(), ilstore.capture(model, {"log_step_ids": [0, 1], "output_dir": str(tmp_path),
                                                  "run_id": "ours"}) as cap:
        for ids in fixture_inputs():
            model(input_ids=ids, use_cache=False)
    # the dump's producer ran different batched-matmul kernels: <= 5e-7 apart after the first attention
    res = invoke("--dir1", VLLM_DUMP, "--dir2", cap.run_dir, "--rtol", "1e-4", "--atol", "1e-5", "--format", "json")
    data = json.loads(res.stdout)
    assert data["dir1"]["path"] == str(VLLM_RUN) and data["dir1"]["status"] == "unknown"
    fixture_side = [t for t in data["tensors"] if t["status"] != "only_in_dir2"]
    assert len(fixture_side) == 124 and all(t["status"] == "match" for t in fixture_side)
    assert data["summary"]["matched"] == 124 and data["summary"]["only_in_dir1"] == 0
    only2 = [t for t in data["tensors"] if t["status"] == "only_in_dir2"]
    # what ilstore captures beyond the earlier implementation: keyword arguments of the calls
    assert only2 and all(t["kind"] == "inputs" and not t["path"][0].isdigit() for t in only2)
    assert {t["path"][0] for t in only2} >= {"hidden_states", "position_ids", "attention_mask", "input_ids"}
    assert res.exit_code == 1 and data["verdict"] == "incomplete" and data["first_divergence"] is None
    keyword_free = invoke("--dir1", VLLM_DUMP, "--dir2", cap.run_dir, "--rtol", "1e-4", "--atol", "1e-5",
                          "--modules", r"_proj$,layernorm$,^lm_head$,act_fn")
    assert keyword_free.exit_code == 0, keyword_free.stdout


def test_empty_comparison_exits_1(runs: dict[str, Path]) -> None:
    res = invoke("--dir1", runs["a"], "--dir2", runs["b"], "--modules", "nothing_matches_this")
    assert res.exit_code == 1 and "EMPTY" in res.stdout


def test_steps_and_modules_options(runs: dict[str, Path]) -> None:
    res = invoke("--dir1", runs["a"], "--dir2", runs["p"], "--steps", "1", "--format", "json")
    data = json.loads(res.stdout)
    assert res.exit_code == 1 and {t["step"] for t in data["tensors"]} == {1}
    res = invoke("--dir1", runs["a"], "--dir2", runs["p"], "--modules", r"layers\.0\.", "--modules", "embed",
                 "--format", "json")
    data = json.loads(res.stdout)
    assert res.exit_code == 0
    assert {t["module"] for t in data["tensors"]} >= {"model.embed_tokens", "model.layers.0.mlp"}
    assert all("layers.0." in t["module"] or "embed" in t["module"] for t in data["tensors"])
    comma = invoke("--dir1", runs["a"], "--dir2", runs["p"], "--modules", r"layers\.[0]{1,1}\.mlp$,lm_head",
                   "--format", "json")
    assert {t["module"] for t in json.loads(comma.stdout)["tensors"]} == {"model.layers.0.mlp", "lm_head"}


def test_exact_and_equal_nan_and_workers_flags(runs: dict[str, Path], tmp_path: Path) -> None:
    assert invoke("--dir1", runs["a"], "--dir2", runs["b"], "--exact").exit_code == 0
    one = invoke("--dir1", runs["a"], "--dir2", runs["p"], "--format", "json", "--workers", "1")
    two = invoke("--dir1", runs["a"], "--dir2", runs["p"], "--format", "json", "--workers", "2")
    assert one.exit_code == two.exit_code == 1 and one.stdout == two.stdout
    lin = torch.nn.Sequential(torch.nn.Identity())
    x = torch.tensor([1.0, float("nan")])
    n1, n2 = module_run(tmp_path, "n1", lin, x), module_run(tmp_path, "n2", lin, x.clone())
    assert invoke("--dir1", n1, "--dir2", n2).exit_code == 1
    assert invoke("--dir1", n1, "--dir2", n2, "--equal-nan").exit_code == 0


def test_deleted_tensor_is_listed_as_one_sided(runs: dict[str, Path], tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(runs["b"], damaged)
    call_dir = damaged / "step_1" / "lm_head"
    doc = json.loads((call_dir / "outputs.json").read_text())
    (call_dir / "outputs.json").write_text(json.dumps({"type": "tuple", "items": [], "ilstore": doc["ilstore"]}))
    res = invoke("--dir1", runs["a"], "--dir2", damaged)
    assert res.exit_code == 1 and "INCOMPLETE" in res.stdout
    assert re.search(r"\| lm_head\s*\| outputs\s*\| only_in_dir1", res.stdout)


def test_map_file(tmp_path: Path) -> None:
    x = torch.ones(2, 4)
    run1 = module_run(tmp_path, "one", Named("attn"), x)
    run2 = module_run(tmp_path, "two", Named("self_attn"), x)
    assert invoke("--dir1", run1, "--dir2", run2).exit_code == 1
    good = tmp_path / "map.json"
    good.write_text(json.dumps({"rules": [["^self_attn$", "attn"]]}))
    res = invoke("--dir1", run1, "--dir2", run2, "--map", good)
    assert res.exit_code == 0, res.output
    assert "renamed from self_attn" in invoke("--dir1", run1, "--dir2", run2, "--map", good, "--verbose").stdout


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ('{"rule": []}', "did you mean 'rules'"),
    ('{"rules": [["(", "x"]]}', "rules[0]: bad regex"),
    ('{"rules": [["a", "\\\\2"]]}', "bad replacement"),
    ('{"rules": [["a"]]}', "rules[0]"),
    ('{"rules": [], "apply_to": "dir3"}', "apply_to"),
    ('[]', "expected a JSON object"),
])
def test_bad_map_file_exits_2(runs: dict[str, Path], tmp_path: Path, content: str, message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    res = invoke("--dir1", runs["a"], "--dir2", runs["b"], "--map", bad)
    assert res.exit_code == 2 and str(bad) in res.stderr and message in res.stderr, res.stderr
    missing = invoke("--dir1", runs["a"], "--dir2", runs["b"], "--map", tmp_path / "nope.json")
    assert missing.exit_code == 2 and "nope.json" in missing.stderr


def test_usage_and_input_errors_exit_2(runs: dict[str, Path], tmp_path: Path) -> None:
    missing = invoke("--dir1", tmp_path / "missing", "--dir2", runs["b"])
    assert missing.exit_code == 2 and "missing" in missing.stderr and "Traceback" not in missing.output
    assert invoke("--dir1", runs["a"]).exit_code == 2
    assert invoke("--dir1", runs["a"], "--dir2", runs["b"], "--steps", "one").exit_code == 2
    assert invoke("--dir1", runs["a"], "--dir2", runs["b"], "--rtol", "-1").exit_code == 2
    assert invoke("--dir1", runs["a"], "--dir2", runs["b"], "--workers", "0").exit_code == 2
    assert invoke("--dir1", runs["a"], "--dir2", runs["b"], "--modules", "(").exit_code == 2
    assert invoke("--dir1", runs["a"], "--dir2", runs["b"], "--format", "pdf").exit_code == 2
    several = invoke("--dir1", runs["a"].parent, "--dir2", runs["b"])
    assert several.exit_code == 2 and str(runs["a"]) in several.stderr and str(runs["p"]) in several.stderr


def _truncate_pt(run: Path) -> Path:
    victim = sorted((run / "step_0" / "model.layers.0.self_attn.q_proj").glob("outputs*.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:64])
    return victim


def _corrupt_safetensors(run: Path) -> Path:
    victim = sorted(run.rglob("*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[:8] = (2 ** 62).to_bytes(8, "little")  # header length far beyond the file
    victim.write_bytes(bytes(data))
    return victim


def _corrupt_h5(run: Path) -> Path:
    victim = sorted(run.rglob("*.h5"))[0]
    data = bytearray(victim.read_bytes())
    data[:8] = b"garbage!"  # no HDF5 superblock signature
    victim.write_bytes(bytes(data))
    return victim


@pytest.mark.parametrize("backend,damage", [("pt", _truncate_pt), ("safetensors", _corrupt_safetensors),
                                            ("hdf5", _corrupt_h5)])
def test_corrupt_tensor_file_exits_2_naming_it(tmp_path: Path, backend: str, damage: object) -> None:
    need_backend(backend)
    good = llama_run(tmp_path, "good", backend=backend)
    bad = llama_run(tmp_path, "bad", backend=backend)
    victim = damage(bad)  # type: ignore[operator]
    for args in (("--dir1", bad, "--dir2", good), ("--dir1", good, "--dir2", bad, "--workers", "2")):
        res = invoke(*args)
        assert res.exit_code == 2, res.output
        assert victim.name in res.stderr and "Traceback" not in res.output


def test_help_has_examples() -> None:
    res = invoke("--help")
    assert res.exit_code == 0 and "Examples:" in res.stdout and "--equal-nan" in res.stdout


def test_option_errors_name_the_flag(runs: dict[str, Path]) -> None:
    res = invoke("--dir1", runs["a"], "--dir2", runs["b"], "--modules", "(")
    assert res.exit_code == 2 and res.stderr.startswith("error: --modules: bad regex"), res.stderr


def test_html_applies_the_brief_limit_like_markdown(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from ilstore_compare import compare, report_outline
    from ilstore_compare.report_html import render_html
    from ilstore_compare.report_md import render_markdown

    monkeypatch.setattr(report_outline, "BRIEF_LIMIT", 3)
    result = compare(runs["a"], runs["p"])
    differing = sum(1 for t in result.tensors if t.status == "mismatch")
    assert differing > 3
    more = f"… and {differing - 3} more"
    assert more in render_markdown(result) and more in render_html(result)
    assert more not in render_html(result, verbose=True)


def test_max_ulp_in_every_report(tmp_path: Path) -> None:
    lin = torch.nn.Sequential(torch.nn.Identity())
    x = torch.tensor([1.0, 2.0, 4.0])
    run1 = module_run(tmp_path, "one", lin, torch.nextafter(x, torch.full_like(x, 10.0)))
    run2 = module_run(tmp_path, "two", lin, x)
    data = json.loads(invoke("--dir1", run1, "--dir2", run2, "--format", "json").stdout)
    assert validate_report(data) == [] and {t["max_ulp"] for t in data["tensors"]} == {1}
    md = invoke("--dir1", run1, "--dir2", run2, "--verbose").stdout
    lines = md.splitlines()
    header = next(n for n, line in enumerate(lines) if line.startswith("| module call") and "max_ulp" in line)
    column = [c.strip() for c in lines[header].strip("|").split("|")].index("max_ulp")
    row = lines[header + 2]  # after the separator: the first tensor
    assert [c.strip() for c in row.strip("|").split("|")][column] == "1"
    html = invoke("--dir1", run1, "--dir2", run2, "--format", "html", "--verbose").stdout
    assert "<th>max_ulp" in html


def test_a_report_that_cannot_be_written_is_refused_before_comparing(tmp_path: Path, monkeypatch) -> None:
    # An unwritable --output used to be found after the whole comparison (its result lost).
    from ilstore_compare import engine

    def never(*args, **kwargs):
        raise AssertionError("compared although the report could not be written")

    monkeypatch.setattr(engine, "compare", never)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    runs = tmp_path / "run"
    runs.mkdir()
    (runs / "ilstore.json").write_text('{"format": "ilstore"}')  # (an empty directory is refused before)
    output = a_file / "report.md"  # (a directory is refused by click's option check)
    res = CliRunner().invoke(compare_cmd, ["--dir1", str(runs), "--dir2", str(runs), "--output", str(output)])
    assert res.exit_code == 2 and f"{output}: cannot write the report" in res.stderr, res.output
    ok = tmp_path / "new" / "dir" / "report.md"  # a directory the report would make is fine, and is not made
    res = CliRunner().invoke(compare_cmd, ["--dir1", str(runs), "--dir2", str(runs), "--output", str(ok)])
    assert "compared although" in str(res.exception) and not (tmp_path / "new").exists()


def test_a_report_inside_a_run_read_is_refused(tmp_path: Path) -> None:
    """A report path inside dir1 or dir2 (or a link to a file there) would replace the run's own
    files (a reviewer's ``-o A/ilstore.json`` left run A unreadable): exit 2, nothing written. A
    path beside the run, in the output_dir that holds it, is fine."""
    from ilstore_compare import cli

    lin = torch.nn.Linear(3, 2)
    run1 = module_run(tmp_path / "out1", "one", lin, torch.ones(3))
    run2 = module_run(tmp_path / "out2", "two", lin, torch.ones(3))
    manifest, manifest2 = (run1 / "ilstore.json").read_bytes(), (run2 / "ilstore.json").read_bytes()
    link = tmp_path / "link.json"
    link.symlink_to(run2 / "ilstore.json")
    for output, name, run in ((run1 / "ilstore.json", "dir1", run1), (run1 / "new" / "r.md", "dir1", run1),
                              (link, "dir2", run2)):
        res = CliRunner().invoke(compare_cmd, ["--dir1", str(tmp_path / "out1"), "--dir2", str(run2),
                                               "--output", str(output), "--format", "json"])
        assert res.exit_code == 2, res.output
        assert f"{output}: inside the run {name} ({run})" in res.stderr, res.stderr
    assert (run1 / "ilstore.json").read_bytes() == manifest and not (run1 / "new").exists()
    assert (run2 / "ilstore.json").read_bytes() == manifest2
    with pytest.raises(ilstore.errors.IlstoreError, match="inside the run --replay"):
        cli._check_output_outside_runs(run2 / "x.md", {"dir1": run1, "--replay": tmp_path / "out2"})
    beside = tmp_path / "out1" / "report.md"
    res = CliRunner().invoke(compare_cmd, ["--dir1", str(tmp_path / "out1"), "--dir2", str(run2),
                                           "--output", str(beside)])
    assert res.exit_code == 0 and beside.is_file(), res.output


def test_option_errors_name_the_flag_and_steps_take_the_command_lines_form(runs: dict[str, Path]) -> None:
    """docs/compare.md: a bad option raises OptionError naming it, and the command line shows the
    same message under the flag's name (--steps and --workers were click's own "Invalid value"
    messages); ``steps`` given as a string in Python is the command line's form (it was taken
    as a list of characters)."""
    from ilstore_compare import CompareOptions, OptionError

    assert CompareOptions(steps="5-7,0,2").steps == (0, 2, 5, 6, 7)
    with pytest.raises(OptionError, match=r"^steps: 'x' is not a step number or a range like 2-5 \(in 'x'\)$"):
        CompareOptions(steps="x")
    for args, message in ((["--steps", "x"], "error: --steps: 'x' is not a step number or a range like 2-5 (in 'x')"),
                          (["--workers", "0"], "error: --workers: must be an integer >= 1, got 0")):
        res = invoke("--dir1", runs["a"], "--dir2", runs["a"], *args)
        assert res.exit_code == 2 and res.stderr.strip() == message, res.stderr
    assert invoke("--dir1", runs["a"], "--dir2", runs["a"], "--steps", "0-0").exit_code == 0
