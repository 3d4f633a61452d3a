"""``ilstore ls`` of a run with a step journal reads JSON only: no torch, and the same output.

:func:`ilstore.summary.summarize_run` without calls lists a format-2 run in a built-in backend
from its manifest, its journal's totals and a listing of its directory
(``_summary_from_journal``); every other run goes through the backend's reader
(``_summary_from_reader``). Both must print the same thing for any run the first accepts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ilstore
import ilstore.summary
from ilstore.cli import cli
from ilstore.keys import CallKey
from ilstore.manifest import JOURNAL_NAME, TOTALS_KEYS, JournalReader, JournalWriter, new_manifest
from ilstore.records import TensorPolicy, build_record, finalize_stats
from ilstore.store import registry
from ilstore.store.base import StepInfo
from ilstore.store.ranks import rank_run_dir, write_ranks_manifest
from ilstore.summary import _summary_from_journal, _summary_from_reader, summarize_run
from support import Skipping

BACKENDS = ["pt", "safetensors", "hdf5"]
FIXTURES = Path(__file__).parent / "fixtures" / "ilstore_0_1_runs"


def _capture(out_dir: Path, backend: str, mode: str, steps: int = 8, run_id: str = "run") -> Path:
    model = Skipping((2, 3, 4, 7))
    config = {"output_dir": str(out_dir), "run_id": run_id, "backend": backend, "mode": mode, "log_step_ids": []}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        for _ in range(steps):
            model(torch.randn(1, 4))
    assert cap.run_dir is not None
    return cap.run_dir


def _cut_step_and_strays(run_dir: Path, backend: str) -> None:
    """What a killed run leaves (a cut step 8), plus names no reader lists as a step."""
    if backend == "hdf5":
        (run_dir / "step_8.h5.partial").write_bytes(b"")
        (run_dir / "step_9.h5").mkdir()  # listed too: the hdf5 reader goes by the name alone
    else:
        (run_dir / "step_8").mkdir()
        (run_dir / "step_9").write_bytes(b"")  # a file, not a step directory
    (run_dir / "step_x").mkdir()


def _ls(args: list[str]) -> str:
    result = CliRunner().invoke(cli, ["ls", *args])
    assert result.exit_code == 0, result.output
    return result.output


def _both_ways(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal listing is taken, and ``ilstore ls`` prints the same text and JSON either way."""
    fast = _summary_from_journal(run_dir)
    assert fast is not None, "the listing without torch should accept this run"
    assert fast == _summary_from_reader(run_dir, calls=False)
    outputs = [_ls([str(run_dir)]), _ls([str(run_dir), "--json"])]
    with monkeypatch.context() as m:
        m.setattr(ilstore.summary, "_summary_from_journal", lambda run_dir: None)
        assert [_ls([str(run_dir)]), _ls([str(run_dir), "--json"])] == outputs


@pytest.mark.parametrize("mode", ["stats", "tensors"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_and_full_listings_agree(out_dir: Path, backend: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = _capture(out_dir, backend, mode)
    _cut_step_and_strays(run_dir, backend)
    _both_ways(run_dir, monkeypatch)
    text = _ls([str(run_dir)])
    assert f"backend {backend}, status complete, 8 step(s)" in text
    assert [ln.split()[0] for ln in text.splitlines()[4:-1]] == ["0", "1-3", "4", "5", "6", "7"]
    cut = "[8, 9]" if backend == "hdf5" else "[8]"
    assert text.splitlines()[-1] == f"incomplete step(s), cut before they finished: {cut}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_rank_listings_agree(tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "ranked"
    for rank in (0, 1):
        writer = registry.get_backend(backend).writer(rank_run_dir(run_dir, rank, 2))
        writer.open(new_manifest(backend, {}, rank=rank, world_size=2))
        for step in range(rank + 2):  # rank 1 completes one step more
            call = CallKey(rank, step, "mlp", 0)
            rec = build_record(call, "outputs", torch.ones(3 + rank), TensorPolicy(pin_memory=False))
            finalize_stats(rec)
            writer.write(rec)
            writer.end_step(StepInfo(step, [call], [call]))
        writer.close("failed" if rank else "complete", "boom" if rank else None)
    write_ranks_manifest(run_dir, backend=backend, world_size=2, config={})
    _both_ways(run_dir, monkeypatch)
    summary = summarize_run(run_dir, calls=False)
    assert summary.status == "failed" and [s.counts() for s in summary.steps] == [(2, 2, 2, 28)] * 2 + [(1, 1, 1, 16)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ls_imports_no_torch(out_dir: Path, backend: str) -> None:
    """``ilstore ls`` of a format-2 run, in a fresh process: neither torch nor h5py/safetensors."""
    run_dir = _capture(out_dir, backend, "stats", steps=3)
    result = _ls_without_torch(run_dir, "(0, None)")
    assert f"backend {backend}, status complete, 3 step(s)" in result.stdout


def _ls_without_torch(run_dir: Path, codes: str) -> subprocess.CompletedProcess[str]:
    """``ilstore ls run_dir`` in a fresh process that asserts its exit code is in ``codes`` (a Python
    tuple's text) and that it imported none of torch, h5py, safetensors, numpy."""
    code = ("import sys\n"
            "from ilstore.cli import main\n"
            f"sys.argv = ['ilstore', 'ls', {str(run_dir)!r}]\n"
            "try:\n"
            "    main()\n"
            "except SystemExit as exc:\n"
            f"    assert exc.code in {codes}, exc.code\n"
            "heavy = sorted(m for m in ('torch', 'h5py', 'safetensors', 'numpy') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_runs_the_journal_cannot_answer_go_through_the_reader(out_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # format 1 (ilstore 0.1.0): no journal
    assert _summary_from_journal(FIXTURES / "pt") is None
    assert summarize_run(FIXTURES / "pt", calls=False) == _summary_from_reader(FIXTURES / "pt", calls=False)
    # a journal line without totals: that step is counted from the files
    run_dir = _capture(out_dir, "pt", "stats", steps=4)
    journal = run_dir / JOURNAL_NAME
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[2] = json.dumps({**json.loads(lines[2]), "totals": None}).encode() + b"\n"
    journal.write_bytes(b"".join(lines))
    assert _summary_from_journal(run_dir) is None
    assert summarize_run(run_dir, calls=False).steps[2].counts() == (2, 4, 0, 0)
    # no such run: the reader says so
    assert _summary_from_journal(run_dir.parent / "missing") is None
    # a reader registered over a built-in one
    reader = type("OtherPtReader", (registry.get_backend("pt").reader,), {})
    monkeypatch.setitem(registry._loaded, "pt", registry.Backend("pt", registry.get_backend("pt").writer, reader))
    assert _summary_from_journal(run_dir) is None


def test_errors_are_the_readers(out_dir: Path) -> None:
    """A damaged journal or manifest: the listing gives up, and the reader's error is reported."""
    run_dir = _capture(out_dir, "pt", "stats", steps=3)
    journal = run_dir / JOURNAL_NAME
    journal.write_bytes(journal.read_bytes().replace(b'"totals": {', b'"totals": {"x', 1))
    assert _summary_from_journal(run_dir) is None
    result = CliRunner().invoke(cli, ["ls", str(run_dir)])
    assert result.exit_code == 2 and "steps.jsonl: line 1 (step 0): not valid JSON" in result.output
    (run_dir / "ilstore.json").write_text("{")
    result = CliRunner().invoke(cli, ["ls", str(run_dir)])
    assert result.exit_code == 2 and "unreadable manifest" in result.output


def test_an_empty_directory_is_answered_without_torch(tmp_path: Path) -> None:
    """``ilstore ls`` of an empty directory: the readers' error, before any backend is imported (a
    review finding: it imported torch first, 9-11 s at load 6)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _ls_without_torch(empty, "(2,)")
    assert f"{empty}: not a run directory (no ilstore.json, no step_<N> data) and no run inside it" in result.stderr


def test_an_output_dir_of_one_run_lists_it_and_of_several_names_them_without_torch(out_dir: Path) -> None:
    """``ilstore ls OUTPUT_DIR`` takes the output_dir as ``ilstore-compare`` does: one run inside is
    listed as if it were given; several are an error naming each, answered before torch is
    imported (it imported torch, then said "not a run directory any backend can read")."""
    run_dir = _capture(out_dir, "pt", "stats", steps=3, run_id="first")
    assert _ls([str(out_dir)]) == _ls([str(run_dir)]) and "status complete, 3 step(s)" in _ls([str(out_dir)])
    second = _capture(out_dir, "hdf5", "stats", steps=2, run_id="second")
    result = _ls_without_torch(out_dir, "(2,)")
    assert f"{out_dir}: holds 2 runs; pass one of them:\n  - {run_dir}\n  - {second}" in result.stderr
    assert _ls_without_torch(second, "(0, None)").stdout.count("status complete, 2 step(s)") == 1


def test_total_counts_match_totals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Line endings are remembered (and forgotten past a bound); other spellings are parsed whole."""
    monkeypatch.setattr(ilstore.manifest, "_SEEN_ENDINGS", 2)
    path = tmp_path / JOURNAL_NAME
    writer = JournalWriter(path)
    for step in range(12):
        totals = dict(zip(TOTALS_KEYS, (1, step % 3, 1, 8 * (step % 5)), strict=True))
        writer.append(step, [["m", 0]], [["m", 0]], totals)
    writer.close()
    with open(path, "ab") as fh:  # another writer's spelling, and a line without totals
        fh.write(b'{"step": 12, "totals": {"bytes": 4, "stored": 1, "tensors": 1, "module_calls": 1}, "calls": []}\n')
        fh.write(b'{"step": 13, "calls": [], "call_ends": []}\n')
    reader = JournalReader(path)
    counts, totals = reader.all_total_counts(), reader.all_totals()
    assert counts == {s: None if t is None else tuple(t[k] for k in TOTALS_KEYS) for s, t in totals.items()}
    assert counts[4] == (1, 1, 1, 32) and counts[12] == (1, 1, 1, 4) and counts[13] is None


def test_the_calls_of_a_multi_rank_run_name_their_rank(tmp_path: Path) -> None:
    """``ls --calls`` of a multi-rank run listed each call once per rank with nothing telling the
    two apart (text and JSON)."""
    from compare_helpers import two_rank_run
    from ilstore.summary import format_summary

    run_dir = two_rank_run(tmp_path / "ranked", "pt", 0.0, steps=1, modules=2)
    summary = summarize_run(run_dir)
    calls = summary.steps[0].calls
    assert calls is not None
    assert sorted((c.module, c.rank) for c in calls) == [("m0", 0), ("m0", 1), ("m1", 0), ("m1", 1)]
    assert {c.to_dict()["rank"] for c in calls} == {0, 1}
    text = format_summary(summary, show_calls=True)
    assert "rank  module call" in text
    single = summarize_run(two_rank_run(tmp_path / "other", "pt", 0.0, steps=1, modules=1) / "rank_0")
    assert "rank  module call" not in format_summary(single, show_calls=True)
