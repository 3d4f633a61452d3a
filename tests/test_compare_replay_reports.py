"""The reports of a replay's and an oracle comparison of several windows of steps (issue 18).

Every report file (JSON streamed to the file, markdown and HTML, brief and ``--verbose``) of a
comparison measured a window of steps at a time is the one-window report byte for byte; the JSON
report makes ``local_errors`` and the oracle's ``calls`` a batch at a time, as it writes them,
instead of holding every item first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import ilstore_compare.report_json as report_json
import test_compare_replay_windows
from ilstore_compare import compare
from ilstore_compare.cli import _write_report, compare_cmd
from ilstore_compare.report_json import render_json, write_json
from ilstore_compare.result import CompareResult, LocalError
from test_compare_replay_windows import WINDOWS, _spilled
from test_compare_windows import _windowed

#: The runs of test_compare_replay_windows (a fixture of module scope, made once here too).
runs = test_compare_replay_windows.runs

#: Comparisons (the ``runs`` and options) whose local errors or oracle verdicts span the windows:
#: ranked across windows, calls the replay lacks, calls not replayed, ``--replay``, the oracle.
CASES: dict[str, tuple[tuple[str, str], dict[str, str]]] = {
    "replay": (("rep", "ref"), {}),
    "lacking": (("lacking", "ref"), {}),
    "gaps": (("gaps", "ref"), {}),
    "replay-option": (("cand", "ref"), {"replay": "rep"}),
    "oracle": (("oracle_cand", "oracle_ref"), {"oracle": "ref"}),
    "oracle-gaps": (("gaps", "lacking"), {"oracle": "ref"}),
}


def _reports(result: CompareResult, out: Path) -> dict[str, bytes]:
    """Every report of ``result``, written as the CLI writes a report file."""
    out.mkdir()
    written = {}
    for fmt in ("json", "md", "html"):
        for verbose in (False, True):
            path = out / f"report{'.verbose' if verbose else ''}.{fmt}"
            _write_report(result, fmt, verbose, path)
            written[path.name] = path.read_bytes()
    return written


@pytest.mark.parametrize("pairs", WINDOWS)
@pytest.mark.parametrize("case", list(CASES))
def test_every_report_of_windows_is_the_one_window_report(runs: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          pairs: int, case: str) -> None:
    names, named = CASES[case]
    args = [runs[n] for n in names]
    options = {k: runs[v] for k, v in named.items()}
    whole = compare(*args, **options)
    held = whole.local.errors if whole.local is not None else whole.oracle.calls if whole.oracle is not None else None
    assert isinstance(held, tuple) and held  # one window: tuples
    windowed = _windowed(monkeypatch, pairs, *args, **options)
    if pairs < 40:
        assert _spilled(windowed) > 0  # read back from the temporary file while written
    expected = _reports(whole, tmp_path / "whole")
    got = _reports(windowed, tmp_path / "windowed")
    assert list(got) == list(expected)
    for name, text in expected.items():
        assert got[name] == text, name


def test_report_files_through_the_cli(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                      tmp_path: Path) -> None:
    """``compare_cmd -o FILE`` of a replay in windows of one step: the files of the one-window comparison."""
    def files(into: Path) -> dict[str, bytes]:
        into.mkdir()
        for fmt in ("json", "md", "html"):
            out = CliRunner().invoke(compare_cmd, ["--dir1", str(runs["cand"]), "--dir2", str(runs["ref"]),
                                                   "--replay", str(runs["rep"]), "-o", str(into / f"r.{fmt}"),
                                                   "--verbose"], catch_exceptions=False)
            assert out.exit_code == 1, out.output
        return {p.name: p.read_bytes() for p in sorted(into.iterdir())}

    whole = files(tmp_path / "whole")
    with monkeypatch.context() as m:
        m.setattr("ilstore_compare.engine._WINDOW_PAIRS", 1)
        windowed = files(tmp_path / "windowed")
    assert list(windowed) == ["r.html", "r.json", "r.md"] and windowed == whole


class _Entries(Sequence[LocalError]):
    """``local.errors`` that counts the passes over it and refuses to be taken whole (``len``, a slice)."""

    def __init__(self, items: Sequence[LocalError]) -> None:
        self.items, self.passes = tuple(items), 0

    def __len__(self) -> int:
        raise AssertionError("len() of every local error")

    def __getitem__(self, index: Any) -> Any:
        raise AssertionError(f"local.errors[{index!r}]")

    def __iter__(self) -> Iterator[LocalError]:
        self.passes += 1
        yield from self.items


class _Watch:
    """A text stream that checks, at each write, how far item making ran ahead of the items written
    (``marker``: the text that ends each item, once)."""

    def __init__(self, marker: str) -> None:
        self.marker, self.made, self.written, self.ahead, self.parts = marker, 0, 0, 0, []

    def write(self, text: str) -> int:
        self.ahead = max(self.ahead, self.made - self.written)
        self.written += text.count(self.marker)
        self.parts.append(text)
        return len(text)

    def counting(self, make: Any) -> Any:
        def made(entry: Any) -> Any:
            self.made += 1
            return make(entry)
        return made


def test_local_errors_are_made_a_batch_at_a_time(runs: dict[str, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The JSON report makes ``local_errors`` as it writes them, in one pass over ``local.errors`` (one
    more for ``not_compared``), never taking its length or the whole of it."""
    result = _windowed(monkeypatch, 3, runs["rep"], runs["ref"])
    assert result.local is not None and len(result.local.errors) > 20
    entries = _Entries(result.local.errors)
    watched = dataclasses.replace(result, local=dataclasses.replace(result.local, errors=entries))
    watch = _Watch('\n   "order": ')  # an item's last key, at its depth (calls' items are one line each)
    monkeypatch.setattr(report_json, "_BATCH", 4)
    monkeypatch.setattr(report_json, "local_error_item", watch.counting(report_json.local_error_item))
    write_json(watched, watch)  # type: ignore[arg-type]
    assert watch.made == watch.written == len(result.local.errors) and entries.passes <= 2
    assert 0 < watch.ahead <= 4  # never more than a batch made and not yet written
    monkeypatch.undo()
    assert "".join(watch.parts) == render_json(result)


def test_oracle_calls_are_made_a_batch_at_a_time(runs: dict[str, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    result = _windowed(monkeypatch, 3, runs["oracle_cand"], runs["oracle_ref"], oracle=runs["ref"])
    assert result.oracle is not None and len(result.oracle.calls) > 20
    watch = _Watch('\n    "container": ')  # a verdict's last key, at its depth
    monkeypatch.setattr(report_json, "_BATCH", 4)
    monkeypatch.setattr(report_json, "_oracle_call", watch.counting(report_json._oracle_call))
    write_json(result, watch)  # type: ignore[arg-type]
    assert watch.made == watch.written == len(result.oracle.calls)
    assert 0 < watch.ahead <= 4
    monkeypatch.undo()
    assert "".join(watch.parts) == render_json(result)
