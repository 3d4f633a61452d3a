"""The step journal's call orders held in arrays (issues 13 and 18: comparing long runs keeps its memory).

``JournalReader.call_orders()`` / ``StoreReader.call_orders()`` answer a read-only mapping with
no Python object per step (:class:`ilstore._stepmap.SharedValues`), reading the journal a window
at a time: the same orders as each step's ``calls()``/``call_ends()``, equal orders one tuple, a
damaged line still an error naming it, and its memory not growing with the steps.
"""

from __future__ import annotations

import json
import os
import random
import tracemalloc
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

import ilstore
from ilstore import manifest
from ilstore.manifest import JOURNAL_NAME, JournalReader, JournalWriter

_TOTALS = {"module_calls": 2, "tensors": 4, "stored": 0, "bytes": 0}
# Which order each step of the captured run takes: lines that spell an order out, lines that
# point at one ("calls_as"), and an order spelled out again after another one.
_SCHEDULE = "AABBACCCABAAB"


class _Scheduled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = _SCHEDULE[self.step]
        self.step += 1
        if kind == "A":
            return self.b(self.a(x))
        if kind == "B":
            return self.b(self.b(self.a(x)))
        return self.a(self.b(x))  # C: another start and end order


def _capture(out_dir: Path, backend: str) -> Path:
    model = _Scheduled()
    config = {"output_dir": str(out_dir), "run_id": backend, "backend": backend, "log_step_ids": [], "mode": "stats"}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        for _ in _SCHEDULE:
            model(torch.ones(1, 4))
    assert cap.run_dir is not None
    return cap.run_dir


def _expected(run: Any) -> dict[int, tuple[Any, ...]]:
    out = {}
    for step in run.steps():
        calls, ends = run.calls(step), run.call_ends(step)
        ranks = {c.rank for c in calls} | {c.rank for c in ends}
        assert len(ranks) == 1
        out[step] = (ranks.pop(), tuple((c.module, c.call) for c in calls), tuple((c.module, c.call) for c in ends))
    return out


def _check_shared(orders: Mapping[int, Any], want: dict[int, Any]) -> None:
    """``orders`` answers ``want`` through every part of the mapping, equal orders one object."""
    assert isinstance(orders, Mapping) and not isinstance(orders, dict)
    assert len(orders) == len(want) and list(orders) == sorted(want)
    assert dict(orders) == want and orders == want
    assert list(orders.values()) == [want[s] for s in sorted(want)]
    assert list(orders.items()) == sorted(want.items())
    for step, order in want.items():
        assert orders[step] == order and orders.get(step) is orders[step] and step in orders
    for missing in (-1, max(want) + 1, "0", 0.5, None):
        assert missing not in orders and orders.get(missing) is None  # type: ignore[call-overload]
        assert orders.get(missing, "x") == "x"  # type: ignore[call-overload]
    with pytest.raises(KeyError):
        orders[max(want) + 1]
    distinct = orders.distinct()  # type: ignore[attr-defined]
    assert len(distinct) == len(set(want.values())) == len({id(v) for v in distinct})
    by_value = {v: v for v in distinct}
    for step in want:  # identity: every step with these orders gets the one tuple
        assert orders[step] is by_value[want[step]]
    assert {id(v) for v in orders.values()} == {id(v) for v in distinct}


@pytest.mark.parametrize("backend", ["pt", "hdf5"])
def test_orders_are_each_steps_calls_and_shared(out_dir: Path, backend: str) -> None:
    run_dir = _capture(out_dir, backend)
    lines = [json.loads(x) for x in (run_dir / JOURNAL_NAME).read_text().splitlines()]
    # the run exercises both kinds of lines, and an order spelled out on several lines
    assert sum("calls_as" in x for x in lines) >= 4
    spelled = [json.dumps([x["calls"], x["call_ends"]]) for x in lines if "calls" in x]
    assert len(spelled) > len(set(spelled)) == 3
    with ilstore.open_run(run_dir) as run:
        orders = run.call_orders()
        assert orders is not None
        want = _expected(run)
        assert len(set(want.values())) == 3
        _check_shared(orders, want)
        assert run.call_orders() is orders  # read once
        assert orders[0] is orders[1] is orders[4] is orders[8] and orders[2] is orders[9] is orders[12]


def _journal(path: Path, steps: list[int], schedule: str) -> dict[int, tuple[Any, ...]]:
    """Write a journal of ``steps`` (in this order; a repeated step's last line wins) whose
    orders follow ``schedule`` cyclically; returns the orders given for each step's last line (a
    "calls_as" line reads as the step it names, whose own last line may come later)."""
    kinds = {"A": [["a", 0], ["b", 0]], "B": [["a", 0], ["b", 0], ["b", 1]], "C": [["b", 0], ["a", 0]],
             "D": [["m.x", 0], ["m", 0], ["m.x", 1]]}
    writer = JournalWriter(path)
    want = {}
    for i, step in enumerate(steps):
        calls = kinds[schedule[i % len(schedule)]]
        writer.append(step, calls, calls[::-1], _TOTALS)
        want[step] = (0, tuple(map(tuple, calls)), tuple(map(tuple, calls[::-1])))
    writer.close()
    return want


@pytest.mark.parametrize("window", [None, 1, 97, 4096])
@pytest.mark.parametrize("remembered", [None, 1, 2])
def test_journal_orders_with_small_windows_and_a_short_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               window: int | None, remembered: int | None) -> None:
    """Windows smaller than a line, several lines a window, the spelled-out lines forgotten and
    read again: the same answer. The journal's steps repeat and do not ascend (an unordered one)."""
    if window is not None:
        monkeypatch.setattr(manifest, "_ORDER_WINDOW", window)
    if remembered is not None:
        monkeypatch.setattr(manifest, "_SPELLED_LINES", remembered)
    path = tmp_path / JOURNAL_NAME
    steps = [*range(40), 7, 3, 55, 41, 41, 12, *range(60, 120, 3)]
    want = _journal(path, steps, "AABBBACDDACCCAB")
    last = {line["step"]: line for line in map(json.loads, path.read_text().splitlines())}
    spelled = [step for step, line in last.items() if "calls" in line]
    assert len(spelled) > 8 and 20 < len(last) - len(spelled) < len(last)
    # a line in a spelling other than the writer's (the step first, "calls_as" last): parsed
    with open(path, "ab") as fh:
        fh.write(b'{"step": 200, "totals": {"module_calls": 2, "tensors": 4, "stored": 0, "bytes": 0}, '
                 b'"calls_as": %d}\n' % spelled[3])
    want[200] = want[spelled[3]]
    reader = JournalReader(path, ordered=False)
    orders = reader.call_orders()
    assert orders is not None
    # what each step's own reading says ("calls_as" names a step, whose last line it follows:
    # step 8 points at step 7, which a later line spells out anew)
    got = {step: (0, tuple((c.module, c.call) for c in reader.calls(step)),
                  tuple((c.module, c.call) for c in reader.calls(step, "call_ends"))) for step in reader.steps()}
    assert sorted(got) == sorted(want) and got[8] == got[7] != want[8]
    assert {s: v for s, v in got.items() if s != 8} == {s: v for s, v in want.items() if s != 8}
    _check_shared(orders, got)
    reader.close()


@pytest.mark.parametrize("window", [None, 30])
def test_damaged_line_names_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int | None) -> None:
    if window is not None:
        monkeypatch.setattr(manifest, "_ORDER_WINDOW", window)
    path = tmp_path / JOURNAL_NAME
    _journal(path, list(range(30)), "AAABBBCC")
    lines = path.read_bytes().splitlines(keepends=True)
    assert b"calls_as" in lines[7] and b"calls_as" not in lines[6]
    good = b"".join(lines)
    # a damaged line that spells its order out, and one a later line points at
    for at in (17, 6):
        damaged = list(lines)
        damaged[at] = b'{"step": %d, "calls": [["a", 0]], "call_ends": [[\n' % at  # complete, not JSON
        path.write_bytes(b"".join(damaged))
        with pytest.raises(ilstore.CorruptFileError, match=f"line {at + 1} \\(step {at}\\): not valid JSON"):
            JournalReader(path).call_orders()
    # a damaged line reached first through a line that points at it ("calls_as", ahead)
    damaged = list(lines)
    damaged[5] = b'{"step": 5, "calls_as": 28, "totals": {}}\n'
    damaged[28] = b'{"step": 28, "calls": [["a", 0]], "call_ends": [[\n'
    path.write_bytes(b"".join(damaged))
    with pytest.raises(ilstore.CorruptFileError, match="line 29 \\(step 28\\): not valid JSON"):
        JournalReader(path).call_orders()
    # what cannot be answered in one pass is still None (calls() then says why): a reference to
    # no line, to its own line, to a line that is itself a reference
    for ref in (b"99", b"9", b"7"):
        assert lines[9].startswith(b'{"step": 9, "calls_as": 8, ') and lines[7].startswith(b'{"step": 7, "calls_as"')
        path.write_bytes(good.replace(b'{"step": 9, "calls_as": 8', b'{"step": 9, "calls_as": ' + ref))
        assert JournalReader(path).call_orders() is None, ref
    # the same lines in another spelling (parsed, not matched): the same answers
    for ref in (b"99", b"9", b"7", b"true", b'"8"'):
        path.write_bytes(good.replace(b'{"step": 9, "calls_as": 8', b'{"step": 9, "calls_as":' + ref))
        assert JournalReader(path).call_orders() is None, ref
    path.write_bytes(good.replace(b'{"step": 9, "calls_as": 8', b'{"step": 9, "calls_as":8'))
    assert JournalReader(path).call_orders() is not None


def _peak(path: Path) -> int:
    """The traced peak of reading every step's orders, the journal already indexed."""
    reader = JournalReader(path)
    assert reader.steps()  # the index is what listing the steps costs already
    tracemalloc.start()
    try:
        orders = reader.call_orders()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert orders is not None
    reader.close()
    return peak


@pytest.mark.parametrize("backwards", [False, True])
def test_memory_does_not_grow_per_step(tmp_path: Path, backwards: bool) -> None:
    """20,000 steps of one 16-call order (every line but the first points at it, as a long run
    writes them) cost about as much as 2,000: a 4-byte number a step, no object. Reading the
    whole file and keeping a dict entry per step, as before, cost ~250 bytes a step here. A
    journal written backwards is read in file order through an array (4 more bytes a line), not
    a list of positions (~36 bytes a step)."""
    calls = [[f"layers.{i}", 0] for i in range(16)]
    peaks = {}
    for steps in (2_000, 20_000):
        path = tmp_path / f"{steps}.jsonl"
        writer = JournalWriter(path)
        for step in range(steps):
            writer.append(steps - 1 - step if backwards else step, calls, calls[::-1], _TOTALS)
        writer.close()
        peaks[steps] = _peak(path)
    per_step = (peaks[20_000] - peaks[2_000]) / 18_000
    assert per_step < 16, (peaks, per_step)


_KINDS = {"A": [["a", 0], ["b", 0]], "B": [["a", 0], ["b", 0], ["b", 1]], "C": [["b", 0], ["a", 0]],
          "D": [["m.x", 0], ["m", 0], ["m.x", 1]]}


def _unordered(rng: random.Random, count: int) -> list[int]:
    """``count`` steps shuffled, some written again later (a resumed run), with gaps."""
    steps = rng.sample(range(count * 3 // 2), count)
    for step in rng.sample(steps, count // 10):
        steps.insert(rng.randrange(steps.index(step) + 1, len(steps) + 1), step)
    return steps


def _shuffled_journal(path: Path, rng: random.Random, count: int) -> dict[int, tuple[Any, ...]]:
    """A journal of :func:`_unordered` steps written by hand: a step's last line spells out one of
    :data:`_KINDS` or names ("calls_as") a step whose last line does, before or after it in the
    file; the lines a later line of their step replaces say anything (a dangling or chained
    reference, another order); some lines in another spelling (parsed). Returns each step's orders."""
    steps = _unordered(rng, count)
    last = {step: k for k, step in enumerate(steps)}
    kinds = {step: rng.choice("AABBCD") for step in last}
    spelled = [step for step in last if rng.random() < 0.3]
    refs = {step: rng.choice(spelled) for step in last if step not in spelled}
    with open(path, "wb") as fh:
        for k, step in enumerate(steps):
            if last[step] != k:  # replaced by a later line of its step
                ref = rng.choice([10**9, step, *refs])
                line: dict[str, Any] = {"step": step, "calls_as": ref} if rng.random() < 0.5 else \
                    {"step": step, "calls": _KINDS["D"][::-1], "call_ends": _KINDS["C"]}
            elif step in refs:
                line = {"step": step, "calls_as": refs[step]}
            else:
                calls = _KINDS[kinds[step]]
                line = {"step": step, "calls": calls, "call_ends": calls[::-1]}
            line["totals"] = _TOTALS
            raw = json.dumps(line)
            if rng.random() < 0.05:
                raw = raw.replace(": ", ":")  # not the writer's spelling: parsed whole
            fh.write(raw.encode() + b"\n")
    want = {}
    for step in last:
        calls = _KINDS[kinds[refs.get(step, step)]]
        want[step] = (0, tuple(map(tuple, calls)), tuple(map(tuple, calls[::-1])))
    return want


def _answer(reader: JournalReader) -> dict[int, tuple[Any, ...]]:
    """What each step's own reading says (the reference each way: ``calls()``)."""
    return {step: (0, tuple((c.module, c.call) for c in reader.calls(step)),  # type: ignore[union-attr]
                   tuple((c.module, c.call) for c in reader.calls(step, "call_ends")))  # type: ignore[union-attr]
            for step in reader.steps()}


@pytest.mark.parametrize("window", [None, 1, 300, 4096])
@pytest.mark.parametrize("remembered", [None, 1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_shuffled_and_reversed_journals_give_the_in_order_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  window: int | None, remembered: int | None,
                                                                  seed: int) -> None:
    """Journals whose lines are in no step order (reversed; shuffled with steps written again and
    gaps) give the answer each step's ``calls()`` gives, and the same as the journal of the same
    lines in step order: equal orders one tuple, a "calls_as" following the last line of the step
    it names wherever that line is in the file."""
    if window is not None:
        monkeypatch.setattr(manifest, "_ORDER_WINDOW", window)
    if remembered is not None:
        monkeypatch.setattr(manifest, "_SPELLED_LINES", remembered)
    for name in ("reversed", "shuffled"):
        path = tmp_path / f"{name}.jsonl"
        if name == "reversed":
            want = _journal(path, list(range(1_500))[::-1], "AABBBACDDACCCABDDDDB")
        else:
            want = _shuffled_journal(path, random.Random(seed), 1_500)
        reader = JournalReader(path)
        orders = reader.call_orders()
        assert orders is not None
        got = _answer(reader)
        assert got == want and len(set(want.values())) == 4
        _check_shared(orders, want)
        # the last line of each step, put in step order (the references still name the same
        # steps, so they read the same): the same mapping
        last = {line["step"]: raw for raw, line in
                ((raw, json.loads(raw)) for raw in path.read_bytes().splitlines(keepends=True))}
        in_order = tmp_path / f"{name}-in-order.jsonl"
        in_order.write_bytes(b"".join(last[step] for step in sorted(last)))
        ordered = JournalReader(in_order, ordered=True).call_orders()
        assert ordered is not None and dict(ordered) == dict(orders) == got
        reader.close()


def test_unordered_journal_fails_as_the_first_failing_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines read in file order, but the answer is the one step order gives: the lowest step whose
    line is damaged (its error, naming its line) or cannot be answered (None) decides."""
    monkeypatch.setattr(manifest, "_ORDER_WINDOW", 200)
    path = tmp_path / JOURNAL_NAME
    steps = list(range(60))[::-1]  # line k holds step 59 - k
    _journal(path, steps, "AAB")
    lines = path.read_bytes().splitlines(keepends=True)

    def damaged(step: int) -> bytes:
        return b'{"step": %d, "calls": [["a", 0]], "call_ends": [[\n' % step

    def dangling(step: int) -> bytes:
        return b'{"step": %d, "calls_as": 999, "totals": {}}\n' % step

    def line_of(step: int) -> int:
        return 60 - step  # 1-based

    cases = [({50: damaged, 20: damaged}, 20), ({50: damaged, 20: dangling}, None),
             ({50: dangling, 20: damaged}, 20), ({5: damaged, 40: dangling}, 5),
             ({5: dangling, 40: damaged}, None), ({30: damaged}, 30)]
    for changes, want in cases:
        changed = list(lines)
        for step, spoil in changes.items():
            changed[line_of(step) - 1] = spoil(step)
        path.write_bytes(b"".join(changed))
        if want is None:
            assert JournalReader(path).call_orders() is None, changes
        else:
            message = f"line {line_of(want)} \\(step {want}\\): not valid JSON"
            with pytest.raises(ilstore.CorruptFileError, match=message):
                JournalReader(path).call_orders()
    # a line whose reference names a damaged line later in the file, below another damaged step
    changed = list(lines)
    changed[line_of(45) - 1] = b'{"step": 45, "calls_as": 3, "totals": {}}\n'
    changed[line_of(3) - 1], changed[line_of(10) - 1] = damaged(3), damaged(10)
    path.write_bytes(b"".join(changed))
    with pytest.raises(ilstore.CorruptFileError, match=f"line {line_of(3)} \\(step 3\\): not valid JSON"):
        JournalReader(path).call_orders()


@pytest.mark.parametrize("kind", ["reversed", "shuffled"])
def test_unordered_journal_is_read_a_window_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """A journal whose lines are not in step order is still read a window at a time through the
    file: about size / window reads, not a window (or a line) per step. Visiting the lines in
    step order read a fresh window for almost every line (a reversed 30,000-line journal: 2.3 s
    for call_orders against 0.5 s in order)."""
    monkeypatch.setattr(manifest, "_ORDER_WINDOW", 4096)
    path = tmp_path / JOURNAL_NAME
    if kind == "reversed":
        want = _journal(path, list(range(5_000))[::-1], "AAAAABBBBBBBCC")
    else:
        want = _shuffled_journal(path, random.Random(2), 5_000)
    reader = JournalReader(path)
    assert len(reader.steps()) == len(want)  # the index is built before counting
    reads, real = [], os.pread

    def counting(fd: int, size: int, at: int) -> bytes:
        reads.append(size)
        return real(fd, size, at)

    monkeypatch.setattr(manifest.os, "pread", counting)
    orders = reader.call_orders()
    monkeypatch.setattr(manifest.os, "pread", real)
    assert orders is not None and dict(orders) == want
    # a window starts at the line it is read for, so it may hold a line less than 4096 bytes
    size, longest = path.stat().st_size, max(map(len, path.read_bytes().splitlines(keepends=True)))
    windows = [n for n in reads if n >= 4096]
    assert len(windows) <= size // (4096 - longest) + 2, (len(windows), size, longest)
    if kind == "reversed":  # each line names the last one spelled out before it: no line read alone
        assert len(reads) == len(windows)
    else:  # a line named before the file reaches it, or forgotten: read alone, at most once a step
        assert len(reads) - len(windows) <= len(want)
    reader.close()


def test_has_batch_asks_for_the_distinct_orders(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``_has_batch`` looks at each distinct order once, not at every step's."""
    from ilstore._stepmap import SharedValues
    from ilstore_compare.tokens_view import _has_batch

    def per_step(self: Any) -> Any:
        raise AssertionError("values() iterated")

    with ilstore.open_run(_capture(out_dir, "pt")) as run:
        monkeypatch.setattr(SharedValues, "values", per_step)
        assert _has_batch(run) is False
