"""Parallel layouts (docs/parallel.md): dims strings, and logical runs assembled from synthetic
multi-rank runs written through each backend's writer (concatenated, blocked and uneven shards,
partial sums, replicas that agree and that disagree), read, converted and compared --unshard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import ilstore
from ilstore.cli import cli
from ilstore.keys import CallKey, TensorKey
from ilstore.layout import Layout, LayoutError, ModuleLayout, annotate, module_layout, parse_dims
from ilstore.manifest import new_manifest
from ilstore.records import TensorPolicy, build_record, finalize_stats, iter_tensor_nodes, tensor_stats
from ilstore.store.base import StepInfo
from ilstore.store.ranks import rank_run_dir, write_ranks_manifest
from ilstore.store.registry import get_backend
from ilstore.unshard import LogicalReader, ReplicaMismatchError, open_logical

BACKENDS = ["pt", "safetensors", "hdf5"]


# -- dims strings ------------------------------------------------------------------------------
def test_parse_dims_kinds() -> None:
    s = parse_dims("t h[tp]")
    assert (s.names, s.kind, s.dim, s.group) == (("t", "h"), "shard", 1, "tp")
    assert parse_dims("t h[tp:partial]").kind == "partial"
    assert parse_dims("t h[tp:avg]").reduce == "avg"
    assert parse_dims("t h").kind == "replicate"
    assert parse_dims("t h[tp:blocks=3]").blocks == 3
    assert parse_dims("t h[tp:blocks=4,1,1]").blocks == (4, 1, 1)
    assert parse_dims("... h[tp]").ellipsis == 0


@pytest.mark.parametrize("text, shape, dim", [("... h[tp]", [2, 3, 8], 2), ("b ... h[tp]", [2, 8], 1),
                                               ("b[tp] ... h", [4, 3, 8], 0), ("t h[tp]", [3, 8], 1)])
def test_bind_resolves_the_dimension(text: str, shape: list[int], dim: int) -> None:
    layout = parse_dims(text).bind(shape, rank=1, world_size=2)
    assert (layout.kind, layout.dim, layout.ranks, layout.index) == ("shard", dim, (0, 1), 1)


@pytest.mark.parametrize("text, why", [("", "names the dimensions"), ("t h[tp", "bad dimension"),
                                        ("... t ...", "once"), ("t[tp] h[tp]", "only one dimension"),
                                        ("t h[tp:weird]", "bad dimension"), ("t-1 h", "bad dimension"),
                                        ("t h[tp:blocks=0]", "blocks")])
def test_parse_dims_errors(text: str, why: str) -> None:
    with pytest.raises(LayoutError, match=why):
        parse_dims(text)


def test_bind_errors() -> None:
    with pytest.raises(LayoutError, match="name 2 dimension"):
        parse_dims("t h[tp]").bind([2, 3, 4], rank=0, world_size=2)
    with pytest.raises(LayoutError, match="do not add up"):
        parse_dims("t h[tp:blocks=4,1,1]").bind([3, 5], rank=0, world_size=2)
    with pytest.raises(LayoutError, match="not in group"):
        parse_dims("t h[tp]").bind([3, 5], rank=2, world_size=2)


def test_layout_json_round_trip_and_errors() -> None:
    lay = Layout("shard", (0, 1), 1, "tp", dim=1, sizes=(3, 2), source="dtensor")
    assert Layout.from_json(json.loads(json.dumps(lay.to_json()))) == lay
    for bad in ({"kind": "shard", "ranks": [0, 1], "index": 0}, {"kind": "cut", "ranks": [0], "index": 0},
                {"kind": "replicate", "ranks": [0, 1], "index": 2}, "shard"):
        with pytest.raises(LayoutError):
            Layout.from_json(bad)


def test_annotate_and_apply_rules() -> None:
    lin = annotate(torch.nn.Linear(4, 4), inputs={"0": "t h"}, outputs={"*": "t h[tp]"})
    rules = module_layout(lin)
    assert isinstance(rules, ModuleLayout)
    record = build_record(CallKey(1, 0, "lin", 0), "outputs", torch.ones(3, 2), TensorPolicy(pin_memory=False))
    rules.apply("outputs", iter_tensor_nodes(record.structure), rank=1, world_size=2)
    assert record.structure["layout"] == {"kind": "shard", "group": "tp", "ranks": [0, 1], "index": 1, "dim": 1,
                                          "source": "annotation"}
    bad = build_record(CallKey(1, 0, "lin", 0), "outputs", torch.ones(3), TensorPolicy(pin_memory=False))
    # a rule that does not fit is recorded, never raised
    rules.apply("outputs", iter_tensor_nodes(bad.structure), rank=1, world_size=2)
    assert bad.structure["layout"]["kind"] == "invalid" and "dimension" in bad.structure["layout"]["reason"]
    with pytest.raises(LayoutError):
        annotate(torch.nn.Linear(4, 4), outputs="t h[")
    assert module_layout(torch.nn.Linear(4, 4)) is None


def test_a_wrapper_that_forwards_lookups_has_its_inner_modules_layout() -> None:
    """torch's checkpoint_wrapper (like FSDP1 and PEFT wrappers) answers attribute lookups with the
    wrapped module's: its calls carry the inner annotation; a class-level annotation counts too."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    inner = annotate(torch.nn.Linear(4, 4), outputs="... i[tp]")
    wrapped = checkpoint_wrapper(inner)
    assert module_layout(wrapped) is module_layout(inner) is not None

    class Annotated(torch.nn.Linear):
        pass

    Annotated.__ilstore_layout__ = module_layout(inner)  # type: ignore[attr-defined]
    assert module_layout(Annotated(4, 4)) is module_layout(inner)
    assert module_layout(torch.nn.Linear(4, 4)) is None


# -- synthetic multi-rank runs -------------------------------------------------------------------
torch.manual_seed(0)
FULL = {
    "col": torch.randn(3, 8),                        # sharded along dim 1, 4 + 4
    "qkv": torch.randn(3, 12),                       # q 8, k 2, v 2: blocks 4,1,1 per rank
    "row": (torch.randn(3, 5), torch.randn(3, 5)),   # partial sums of rank 0 and rank 1
    "rep": torch.randn(3, 5),                        # replicated, no layout
    "uneven": torch.randn(2, 5),                     # sharded along dim 1, 3 + 2 (sizes recorded)
    "ids": torch.arange(6).reshape(2, 3),            # integer, replicated
}


def _rank_values(rank: int, perturb: dict[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """module -> (outputs value, layout rules) on ``rank``."""
    col = FULL["col"][:, 4 * rank:4 * rank + 4].clone()
    q, k, v = FULL["qkv"].split([8, 2, 2], dim=1)
    qkv = torch.cat([q[:, 4 * rank:4 * rank + 4], k[:, rank:rank + 1], v[:, rank:rank + 1]], dim=1)
    uneven = FULL["uneven"][:, :3].clone() if rank == 0 else FULL["uneven"][:, 3:].clone()
    values = {
        "col": (col, "t h[tp]"),
        "qkv": ((qkv, None), {"0": "t h[tp:blocks=4,1,1]"}),
        "row": (FULL["row"][rank].clone(), "t h[tp:partial]"),
        "rep": (FULL["rep"].clone(), None),
        "uneven": (uneven, Layout("shard", (0, 1), rank, "tp", dim=1, sizes=(3, 2))),
        "ids": (FULL["ids"].clone(), None),
    }
    for module, fn in (perturb or {}).items():
        value, rule = values[module]
        values[module] = (fn(value), rule)
    return values


def _write_rank(run_dir: Path, backend: str, rank: int, world: int, values: dict[str, tuple[Any, Any]]) -> None:
    writer = get_backend(backend).writer(run_dir, {})
    writer.open(new_manifest(backend, {"run_id": run_dir.name}, rank=rank, world_size=world))
    calls = []
    for module, (value, rule) in values.items():
        call = CallKey(rank, 0, module, 0)
        calls.append(call)
        record = build_record(call, "outputs", value, TensorPolicy(pin_memory=False))
        if rule is not None and world > 1:
            (ModuleLayout({}, {"*": rule}) if not isinstance(rule, dict) else ModuleLayout({}, rule)).apply(
                "outputs", iter_tensor_nodes(record.structure), rank, world)
        finalize_stats(record)
        writer.write(record)
    writer.end_step(StepInfo(0, calls, calls))
    writer.close("complete")


def write_tp2(root: Path, backend: str, name: str = "tp2", perturb: dict[int, dict[str, Any]] | None = None) -> Path:
    run_dir = root / name
    write_ranks_manifest(run_dir, backend=backend, world_size=2, config={"run_id": name})
    for rank in (0, 1):
        _write_rank(rank_run_dir(run_dir, rank, 2), backend, rank, 2, _rank_values(rank, (perturb or {}).get(rank)))
    return run_dir


def write_tp1(root: Path, backend: str, name: str = "tp1") -> Path:
    values = {"col": (FULL["col"], None), "qkv": ((FULL["qkv"], None), None),
              "row": (FULL["row"][0] + FULL["row"][1], None), "rep": (FULL["rep"], None),
              "uneven": (FULL["uneven"], None), "ids": (FULL["ids"], None)}
    _write_rank(root / name, backend, 0, 1, values)
    return root / name


def _expected(module: str) -> torch.Tensor:
    if module == "row":
        return (FULL["row"][0].double() + FULL["row"][1].double()).float()
    return FULL[module]  # type: ignore[return-value]


@pytest.mark.parametrize("backend", BACKENDS)
def test_logical_view_assembles_every_layout(tmp_path: Path, backend: str) -> None:
    run_dir = write_tp2(tmp_path, backend)
    with open_logical(run_dir) as run:
        assert run.steps() == [0] and run.manifest["world_size"] == 1
        assert [c.module for c in run.calls(0)] == list(FULL)
        assert all(k.rank == 0 for k in run.keys(0))
        for module in FULL:
            path = ("0",) if module == "qkv" else ()
            key = TensorKey(0, module, 0, "outputs", path)
            got = run.load(key)
            assert torch.equal(got, _expected(module)), module
            meta = run.meta(key)
            assert meta["shape"] == list(got.shape) and "layout" not in meta
            assert ("stats" in meta) == (module in ("rep", "ids"))  # a shard's stats are not the tensor's


@pytest.mark.parametrize("backend", BACKENDS)
def test_replicas_that_disagree_are_reported(tmp_path: Path, backend: str) -> None:
    run_dir = write_tp2(tmp_path, backend, perturb={1: {"rep": lambda t: t + 1e-3}})
    with open_logical(run_dir) as run:
        with pytest.raises(ReplicaMismatchError, match=r"rank 1's replica differs from rank 0's \(max abs diff 0.001"):
            run.load(TensorKey(0, "rep", 0, "outputs"))
        assert torch.equal(run.load(TensorKey(0, "col", 0, "outputs")), FULL["col"])  # the rest still reads
    with LogicalReader(ilstore.open_run(run_dir), replica_atol=1e-2) as loose:
        assert torch.equal(loose.load(TensorKey(0, "rep", 0, "outputs")), FULL["rep"])


def test_what_cannot_be_assembled_says_why(tmp_path: Path) -> None:
    run_dir = tmp_path / "odd"
    write_ranks_manifest(run_dir, backend="pt", world_size=2, config={"run_id": "odd"})
    for rank in (0, 1):
        values = {"noshard": (torch.ones(3, 4 + rank), None),       # shapes differ, no layout
                  "half": (torch.ones(3, 4), "t h[tp]" if rank == 0 else None),  # layouts differ
                  "alone": (torch.ones(2) if rank == 0 else None, None)}  # a tensor on rank 0, None on rank 1
        _write_rank(rank_run_dir(run_dir, rank, 2), "pt", rank, 2, values)
    with open_logical(run_dir) as run:
        noshard = run.meta(TensorKey(0, "noshard", 0, "outputs"))
        assert noshard["stored"] is False and "shapes differ" in noshard["reason"] and "annotate" in noshard["reason"]
        assert "stats" not in noshard
        assert "different layouts" in run.meta(TensorKey(0, "half", 0, "outputs"))["reason"]
        with pytest.raises(KeyError, match="not stored"):
            run.load(TensorKey(0, "noshard", 0, "outputs"))
        # None on rank 1: the tensor is rank 0's, as a call only rank 0 made (vLLM may gather
        # logits to one rank); a plain value there instead fails (tests/test_unshard_review.py)
        assert torch.equal(run.load(TensorKey(0, "alone", 0, "outputs")), torch.ones(2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_convert_unshard_writes_the_logical_run(tmp_path: Path, backend: str) -> None:
    src = write_tp2(tmp_path, "pt")
    runner = CliRunner()
    res = runner.invoke(cli, ["convert", str(src), str(tmp_path / "logical"), "--to", backend, "--unshard"])
    assert res.exit_code == 0, res.output
    with ilstore.open_run(tmp_path / "logical") as run:
        assert run.name == backend and run.manifest["world_size"] == 1
        assert run.manifest["unsharded_from"]["ranks"] == [0, 1]
        for module in FULL:
            key = TensorKey(0, module, 0, "outputs", ("0",) if module == "qkv" else ())
            got = run.load(key)
            assert torch.equal(got, _expected(module))
            assert run.meta(key)["stats"] == tensor_stats(got)
    bad = write_tp2(tmp_path, "pt", "bad", perturb={1: {"rep": lambda t: t + 1}})
    res = runner.invoke(cli, ["convert", str(bad), str(tmp_path / "bad-logical"), "--to", "pt", "--unshard"])
    assert res.exit_code == 2 and "replica differs" in res.output and not (tmp_path / "bad-logical").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_compare_unshard_tp2_against_tp1(tmp_path: Path, backend: str) -> None:
    from ilstore_compare.cli import compare_cmd

    tp2, tp1 = write_tp2(tmp_path, backend), write_tp1(tmp_path, "pt")
    runner = CliRunner()
    plain = runner.invoke(compare_cmd, ["--dir1", str(tp2), "--dir2", str(tp1)])
    assert plain.exit_code == 1  # rank 1 has no counterpart without --unshard
    out = tmp_path / "r.json"
    res = runner.invoke(compare_cmd, ["--dir1", str(tp2), "--dir2", str(tp1), "--unshard", "--rtol", "1e-6",
                                      "--output", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["summary"]["compared"] == len(FULL) and report["summary"]["matched"] == len(FULL)
    assert report["dir1"]["path"] == str(tp2) and any("--unshard" in n for n in report["notes"])
    # a perturbation of rank 1's shard shows in the logical tensor, at that module, as introduced
    pert = write_tp2(tmp_path, backend, "pert", perturb={1: {"col": lambda t: t.index_add(1, torch.tensor([2]),
                                                                                            torch.full((3, 1), 0.5))}})
    res = runner.invoke(compare_cmd, ["--dir1", str(pert), "--dir2", str(tp1), "--unshard", "--format", "json"])
    assert res.exit_code == 1
    report = json.loads(res.output)
    bad = [t for t in report["tensors"] if t["status"] != "match"]
    assert [t["module"] for t in bad] == ["col"]
    assert bad[0]["max_abs_diff_index"] == [0, 6] and bad[0]["mismatched"] == 3  # rank 1's column 2 is column 6
    first = report["first_divergence"]
    assert (first["module"], first["origin"], first["rank"]) == ("col", "introduced", 0)


def test_compare_unshard_refuses_replay(tmp_path: Path) -> None:
    from ilstore_compare.cli import compare_cmd

    tp2, tp1 = write_tp2(tmp_path, "pt"), write_tp1(tmp_path, "pt")
    res = CliRunner().invoke(compare_cmd, ["--dir1", str(tp2), "--dir2", str(tp1), "--unshard", "--replay", str(tp1)])
    assert res.exit_code == 2 and "--replay: cannot be combined with --unshard" in res.output


_ONE_RANK_DTENSOR = r"""
import sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
import ilstore
dist.init_process_group("gloo", init_method="file://" + sys.argv[1] + "/pg-store", rank=0, world_size=1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
with torch.no_grad(), ilstore.capture(model, {"output_dir": sys.argv[1], "run_id": "one"}) as cap:
    model(torch.ones(2, 4))
dist.destroy_process_group()
"""


def test_dtensor_layouts_in_one_process(tmp_path: Path) -> None:
    """The DTensor paths on a 1-rank mesh (the 2-rank case is tests/test_multirank.py, slow)."""
    proc = subprocess.run([sys.executable, "-c", _ONE_RANK_DTENSOR, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with ilstore.open_run(tmp_path / "one") as run:
        def layout(module: str, kind: str, path: tuple[str, ...] = ()) -> Any:
            return run.meta(TensorKey(0, module, 0, kind, path)).get("layout")

        # a DTensor input: stored as its local tensor, with its placement
        assert run.meta(TensorKey(0, "0", 0, "inputs", ("0",)))["shape"] == [2, 4]
        assert layout("0", "inputs", ("0",)) == {"kind": "replicate", "group": "tp", "ranks": [0], "index": 0,
                                                 "source": "dtensor"}
        # a plain output of a column-wise Linear: its layout from the DTensor weight
        assert layout("0", "outputs") == {"kind": "shard", "group": "tp", "ranks": [0], "index": 0, "dim": 1,
                                          "sizes": [8], "source": "module"}
        assert layout("2", "inputs", ("0",))["source"] == "dtensor"  # row-wise: its input made a DTensor
        assert layout("1", "outputs") is None
    with open_logical(tmp_path / "one") as logical:
        assert logical.load(TensorKey(0, "0", 0, "outputs")).shape == (2, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compare_unshard_reads_each_rank_side_once(tmp_path: Path, backend: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A logical tensor loads its parts with the ranks' own nodes (kept in its plan) and hands a
    planning rank reader (hdf5) those parts: no rank's side is parsed again at load time, although
    a comparer's window spans more steps than a rank reader keeps structures of."""
    from collections import Counter

    from compare_helpers import two_rank_run
    from ilstore_compare.unshard import compare_unsharded

    two_rank_run(tmp_path / "a", backend, 0.0)
    two_rank_run(tmp_path / "b", backend, 1.0)
    cls = get_backend(backend).reader
    real = cls._read_structure
    reads: Counter[tuple[str, Any, str]] = Counter()

    def counting(self: Any, call: Any, kind: str) -> Any:
        reads[(str(self.run_dir), call, kind)] += 1
        return real(self, call, kind)

    monkeypatch.setattr(cls, "_read_structure", counting)
    result = compare_unsharded(tmp_path / "a", tmp_path / "b")
    assert result.exit_code == 1 and len(result.tensors) == 12 * 3 * 2
    # replicated tensors (no layout): every rank's replica is loaded, and each of its sides parsed once
    assert len([k for k in reads if k[2] in ("inputs", "outputs")]) == 2 * 2 * 12 * 3 * 2
    assert max(reads.values()) == 1, \
        [k for k, n in reads.items() if n > 1][:3]
