"""The logical view fails closed (docs/parallel.md): ranks that disagree on a call's tensors, layouts
that disagree or are malformed, stats-only replicas that differ, reductions that cannot be assembled
and runs that lost a rank are never assembled into something that passes; the CLIs say why
(exit status 2 for a malformed run, never a traceback)."""

from __future__ import annotations

import json
import logging
import shutil
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import ilstore
from ilstore.cli import cli
from ilstore.errors import CorruptFileError, StoreError
from ilstore.keys import CallKey, TensorKey
from ilstore.layout import Layout, LayoutError, _placement_layout
from ilstore.manifest import new_manifest
from ilstore.records import TensorPolicy, build_record, finalize_stats, iter_tensor_nodes
from ilstore.store.base import StepInfo
from ilstore.store.ranks import rank_run_dir, write_ranks_manifest
from ilstore.store.registry import get_backend
from ilstore.unshard import LogicalReader, open_logical

BACKENDS = ["pt", "safetensors", "hdf5"]
FULL = torch.arange(24.0).reshape(3, 8)


def _write_rank(run_dir: Path, rank: int, world: int, values: dict[str, tuple[Any, Any]], *,
                backend: str = "pt", stats_only: bool = False) -> None:
    """values: module -> (outputs value, raw layout JSON for every tensor or None); a value of
    None: the rank made no such call."""
    writer = get_backend(backend).writer(run_dir, {})
    writer.open(new_manifest(backend, {"run_id": run_dir.name}, rank=rank, world_size=world))
    calls = []
    for module, (value, layout) in values.items():
        if value is None:
            continue
        call = CallKey(rank, 0, module, 0)
        calls.append(call)
        record = build_record(call, "outputs", value, TensorPolicy(store_bodies=not stats_only, pin_memory=False))
        if layout is not None:
            for _path, node in iter_tensor_nodes(record.structure):
                node["layout"] = layout
        finalize_stats(record)
        writer.write(record)
    writer.end_step(StepInfo(0, calls, calls))
    writer.close("complete")


def write_ranks(root: Path, name: str, per_rank: list[dict[str, tuple[Any, Any]]], **kw: Any) -> Path:
    run_dir = root / name
    write_ranks_manifest(run_dir, backend=kw.get("backend", "pt"), world_size=len(per_rank), config={"run_id": name})
    for rank, values in enumerate(per_rank):
        _write_rank(rank_run_dir(run_dir, rank, len(per_rank)), rank, len(per_rank), values, **kw)
    return run_dir


def write_one(root: Path, name: str, values: dict[str, Any], **kw: Any) -> Path:
    _write_rank(root / name, 0, 1, {m: (v, None) for m, v in values.items()}, **kw)
    return root / name


def shard(rank: int, dim: int = 1, ranks: tuple[int, ...] = (0, 1), **kw: Any) -> dict[str, Any]:
    return {"kind": "shard", "dim": dim, "group": "tp", "ranks": list(ranks),
            "index": ranks.index(rank) if rank in ranks else 0, **kw}


def rep(rank: int, ranks: tuple[int, ...] = (0, 1), **kw: Any) -> dict[str, Any]:
    return {"kind": "replicate", "group": "tp", "ranks": list(ranks), "index": ranks.index(rank), **kw}


def partial(rank: int, ranks: tuple[int, ...] = (0, 1), **kw: Any) -> dict[str, Any]:
    return {"kind": "partial", "reduce": "sum", "group": "tp", "ranks": list(ranks), "index": ranks.index(rank), **kw}


def meta(run_dir: Path, module: str, path: tuple[str, ...] = ()) -> dict[str, Any]:
    with open_logical(run_dir) as run:
        return run.meta(TensorKey(0, module, 0, "outputs", path))


def not_assembled(node: dict[str, Any], *words: str) -> bool:
    """Not stored, with a reason holding ``words``, and no rank's shape, size or statistics."""
    reason = str(node.get("reason"))
    return node["stored"] is False and reason.startswith("not assembled") and all(w in reason for w in words) \
        and node["shape"] is None and node["numel"] is None and "stats" not in node


def compare_statuses(dir1: Path, dir2: Path, **kw: Any) -> tuple[int, dict[str, tuple[str, str | None]]]:
    from ilstore_compare.unshard import compare_unsharded

    result = compare_unsharded(dir1, dir2, **kw)
    return result.exit_code, {"/".join([t.key.module, *t.key.path]): (t.status, t.note) for t in result.tensors}


# -- 1: every rank that made a call has the same tensors ---------------------------------------------
def test_ranks_that_disagree_on_a_calls_tensors_fail_closed(tmp_path: Path) -> None:
    left = FULL[:, :4].clone()
    # M: rank 1's output has a tensor at path 1 that rank 0's has not
    extra = write_ranks(tmp_path, "M", [{"a": ((left,), None)}, {"a": ((left.clone(), left + 1), None)}])
    assert not_assembled(meta(extra, "a", ("1",)), "rank(s) [1] recorded a tensor", "rank(s) [0] did not")
    assert meta(extra, "a", ("0",))["stored"] is True  # both ranks recorded that one
    code, got = compare_statuses(extra, write_one(tmp_path, "ref_m", {"a": (left,)}))
    assert code != 0 and got["a/0"][0] == "match" and got["a/1"][0] == "only_in_dir1"
    # ... and where the structure with the most tensors has no place for another rank's tensor
    # (rank 0: a tensor at path 0 alone; rank 1: a container there), nothing of that side is trusted
    nested = write_ranks(tmp_path, "M2", [{"a": ((left, left), None)}, {"a": (((left.clone(),), left.clone()), None)}])
    assert not_assembled(meta(nested, "a", ("1",)), "different structures")
    assert not_assembled(meta(nested, "a", ("0",)), "different structures")
    # N: an int on rank 1 where rank 0 has a tensor
    plain = write_ranks(tmp_path, "N", [{"a": ((left, 1), None)}, {"a": ((7, 1), None)}])
    assert not_assembled(meta(plain, "a", ("0",)), "rank(s) [0] recorded a tensor", "rank(s) [1] did not")
    code, got = compare_statuses(plain, write_one(tmp_path, "ref_n", {"a": (left, 1)}))
    assert code != 0 and got["a/0"][0] == "not_compared"
    # B: an explicit replicate layout over ranks [0, 1], and rank 1 never made the call
    lacking = write_ranks(tmp_path, "B", [{"a": (left, None), "b": (left.clone(), rep(0))},
                                          {"a": (left.clone(), None), "b": (None, None)}])
    assert not_assembled(meta(lacking, "b"), "rank(s) [1] of group 'tp' [0, 1] recorded no such tensor")
    code, got = compare_statuses(lacking, write_one(tmp_path, "ref_b", {"a": left, "b": left}))
    assert code != 0 and got["b"][0] == "not_compared" and got["a"][0] == "match"


def test_none_where_another_rank_holds_the_tensor(tmp_path: Path) -> None:
    """A rank holding None where another holds a tensor (a result gathered to one rank, as vLLM's
    logits may be) leaves the tensor to the ranks holding it, as a call only they made; a layout
    naming the rank holding None still fails."""
    left = FULL[:, :4].clone()
    run_dir = write_ranks(tmp_path, "G", [{"a": ((left, left + 1), None), "b": ((left,), rep(0))},
                                          {"a": ((left.clone(), None), None), "b": ((None,), None)}])
    with open_logical(run_dir) as run:
        assert torch.equal(run.load(TensorKey(0, "a", 0, "outputs", ("1",))), left + 1)
        assert torch.equal(run.load(TensorKey(0, "a", 0, "outputs", ("0",))), left)
    assert not_assembled(meta(run_dir, "b", ("0",)), "rank(s) [1] of group 'tp' [0, 1] recorded no such tensor")


def test_a_call_only_some_ranks_made_without_layout_is_theirs(tmp_path: Path) -> None:
    """Pipeline parallelism puts layers on different ranks: such a call is replicated over the
    ranks that made it (cases A and FF)."""
    left = FULL[:, :4].clone()
    run_dir = write_ranks(tmp_path, "pp", [{"a": (left, None), "b": (left + 1, None), "c": (None, None)},
                                           {"a": (left.clone(), None), "b": (None, None), "c": (left + 5, None)}])
    with open_logical(run_dir) as run:
        for module, value in (("a", left), ("b", left + 1), ("c", left + 5)):
            assert torch.equal(run.load(TensorKey(0, module, 0, "outputs")), value)
    code, got = compare_statuses(run_dir, write_one(tmp_path, "ref", {"a": left, "b": left + 1, "c": left + 5}))
    assert code == 0 and {s for s, _ in got.values()} == {"match"}


# -- 2, 5, 8: layouts ------------------------------------------------------------------------------
@pytest.mark.parametrize("doc, why", [
    (shard(0, ranks=(0, 0)), "twice"), (shard(0, ranks=(0, -1)), "ranks >= 0"),
    (shard(0, dim=True), "'dim'"), ({**shard(0), "index": True}, "'index'"), (shard(0, sizes=[4, -4]), "sizes"),
    (shard(0, blocks=[6, -2]), "blocks"), (shard(0, blocks=[0]), "blocks"), (shard(0, blocks=[]), "blocks"),
    ({**shard(0), "ranks": [True, 1]}, "'ranks'"), (shard(0, sizes=[4, True]), "'sizes'"),
])
def test_malformed_layouts_are_rejected(doc: dict[str, Any], why: str) -> None:
    with pytest.raises(LayoutError, match=why):
        Layout.from_json(doc)


def test_layout_objects_validate_their_fields() -> None:
    with pytest.raises(LayoutError, match="twice"):
        Layout("replicate", (1, 1), 0)
    with pytest.raises(LayoutError, match="dim"):
        Layout("shard", (0, 1), 0, dim=True)
    with pytest.raises(LayoutError, match="index"):
        Layout("shard", (0, 1), True, dim=1)  # type: ignore[arg-type]
    assert Layout("shard", (2, 3), 1, dim=0, sizes=(0, 4), blocks=(1, 3)).ranks == (2, 3)


def test_a_group_must_be_exactly_the_ranks_that_recorded_it(tmp_path: Path) -> None:
    half = [FULL[:, :4].clone(), FULL[:, 4:].clone()]
    # E2: replicate over [0] only, while rank 1 recorded another value: not rank 0's alone
    e2 = write_ranks(tmp_path, "E2", [{"x": (FULL.clone(), rep(0, ranks=(0,)))},
                                      {"x": (FULL + 1, rep(0, ranks=(0,)))}])
    assert not_assembled(meta(e2, "x"), "rank 1")
    code, got = compare_statuses(e2, write_one(tmp_path, "ref", {"x": FULL}))
    assert code != 0 and got["x"][0] == "not_compared"
    # E: a shard group of rank 0 only, recorded by both ranks
    e = write_ranks(tmp_path, "E", [{"x": (half[0], shard(0, ranks=(0,)))}, {"x": (half[1], shard(0, ranks=(0,)))}])
    assert not_assembled(meta(e, "x"), "rank 1")
    # D: duplicate ranks
    d = write_ranks(tmp_path, "D", [{"x": (half[0], shard(0, ranks=(0, 0)))}, {"x": (half[1], shard(0, ranks=(0, 0)))}])
    assert not_assembled(meta(d, "x"), "malformed", "twice")
    # a group need not span the run: pipeline stages of 2 ranks each, tensor parallel within
    stages = [{"s0": (half[r], shard(r, ranks=(0, 1))) if r < 2 else (None, None),
               "s1": (half[r - 2] + 100, shard(r, ranks=(2, 3))) if r >= 2 else (None, None)} for r in range(4)]
    pp = write_ranks(tmp_path, "pp_tp", stages)
    with open_logical(pp) as run:
        assert torch.equal(run.load(TensorKey(0, "s0", 0, "outputs")), FULL)
        assert torch.equal(run.load(TensorKey(0, "s1", 0, "outputs")), FULL + 100)


@pytest.mark.parametrize("l0, l1, why", [
    (shard(0, sizes=[4, 4]), shard(1, sizes=[5, 3]), "different layouts"),        # I: sizes disagree
    (shard(0), shard(0), "rank 1 recorded index 0"),                              # J: both at index 0
    (shard(0), shard(1, group="dp"), "different layouts"),                        # P: groups differ
    (shard(0), shard(1, blocks=[2, 1, 1]), "different layouts"),                  # blocks on rank 1 only
    (shard(0, blocks=[2, 2]), shard(1, blocks=[2, 1, 1]), "different layouts"),   # as many blocks
    (shard(0, sizes=[4, 4]), shard(1), "different layouts"),                      # sizes on rank 0 only
])
def test_the_members_layouts_must_agree(tmp_path: Path, l0: dict[str, Any], l1: dict[str, Any], why: str) -> None:
    run_dir = write_ranks(tmp_path, "tp", [{"x": (FULL[:, :4].clone(), l0)}, {"x": (FULL[:, 4:].clone(), l1)}])
    assert not_assembled(meta(run_dir, "x"), why)


def test_blocks_recorded_alike_still_assemble(tmp_path: Path) -> None:
    q, k, v = FULL[:, :4], FULL[:, 4:6], FULL[:, 6:]
    parts = [torch.cat([q[:, 2 * r:2 * r + 2], k[:, r:r + 1], v[:, r:r + 1]], 1) for r in (0, 1)]
    run_dir = write_ranks(tmp_path, "qkv", [{"x": (parts[r], shard(r, blocks=[2, 1, 1]))} for r in (0, 1)])
    with open_logical(run_dir) as run:
        assert torch.equal(run.load(TensorKey(0, "x", 0, "outputs")), FULL)


def test_malformed_layouts_give_an_honest_run_never_a_traceback(tmp_path: Path) -> None:
    # H: negative blocks; P8: dim true (as JSON writes it)
    for name, l0, l1 in (("H", shard(0, blocks=[6, -2]), shard(1, blocks=[6, -2])),
                         ("P8", shard(0, dim=True), shard(1, dim=True))):
        run_dir = write_ranks(tmp_path, name, [{"x": (FULL[:, :4].clone(), l0)}, {"x": (FULL[:, 4:].clone(), l1)}])
        assert not_assembled(meta(run_dir, "x"), "malformed")
        res = CliRunner().invoke(cli, ["convert", str(run_dir), str(tmp_path / f"{name}-logical"), "--to", "pt",
                                       "--unshard"])
        assert res.exit_code == 0 and res.exception is None, res.output


def test_unexpected_errors_while_assembling_name_the_run_and_tensor(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = write_ranks(tmp_path, "tp", [{"x": (FULL[:, :4].clone(), shard(0)), "y": (FULL, None)},
                                           {"x": (FULL[:, 4:].clone(), shard(1)), "y": (FULL.clone(), None)}])

    def boom(*_args: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(LogicalReader, "_assemble", boom)
    with open_logical(run_dir) as run, pytest.raises(StoreError, match=r"tp: step 0 x outputs cannot be assembled"):
        run.load(TensorKey(0, "x", 0, "outputs"))
    res = CliRunner().invoke(cli, ["convert", str(run_dir), str(tmp_path / "out"), "--to", "pt", "--unshard"])
    assert res.exit_code == 2 and "cannot be assembled" in res.output and "RuntimeError: boom" in res.output
    monkeypatch.setattr(LogicalReader, "_plan", boom)
    assert not_assembled(meta(run_dir, "y"), "unexpected RuntimeError", "boom")


# -- 3: stats-only replicas --------------------------------------------------------------------------
def test_stats_only_replicas_are_cross_checked(tmp_path: Path) -> None:
    differ = write_ranks(tmp_path, "differ", [{"rep": (FULL.clone(), None)}, {"rep": (FULL + 100, None)}],
                         stats_only=True)
    node = meta(differ, "rep")
    assert not_assembled(node, "rank 1's statistics differ from rank 0's")
    for ref in (write_one(tmp_path, "ref_stats", {"rep": FULL}, stats_only=True),
                write_one(tmp_path, "ref", {"rep": FULL})):
        code, got = compare_statuses(differ, ref)
        assert code != 0 and got["rep"][0] == "not_compared", got
    # replicas whose statistics agree keep them (compared by statistics)
    agree = write_ranks(tmp_path, "agree", [{"rep": (FULL.clone(), None)}, {"rep": (FULL.clone(), None)}],
                        stats_only=True)
    node = meta(agree, "rep")
    assert node["stored"] is False and node["shape"] == [3, 8] and node["stats"]["max"] == 23.0
    # within replica_atol, as bodies would be
    near = write_ranks(tmp_path, "near", [{"rep": (FULL.clone(), None)}, {"rep": (FULL + 1e-3, None)}],
                       stats_only=True)
    with LogicalReader(ilstore.open_run(near), replica_atol=1e-2) as loose:
        assert "stats" in loose.meta(TensorKey(0, "rep", 0, "outputs"))
    assert not_assembled(meta(near, "rep"), "allowed 0")


# -- 4: DTensor placements ---------------------------------------------------------------------------
def test_dtensor_placements_other_than_shard_sum_avg_replicate_are_unsupported() -> None:
    placement_types = pytest.importorskip("torch.distributed.tensor.placement_types")
    mesh = types.SimpleNamespace(mesh=torch.tensor([0, 1]), mesh_dim_names=("tp",))
    for op in ("max", "min"):
        doc = _placement_layout(placement_types.Partial(op), mesh, [2, 4], "dtensor")
        assert doc["kind"] == "unsupported" and op in doc["reason"]
    assert _placement_layout(placement_types.Partial("avg"), mesh, [2, 4], "dtensor")["reduce"] == "avg"
    assert _placement_layout(placement_types.Partial("sum"), mesh, [2, 4], "dtensor")["reduce"] == "sum"
    assert _placement_layout(placement_types.Shard(1), mesh, [2, 4], "dtensor")["kind"] == "shard"
    assert _placement_layout(placement_types.Replicate(), mesh, [2, 4], "dtensor")["kind"] == "replicate"
    strided = getattr(placement_types, "_StridedShard", None)
    if strided is not None:
        doc = _placement_layout(strided(0, split_factor=2), mesh, [2, 4], "dtensor")
        assert doc["kind"] == "unsupported" and "_StridedShard" in doc["reason"]


# -- 6, 7: what cannot be assembled ------------------------------------------------------------------
def test_an_unassembled_tensor_is_not_compared_with_its_reason(tmp_path: Path) -> None:
    run_dir = write_ranks(tmp_path, "P2", [{"x": (FULL[:, :4].clone(), shard(0, ranks=(0, 5)))},
                                           {"x": (FULL[:, 4:].clone(), shard(1))}])
    code, got = compare_statuses(run_dir, write_one(tmp_path, "ref", {"x": FULL}))
    status, note = got["x"]
    assert code != 0 and status == "not_compared" and "not assembled" in str(note)


@pytest.mark.parametrize("backend", BACKENDS)
def test_convert_unshard_writes_unassembled_tensors_without_a_shape_and_warns(
        tmp_path: Path, backend: str, caplog: pytest.LogCaptureFixture) -> None:
    per_rank = [{f"m{i}": (FULL[:, 4 * r:4 * r + 4].clone(), shard(r, ranks=(0,))) for i in range(7)} for r in (0, 1)]
    for r in (0, 1):
        per_rank[r]["ok"] = (FULL.clone(), None)
    run_dir = write_ranks(tmp_path, "bad", per_rank)
    with caplog.at_level(logging.WARNING, logger="ilstore.convert"):
        res = CliRunner().invoke(cli, ["convert", str(run_dir), str(tmp_path / "out"), "--to", backend, "--unshard"])
    assert res.exit_code == 0, res.output
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "7 tensor(s) could not be assembled" in warning and "step 0 m0 outputs: not assembled" in warning
    assert "and 2 more" in warning
    with ilstore.open_run(tmp_path / "out") as run:
        node = run.meta(TensorKey(0, "m0", 0, "outputs"))
        assert node["stored"] is False and node["shape"] is None and "stats" not in node
        assert "not assembled" in node["reason"] and "unshard" not in node
        assert torch.equal(run.load(TensorKey(0, "ok", 0, "outputs")), FULL)
    code, got = compare_statuses(tmp_path / "out", write_one(tmp_path, "ref", {"ok": FULL, "m0": FULL}))
    assert code != 0 and got["m0"][0] == "not_compared" and got["ok"][0] == "match"


# -- 9: partial reductions of integers and booleans --------------------------------------------------
def test_partial_avg_of_integers_and_partial_of_booleans_are_not_assembled(tmp_path: Path) -> None:
    per_rank = [{"iavg": (torch.full((2,), r + 1), partial(r, reduce="avg")),
                 "isum": (torch.full((2,), r + 1), partial(r)),
                 "bsum": (torch.tensor([True, False]), partial(r)),
                 "cavg": (torch.full((2,), complex(r, 1)), partial(r, reduce="avg"))} for r in (0, 1)]
    run_dir = write_ranks(tmp_path, "vals", per_rank)
    assert not_assembled(meta(run_dir, "iavg"), "avg of torch.int64")
    assert not_assembled(meta(run_dir, "bsum"), "sum of torch.bool")
    with open_logical(run_dir) as run:
        assert run.load(TensorKey(0, "isum", 0, "outputs")).tolist() == [3, 3]
        assert run.load(TensorKey(0, "cavg", 0, "outputs")).tolist() == [complex(0.5, 1)] * 2
    res = CliRunner().invoke(cli, ["convert", str(run_dir), str(tmp_path / "out"), "--to", "pt", "--unshard"])
    assert res.exit_code == 0 and res.exception is None, res.output


# -- 10: a run that lost a rank ----------------------------------------------------------------------
def _two_ranks(tmp_path: Path) -> Path:
    return write_ranks(tmp_path, "tp", [{"rep": (FULL.clone(), None)}, {"rep": (FULL.clone(), None)}])


def test_a_run_missing_a_rank_is_an_error(tmp_path: Path) -> None:
    run_dir = _two_ranks(tmp_path)
    shutil.rmtree(run_dir / "rank_1")
    manifest = json.loads((run_dir / "ilstore.json").read_text())
    (run_dir / "ilstore.json").write_text(json.dumps({**manifest, "ranks": [0]}))
    with pytest.raises(CorruptFileError, match=r"world_size 2 but rank\(s\) \[1\] are missing"):
        ilstore.open_run(run_dir)
    res = CliRunner().invoke(cli, ["ls", str(run_dir)])
    assert res.exit_code == 2 and "rank(s) [1] are missing" in res.output and "Traceback" not in res.output
    from ilstore_compare.cli import compare_cmd

    ref = write_one(tmp_path, "ref", {"rep": FULL})
    res = CliRunner().invoke(compare_cmd, ["--dir1", str(run_dir), "--dir2", str(ref), "--unshard"])
    assert res.exit_code == 2 and "rank(s) [1] are missing" in res.output


@pytest.mark.parametrize("patch, why", [({"ranks": [0, 1, 1]}, "once"), ({"ranks": [0, 2]}, "once"),
                                        ({"world_size": True}, "world_size"), ({"world_size": 3}, r"\[2\]")])
def test_a_ranks_manifest_must_list_each_rank_once(tmp_path: Path, patch: dict[str, Any], why: str) -> None:
    run_dir = _two_ranks(tmp_path)
    manifest = json.loads((run_dir / "ilstore.json").read_text())
    (run_dir / "ilstore.json").write_text(json.dumps({**manifest, **patch}))
    with pytest.raises(CorruptFileError, match=why):
        ilstore.open_run(run_dir)


def test_each_ranks_manifest_must_agree(tmp_path: Path) -> None:
    run_dir = _two_ranks(tmp_path)
    path = run_dir / "rank_1" / "ilstore.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "rank": 0}))
    with pytest.raises(CorruptFileError, match="rank_1.*must be rank 1 of world_size 2"):
        ilstore.open_run(run_dir)
    res = CliRunner().invoke(cli, ["convert", str(run_dir), str(tmp_path / "out"), "--to", "pt", "--unshard"])
    assert res.exit_code == 2 and "must be rank 1" in res.output


def test_a_replica_that_recorded_nothing_keeps_its_reason_and_the_shape(tmp_path: Path) -> None:
    """A replica left out by ``device_names`` (no body, no statistics) is no disagreement of
    statistics: the node keeps its shape and the rank's own reason, as before the stats check."""
    run_dir = tmp_path / "filtered"
    write_ranks_manifest(run_dir, backend="pt", world_size=2, config={"run_id": "filtered"})
    for rank in (0, 1):
        writer = get_backend("pt").writer(rank_run_dir(run_dir, rank, 2), {})
        writer.open(new_manifest("pt", {"run_id": "filtered"}, rank=rank, world_size=2))
        call = CallKey(rank, 0, "norm", 0)
        policy = TensorPolicy(pin_memory=False, device_ok=lambda _device, keep=rank == 0: keep)
        record = build_record(call, "outputs", FULL[:2, :3].clone(), policy)
        finalize_stats(record)
        writer.write(record)
        writer.end_step(StepInfo(0, [call], [call]))
        writer.close("complete")
    node = meta(run_dir, "norm")
    assert node["stored"] is False and node["shape"] == [2, 3]
    assert node["reason"].startswith("rank 1: ") and "not assembled" not in node["reason"]


def test_none_above_a_tensor_path_leaves_it_to_the_ranks_holding_it(tmp_path: Path) -> None:
    """vLLM's first pipeline stage passes ``intermediate_tensors=None`` where later stages pass a
    container of tensors: those tensors are the later stages' (as for None at their own path)."""
    x, hidden = FULL[:2, :3].clone(), torch.ones(2, 3)
    first, later = {"model": ((x, None), None)}, {"model": ((x.clone(), {"hidden": hidden}), None)}
    run_dir = write_ranks(tmp_path, "pp", [first, first, later, later])
    node = meta(run_dir, "model", ("1", "hidden"))
    assert node["stored"] is True and node["shape"] == [2, 3]
    with open_logical(run_dir) as run:
        assert torch.equal(run.load(TensorKey(0, "model", 0, "outputs", ("1", "hidden"))), hidden)
