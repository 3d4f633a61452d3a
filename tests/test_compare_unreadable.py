"""Compare goes on past unreadable tensors (issue 15): each one is reported (run, file, reason) in
every report format, everything else is compared, and the exit status is 2 at the end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from compare_helpers import PERTURBED, fake_replay, llama_run, need_backend
from ilstore.errors import CorruptFileError
from ilstore_compare import compare
from ilstore_compare.cli import compare_cmd
from ilstore_compare.report_html import render_html
from ilstore_compare.report_json import report_dict, validate_report
from ilstore_compare.report_md import render_markdown

DELETED = ("step_0", "model.layers.0.self_attn", "outputs_0_cpu.pt")
TRUNCATED = ("step_1", "model.layers.1.mlp.down_proj", "outputs_cpu.pt")


def invoke(*args: str | Path) -> Any:
    return CliRunner().invoke(compare_cmd, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("unreadable")
    ref = llama_run(out, "ref")
    return {"ref": ref, "same": llama_run(out, "same"), "perturbed": llama_run(out, "perturbed", perturb=PERTURBED),
            "replay": fake_replay(ref, out, "replay"), "replay2": fake_replay(ref, out, "replay2")}


def _truncate(victim: Path, keep: int = 64) -> None:
    data = victim.read_bytes()
    victim.unlink()  # a file of its own: the store may hard-link identical tensors
    victim.write_bytes(data[:keep])


def _damage_pt(run: Path, tmp_path: Path, name: str = "damaged") -> tuple[Path, Path, Path]:
    """A copy of ``run`` with one tensor file deleted and one truncated: (copy, deleted, truncated)."""
    damaged = tmp_path / name
    shutil.copytree(run, damaged)
    deleted, truncated = damaged.joinpath(*DELETED), damaged.joinpath(*TRUNCATED)
    assert deleted.is_file() and truncated.is_file()
    deleted.unlink()
    _truncate(truncated)
    return damaged, deleted, truncated


@pytest.mark.parametrize("fmt", ["md", "html", "json"])
def test_deleted_and_truncated_pt_files_are_reported_the_rest_compared_exit_2(
        runs: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    damaged, deleted, truncated = _damage_pt(runs["same"], tmp_path)
    out = tmp_path / "reports" / f"report.{fmt}"
    res = invoke("--dir1", damaged, "--dir2", runs["ref"], "--output", out)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "2 unreadable" in res.stdout
    assert str(deleted) in res.stderr and str(truncated) in res.stderr
    text = out.read_text(encoding="utf-8")
    for victim in (deleted, truncated):
        assert str(victim) in text
    assert "tensor file is missing" in text and "truncated or corrupt" in text
    assert "unreadable" in text
    if fmt == "json":
        data = json.loads(text)
        assert validate_report(data) == []
        assert data["exit_code"] == 2 and data["verdict"] == "incomplete"
        assert {(u["run"], u["file"], u["during"]) for u in data["unreadable"]} == {
            ("dir1", str(deleted), "compare"), ("dir1", str(truncated), "compare")}
        reasons = {u["file"]: u["reason"] for u in data["unreadable"]}
        assert reasons[str(deleted)] == "tensor file is missing" and "truncated" in reasons[str(truncated)]
        s = data["summary"]
        assert s["unreadable"] == 2 and s["not_compared"] == 2 and s["mismatched"] == 0
        assert s["matched"] == s["compared"] == s["tensors"] - 2 > 100
        statuses = {(t["step"], t["module"]): t["status"] for t in data["tensors"] if t["status"] != "match"}
        assert statuses == {(0, DELETED[1]): "unreadable", (1, TRUNCATED[1]): "unreadable"}
        verdicts = {c["module"]: c["verdict"] for c in data["calls"] if c["verdict"] != "match"}
        assert verdicts == {DELETED[1]: "unreadable", TRUNCATED[1]: "unreadable"}


def test_workers_give_the_same_report_in_order(runs: dict[str, Path], tmp_path: Path) -> None:
    damaged, deleted, truncated = _damage_pt(runs["same"], tmp_path)
    reports = []
    for workers in ("1", "3"):
        res = invoke("--dir1", runs["ref"], "--dir2", damaged, "--workers", workers, "--format", "json")
        assert res.exit_code == 2, res.output
        reports.append(json.loads(res.stdout))
    one, three = reports
    assert one["tensors"] == three["tensors"] and one["unreadable"] == three["unreadable"]
    assert [u["file"] for u in one["unreadable"]] == [str(deleted), str(truncated)]  # in execution order
    assert {u["run"] for u in one["unreadable"]} == {"dir2"}


def test_both_sides_unreadable_are_both_named(runs: dict[str, Path], tmp_path: Path) -> None:
    d1, deleted1, _ = _damage_pt(runs["same"], tmp_path, "one")
    d2, deleted2, _ = _damage_pt(runs["ref"], tmp_path, "two")
    result = compare(d1, d2, keep_going=True)
    assert result.exit_code == 2
    entry = next(t for t in result.tensors if t.key.module == DELETED[1] and t.status == "unreadable")
    assert [(u.run, u.file) for u in entry.unreadable] == [("dir1", str(deleted1)), ("dir2", str(deleted2))]
    assert str(deleted1) in (entry.note or "") and str(deleted2) in (entry.note or "")
    assert len(result.unreadable) == 4 and result.summary.unreadable == 2


def test_exit_2_wins_over_differences(runs: dict[str, Path], tmp_path: Path) -> None:
    damaged, deleted, _ = _damage_pt(runs["same"], tmp_path)
    result = compare(damaged, runs["perturbed"], keep_going=True)
    assert result.verdict == "mismatch" and result.summary.mismatched > 0 and result.first_divergence is not None
    assert result.exit_code == 2 and str(deleted) in {u.file for u in result.unreadable}
    for text in (render_markdown(result), render_html(result)):
        assert "exit status 2" in text and str(deleted) in text
    assert validate_report(report_dict(result)) == []


def test_library_stops_at_the_first_unreadable_file_unless_keep_going(runs: dict[str, Path], tmp_path: Path) -> None:
    damaged, deleted, _ = _damage_pt(runs["same"], tmp_path)
    with pytest.raises(CorruptFileError, match=deleted.name):
        compare(damaged, runs["ref"])
    result = compare(damaged, runs["ref"], keep_going=True)
    assert result.exit_code == 2 and not result.ok and len(result.unreadable) == 2


def test_an_unreadable_manifest_still_fails_early_without_a_report(runs: dict[str, Path], tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(runs["same"], damaged)
    (damaged / "ilstore.json").write_text("{not json")
    out = tmp_path / "report.md"
    res = invoke("--dir1", damaged, "--dir2", runs["ref"], "--output", out)
    assert res.exit_code == 2 and "ilstore.json" in res.stderr and "Traceback" not in res.output
    assert not out.exists()


def _damage_safetensors(run: Path) -> tuple[Path, str]:
    shard = sorted((run / "step_1").glob("*.safetensors"))[0]
    _truncate(shard, keep=shard.stat().st_size // 2)
    return shard, "step_1"


def _damage_hdf5(run: Path) -> tuple[Path, str]:
    import h5py

    path = run / "step_1.h5"
    with h5py.File(path, "r+") as f:
        group = f[sorted(name for name in f if "down_proj" in name)[0]]
        del group[sorted(group)[0]]  # the dataset the metadata promises is gone
    return path, "step_1"


def test_an_hdf5_step_file_that_does_not_open_stops_with_its_name(tmp_path: Path) -> None:
    # The step file holds that step's call structure too: nothing of the step can be paired, so
    # the comparison stops as for other metadata (docs/compare.md), naming the file, no report.
    need_backend("hdf5")
    ref = llama_run(tmp_path, "ref", backend="hdf5")
    bad = llama_run(tmp_path, "bad", backend="hdf5")
    victim = bad / "step_1.h5"
    _truncate(victim, keep=victim.stat().st_size // 2)
    out = tmp_path / "report.json"
    res = invoke("--dir1", bad, "--dir2", ref, "--output", out)
    assert res.exit_code == 2 and str(victim) in res.stderr and "Traceback" not in res.output
    assert not out.exists()


@pytest.mark.parametrize("backend,damage", [("safetensors", _damage_safetensors), ("hdf5", _damage_hdf5)])
def test_a_damaged_shard_or_dataset_is_reported_and_the_rest_compared(tmp_path: Path, backend: str,
                                                                       damage: Any) -> None:
    need_backend(backend)
    ref = llama_run(tmp_path, "ref", backend=backend)
    bad = llama_run(tmp_path, "bad", backend=backend)
    victim, step = damage(bad)
    out = tmp_path / "report.json"
    res = invoke("--dir1", bad, "--dir2", ref, "--output", out, "--workers", "2")
    assert res.exit_code == 2, res.output
    data = json.loads(out.read_text())
    assert validate_report(data) == [] and data["exit_code"] == 2
    assert data["unreadable"] and {u["file"] for u in data["unreadable"]} == {str(victim)}
    assert all(u["reason"] and u["run"] == "dir1" and u["step"] == 1 for u in data["unreadable"]), step
    s = data["summary"]
    assert s["unreadable"] == len(data["unreadable"]) and s["matched"] == s["tensors"] - s["unreadable"]
    assert s["matched"] > 0 and all(t["status"] == "match" for t in data["tensors"] if t["step"] == 0)
    for fmt in ("md", "html"):
        text = invoke("--dir1", bad, "--dir2", ref, "--format", fmt).stdout
        assert str(victim) in text


def test_local_error_lists_an_unreadable_output_as_not_measured(runs: dict[str, Path], tmp_path: Path) -> None:
    replay = tmp_path / "replay"
    shutil.copytree(runs["replay"], replay)
    victim = replay.joinpath(*TRUNCATED)
    _truncate(victim)
    result = compare(replay, runs["ref"], keep_going=True)
    assert result.local is not None and result.exit_code == 2
    missing = [e for e in result.local.errors if e.call.module == TRUNCATED[1] and e.call.step == 1]
    assert len(missing) == 1 and not missing[0].compared and missing[0].rel_l2 is None
    assert str(victim) in (missing[0].reason or "") and "truncated" in (missing[0].reason or "")
    assert [(u.run, u.file, u.during) for u in missing[0].unreadable] == [("dir1", str(victim), "local_error")]
    # the pair and the measurement tried the same file: listed once
    assert [u.file for u in result.unreadable] == [str(victim)]
    data = report_dict(result)
    assert validate_report(data) == [] and data["exit_code"] == 2
    assert str(victim) in render_markdown(result) and str(victim) in render_html(result)


def test_replay_option_with_an_unreadable_replay_tensor_exits_2(runs: dict[str, Path], tmp_path: Path) -> None:
    replay = tmp_path / "replay"
    shutil.copytree(runs["replay"], replay)
    victim = replay.joinpath(*DELETED)
    victim.unlink()
    out = tmp_path / "report.json"
    res = invoke("--dir1", runs["same"], "--dir2", runs["ref"], "--replay", replay, "--output", out)
    assert res.exit_code == 2, res.output
    data = json.loads(out.read_text())
    assert validate_report(data) == []
    assert [(u["run"], u["file"], u["during"]) for u in data["unreadable"]] == [("replay", str(victim), "local_error")]
    item = next(i for i in data["local_errors"] if i["module"] == DELETED[1] and i["step"] == 0)
    assert item["compared"] is False and str(victim) in item["reason"]
    assert data["summary"]["unreadable"] == 0 and data["summary"]["matched"] == data["summary"]["tensors"]


def test_oracle_lists_an_unreadable_replay_output_as_not_evaluated(runs: dict[str, Path], tmp_path: Path) -> None:
    cand = tmp_path / "cand"
    shutil.copytree(runs["replay"], cand)
    victim = cand.joinpath(*TRUNCATED)
    _truncate(victim)
    out = tmp_path / "report.html"
    res = invoke("--dir1", cand, "--dir2", runs["replay2"], "--oracle", runs["ref"], "--output", out)
    assert res.exit_code == 2, res.output
    assert str(victim) in out.read_text(encoding="utf-8")
    result = compare(cand, runs["replay2"], oracle=runs["ref"], keep_going=True)
    assert result.oracle is not None and result.exit_code == 2
    missing = [c for c in result.oracle.not_evaluated if c.call.module == TRUNCATED[1]]
    assert len(missing) == 1 and str(victim) in (missing[0].reason or "")
    assert [u.file for u in result.unreadable] == [str(victim)]
