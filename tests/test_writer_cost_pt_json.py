"""One cached JSON encoder for every writer (issue 13, the per-record document cost).

``ilstore.manifest.dumps`` is ``json.dumps(doc, allow_nan=False)`` with the C encoder made once,
and ``dumps_tree`` the same without the check for circular references (a record's structure is
a tree); the pt and safetensors writers and the step journal use them. Their text and their
errors must be exactly json.dumps's, and a structure that is not JSON (a NaN, a type JSON lacks,
a loop) must fail at ``write`` with the StoreError naming the side in the pt writer too (it
raised the bare ValueError before), the writer going on with the next record.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from ilstore import manifest
from ilstore.errors import StoreError
from ilstore.keys import CallKey
from ilstore.manifest import new_manifest
from ilstore.records import Record, TensorPolicy, build_record, finalize_stats
from ilstore.store import pt
from ilstore.store.base import StepInfo
from ilstore.store.registry import open_run

_DOCS: list[Any] = [
    {}, {"a": [1.5, -0.0, 1e300, 2**70, None, True, False, "é\u2028\n\"\\", ""]},
    {"k": (1, 2), 3: {"x": -1e-300}, 2.5: [], None: {}, True: "t"},
    OrderedDict(b=1, a=[{"c": [[]]}]), {"nan": float("nan")}, {"inf": float("-inf")}, {"set": {1}},
    {"deep": {"er": [{"est": 0.1 + 0.2}]}}, {"bytes": b"x"}, {(1, 2): 3},
    # not a dict at the top: the encoders take any value, as json.dumps does
    [1, "x", {"y": 2.0}], "plain \u00ff", 3.25, 7, None,
]


def _outcome(fn: Any, doc: Any) -> tuple[str, str]:
    try:
        return "text", fn(doc)
    except (TypeError, ValueError) as exc:
        return type(exc).__name__, str(exc)


@pytest.mark.parametrize("doc", _DOCS)
def test_dumps_and_dumps_tree_are_json_dumps(doc: Any) -> None:
    want = _outcome(lambda d: json.dumps(d, allow_nan=False), doc)
    assert _outcome(manifest.dumps, doc) == want
    assert _outcome(manifest.dumps_tree, doc) == want
    # usable after an error too (a failed call may leave circular-reference marks behind)
    assert manifest.dumps({"after": [1, {"a": 2}]}) == manifest.dumps_tree({"after": [1, {"a": 2}]}) \
        == '{"after": [1, {"a": 2}]}'


def test_a_loop_is_a_value_error_in_dumps_and_a_recursion_error_in_dumps_tree() -> None:
    doc: dict[str, Any] = {"a": 1}
    doc["self"] = doc
    with pytest.raises(ValueError, match="Circular reference detected"):
        manifest.dumps(doc)
    with pytest.raises(RecursionError):
        manifest.dumps_tree(doc)
    assert manifest.dumps({"a": [doc["a"]]}) == '{"a": [1]}'


def test_the_writers_share_one_encoder() -> None:
    """pt's and safetensors' encoders are manifest's (no private copy to drift apart)."""
    from ilstore.store import safetensors as st

    assert pt._dumps is manifest.dumps and pt._dumps_tree is manifest.dumps_tree
    assert st._ENCODE is manifest.dumps_tree
    assert pt._json_str is st._json_str is manifest.json_str


def _record(step: int, value: Any, kind: str = "outputs", mode: str = "tensors") -> Record:
    record = build_record(CallKey(0, step, "m", 0), kind, value, TensorPolicy(store_bodies=mode == "tensors"))
    finalize_stats(record)
    return record


@pytest.mark.parametrize("mode", ["tensors", "stats"])
@pytest.mark.parametrize("bad", ["nan", "set", "loop"])
def test_a_pt_structure_that_is_not_json_fails_at_write_and_the_writer_goes_on(tmp_path: Path, mode: str,
                                                                              bad: str) -> None:
    writer = pt.PtWriter(tmp_path / "run")
    writer.open(new_manifest("pt", {}))
    record = _record(0, torch.ones(3), mode=mode)
    if bad == "nan":
        record.structure["extra"] = float("nan")
    elif bad == "set":
        record.structure["extra"] = {1, 2}
    else:
        record.structure["loop"] = record.structure
    with pytest.raises(StoreError, match="r0/s0/m/0/outputs: structure is not valid JSON"):
        writer.write(record)
    good = _record(0, torch.arange(4.0), kind="inputs", mode=mode)
    writer.write(good)
    writer.end_step(StepInfo(0, [good.call], [good.call]))
    writer.close()
    with open_run(tmp_path / "run") as reader:
        assert reader.structure(good.call, "outputs") is None
        structure = reader.structure(good.call, "inputs")
        assert structure is not None and structure["type"] == "tensor"
        if mode == "tensors":
            assert torch.equal(reader.load(good.call.tensor("inputs")), torch.arange(4.0))


def test_pt_documents_and_journal_lines_are_json_dumps_text(tmp_path: Path) -> None:
    """Every structure file, structure-list line and journal line of a pt run written through the
    shared encoder is ``json.dumps(doc, allow_nan=False)`` of its own content."""
    writer = pt.PtWriter(tmp_path / "run")
    writer.open(new_manifest("pt", {}))
    for step in range(3):
        calls = []
        for i, mode in enumerate(("tensors", "stats")):
            record = build_record(CallKey(0, step, f"m{i}", 0), "outputs",
                                  {"x": torch.randn(5) * (step + 1), "n": step, "s": "é"},
                                  TensorPolicy(store_bodies=mode == "tensors"))
            finalize_stats(record)
            writer.write(record)
            calls.append(record.call)
        writer.end_step(StepInfo(step, calls, calls))
    writer.close()
    run = tmp_path / "run"
    texts = [p.read_text(encoding="utf-8") for p in run.rglob("*.json") if p.name != manifest.MANIFEST_NAME]
    lists = [run / manifest.JOURNAL_NAME, *run.rglob(pt.STRUCTURES_NAME)]
    texts += [line for p in lists for line in p.read_text(encoding="utf-8").splitlines()]
    assert len(texts) >= 3 + 3 + 3
    for text in texts:
        assert text == json.dumps(json.loads(text), allow_nan=False)
