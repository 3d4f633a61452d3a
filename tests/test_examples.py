"""examples/offline_inference.py: the argparse helper on a Hugging Face generate loop."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import ilstore

EXAMPLE = Path(__file__).parent.parent / "examples" / "offline_inference.py"


def _example():
    spec = importlib.util.spec_from_file_location("offline_inference", EXAMPLE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_with_and_without_capture(out_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ex = _example()
    assert ex.main(["--max-new-tokens", "3"]) == 0
    plain = capsys.readouterr().out.splitlines()[0]
    cfg = json.dumps({"enabled": True, "output_dir": str(out_dir), "run_id": "gen", "log_step_ids": [0, 1, 2],
                      "module_call_match": "layers\\.0\\."})
    assert ex.main(["--max-new-tokens", "3", "--intermediate-log-config", cfg]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == plain  # same generated tokens with capture on
    with ilstore.open_run(out_dir / "gen") as run:
        assert run.steps() == [0, 1, 2]
        assert {c.module for c in run.calls(1)} and all(".layers.0." in c.module for c in run.calls(1))
        step0 = run.meta(next(k for k in run.keys(0) if k.kind == "outputs"))["shape"]
        step1 = run.meta(next(k for k in run.keys(1) if k.kind == "outputs"))["shape"]
        assert step0[1] == 12 and step1[1] == 1  # prompt, then one token per step (KV cache)


def test_config_path_and_bad_config(out_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ex = _example()
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"output_dir": str(out_dir), "run_id": "p", "mode": "stats"}))
    assert ex.main(["--max-new-tokens", "2", "--intermediate-log-config-path", str(path)]) == 0
    assert ilstore.open_run(out_dir / "p").steps() == [0]
    assert f"captured 1 of 2 step(s) into {out_dir / 'p'}" in capsys.readouterr().out  # said 2 (steps run)
    with pytest.raises(SystemExit) as info:
        ex.main(["--intermediate-log-config", '{"mode": "nope"}'])
    assert info.value.code == 2
