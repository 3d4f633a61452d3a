"""The JSON report is streamed: the same data as ``report_dict``, one item per line, made a batch at a
time, and a report file appears whole or not at all."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import ilstore_compare.report_json as report_json
from compare_helpers import PERTURBED, llama_run
from ilstore_compare import compare
from ilstore_compare.cli import compare_cmd
from ilstore_compare.report_json import render_json, report_dict, validate_report, write_json


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("stream")
    return {"a": llama_run(out, "a"), "p": llama_run(out, "p", perturb=PERTURBED)}


def invoke(*args: str | Path) -> Any:
    return CliRunner().invoke(compare_cmd, [str(a) for a in args], catch_exceptions=False)


def test_streamed_text_is_the_report_dict_one_item_per_line(runs: dict[str, Path]) -> None:
    result = compare(runs["a"], runs["p"])
    text = render_json(result)
    data = json.loads(text)
    assert data == json.loads(json.dumps(report_dict(result))) and validate_report(data) == []
    assert data["summary"]["mismatched"] > 0 and "NaN" not in text and "Infinity" not in text
    lines = text.splitlines()
    items = [line for line in lines if line.startswith('  {"step": ')]
    assert len(items) == len(result.tensors) + len(result.calls) > 0
    for line in items:  # each item is a whole JSON object on its line
        json.loads(line.rstrip(","))
    # everything else keeps one space of indent per level
    assert lines[0] == "{" and lines[1].startswith(' "format": ') and lines[-1] == "}"


class _Counted:
    """``result.tensors`` that counts the items taken from it."""

    def __init__(self, items: Any) -> None:
        self.items, self.taken = items, 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Any]:
        for item in self.items:
            self.taken += 1
            yield item


class _Watch:
    """A text stream that checks, at each write, how far item making ran ahead of the text."""

    def __init__(self, counted: _Counted) -> None:
        self.counted, self.written, self.ahead, self.parts = counted, 0, 0, []

    def write(self, text: str) -> int:
        self.ahead = max(self.ahead, self.counted.taken - self.written)
        self.written += sum(1 for line in text.splitlines() if line.startswith('  {"step": ') and '"path": ' in line)
        self.parts.append(text)
        return len(text)


def test_tensor_items_are_made_a_batch_at_a_time(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    result = compare(runs["a"], runs["p"])
    assert len(result.tensors) > 10
    monkeypatch.setattr(report_json, "_BATCH", 4)
    counted = _Counted(result.tensors)
    watch = _Watch(counted)
    write_json(dataclasses.replace(result, tensors=counted), watch)  # type: ignore[arg-type]
    assert counted.taken == watch.written == len(result.tensors)
    assert 0 < watch.ahead <= 4  # never more than a batch made and not yet written
    assert json.loads("".join(watch.parts)) == json.loads(render_json(result))


def test_failed_write_keeps_the_earlier_report(runs: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "report.json"
    out.write_text("earlier report\n")

    def fail(result: Any, stream: Any) -> None:
        stream.write('{\n "format": ')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_json, "write_json", fail)
    res = invoke("--dir1", runs["a"], "--dir2", runs["p"], "--output", out)
    assert res.exit_code == 2 and str(out) in res.stderr and "No space left on device" in res.stderr
    assert out.read_text() == "earlier report\n" and sorted(os.listdir(tmp_path)) == ["report.json"]
    monkeypatch.undo()
    res = invoke("--dir1", runs["a"], "--dir2", runs["p"], "--output", out)
    assert res.exit_code == 1 and validate_report(json.loads(out.read_text())) == []
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


def test_report_into_a_pipe_is_written_directly(runs: dict[str, Path], tmp_path: Path) -> None:
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(pipe.read_text()))
    reader.start()
    res = invoke("--dir1", runs["a"], "--dir2", runs["p"], "--output", pipe, "--format", "json")
    reader.join(timeout=60)
    assert res.exit_code == 1 and validate_report(json.loads(got[0])) == []
    assert sorted(os.listdir(tmp_path)) == ["pipe"]


def test_report_through_a_symlink_keeps_the_link_and_a_replaced_file_its_mode(runs: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_text("earlier\n")
    link.symlink_to(target.name)
    res = invoke("--dir1", runs["a"], "--dir2", runs["p"], "--output", link)
    assert res.exit_code == 1 and link.is_symlink() and validate_report(json.loads(target.read_text())) == []
    own = tmp_path / "own.json"
    own.write_text("earlier\n")
    own.chmod(0o600)
    assert invoke("--dir1", runs["a"], "--dir2", runs["p"], "--output", own).exit_code == 1
    assert own.stat().st_mode & 0o777 == 0o600 and validate_report(json.loads(own.read_text())) == []
    fresh = tmp_path / "fresh.md"
    assert invoke("--dir1", runs["a"], "--dir2", runs["p"], "--output", fresh).exit_code == 1
    mask = os.umask(0o022)
    os.umask(mask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~mask
    assert sorted(os.listdir(tmp_path)) == ["fresh.md", "link.json", "own.json", "target.json"]


def test_links_and_long_names_are_checked_the_way_the_report_is_written(runs: dict[str, Path], tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The --output check before comparing follows the report's own ways (review findings): a
    dangling link whose target's directory is missing is refused before comparing (it passed the
    check and the result was lost after the comparison); a link to a file not yet there is fine
    and the check leaves nothing behind; a 250-character name is written (the temporary name was
    the report's name plus 15 characters, over 255 bytes)."""
    from ilstore_compare import engine

    real = engine.compare
    ran: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        ran.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "compare", counted)
    nowhere = tmp_path / "nowhere.md"
    nowhere.symlink_to(tmp_path / "no_such_dir" / "report.md")
    res = CliRunner().invoke(compare_cmd, ["--dir1", str(runs["a"]), "--dir2", str(runs["p"]), "--output",
                                           str(nowhere)])
    assert res.exit_code == 2 and f"{nowhere}: cannot write the report" in res.stderr and ran == []
    later = tmp_path / "later.md"
    later.symlink_to("made_by_the_report.md")
    assert invoke("--dir1", runs["a"], "--dir2", runs["p"], "--output", later).exit_code == 1 and ran == [1]
    assert later.is_symlink() and "mismatch" in (tmp_path / "made_by_the_report.md").read_text()
    long_name = tmp_path / ("r" * 247 + ".md")
    assert invoke("--dir1", runs["a"], "--dir2", runs["p"], "--output", long_name).exit_code == 1
    assert "mismatch" in long_name.read_text() and ran == [1, 1]
    wide_name = tmp_path / ("\u20ac" * 80 + ".md")  # 243 bytes, 83 characters: the cut counts bytes
    assert invoke("--dir1", runs["a"], "--dir2", runs["p"], "--output", wide_name).exit_code == 1
    assert "mismatch" in wide_name.read_text() and ran == [1, 1, 1]
    assert sorted(os.listdir(tmp_path)) == sorted(["nowhere.md", "later.md", "made_by_the_report.md", long_name.name,
                                                   wide_name.name])


_AS_A_USER = """
import sys
from pathlib import Path
from ilstore_compare.cli import main
sys.argv = ["ilstore-compare", "--dir1", sys.argv[1], "--dir2", sys.argv[2], "--output", sys.argv[3]]
main()
"""


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_a_link_in_a_directory_the_user_cannot_write_is_written_through(runs: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """A report link in a read-only directory, to a file the user may write, is written through (as
    docs/compare.md says); the check before comparing had created its probe beside the link and
    refused the report (a review finding). Run without the capability that lets root write
    anywhere, where the test runs as root."""
    import shutil
    import subprocess
    import sys

    target_dir, link_dir = tmp_path / "rw", tmp_path / "ro"
    target_dir.mkdir()
    link_dir.mkdir()
    target = target_dir / "report.md"
    target.write_text("old\n")
    link = link_dir / "link.md"
    link.symlink_to(target)
    link_dir.chmod(0o555)
    cmd = [sys.executable, "-c", _AS_A_USER, str(runs["a"]), str(runs["p"]), str(link)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root without setpriv: permissions are not enforced")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", *cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        link_dir.chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    assert "mismatch" in target.read_text() and link.is_symlink() and os.listdir(link_dir) == ["link.md"]


def test_a_report_name_that_is_not_utf8_is_written(runs: dict[str, Path], tmp_path: Path) -> None:
    """``--output`` naming a file whose name is not UTF-8 (byte 0xff, as a file system may hold it)
    gets its report; the temporary name's cut to 100 bytes encoded the name as UTF-8 and stopped
    with a traceback (a review finding)."""
    import subprocess
    import sys

    name = os.fsencode(tmp_path) + b"/rep\xff.md"
    proc = subprocess.run([sys.executable, "-c", _AS_A_USER, str(runs["a"]), str(runs["p"]), name],
                          capture_output=True, text=True, errors="replace", timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert os.listdir(os.fsencode(tmp_path)) == [b"rep\xff.md"]
    with open(name, encoding="utf-8") as f:
        assert "mismatch" in f.read()
