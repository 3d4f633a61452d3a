"""Config loading and validation (SPEC §2)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from ilstore.cli import cli
from ilstore.cli_args import add_intermediate_log_args, config_from_args
from ilstore.config import DEFAULTS, load_config
from ilstore.errors import ConfigError


def test_defaults() -> None:
    cfg = load_config({})
    d = cfg.to_dict()
    for key, value in DEFAULTS.items():
        if key != "run_id":
            assert d[key] == value, key
    assert len(cfg.run_id) == 36  # a UUID4
    assert load_config({}).run_id != cfg.run_id


def test_sources_dict_text_file_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = {"log_step_ids": [1, 2], "mode": "stats"}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(data))
    for source in (data, json.dumps(data), str(path), path):
        cfg = load_config(source)
        assert cfg.log_step_ids == (1, 2) and cfg.mode == "stats"
    monkeypatch.setenv("ILSTORE_CONFIG", json.dumps(data))
    assert load_config().mode == "stats"
    monkeypatch.setenv("ILSTORE_CONFIG", str(path))
    assert load_config().log_step_ids == (1, 2)
    monkeypatch.setenv("ILSTORE_CONFIG", '{"mode": "fast"}')
    with pytest.raises(ConfigError, match=r"ILSTORE_CONFIG.*\n.*mode"):
        load_config()


def test_selectors() -> None:
    cfg = load_config({"module_call_match": ["lin:1", "a:0,2", "b:1-3", "(?:x|y)", {"pattern": "z", "calls": [4]},
                                             "c:0-1,5"]})
    assert cfg.selected_calls("lin") == {1}
    assert cfg.selected_calls("a") == {0, 2}
    assert cfg.selected_calls("b") == {1, 2, 3}
    assert cfg.selected_calls("x") is None  # a regex containing ':' is not a selector
    assert cfg.selected_calls("z") == {4}
    assert cfg.selected_calls("c") == {0, 1, 5}
    assert not cfg.module_may_match("q")
    # union over several patterns matching the same module
    both = load_config({"module_call_match": ["mlp:0", "layers\\.0\\.mlp:2"]})
    assert both.selected_calls("model.layers.0.mlp") == {0, 2}
    assert both.selected_calls("model.layers.1.mlp") == {0}
    assert load_config({"module_call_match": ["mlp:0", "mlp"]}).selected_calls("mlp") is None
    assert load_config({"module_call_match": "layers"}).module_may_match("model.layers.3")


def test_device_filter() -> None:
    cfg = load_config({"device_names": ["cuda", "cpu"]})
    assert cfg.logs_device("cuda:3") and cfg.logs_device("cpu")
    only0 = load_config({"device_names": ["cuda:0"]})
    assert only0.logs_device("cuda:0") and not only0.logs_device("cuda:1") and not only0.logs_device("cpu")
    assert load_config({}).logs_device("mps")


def test_log_step_ids() -> None:
    assert load_config({}).logs_step(0) and not load_config({}).logs_step(1)
    assert load_config({"log_step_ids": []}).logs_step(99)


BAD_CONFIGS = [
    ('{"enabled": "yes"}', "enabled: expected boolean"),
    ('{"log_step_ids": [0, -1]}', "log_step_ids[1]"),
    ('{"log_step_ids": "0"}', "log_step_ids: expected array"),
    ('{"module_call_match": ["ok", "bad("]}', "module_call_match[1]: 'bad(' is not a valid regular expression"),
    ('{"module_call_match": 5}', "module_call_match: expected null, a regex string"),
    ('{"module_call_match": [{"pattern": "a", "calls": [-1]}]}', "module_call_match[0].calls[0]"),
    ('{"module_call_match": "lin:3-1"}', "module_call_match: bad call selector"),
    ('{"max_tensor_size": -5}', "max_tensor_size"),
    ('{"mode": "fast"}', "mode"),
    ('{"backend": "ptt"}', "backend: unknown backend 'ptt'; did you mean 'pt'?"),
    ('{"backend_options": {"shard": 1}}', "backend_options.shard"),
    ('{"log_step_id": [0]}', "log_step_id: unknown key; did you mean 'log_step_ids'?"),
    ('{"device_names": "cuda:0"}', "device_names: expected array"),
    ('{"output_dir": ""}', "output_dir"),
    ('{"enabled": true,}', "malformed JSON at line 1"),
    ('[1, 2]', "(top level): expected an object"),
]


@pytest.mark.parametrize("text, expected", BAD_CONFIGS)
def test_bad_config_cli_exit_2(text: str, expected: str) -> None:
    result = CliRunner().invoke(cli, ["validate-config", text])
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_every_problem_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"enabled": 1, "mode": "x", "log_stepids": [], "max_tensor_size": "big"})
    problems = info.value.problems
    assert len(problems) == 4
    assert any(p.startswith("enabled:") for p in problems)
    assert any(p.startswith("mode:") for p in problems)
    assert any("did you mean 'log_step_ids'" in p for p in problems)
    assert any(p.startswith("max_tensor_size:") for p in problems)


def test_missing_config_file_named(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["validate-config", str(tmp_path / "nope.json")])
    assert result.exit_code == 2 and "nope.json" in result.output


def test_validate_config_prints_resolved() -> None:
    result = CliRunner().invoke(cli, ["validate-config", '{"run_id": "r1", "module_call_match": "mlp:1"}'])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["run_id"] == "r1" and data["module_call_match"] == ["mlp:1"] and data["backend"] == "pt"


def test_argparse_helper(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    add_intermediate_log_args(parser)
    assert config_from_args(parser.parse_args([]), parser) is None
    args = parser.parse_args(["--intermediate-log-config",
                              '{"enabled": true, "module_call_match": "layers\\\\.0\\\\."}'])
    cfg = config_from_args(args, parser)
    assert cfg is not None and cfg.selectors is not None and cfg.selectors[0].pattern == "layers\\.0\\."
    path = tmp_path / "c.json"
    path.write_text('{"log_step_ids": [0, 1]}')
    cfg = config_from_args(parser.parse_args(["--intermediate-log-config-path", str(path)]), parser)
    assert cfg is not None and cfg.log_step_ids == (0, 1)
    with pytest.raises(SystemExit) as info:
        config_from_args(parser.parse_args(["--intermediate-log-config", '{"mode": 3}']), parser)
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--intermediate-log-config", "{}", "--intermediate-log-config-path", str(path)])


_json = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False)
                     | st.text(max_size=12),
                     lambda inner: (st.lists(inner, max_size=4)
                                    | st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                     max_leaves=12)
_keys = st.sampled_from(sorted(DEFAULTS) + ["log_step_id", "modul_call_match", "", "x"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _json | st.sampled_from(["(", "a:1", "[", "layers\\.0:0-2,5", "*", "cuda"]), max_size=6))
def test_fuzzed_configs_validate_or_give_keyed_errors(data: dict) -> None:
    try:
        cfg = load_config(data)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            head = problem.split(":", 1)[0]
            root = head.split("[")[0].split(".")[0]
            assert head and (root in DEFAULTS or head == "(top level)" or "unknown key" in problem), problem
    else:
        assert cfg.to_dict().keys() == DEFAULTS.keys()


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_fuzzed_text_never_raises_other_errors(text: str) -> None:
    try:
        load_config(text if text.lstrip().startswith("{") else "{" + text)
    except ConfigError:
        pass


@pytest.mark.parametrize("run_id", ["../../etc", "a/b", "..", ".", "a\\b", "x\x00y"])
def test_run_id_is_one_path_component(run_id: str, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"run_id: .* is not one path component") as info:
        load_config({"run_id": run_id, "output_dir": str(tmp_path)})
    assert len(info.value.problems) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_run_id_with_dots_inside_is_fine() -> None:
    assert load_config({"run_id": "bf16..v2.run"}).run_id == "bf16..v2.run"
