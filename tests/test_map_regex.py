"""User-given regexes that ``re.compile`` cannot build without raising ``re.error``: a repetition
too large (``OverflowError``) or groups nested too deeply (``RecursionError``). Each is a user error
(exit status 2, a message naming where the regex is), never a traceback with the "mismatch" status:
the name map's ``rules``, ``path_rules`` and ``unaligned``, ``--modules``, and the capture config's
``module_call_match``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import ilstore
from ilstore.cli import cli as ilstore_cli
from ilstore.config import load_config
from ilstore.errors import ConfigError
from ilstore_compare import NameMap, NameMapError
from ilstore_compare.cli import compare_cmd
from ilstore_compare.errors import OptionError
from ilstore_compare.options import CompareOptions

OVERFLOW = "a{99999999999}"  # re.compile: OverflowError
DEEP = "(" * 2000 + "a" + ")" * 2000  # re.compile: RecursionError

MAPS = {
    "rules": ({"rules": [[OVERFLOW, "x"]]}, "rules[0]"),
    "rules_object": ({"rules": [{"pattern": OVERFLOW, "replacement": "x"}]}, "rules[0]"),
    "rules_deep": ({"rules": [[DEEP, "x"]]}, "rules[0]"),
    "path_rules": ({"path_rules": [{"module": OVERFLOW, "path": "outputs/0", "to": "outputs"}]}, "path_rules[0]"),
    "path_rules_deep": ({"path_rules": [{"module": DEEP, "path": "outputs/0", "to": "outputs"}]}, "path_rules[0]"),
    "unaligned_tensor": ({"unaligned": [{"tensor": OVERFLOW, "reason": "r"}]}, "unaligned[0]"),
    "unaligned_module_deep": ({"unaligned": [{"module": DEEP, "reason": "r"}]}, "unaligned[0]"),
}


@pytest.mark.parametrize("name", sorted(MAPS))
def test_a_map_regex_re_cannot_build_is_a_name_map_error(name: str) -> None:
    data, where = MAPS[name]
    with pytest.raises(NameMapError, match=r"bad regex") as info:
        NameMap.from_dict(data, "m.json")
    message = str(info.value)
    assert message.startswith(f"m.json: {where}") and len(message) < 400  # a 4,001-character pattern is cut
    assert ("nested too deeply" in message) if "deep" in name else ("repetition number is too large" in message)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("runs")
    for run_id in ("r1", "r2"):
        model = nn.Sequential(nn.Linear(2, 2))
        with torch.no_grad(), ilstore.capture(model, {"output_dir": str(out), "run_id": run_id}):
            model(torch.ones(1, 2))
    return out / "r1", out / "r2"


@pytest.mark.parametrize("name", ["rules", "rules_deep", "path_rules", "unaligned_tensor"])
def test_the_cli_reports_it_with_status_2(runs: tuple[Path, Path], tmp_path: Path, name: str) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps(MAPS[name][0]))
    res = CliRunner().invoke(compare_cmd, ["--dir1", str(runs[0]), "--dir2", str(runs[1]), "--map", str(path)])
    assert res.exit_code == 2, res.output
    assert "bad regex" in res.output and MAPS[name][1] in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("pattern", [OVERFLOW, DEEP, f"ok,{OVERFLOW}"])
def test_a_modules_regex_re_cannot_build_is_an_option_error(runs: tuple[Path, Path], pattern: str) -> None:
    with pytest.raises(OptionError, match="bad regex") as info:
        CompareOptions(modules=pattern)
    assert "modules" in str(info.value) and len(str(info.value)) < 400
    res = CliRunner().invoke(compare_cmd, ["--dir1", str(runs[0]), "--dir2", str(runs[1]), "--modules", pattern])
    assert res.exit_code == 2 and "bad regex" in res.output and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("entry", [OVERFLOW, f"{OVERFLOW}:1", DEEP, {"pattern": OVERFLOW}, [OVERFLOW]])
def test_a_module_call_match_regex_re_cannot_build_is_a_config_error(entry: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"module_call_match": entry})
    (problem,) = info.value.problems
    assert problem.startswith("module_call_match") and "is not a valid regular expression" in problem
    res = CliRunner().invoke(ilstore_cli, ["validate-config", json.dumps({"module_call_match": entry})])
    assert res.exit_code == 2 and "module_call_match" in res.output and "Traceback" not in res.output, res.output
