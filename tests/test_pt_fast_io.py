"""The ``pt`` backend's few-system-call file access (issues 13 and 18): the reader opens tensor
and JSON files in checked call directories without an ``lstat`` or ``stat`` first (``O_NOFOLLOW``
sends links the checked way), reads a known header and the body with one ``preadv``; the writer
makes directories with one ``mkdir`` and writes each JSON with one ``write``. Same files, same
tensors, same errors as before."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ilstore
import ilstore.store.pt as pt
from ilstore.errors import StoreError
from ilstore.keys import TensorKey
from support import OsCalls, step_records


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))


def _run(out: Path, mode: str = "tensors", steps: int = 2, run_id: str = "r") -> Path:
    model = _model()
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(out), "run_id": run_id, "mode": mode,
                                                 "log_step_ids": []}) as cap:
        for i in range(steps):
            model(torch.full((2, 8), float(i)))
    assert cap.run_dir is not None and cap.error is None
    return cap.run_dir


# -- reader ----------------------------------------------------------------------------------------
def test_known_headers_are_read_with_open_preadv_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a header is learned, a tensor costs open + one preadv + close: no stat of any kind."""
    run_dir = _run(tmp_path)
    with ilstore.open_run(run_dir) as run:
        keys = run.keys()
        want = {k: run.load(k) for k in keys}  # learns the headers (and reads the structures)
        calls = OsCalls(monkeypatch, ("stat", "lstat", "fstat", "open", "preadv", "close"))
        for key in keys:
            assert torch.equal(run.load(key), want[key])
        counts = dict(calls.counts)
    n = len(keys)
    assert counts == {"stat": 0, "lstat": 0, "fstat": 0, "open": n, "preadv": n, "close": n}, counts


def test_structures_are_read_without_stat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A structure file: open, read until the end, close; an absent one (no post_fwd_inputs.json):
    one failed open."""
    run_dir = _run(tmp_path)
    with ilstore.open_run(run_dir) as run:
        run._dirs_of(0)  # type: ignore[attr-defined]  # the call directories are resolved (and checked) once per step
        calls = OsCalls(monkeypatch, ("stat", "lstat", "fstat", "open"))
        nodes = [node for call in run.calls(0) for kind in ("inputs", "outputs", "post_fwd_inputs")
                 for _key, node in run.tensor_nodes(call, kind)]
    assert nodes and calls.counts["stat"] == calls.counts["lstat"] == calls.counts["fstat"] == 0, calls.counts


def _relink(path: Path, target: Path) -> None:
    shutil.move(path, target)
    path.symlink_to(target)


def test_a_linked_tensor_file_inside_the_run_loads(tmp_path: Path) -> None:
    run_dir = _run(tmp_path)
    with ilstore.open_run(run_dir) as run:
        key = TensorKey(0, "0", 0, "outputs")
        want = run.load(key)  # the header is known from here on
    _relink(run_dir / "step_0" / "0" / "outputs_cpu.pt", run_dir / "step_0" / "moved.pt")
    with ilstore.open_run(run_dir) as run:
        assert torch.equal(run.load(key), want)


def test_a_linked_tensor_file_leading_outside_is_refused(tmp_path: Path) -> None:
    run_dir = _run(tmp_path / "run")
    with ilstore.open_run(run_dir) as run:
        key = TensorKey(0, "0", 0, "outputs")
        run.load(key)  # the header is known: the direct read would take the file
    _relink(run_dir / "step_0" / "0" / "outputs_cpu.pt", tmp_path / "outside.pt")
    with pytest.raises(ilstore.UnsafePathError, match="outside the run directory"), ilstore.open_run(run_dir) as run:
        run.load(key)


def test_a_linked_structure_file_leading_outside_is_refused(tmp_path: Path) -> None:
    run_dir = _run(tmp_path / "run")
    _relink(run_dir / "step_0" / "0" / "outputs.json", tmp_path / "outside.json")
    with pytest.raises(ilstore.UnsafePathError, match="outside the run directory"), ilstore.open_run(run_dir) as run:
        run.meta(TensorKey(0, "0", 0, "outputs"))


def test_a_linked_structure_file_inside_the_run_reads(tmp_path: Path) -> None:
    run_dir = _run(tmp_path)
    with ilstore.open_run(run_dir) as run:
        want = run.meta(TensorKey(0, "0", 0, "outputs"))
    _relink(run_dir / "step_0" / "0" / "outputs.json", run_dir / "step_0" / "moved.json")
    with ilstore.open_run(run_dir) as run:
        assert run.meta(TensorKey(0, "0", 0, "outputs")) == want


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[1, 2]"])
def test_damaged_structure_files_are_corrupt_file_errors(tmp_path: Path, content: bytes) -> None:
    run_dir = _run(tmp_path)
    (run_dir / "step_0" / "0" / "outputs.json").write_bytes(content)
    with pytest.raises(ilstore.CorruptFileError, match="outputs.json"), ilstore.open_run(run_dir) as run:
        run.meta(TensorKey(0, "0", 0, "outputs"))


def test_a_directory_in_place_of_a_structure_file_reads_as_before(tmp_path: Path) -> None:
    """A directory named ``outputs.json``: not a captured side (``is_file`` is false), as before."""
    run_dir = _run(tmp_path)
    path = run_dir / "step_0" / "0" / "outputs.json"
    path.unlink()
    path.mkdir()
    with ilstore.open_run(run_dir) as run:
        assert run.structure(run.calls(0)[0], "outputs") is None


def _rekey(data: bytes, digits: int) -> bytes:
    """A legacy file with its storage key (an address: the same decimal string twice, in the
    tensor's pickle and in the key list) replaced by one of ``digits`` digits: a header of
    another length, as another writer process may write."""
    keys = {m.group(2) for m in re.finditer(rb"X(.)\x00\x00\x00(\d+)q", data)
            if len(m.group(2)) == m.group(1)[0] and len(m.group(2)) > 6}
    assert len(keys) == 1
    key = keys.pop()
    new = b"7" * digits
    return data.replace(bytes([len(key)]) + b"\x00\x00\x00" + key, bytes([digits]) + b"\x00\x00\x00" + new)


def test_headers_of_two_lengths_for_one_signature(tmp_path: Path, fresh: list[Path]) -> None:
    """Two writers' headers for the same dtype and shape, of different lengths: both are learned
    (one torch.load each) and files of either are read directly after that (``fstat`` tells
    which length a file has)."""
    loaded = fresh  # the files torch.load read
    tensors = [torch.randn(6, 5, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    paths = []
    for i, tensor in enumerate(tensors):
        path = tmp_path / f"{i}.pt"
        pt._save_tensor(tensor, str(path))
        if i % 2:
            digits = len(next(m.group(2) for m in re.finditer(rb"X(.)\x00\x00\x00(\d+)q", path.read_bytes())
                              if len(m.group(2)) > 6))
            path.write_bytes(_rekey(path.read_bytes(), digits + 3))
        paths.append(path)
    for path, tensor in zip(paths, tensors, strict=True):
        got = pt.load_pt_file(path, "torch.float32", [6, 5])
        assert torch.equal(got, tensor) and torch.equal(got, torch.load(path, weights_only=True))
    assert loaded == paths[:2]  # one torch.load per header
    assert len({len(h) for h in pt._KNOWN}) == 2


def test_a_header_of_a_known_length_but_other_bytes_goes_to_torch_load(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A header not learned yet, as long as a learned one: read once in full, then torch.load
    (which learns it); the tensor is torch.load's."""
    monkeypatch.setattr(pt, "_KNOWN", {})
    monkeypatch.setattr(pt, "_HEADERS", {})
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    pt._save_tensor(a, str(tmp_path / "a.pt"))
    pt._save_tensor(b, str(tmp_path / "b.pt"))
    data = (tmp_path / "b.pt").read_bytes()
    key = next(m.group(2) for m in re.finditer(rb"X(.)\x00\x00\x00(\d+)q", data) if len(m.group(2)) > 6)
    (tmp_path / "b.pt").write_bytes(data.replace(key, b"1" * len(key)))  # same length, other bytes
    pt.load_pt_file(tmp_path / "a.pt", "torch.float32", [4, 4])
    assert torch.equal(pt.load_pt_file(tmp_path / "b.pt", "torch.float32", [4, 4]), b)
    assert len(pt._KNOWN) == 2


# -- writer ----------------------------------------------------------------------------------------
def _files(run_dir: Path) -> Iterator[Path]:
    return (p for p in sorted(run_dir.rglob("*")) if p.is_file())


def test_structure_files_are_json_dumps_text(tmp_path: Path) -> None:
    """Every JSON file, and every line of a structure list, is exactly ``json.dumps(doc,
    allow_nan=False)`` of its own content: the cached C encoder writes the text json.dumps wrote.
    (Statistics-only sides are lines of ``structures.jsonl``; sides with bodies ``.json`` files.)"""
    stats = _run(tmp_path / "stats", mode="stats")
    lines = (stats / "step_0" / "structures.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 6 and not [p for p in _files(stats / "step_0") if p.suffix == ".json"]
    tensors = _run(tmp_path / "tensors", mode="tensors")
    jsons = [p.read_text(encoding="utf-8") for p in _files(tensors / "step_0") if p.suffix == ".json"]
    assert len(jsons) == 6
    for text in lines + jsons:
        assert text == json.dumps(json.loads(text), allow_nan=False)


@pytest.mark.parametrize("doc", [{}, {"a": [1.5, -0.0, 1e300, 2**70, None, True, "é\u2028\n\"\\"]},
                                 {"k": (1, 2), 3: {"x": -1e-300}}, {"nan": float("nan")}, {"inf": float("-inf")},
                                 {"set": {1}}])
def test_dumps_is_json_dumps(doc: dict[str, Any]) -> None:
    def outcome(fn: Any) -> tuple[str, str]:
        try:
            return "text", fn(doc)
        except (TypeError, ValueError) as exc:
            return type(exc).__name__, str(exc)

    assert outcome(pt._dumps) == outcome(lambda d: json.dumps(d, allow_nan=False))
    assert pt._dumps({"after": [1, {"a": 2}]}) == '{"after": [1, {"a": 2}]}'  # usable after an error too


@pytest.mark.parametrize("per_write", [32, 4, 1])
def test_a_stats_step_makes_one_directory_and_appends_its_structures_in_batches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per_write: int) -> None:
    """Statistics-only records: per step one mkdir (the step's; no call has a directory), one
    open of the structure list, one write per ``_lines_per_write`` records (and one for the rest
    at the step's end), one close, and no stat before any of them; then module_calls.txt (open,
    write, close, replace)."""
    run_dir = _run(tmp_path, mode="stats", steps=1)
    monkeypatch.setattr(pt.PtWriter, "_lines_per_write", per_write)
    writer = pt.PtWriter(tmp_path / "copy")
    writer.open(json.loads((run_dir / "ilstore.json").read_text()))
    records, info = step_records(run_dir, 0)
    calls = info.calls
    counts = OsCalls(monkeypatch, ("mkdir", "stat", "lstat", "open", "close", "replace"))
    writes = []
    def counting_write(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return os.write(fd, data)

    monkeypatch.setattr(pt, "_os_write", counting_write)
    for record in records:
        writer._write(record)
    writer._end_step(info)
    monkeypatch.undo()
    counts.counts["write"] = len(writes)
    writer.close()
    batches = -(-len(records) // per_write)
    assert len(records) == 6 and counts.counts == {"mkdir": 1, "stat": 0, "lstat": 0, "open": 2, "close": 2,
                                                   "write": batches + 1, "replace": 1}, counts.counts
    assert [w.count(b"\n") for w in writes[:-1]] == [min(per_write, len(records) - i * per_write)
                                                      for i in range(batches)]
    assert sorted(p.name for p in (tmp_path / "copy" / "step_0").iterdir()) == ["module_calls.txt",
                                                                                "structures.jsonl"]
    lines = (tmp_path / "copy" / "step_0" / "structures.jsonl").read_text().splitlines()
    assert sorted(lines) == sorted((run_dir / "step_0" / "structures.jsonl").read_text().splitlines())
    assert [(d["ilstore"]["module"], d["ilstore"]["kind"]) for d in map(json.loads, lines)] == [
        (r.call.module, r.kind) for r in records]
    assert ((tmp_path / "copy" / "step_0" / "module_calls.txt").read_text()
            == (run_dir / "step_0" / "module_calls.txt").read_text() == "".join(f"{c.module}\n" for c in calls))


def test_a_tensors_step_makes_each_directory_with_one_mkdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records with bodies keep the directory layout: one mkdir for the step and one per call
    directory, one open/write/close per JSON file, no stat, and no structure list."""
    run_dir = _run(tmp_path, mode="tensors", steps=1)
    writer = pt.PtWriter(tmp_path / "copy")
    writer.open(json.loads((run_dir / "ilstore.json").read_text()))
    with ilstore.open_run(run_dir) as run:
        from ilstore.records import Record
        from ilstore.store.base import StepInfo

        calls = run.calls(0)
        records = [Record(call, kind, run.structure(call, kind),
                          {key.path: run.load(key) for key, _node in run.tensor_nodes(call, kind)})
                   for call in calls for kind in ("inputs", "outputs")]
        info = StepInfo(0, calls, run.call_ends(0))
    counts = OsCalls(monkeypatch, ("mkdir", "stat", "lstat", "replace"))
    for record in records:
        writer.write(record)
    writer._end_step(info)
    monkeypatch.undo()
    writer.close()
    assert counts.counts == {"mkdir": 1 + len(calls), "stat": 0, "lstat": 0, "replace": 1}, counts.counts
    assert not (tmp_path / "copy" / "step_0" / "structures.jsonl").exists()
    for call in calls:
        for kind in ("inputs", "outputs"):
            assert (json.loads((tmp_path / "copy" / "step_0" / call.module / f"{kind}.json").read_text())
                    == json.loads((run_dir / "step_0" / call.module / f"{kind}.json").read_text()))


def test_a_step_written_again_reuses_its_directories(tmp_path: Path) -> None:
    """Records of a step after another step's (a step's directories exist already): existing
    directories are fine, files are replaced whole."""
    source = _run(tmp_path / "src", mode="stats", steps=2)
    (records0, info0), (records1, info1) = step_records(source, 0), step_records(source, 1)
    writer = pt.PtWriter(tmp_path / "copy")
    writer.open(json.loads((source / "ilstore.json").read_text()))
    for records, info in ((records0, info0), (records1, info1)):
        for record in records:
            writer.write(record)
        writer.end_step(info)
    for record in records0:  # the backend's part only: the step journal takes each step once here
        writer._write(record)
    writer._end_step(info0)
    writer.close()
    with ilstore.open_run(tmp_path / "copy") as run, ilstore.open_run(source) as src:
        for step in (0, 1):
            assert run.keys(step) == src.keys(step)
            assert [run.meta(k) for k in run.keys(step)] == [src.meta(k) for k in src.keys(step)]


def test_mkdir_refuses_a_file_in_the_way_and_a_missing_parent(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        pt._mkdir(str(tmp_path / "file"))
    with pytest.raises(StoreError, match="its parent is gone"):  # the run directory, removed mid-run
        pt._mkdir(str(tmp_path / "a" / "b" / "c"))
    assert not (tmp_path / "a").exists()
    pt._mkdir(str(tmp_path / "a"))
    pt._mkdir(str(tmp_path / "a"))  # exists: fine
    assert (tmp_path / "a").is_dir()


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the system writes less than asked, the rest is written after (JSON and tensor files)."""
    def write(fd: int, data: Any) -> int:
        return os.write(fd, memoryview(data)[:3])

    def writev(fd: int, parts: list[Any]) -> int:
        return os.write(fd, memoryview(parts[0])[:5])

    monkeypatch.setattr(pt, "_os_write", write)
    monkeypatch.setattr(pt, "_os_writev", writev)
    pt._write_file(str(tmp_path / "a.json"), b'{"a": [1, 2, 3]}')
    assert (tmp_path / "a.json").read_bytes() == b'{"a": [1, 2, 3]}'
    head, data = b"head-bytes", bytes(range(256)) * 9
    pt._write_body(str(tmp_path / "b.bin"), head, memoryview(data))
    assert (tmp_path / "b.bin").read_bytes() == head + data


def test_written_files_get_the_default_permissions(tmp_path: Path) -> None:
    """os.open with mode 0o666, as open() creates files (less the umask)."""
    umask = os.umask(0o022)
    os.umask(umask)
    run_dir = _run(tmp_path, steps=1)
    modes = {p.suffix: p.stat().st_mode & 0o777 for p in _files(run_dir / "step_0")}
    assert modes == {".json": 0o666 & ~umask, ".pt": 0o666 & ~umask, ".txt": 0o666 & ~umask}, modes


@pytest.mark.parametrize("structure", [{}, {"type": "value", "value": 3},
                                       {"type": "tuple", "items": [{"type": "tensor", "stats": {"min": -0.0,
                                                                                                 "max": 1e300}}]},
                                       {"type": "value", "value": "x", "ilstore": {"stale": True}},
                                       OrderedDict(type="value", value=[1, 2])])
@pytest.mark.parametrize(("module", "call", "rank"), [("model.layers.0", 0, 0), ("é/\"x\n\u2028", 3, 7), ("", 12, 1),
                                                      ("fc", True, 0)])
def test_a_side_document_is_json_dumps_of_the_structure_and_header(structure: dict[str, Any], module: str,
                                                                   call: int, rank: int) -> None:
    """The text of a side's document is ``json.dumps`` of the structure with the ``ilstore``
    header added as its last key (replacing one the structure has), whatever the names hold."""
    from ilstore.keys import CallKey

    for kind in ("inputs", "post_fwd_inputs"):
        key = CallKey(rank, 5, module, call)
        want = json.dumps({**structure, "ilstore": {"module": module, "call": call, "step": 5, "rank": rank,
                                                    "kind": kind}}, allow_nan=False)
        assert pt._document(structure, key, kind, "\n") == want + "\n"
        assert pt._document(structure, key, kind, "") == want


def test_a_side_document_refuses_nan_as_json_dumps_does() -> None:
    from ilstore.keys import CallKey

    with pytest.raises(ValueError, match="Out of range float"):
        pt._document({"type": "value", "value": float("nan")}, CallKey(0, 0, "m", 0), "outputs", "")
