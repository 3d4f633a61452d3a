"""Long runs (issue 13): a step end costs what the step wrote, not what the run holds.

The manifest is written only when the run opens and closes; each completed step appends one
short line to the step journal ``steps.jsonl``, which readers index once and read line by line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ilstore
import ilstore.manifest
import ilstore.store.base
from ilstore.cli import cli
from ilstore.keys import CallKey
from ilstore.manifest import JOURNAL_NAME, MANIFEST_NAME, new_manifest
from ilstore.records import TensorPolicy, build_record, finalize_stats
from ilstore.store.base import StepInfo
from ilstore.store.ranks import rank_run_dir, write_ranks_manifest
from ilstore.store.registry import get_backend
from ilstore.summary import summarize_run
from support import Skipping


def _small() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))


def _capture(out_dir: Path, steps: int, run_id: str = "run", **cfg: object) -> Path:
    model = _small()
    x = torch.randn(1, 4)
    config = {"output_dir": str(out_dir), "run_id": run_id, "log_step_ids": [], **cfg}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        for _ in range(steps):
            model(x)
    assert cap.run_dir is not None
    return cap.run_dir


def test_thousands_of_steps_append_constant_lines(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """3,000 logged steps: the manifest is written at open and close only, and what a step end
    appends does not grow with the step number."""
    written: list[str] = []
    real = ilstore.store.base.write_json_atomic

    def counting(path: Path, data: object) -> None:
        written.append(path.name)
        real(path, data)

    monkeypatch.setattr(ilstore.store.base, "write_json_atomic", counting)
    model = _small()
    x = torch.randn(1, 4)
    config = {"output_dir": str(out_dir), "run_id": "long", "log_step_ids": [], "mode": "stats",
              "async_writes": False}
    stats = {}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        manifest = cap.run_dir / MANIFEST_NAME
        for step in range(3000):
            model(x)
            if step in (10, 2990):
                st = manifest.stat()
                stats[step] = (st.st_ino, st.st_mtime_ns, st.st_size)
    assert stats[10] == stats[2990]
    assert written.count(MANIFEST_NAME) == 2  # open, close
    lines = (cap.run_dir / JOURNAL_NAME).read_bytes().splitlines(keepends=True)
    assert len(lines) == 3000 and all(line.endswith(b"\n") for line in lines)
    early = max(len(line) for line in lines[1:100])
    for step, line in enumerate(lines[-100:], 2900):
        assert len(line) <= early + len(str(step)), (step, line)
        assert json.loads(line)["calls_as"] == 0
    with ilstore.open_run(cap.run_dir) as run:
        assert run.steps() == list(range(3000)) and run.status == "complete"
        assert [c.module for c in run.calls(2999)] == ["0", "1"]
        assert run.step_totals(2999) == {"module_calls": 2, "tensors": 4, "stored": 0, "bytes": 0}
    result = CliRunner().invoke(cli, ["ls", str(cap.run_dir)])
    assert result.exit_code == 0, result.output
    assert [ln.split() for ln in result.output.splitlines()[4:]] == [["0-2999", "2", "4", "0", "0", "B"]]
    data = json.loads(CliRunner().invoke(cli, ["ls", str(cap.run_dir), "--json"]).output)
    assert len(data["steps"]) == 3000 and data["steps"][-1] == {"step": 2999, "module_calls": 2, "tensors": 4,
                                                                "stored": 0, "bytes": 0}


def test_call_order_is_spelled_out_when_it_changes(out_dir: Path) -> None:
    model = Skipping((2, 3, 5))
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(out_dir), "run_id": "r",
                                                  "log_step_ids": []}) as cap:
        for _ in range(6):
            model(torch.randn(1, 4))
    lines = [json.loads(line) for line in (cap.run_dir / JOURNAL_NAME).read_text().splitlines()]
    # only the last line that spelled the order out is referred to
    assert [line.get("calls_as") for line in lines] == [None, None, 1, None, None, None]
    with ilstore.open_run(cap.run_dir) as run:
        assert [[c.module for c in run.calls(s)] for s in run.steps()] == [
            ["a"], ["a", "b"], ["a", "b"], ["a"], ["a", "b"], ["a"]]
        assert [run.step_totals(s)["module_calls"] for s in run.steps()] == [1, 2, 2, 1, 2, 1]


def test_partial_last_line_is_ignored(out_dir: Path) -> None:
    """A process killed mid-append leaves a line without its newline: that step is not listed."""
    run_dir = _capture(out_dir, 6)
    journal = run_dir / JOURNAL_NAME
    journal.write_bytes(journal.read_bytes()[:-7])
    with ilstore.open_run(run_dir) as run:
        assert run.steps() == [0, 1, 2, 3, 4] and run.incomplete_steps() == [5]
        assert run.step_totals(5) is None and len(run.keys(4)) == 4
    result = CliRunner().invoke(cli, ["ls", str(run_dir)])
    assert result.exit_code == 0 and "cut before they finished: [5]" in result.output and "0-4" in result.output


def test_corrupt_line_is_an_error_for_its_step_only(out_dir: Path) -> None:
    run_dir = _capture(out_dir, 6)
    journal = run_dir / JOURNAL_NAME
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[3] = b'{"step": 3, "calls_as": 0, "totals": {"module_calls": 2,\n'  # complete, not JSON
    journal.write_bytes(b"".join(lines))
    with ilstore.open_run(run_dir) as run:
        assert run.steps() == [0, 1, 2, 3, 4, 5]
        assert len(run.keys(2)) == 4 and len(run.keys(4)) == 4  # the other steps read
        for query in (run.calls, run.call_ends, run.step_totals):
            with pytest.raises(ilstore.CorruptFileError, match="steps.jsonl: line 4 \\(step 3\\)") as info:
                query(3)
            assert info.value.path == str(journal)
    result = CliRunner().invoke(cli, ["ls", str(run_dir)])
    assert result.exit_code == 2 and "steps.jsonl: line 4" in result.output


@pytest.mark.parametrize("line,message", [
    (b'{"step": 3, "calls_as": 9, "totals": {}}\n', "names no step"),
    (b'{"step": 3, "calls": [["0", -1]], "call_ends": [], "totals": {}}\n', "calls: bad call entry"),
    (b'{"step": 3, "step": 5, "calls_as": 0}\n', "expected a JSON object whose \"step\""),
])
def test_damaged_lines_name_the_line(out_dir: Path, line: bytes, message: str) -> None:
    run_dir = _capture(out_dir, 6)
    journal = run_dir / JOURNAL_NAME
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[3] = line
    journal.write_bytes(b"".join(lines))
    with ilstore.open_run(run_dir) as run:
        with pytest.raises(ilstore.CorruptFileError, match="line 4") as info:
            run.calls(3)
        assert message in str(info.value)
        assert len(run.keys(2)) == 4


@pytest.mark.parametrize("backend", ["pt", "safetensors", "hdf5"])
def test_journal_listing_a_call_the_files_lack_names_the_journal(out_dir: Path, backend: str) -> None:
    run_dir = _capture(out_dir, 2, backend=backend)
    journal = run_dir / JOURNAL_NAME
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[1] = b'{"step": 1, "calls": [["0", 0], ["1", 0], ["ghost", 0]], "call_ends": [], "totals": null}\n'
    journal.write_bytes(b"".join(lines))
    with ilstore.open_run(run_dir) as run:
        assert len(run.keys(0)) == 4
        with pytest.raises(ilstore.CorruptFileError, match="lists module call ghost#0 of step 1") as info:
            run.keys(1)
    # the pt reader checks this itself and names the manifest (ilstore/store/pt.py, _call_dir)
    assert info.value.path.endswith("ilstore.json" if backend == "pt" else JOURNAL_NAME)


def test_line_without_a_step_number_is_skipped(out_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = _capture(out_dir, 4)
    journal = run_dir / JOURNAL_NAME
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[1] = b"garbage\n"
    journal.write_bytes(b"".join(lines))
    with caplog.at_level(logging.WARNING), ilstore.open_run(run_dir) as run:
        assert run.steps() == [0, 2, 3] and run.incomplete_steps() == [1]
    assert "line(s) 2 do not start with a step number" in caplog.text


def test_missing_journal_and_bad_journal_name(out_dir: Path) -> None:
    run_dir = _capture(out_dir, 2)
    (run_dir / JOURNAL_NAME).unlink()
    with ilstore.open_run(run_dir) as run, pytest.raises(ilstore.CorruptFileError, match="steps.jsonl.*missing"):
        run.steps()
    manifest = json.loads((run_dir / MANIFEST_NAME).read_text())
    (run_dir / MANIFEST_NAME).write_text(json.dumps({**manifest, "journal": "../steps.jsonl"}))
    with pytest.raises(ilstore.CorruptFileError, match="ilstore.json.*journal"):
        ilstore.open_run(run_dir)


@pytest.mark.parametrize("second", ["b", "a"])
def test_a_step_ended_twice_keeps_its_last_line(tmp_path: Path, second: str) -> None:
    """With ``second == "a"`` every step has the same call order, so step 1's line says
    ``"calls_as": 0``; step 0's second line must spell its order out, not point at itself."""
    writer = get_backend("pt").writer(tmp_path / "run")
    writer.open(new_manifest("pt", {}))
    for step, module in ((0, "a"), (1, second), (0, "a")):
        call = CallKey(0, step, module, 0)
        rec = build_record(call, "outputs", torch.ones(2), TensorPolicy(pin_memory=False))
        finalize_stats(rec)
        writer.write(rec)
        writer.end_step(StepInfo(step, [call], [call]))
    writer.close()
    with ilstore.open_run(tmp_path / "run") as run:
        assert run.steps() == [0, 1] and [c.module for c in run.calls(0)] == ["a"]
        assert [c.module for c in run.calls(1)] == [second]
        assert run.step_totals(1) == {"module_calls": 1, "tensors": 1, "stored": 1, "bytes": 8}


def test_failed_append_leaves_no_partial_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half-way (a full disk) is cut back, so the next line stays whole."""
    writer = get_backend("pt").writer(tmp_path / "run")
    writer.open(new_manifest("pt", {}))
    real_write = os.write
    calls = {"n": 0}

    def flaky(fd: int, data: bytes) -> int:
        journal = data.startswith(b'{"step"')  # the journal's writes (not the statistics table's)
        calls["n"] += journal
        if calls["n"] == 2 and journal:
            real_write(fd, data[:5])
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    for step in range(3):
        call = CallKey(0, step, "m", 0)
        writer.write(build_record(call, "outputs", {"x": 1}, TensorPolicy(pin_memory=False)))
        monkeypatch.setattr(ilstore.manifest.os, "write", flaky)
        try:
            writer.end_step(StepInfo(step, [call], [call]))
        except ilstore.StoreError as exc:
            assert step == 1 and "No space left" in str(exc) and "steps.jsonl" in str(exc)
        monkeypatch.setattr(ilstore.manifest.os, "write", real_write)
    writer.close()
    with ilstore.open_run(tmp_path / "run") as run:
        assert run.steps() == [0, 2] and [c.module for c in run.calls(2)] == ["m"]


def test_multi_rank_totals_add_up(tmp_path: Path) -> None:
    run_dir = tmp_path / "ranked"
    for rank in (0, 1):
        writer = get_backend("pt").writer(rank_run_dir(run_dir, rank, 2))
        writer.open(new_manifest("pt", {}, rank=rank, world_size=2))
        for step in range(rank + 1):  # rank 1 completes one step more
            call = CallKey(rank, step, "mlp", 0)
            rec = build_record(call, "outputs", torch.ones(3), TensorPolicy(pin_memory=False))
            finalize_stats(rec)
            writer.write(rec)
            writer.end_step(StepInfo(step, [call], [call]))
        writer.close()
    write_ranks_manifest(run_dir, backend="pt", world_size=2, config={})
    assert (run_dir / "rank_1" / JOURNAL_NAME).is_file() and not (run_dir / JOURNAL_NAME).exists()
    with ilstore.open_run(run_dir) as run:
        assert run.step_totals(0) == {"module_calls": 2, "tensors": 2, "stored": 2, "bytes": 24}
        assert run.step_totals(1) == {"module_calls": 1, "tensors": 1, "stored": 1, "bytes": 12}
        assert run.step_totals(2) is None
    quick, full = summarize_run(run_dir, calls=False), summarize_run(run_dir)
    assert [s.counts() for s in quick.steps] == [s.counts() for s in full.steps] == [(2, 2, 2, 24), (1, 1, 1, 12)]


def test_format_1_runs_have_no_totals_and_list_from_their_structures() -> None:
    runs = Path(__file__).parent / "fixtures" / "ilstore_0_1_runs"
    with ilstore.open_run(runs / "pt") as run:
        assert run.manifest is not None and run.manifest["format_version"] == 1
        assert run.step_totals(0) is None
    quick, full = summarize_run(runs / "pt", calls=False), summarize_run(runs / "pt")
    assert [s.counts() for s in quick.steps] == [s.counts() for s in full.steps]
    assert quick.steps[0].calls is None and full.steps[0].calls


def test_ls_collapses_three_or_more_identical_consecutive_steps(out_dir: Path) -> None:
    from ilstore.summary import RunSummary, StepSummary, format_summary

    def table(counts: list[tuple[int, int]]) -> list[str]:
        steps = tuple(StepSummary(s, 1, n, n, 4 * n) for s, n in counts)
        text = format_summary(RunSummary(out_dir, "pt", "complete", steps, ()))
        return [ln.split()[0] for ln in text.splitlines()[4:]]

    assert table([(0, 1), (1, 1)]) == ["0", "1"]
    assert table([(0, 1), (1, 1), (2, 1), (3, 2), (4, 2), (5, 1), (6, 1), (7, 1), (8, 1)]) == ["0-2", "3", "4", "5-8"]
    assert table([(0, 1), (2, 1), (4, 1)]) == ["0", "2", "4"]  # not consecutive step numbers


def test_index_is_the_same_whatever_the_read_size(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal is scanned in chunks: lines cut by a chunk's end are joined, whatever its size."""
    run_dir = _capture(out_dir, 5)
    journal = run_dir / JOURNAL_NAME
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[2] = b"garbage\n"
    journal.write_bytes(b"".join(lines) + b'{"step": 5, "calls_as"')  # a partial last line
    expected = None
    for size in (1 << 23, 1, 7, 64, 100):
        monkeypatch.setattr(ilstore.manifest, "_SCAN_CHUNK", size)
        with ilstore.open_run(run_dir) as run:
            seen = (run.steps(), [run.calls(s) for s in run.steps()], run.all_step_totals())
        assert seen[0] == [0, 1, 3, 4]
        assert expected is None or seen == expected, size
        expected = seen


@pytest.mark.parametrize("backend", ["pt", "safetensors", "hdf5"])
def test_reading_a_run_step_by_step_keeps_few_steps_cached(out_dir: Path, backend: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The structure cache keeps the most recent steps only: 4 (pt), or, for a reader that keeps a
    compare window's structures (safetensors: ``window_nodes``), those whose tensor nodes
    weigh at most ``_CACHED_NODES`` (here lowered to 6, so 4 steps again)."""
    run_dir = _capture(out_dir, 12, backend=backend)
    monkeypatch.setattr(ilstore.store.base, "_CACHED_NODES", 6)
    with ilstore.open_run(run_dir) as run:
        for step in run.steps():
            for key in run.keys(step):
                run.meta(key)
            kept = sorted(run._structures)  # noqa: SLF001 - the cache itself
            assert kept == list(range(max(0, step - 3), step + 1))  # the most recent ones, 4 at most
        assert len(run._structures) == 4  # noqa: SLF001
        assert run.meta(run.keys(0)[0])["shape"] == [1, 4]  # an evicted step is read again
    monkeypatch.undo()
    with ilstore.open_run(run_dir) as run:  # the default bound: a window reader keeps these 12 small steps
        for step in run.steps():
            for key in run.keys(step):
                run.meta(key)
        kept = sorted(run._structures)  # noqa: SLF001
        assert kept == list(range(12 - len(kept), 12))
        assert len(kept) == (12 if run.window_nodes else 4)
        assert run._cached_weight <= ilstore.store.base._CACHED_NODES  # noqa: SLF001


def test_one_step_is_found_without_indexing_the_journal(out_dir: Path) -> None:
    """A step's line is found by a binary search over the file (every step, repeated lines of one
    step adjacent, a line without a step, a partial last line): the same answers as the index."""
    path = out_dir / JOURNAL_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ilstore.manifest.JournalWriter(path)
    for step in range(300):
        calls = [["a", 0]] + ([["b", step % 3]] if step % 7 else [])
        writer.append(step, calls, calls, {"module_calls": len(calls), "tensors": 0, "stored": 0, "bytes": 0})
        if step == 150:  # a step's second line: the last one wins
            writer.append(step, [["c", 0]], [["c", 0]], {"module_calls": 1, "tensors": 0, "stored": 0, "bytes": 0})
    writer.close()
    with open(path, "ab") as fh:
        fh.write(b'{"step": 300, "calls_as": 0')  # cut mid-append
    lines = path.read_bytes().splitlines(keepends=True)
    lines.insert(40, b"garbage\n")
    path.write_bytes(b"".join(lines))
    indexed = ilstore.manifest.JournalReader(path)
    searched = ilstore.manifest.JournalReader(path, ordered=True)
    for step in [0, 1, 39, 40, 41, 150, 151, 299, 300, 5000]:
        assert searched.calls(step) == indexed.calls(step), step
        assert searched.totals(step) == indexed.totals(step), step
        assert (step in searched) == (step in indexed)
    assert [c.module for c in searched.calls(150)] == ["c"]
    assert searched._steps is None  # nothing above indexed the file
    assert searched.steps() == indexed.steps() == list(range(300))


def test_a_journal_out_of_order_is_marked_and_indexed(out_dir: Path) -> None:
    """A writer handed a step below the last one marks the manifest, and readers then index the
    journal (the last line of a step wins even when it is not next to the first)."""
    run_dir = out_dir / "r"
    writer = get_backend("pt").writer(run_dir)
    writer.open(new_manifest("pt", {}))
    for step, module in ((0, "a"), (1, "a"), (2, "a"), (0, "b")):
        call = CallKey(0, step, module, 0)
        writer.write(build_record(call, "outputs", torch.ones(2), TensorPolicy()))
        writer.end_step(StepInfo(step, [call], [call]))
    writer.close()
    manifest = json.loads((run_dir / MANIFEST_NAME).read_text())
    assert manifest[ilstore.manifest.UNORDERED_KEY] is True
    with ilstore.open_run(run_dir) as run:
        assert [c.module for c in run.calls(0)] == ["b"] and run.steps() == [0, 1, 2]
