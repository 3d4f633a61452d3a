"""Values that are not tensors and cannot be printed do not stop a capture (a review finding, the
2026-12-01 third round): a module called with (or returning) an object whose ``__repr__`` raises,
or a list nested deeper than Python can print, had stopped the capture at step 0 with the run
marked failed; each such value is now recorded with the failure, and every tensor is kept.

The same for containers that cannot be walked (the fourth round): a dataclass with a field never
set, a mapping whose ``__getitem__`` raises, a dict key whose ``str()`` raises had stopped the
capture; each is now one value node with the reason. And dict keys that collide once made strings
(``{1: a, "1": b}``) had kept ``b`` only, silently: both are kept now, the second as ``1~2``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ilstore
from ilstore.convert import convert
from ilstore.store.registry import open_run
from ilstore_compare import compare
from support import HalfReadableMapping

BACKENDS = ["pt", "safetensors", "hdf5"]


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("repr not available before init")


class Passes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, odd: Any) -> tuple[torch.Tensor, Any]:
        return self.lin(x), odd


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Passes()

    def forward(self, x: torch.Tensor, odd: Any) -> tuple[torch.Tensor, Any]:
        return self.inner(x, odd)


def _deep(levels: int) -> Any:
    value: Any = [torch.ones(2)]
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("async_writes", [False, True])
@pytest.mark.parametrize("odd", ["unprintable", "deep"])
def test_a_value_that_cannot_be_printed_is_recorded_as_such(tmp_path: Path, backend: str, async_writes: bool,
                                                            odd: str) -> None:
    value = Unprintable() if odd == "unprintable" else _deep(5000)
    model = Outer()
    x = torch.randn(3, 4)
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "backend": backend,
                                                  "async_writes": async_writes, "log_step_ids": []}) as cap:
        for _ in range(2):
            model(x, value)
    reader = open_run(cap.run_dir)
    assert reader.manifest["status"] == "complete" and list(reader.steps()) == [0, 1]
    calls = {c.module: c for c in reader.calls(1)}
    assert set(calls) == {"inner", "inner.lin"}
    odd_node = reader.structure(calls["inner"], "outputs")["items"][1]
    text = str(odd_node)
    if odd == "unprintable":
        assert odd_node["type"] == "value" and "repr failed: RuntimeError: repr not available before init" in text
    else:
        assert "repr failed: RecursionError" in text
    (key, _), = reader.tensor_nodes(calls["inner.lin"], "inputs")
    assert torch.equal(reader.load(key), x)


@dataclasses.dataclass
class _Unset:
    x: torch.Tensor
    y: int = dataclasses.field(init=False)  # never set: getattr raises AttributeError


class _NoStr:
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        return "_NoStr()"


def _odd_container(kind: str, t: torch.Tensor) -> tuple[Any, str]:
    """The container and the reason its node must give."""
    if kind == "unset_field":
        return _Unset(t), "AttributeError"
    if kind == "failing_mapping":
        return HalfReadableMapping(t), "KeyError: 'b'"
    return {"ok": t, _NoStr(): t}, "RuntimeError: no str"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["unset_field", "failing_mapping", "unprintable_key"])
def test_a_container_that_cannot_be_walked_is_one_value(tmp_path: Path, backend: str, kind: str) -> None:
    model = Outer()
    x = torch.randn(3, 4)
    seen = []
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "backend": backend,
                                                  "on_error": "raise", "log_step_ids": []}) as cap:
        for _ in range(2):
            value, reason = _odd_container(kind, x + 1)
            out = model(x, value)
            seen.append(out[1] is value)
    assert seen == [True, True]  # the model's own object, untouched
    reader = open_run(cap.run_dir)
    assert reader.manifest["status"] == "complete" and list(reader.steps()) == [0, 1]
    calls = {c.module: c for c in reader.calls(1)}
    for side, node in (("inputs", reader.structure(calls["inner"], "inputs")["items"][1]),
                       ("outputs", reader.structure(calls["inner"], "outputs")["items"][1])):
        assert node["type"] == "value", side
        assert node["reason"].startswith("cannot be walked: ") and reason in node["reason"], node
        assert isinstance(node["repr"], str) and node["class"].endswith(type(value).__qualname__)
    # nothing of the container was half captured: its tensor has no key
    assert [k.path for k in reader.keys(1) if k.module == "inner"] == [("0",), ("0",)]
    (key, _), = reader.tensor_nodes(calls["inner.lin"], "inputs")
    assert torch.equal(reader.load(key), x)


class _Keys(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[Any, torch.Tensor]:
        return {1: x + 1, "1": x + 2, "1~2": x + 3, "z": x + 4}


class _Root(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> Any:
        return self.inner(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_that_collide_as_strings_keep_every_tensor(tmp_path: Path, backend: str) -> None:
    model = _Root(_Keys())
    x = torch.zeros(2)
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path / "runs"), "backend": backend,
                                                  "on_error": "raise"}) as cap:
        model(x)
    want = {("1",): 1.0, ("1~2",): 2.0, ("1~2~2",): 3.0, ("z",): 4.0}
    with open_run(cap.run_dir) as reader:
        call, = reader.calls(0)
        node = reader.structure(call, "outputs")
        assert list(node["items"]) == ["1", "1~2", "1~2~2", "z"]
        assert node["renamed"] == {"1~2": "'1'", "1~2~2": "'1~2'"}
        got = {k.path: reader.load(k) for k in reader.keys(0) if k.kind == "outputs"}
    assert {p: float(t[0]) for p, t in got.items()} == want
    for other in BACKENDS:
        if other == backend:
            continue
        there = convert(cap.run_dir, tmp_path / other, to=other)
        back = convert(there, tmp_path / f"{other}-back", to=backend)
        for run in (there, back):
            with open_run(run) as reader:
                call, = reader.calls(0)
                assert reader.structure(call, "outputs")["renamed"] == node["renamed"]
                assert {k.path: float(reader.load(k)[0]) for k in reader.keys(0) if k.kind == "outputs"} == want
            result = compare(run, cap.run_dir)
            assert result.exit_code == 0 and len(result.tensors) == 5  # 4 outputs and the input


class _SurrogateKey(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"k\ud800": x + 1, "k\\ud800": x + 2}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dedup", [True, False])
def test_a_key_with_a_lone_surrogate_keeps_its_tensor(tmp_path: Path, backend: str, dedup: bool) -> None:
    """No backend can write a lone surrogate (names are UTF-8): the tensor had been lost (with
    ``dedup``) or the capture stopped (without); now the key is written escaped."""
    model = _Root(_SurrogateKey())
    x = torch.zeros(2)
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "backend": backend,
                                                  "dedup": dedup, "on_error": "raise"}) as cap:
        model(x)
    with open_run(cap.run_dir) as reader:
        assert reader.manifest["status"] == "complete"
        call, = reader.calls(0)
        node = reader.structure(call, "outputs")
        assert list(node["items"]) == ["k\\ud800", "k\\ud800~2"]
        assert node["renamed"] == {"k\\ud800": repr("k\ud800"), "k\\ud800~2": repr("k\\ud800")}
        got = {k.path: float(reader.load(k)[0]) for k in reader.keys(0) if k.kind == "outputs"}
    assert got == {("k\\ud800",): 1.0, ("k\\ud800~2",): 2.0}


class _Plus(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


class _OddlyNamed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.add_module("m\ud800", _Plus())  # add_module checks no encoding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_submodule("m\ud800")(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_module_name_with_a_lone_surrogate_is_written_escaped(tmp_path: Path, backend: str) -> None:
    """A reviewer's module named ``m\\ud800``: pt stopped the capture, safetensors lost the bodies
    and hdf5 wrote a run that said complete and could not be read. The name is now recorded as
    dict keys are, with the surrogate escaped, in every backend alike (so runs compare)."""
    model = _OddlyNamed()
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "backend": backend,
                                                  "on_error": "raise"}) as cap:
        model(torch.zeros(2))
    with open_run(cap.run_dir) as reader:
        assert reader.manifest["status"] == "complete"
        got = {(k.module, k.kind): reader.load(k).tolist() for k in reader.keys(0)}
    assert got == {("m\\ud800", "inputs"): [0.0, 0.0], ("m\\ud800", "outputs"): [1.0, 1.0]}


class _Named(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.add_module(name, _Plus())
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_submodule(self.name)(x)


def test_control_characters_in_module_names_are_shown_escaped(tmp_path: Path) -> None:
    """A reviewer's module names with ESC sequences and a newline: ``ilstore ls --calls`` and the
    markdown report printed them raw (a newline was dropped, so ``ctl\\n`` looked like ``ctl``; a
    ``|`` or a newline split a table row; ``<script>`` went into the markdown as HTML)."""
    from click.testing import CliRunner

    from ilstore.cli import cli
    from ilstore_compare.report_md import render_markdown

    name = "ctl\n\x1b[31m|<script>"
    runs = []
    for run_id, scale in (("a", 1.0), ("b", 2.0)):
        model = _Named(name)
        with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": run_id}) as cap:
            model(torch.ones(2) * scale)
        runs.append(cap.run_dir)
    listing = CliRunner().invoke(cli, ["ls", "--calls", str(runs[0])])
    assert listing.exit_code == 0 and "ctl\\n\\x1b[31m|<script>" in listing.output, listing.output
    assert "\x1b" not in listing.output
    md = render_markdown(compare(runs[0], runs[1]), verbose=True)
    assert "\x1b" not in md and "ctl\n" not in md and "\\<script>" in md
    assert md.count("<script>") == md.count("\\<script>")  # every one escaped (it renders as written)
    rows = [line for line in md.splitlines() if "ctl\\n\\x1b[31m\\|\\<script>" in line]
    assert rows and all(line.startswith("|") and line.endswith("|") for line in rows)


class _TakesAnything(nn.Module):
    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return args[0] + kwargs["0"] + kwargs["k\ud800"]


class _PassesOddKeywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _TakesAnything()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x, **{"0": x * 10, "k\ud800": x * 3})


@pytest.mark.parametrize("backend", BACKENDS)
def test_keywords_named_as_positions_or_with_a_surrogate_keep_their_tensors(tmp_path: Path, backend: str) -> None:
    """``**{"0": y}`` beside a first positional argument had the path ``("0",)`` of that argument
    (one of the two tensors lost); a keyword holding a lone surrogate lost its body. They are
    named as dict items are (``0~2``, escaped) and listed in the structure's ``"renamed"``."""
    model = _PassesOddKeywords()
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "backend": backend,
                                                  "on_error": "raise"}) as cap:
        model(torch.ones(2))
    with open_run(cap.run_dir) as reader:
        got = {k.path: reader.load(k).tolist() for k in reader.keys(0) if k.kind == "inputs" and k.module == "inner"}
        call = next(c for c in reader.calls(0) if c.module == "inner")
        renamed = reader.structure(call, "inputs")["renamed"]
    assert got == {("0",): [1.0, 1.0], ("0~2",): [10.0, 10.0], ("k\\ud800",): [3.0, 3.0]}
    assert renamed == {"0~2": repr("0"), "k\\ud800": repr("k\ud800")}
