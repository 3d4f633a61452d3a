"""Convert between every pair of backends, bit-exactly; the same capture in every backend; the CLI."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ilstore
from ilstore.cli import cli
from ilstore.convert import convert, replay_order
from ilstore.demo import DEMO_PROMPT, tiny_llama
from ilstore.keys import CallKey, TensorKey
from ilstore.manifest import new_manifest
from ilstore.records import TensorPolicy, build_record, finalize_stats
from ilstore.store.base import StepInfo
from ilstore.store.ranks import rank_run_dir, write_ranks_manifest
from ilstore.store.registry import get_backend
from ilstore.testing import ConformanceModel, assert_bits_equal, neutral_meta
from support import VLLM_RUN, native_hdf5, native_safetensors

BACKENDS = ["pt", "safetensors", "hdf5"]
_MANIFEST_KEYS = ("config", "format_version", "journal", "status", "rank", "world_size", "torch_version")


def assert_same_run(a_dir: Path, b_dir: Path, manifest: bool = True) -> int:
    """Same steps, call order, keys, metadata and bits; returns the number of tensors compared."""
    n = 0
    with ilstore.open_run(a_dir) as a, ilstore.open_run(b_dir) as b:
        assert a.steps() == b.steps() and a.steps()
        if manifest:
            for key in _MANIFEST_KEYS:
                assert a.manifest.get(key) == b.manifest.get(key), key
        for step in a.steps():
            assert a.calls(step) == b.calls(step) and a.call_ends(step) == b.call_ends(step)
            totals = a.step_totals(step)
            assert totals is None or totals == b.step_totals(step), step
        keys = a.keys()
        assert keys == b.keys()
        for key in keys:
            assert neutral_meta(a, key) == neutral_meta(b, key), key
            if a.meta(key).get("stored") is not False:
                assert_bits_equal(b.load(key), a.load(key), key)
                n += 1
    return n


@pytest.fixture(scope="module")
def captures(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Per backend: the tiny Llama in bfloat16 (two steps) and the all-dtypes conformance model."""
    out = tmp_path_factory.mktemp("captures")
    runs = {}
    for backend in BACKENDS:
        model = tiny_llama(torch.bfloat16)
        ids = torch.tensor(DEMO_PROMPT)
        cfg = {"output_dir": str(out), "run_id": f"llama-{backend}", "backend": backend, "log_step_ids": [0, 1],
               "on_error": "raise"}
        with torch.no_grad(), ilstore.capture(model, cfg) as cap:
            model(input_ids=ids, use_cache=False)
            model(input_ids=ids[:, :5], attention_mask=torch.ones(1, 5, dtype=torch.long), use_cache=False)
        runs[("llama", backend)] = cap.run_dir
        model = ConformanceModel()
        cfg = {**cfg, "run_id": f"zoo-{backend}", "log_post_fwd_inputs": True}
        torch.manual_seed(1)
        with torch.no_grad(), ilstore.capture(model, cfg) as cap:
            model(torch.randn(3, 4))
            model(torch.randn(3, 4))
        runs[("zoo", backend)] = cap.run_dir
    return runs


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("model", ["llama", "zoo"])
def test_same_capture_in_every_backend(captures: dict[tuple[str, str], Path], model: str, backend: str) -> None:
    assert assert_same_run(captures[(model, "pt")], captures[(model, backend)], manifest=False) > 50
    with ilstore.open_run(captures[(model, backend)]) as run:
        assert run.name == backend and run.manifest["config"]["backend"] == backend


@pytest.mark.parametrize("a,b", list(itertools.permutations(BACKENDS, 2)))
@pytest.mark.parametrize("model", ["llama", "zoo"])
def test_convert_there_and_back_is_bit_identical(captures: dict[tuple[str, str], Path], tmp_path: Path,
                                                 model: str, a: str, b: str) -> None:
    src = captures[(model, a)]
    mid = convert(src, tmp_path / f"{model}-{b}", to=b)
    back = convert(mid, tmp_path / f"{model}-{a}", to=a)
    with ilstore.open_run(mid) as run:
        assert run.name == b and run.manifest["converted_from"] == {"path": str(src), "backend": a}
    assert assert_same_run(src, mid) == assert_same_run(src, back) > 50


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_files_read_natively_match_the_pt_capture(captures: dict[tuple[str, str], Path], backend: str) -> None:
    native = native_safetensors if backend == "safetensors" else native_hdf5
    for model in ("llama", "zoo"):
        with ilstore.open_run(captures[(model, "pt")]) as pt:
            n = 0
            for key in pt.keys():
                meta = pt.meta(key)
                if meta.get("stored") is False or "same_as" in meta:
                    continue
                assert_bits_equal(native(captures[(model, backend)], key), pt.load(key), key)
                n += 1
            assert n > 20
    bf16 = TensorKey(0, "model.layers.0.mlp.down_proj", 0, "outputs")
    assert native(captures[("llama", backend)], bf16).dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_vllm_fixture_converts_without_loss(tmp_path: Path, backend: str) -> None:
    before = sorted(os.walk(VLLM_RUN))
    dst = convert(VLLM_RUN, tmp_path / backend, to=backend)
    assert assert_same_run(VLLM_RUN, dst, manifest=False) > 100
    back = convert(dst, tmp_path / "pt", to="pt")
    assert assert_same_run(VLLM_RUN, back, manifest=False) > 100
    assert sorted(os.walk(VLLM_RUN)) == before  # the source is only read
    with ilstore.open_run(dst) as run:
        assert run.status == "complete" and run.manifest["config"] == {}


def test_only_selected_steps(captures: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    dst = convert(captures[("llama", "pt")], tmp_path / "one", to="hdf5", steps=[1])
    with ilstore.open_run(dst) as run, ilstore.open_run(captures[("llama", "pt")]) as src:
        assert run.steps() == [1] and run.keys() == src.keys(1)
    with pytest.raises(ilstore.StoreError, match="no completed step 7"):
        convert(captures[("llama", "pt")], tmp_path / "seven", to="hdf5", steps=[7])
    assert not (tmp_path / "seven").exists()


def test_refuses_unsafe_destinations(captures: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    src = captures[("zoo", "pt")]
    with pytest.raises(ilstore.StoreError, match="must not be the source"):
        convert(src, src, to="hdf5", overwrite=True)
    with pytest.raises(ilstore.StoreError, match="must not be the source"):
        convert(src, src / "inner", to="hdf5")
    dst = convert(src, tmp_path / "dst", to="hdf5")
    with pytest.raises(ilstore.StoreError, match="already exists"):
        convert(src, dst, to="safetensors")
    assert convert(src, dst, to="safetensors", overwrite=True) == dst
    with ilstore.open_run(dst) as run:
        assert run.name == "safetensors"
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ilstore.StoreError, match="not an ilstore run"):
        convert(src, other, to="hdf5", overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"
    outer = tmp_path / "outer"
    inner = convert(src, outer / "inner", to="pt")
    with pytest.raises(ilstore.StoreError, match="would delete the source"):
        convert(inner, outer, to="pt", overwrite=True)
    assert ilstore.open_run(inner).steps() == [0, 1]
    with pytest.raises(ilstore.BackendError, match="unknown backend 'hdf'; did you mean 'hdf5'"):
        convert(src, tmp_path / "x", to="hdf")
    with pytest.raises(ilstore.BackendError, match="shard_size_mb"):
        convert(src, tmp_path / "x", to="safetensors", options={"shard_size_mb": -1})
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers


def test_failed_conversion_leaves_nothing_and_keeps_old_destination(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "src"}) as cap:
        model(torch.randn(1, 2))
    old = convert(cap.run_dir, tmp_path / "dst", to="hdf5")
    victim = cap.run_dir / "step_0" / "1" / "outputs_cpu.pt"
    victim.write_bytes(victim.read_bytes()[:20])
    with pytest.raises(ilstore.CorruptFileError, match="outputs_cpu.pt"):
        convert(cap.run_dir, old, to="safetensors", overwrite=True)
    with ilstore.open_run(old) as run:
        assert run.name == "hdf5" and len(run.keys()) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_ranks_manifest_and_rank_dirs(tmp_path: Path) -> None:
    run_dir = tmp_path / "new" / "ranked"
    write_ranks_manifest(run_dir, backend="pt", world_size=2, config={"run_id": "ranked"})
    assert json.loads((run_dir / "ilstore.json").read_text()) == {
        "format": "ilstore", "format_version": 1, "layout": "ranks", "world_size": 2, "ranks": [0, 1],
        "backend": "pt", "config": {"run_id": "ranked"}}
    assert rank_run_dir(run_dir, 0, 1) == run_dir and rank_run_dir(run_dir, 1, 2) == run_dir / "rank_1"


def test_multi_rank_run_converts_rank_by_rank(tmp_path: Path) -> None:
    run_dir = tmp_path / "ranked"
    for rank in (0, 1):
        writer = get_backend("pt").writer(rank_run_dir(run_dir, rank, 2))
        writer.open(new_manifest("pt", {}, rank=rank, world_size=2))
        call = CallKey(rank, 0, "mlp", 0)
        rec = build_record(call, "outputs", torch.full((2,), float(rank)), TensorPolicy(pin_memory=False))
        finalize_stats(rec)
        writer.write(rec)
        writer.end_step(StepInfo(0, [call], [call]))
        writer.close()
    write_ranks_manifest(run_dir, backend="pt", world_size=2, config={})
    dst = convert(run_dir, tmp_path / "h5", to="hdf5")
    assert sorted(os.listdir(dst)) == ["ilstore.json", "rank_0", "rank_1"]
    assert json.loads((dst / "ilstore.json").read_text())["backend"] == "hdf5"
    assert assert_same_run(run_dir, dst, manifest=False) == 2
    with ilstore.open_run(dst) as run:
        assert run.load(TensorKey(0, "mlp", 0, "outputs", rank=1)).tolist() == [1.0, 1.0]


def test_replay_order_reproduces_nesting() -> None:
    a, b, c, d = (CallKey(0, 0, m, 0) for m in ("a", "a.b", "a.c", "d"))
    order = [(k.module, end) for k, end in replay_order([a, b, c, d], [b, c, a, d])]
    assert order == [("a", False), ("a.b", False), ("a.b", True), ("a.c", False), ("a.c", True), ("a", True),
                     ("d", False), ("d", True)]
    assert [(k.module, end) for k, end in replay_order([a, b], [])] == [("a", False), ("a.b", False), ("a", True),
                                                                         ("a.b", True)]


def test_progress_bar_on_request(captures: dict[tuple[str, str], Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    convert(captures[("zoo", "hdf5")], tmp_path / "p", to="pt", progress=True)
    assert "convert" in capsys.readouterr().err
    convert(captures[("zoo", "hdf5")], tmp_path / "q", to="pt")  # not a terminal: no bar
    assert capsys.readouterr().err == ""


# -- the command line -------------------------------------------------------------------------------
def test_cli_convert(captures: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    src = captures[("llama", "safetensors")]
    dst = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(cli, ["convert", str(src), str(dst), "--to", "hdf5", "--steps", "0,1"])
    assert result.exit_code == 0, result.output
    assert "backend hdf5, 2 step(s), status complete" in result.output
    again = runner.invoke(cli, ["convert", str(src), str(dst), "--to", "hdf5"])
    assert again.exit_code == 2 and "already exists" in again.output and "--overwrite" in again.output
    over = runner.invoke(cli, ["convert", str(src), str(dst), "--to", "pt", "--overwrite", "--steps", "1"])
    assert over.exit_code == 0, over.output
    assert ilstore.open_run(dst).steps() == [1]
    opts = runner.invoke(cli, ["convert", str(src), str(tmp_path / "gz"), "--to", "hdf5",
                               "--backend-options", '{"compression": "gzip"}'])
    assert opts.exit_code == 0, opts.output
    listing = runner.invoke(cli, ["ls", str(tmp_path / "gz")])
    assert listing.exit_code == 0 and "backend hdf5, status complete, 2 step(s)" in listing.output


@pytest.mark.parametrize("args,message", [
    (["--to", "nope"], "unknown backend 'nope'"),
    (["--to", "hdf5", "--steps", "x"], "Invalid value for '--steps'"),
    (["--to", "hdf5", "--steps", "9"], "no completed step 9"),
    (["--to", "hdf5", "--backend-options", "{bad"], "not valid JSON"),
    (["--to", "hdf5", "--backend-options", '{"level": 1}'], "backend_options.level"),
])
def test_cli_convert_errors_exit_2(captures: dict[tuple[str, str], Path], tmp_path: Path, args: list[str],
                                   message: str) -> None:
    result = CliRunner().invoke(cli, ["convert", str(captures[("zoo", "pt")]), str(tmp_path / "o"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_cli_convert_missing_source_and_help(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "missing"), str(tmp_path / "o"), "--to", "pt"])
    assert result.exit_code == 2 and "no such run directory" in result.output
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())
    helptext = CliRunner().invoke(cli, ["convert", "--help"])
    assert helptext.exit_code == 0 and "Examples:" in helptext.output and "--overwrite" in helptext.output
