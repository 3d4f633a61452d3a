"""Runs written by ilstore 0.1.0 (tests/fixtures/ilstore_0_1_runs) open, list, convert and compare.

Any change to a format or to the manifest must keep these passing: users keep runs for a long
time and compare new ones against them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ilstore
from ilstore.cli import cli
from ilstore.convert import convert
from ilstore_compare import compare
from support import FIXTURES, fixture_model

RUNS = FIXTURES / "ilstore_0_1_runs"
TENSOR_RUNS = ["pt", "safetensors", "hdf5"]
RECORD = json.loads((RUNS / "run_record.json").read_text())


@pytest.mark.parametrize("name", [*TENSOR_RUNS, "pt_stats"])
def test_opens_and_lists(name: str) -> None:
    with ilstore.open_run(RUNS / name) as run:
        assert run.status == "complete" and run.steps() == [0, 1]
        assert run.manifest is not None and run.manifest["ilstore_version"] == "0.1.0"
        keys = run.keys()
        assert len(keys) == RECORD["runs"][name]["tensors"]
        assert {run.meta(k)["dtype"] for k in keys} >= {"torch.float32", "torch.int64"}
        if name != "pt_stats":
            for key in keys:
                assert list(run.load(key).shape) == run.meta(key)["shape"]
    result = CliRunner().invoke(cli, ["ls", str(RUNS / name), "--calls"])
    assert result.exit_code == 0, result.output
    assert "model.layers.1.mlp.down_proj" in result.output


@pytest.mark.parametrize("name", TENSOR_RUNS[1:])
def test_backends_hold_the_same_tensors(name: str) -> None:
    result = compare(RUNS / name, RUNS / "pt", rtol=0, atol=0)
    assert result.exit_code == 0 and len(result.tensors) == 164


@pytest.mark.parametrize("src", [*TENSOR_RUNS, "pt_stats"])
@pytest.mark.parametrize("to", TENSOR_RUNS)
def test_converts_bit_exactly(src: str, to: str, tmp_path: Path) -> None:
    out = tmp_path / f"{src}-as-{to}"
    convert(RUNS / src, out, to, progress=False)
    with ilstore.open_run(RUNS / src) as old, ilstore.open_run(out) as new:
        assert new.keys() == old.keys() and new.steps() == [0, 1]
        for key in old.keys():
            assert new.meta(key).get("stats") == old.meta(key).get("stats")
            if src != "pt_stats":
                a, b = old.load(key), new.load(key)
                assert a.dtype == b.dtype and torch.equal(a, b)


def test_a_new_capture_compares_against_an_old_run(tmp_path: Path) -> None:
    """The same model and prompt captured today: every tensor pairs with the 0.1.0 run's and matches
    within float32 reduction-order noise (kernels may differ between machines and thread counts)."""
    model = fixture_model()
    ids = torch.tensor([[1, 15, 42, 7, 99, 3, 64, 120]])
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "now",
                                                 "log_step_ids": [0, 1]}) as cap:
        logits = model(ids).logits
        model(torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1))
    assert cap.run_dir is not None
    for name in TENSOR_RUNS:
        result = compare(cap.run_dir, RUNS / name, rtol=1e-5, atol=1e-6)
        assert result.exit_code == 0, (name, result.first_divergence)
        assert len(result.tensors) == 164
