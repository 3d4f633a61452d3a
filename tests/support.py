"""Helpers shared by the tests: the vLLM dump fixture's model and inputs, a root that calls one
module three times, and "bypass" readers that read each format with its own library only.

Tests import this module by name (pytest puts tests/ on sys.path); conftest.py keeps only fixtures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

FIXTURES = Path(__file__).parent / "fixtures"
VLLM_DUMP = FIXTURES / "vllm_pr_dump"
VLLM_RUN = VLLM_DUMP / "e9d340f1-195b-4b59-b707-d34544334ca1"


def fixture_model() -> torch.nn.Module:
    """The model that wrote tests/fixtures/vllm_pr_dump, with its shipped weights."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    record = json.loads((VLLM_DUMP / "run_record.json").read_text())
    skip = ("attn_implementation", "dtype", "device", "init")
    cfg = {k: v for k, v in record["llama_config"].items() if k not in skip}
    config = LlamaConfig(**cfg)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    model.load_state_dict(load_file(str(VLLM_DUMP / "tiny_llama_weights.safetensors")))
    return model.eval()


def fixture_inputs() -> list[torch.Tensor]:
    record = json.loads((VLLM_DUMP / "run_record.json").read_text())
    return [torch.tensor(s["input_ids"]) for s in record["steps"]]


class Thrice(torch.nn.Module):
    """A root that calls the same Linear three times per forward (for call selectors)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4)
        self.other = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(self.lin(self.lin(self.lin(x))))


# -- bypass readers: each format read with its own library only, following docs/format-*.md --------
def native_pt(run_dir: Path, key, meta: dict) -> torch.Tensor:
    for call_dir in (run_dir / f"step_{key.step}").iterdir():
        doc_path = call_dir / f"{key.kind}.json"
        if doc_path.is_file():
            info = json.loads(doc_path.read_text())["ilstore"]
            if (info["module"], info["call"]) == (key.module, key.call):
                return torch.load(call_dir / meta["file"], weights_only=True)
    raise AssertionError(f"no directory holds {key}")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def native_safetensors(run_dir: Path, key) -> torch.Tensor:
    from safetensors import safe_open

    index = json.loads((run_dir / f"step_{key.step}" / "index.json").read_text())
    entry = index["tensors"][str(key)]
    with safe_open(str(run_dir / f"step_{key.step}" / entry["shard"]), framework="pt") as f:
        t = f.get_tensor(entry["name"])
    if entry.get("encoding") == "real":
        t = torch.view_as_complex(t)
    elif entry.get("encoding") == "bits":
        t = t.view(_dtype(entry["dtype"]))
    assert t.dtype == _dtype(entry["dtype"]) and list(t.shape) == entry["shape"]
    return t


def native_hdf5(run_dir: Path, key) -> torch.Tensor:
    from urllib.parse import quote

    import h5py
    import numpy as np

    group = (quote(key.module, safe="") or "%") + f"#{key.call}"
    name = ":".join([key.kind, *((quote(p, safe="") or "%") for p in key.path)])
    with h5py.File(run_dir / f"step_{key.step}.h5", "r") as f:
        ds = f[group][name]
        t = torch.from_numpy(np.array(ds[()]))
        dtype, encoding = _dtype(ds.attrs["dtype"]), ds.attrs.get("encoding", "")
    if encoding == "bits":
        t = t.view(dtype)
    elif encoding == "real":
        t = torch.view_as_complex(t)
    assert t.dtype == dtype
    return t


# -- shared by several test modules -------------------------------------------------------------
VLLM_PYTHON = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"


def require_vllm_python() -> Path:
    """The vLLM venv's python; a failure in CI (the tier must run there), a skip elsewhere."""
    import pytest

    if not VLLM_PYTHON.exists():
        message = f"{VLLM_PYTHON} is missing: run `bash scripts/setup_vllm.sh` first"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return VLLM_PYTHON


class Skipping(torch.nn.Module):
    """Two Linears; the second runs only on the forwards (1-based) in ``second_on``, so
    consecutive steps differ in their calls."""

    def __init__(self, second_on: tuple[int, ...]) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.second_on = second_on
        self.n = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n += 1
        y = self.a(x)
        return self.b(y) if self.n in self.second_on else y


class OsCalls:
    """Counts calls of some ``os`` functions through ``monkeypatch`` (code that calls ``os.<name>``
    is counted; a module's own bound reference is not): ``OsCalls(monkeypatch, ("open",)).counts``."""

    def __init__(self, monkeypatch: Any, names: tuple[str, ...]) -> None:
        self.counts = dict.fromkeys(names, 0)
        for name in names:
            real = getattr(os, name)

            def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
                self.counts[_name] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(os, name, counted)


def step_records(run_dir: Path, step: int) -> tuple[list[Any], Any]:
    """The records (inputs and outputs of each call, without bodies) and the StepInfo of one step
    of a run, read back: what a writer driven by hand is given to write that step again."""
    import ilstore
    from ilstore.records import Record
    from ilstore.store.base import StepInfo

    with ilstore.open_run(run_dir) as run:
        calls = run.calls(step)
        records = [Record(call, kind, run.structure(call, kind), {})
                   for call in calls for kind in ("inputs", "outputs")]
        return records, StepInfo(step, calls, run.call_ends(step))


_CLI_DRIVER = """
import importlib, json, sys
module, prog, cases, heavy = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
main = importlib.import_module(module).main
codes = []
for args in cases:
    sys.argv = [prog, *args]
    try:
        main()
        codes.append(0)
    except SystemExit as exc:
        codes.append(exc.code)
print(json.dumps({'codes': codes, 'heavy': [m for m in heavy if m in sys.modules]}))
"""


def run_cli_cases(module: str, prog: str, cases: list[list[str]], heavy: tuple[str, ...]
                  ) -> tuple[list[Any], list[str], str]:
    """Run a click CLI's ``main`` (from ``module``) on each argument list in one fresh process.

    Returns each case's exit code, which of the ``heavy`` modules the process had imported at
    the end, and its stderr: start-up tests assert that answers need none of them.
    """
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _CLI_DRIVER, module, prog, json.dumps(cases), json.dumps(heavy)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["codes"], out["heavy"], proc.stderr


class HalfReadableMapping(Mapping[str, Any]):
    """Lists two keys; its first item (a tensor) reads, its second raises ``KeyError('b')``: a
    container a capture cannot walk (it must leave no node of the first item)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def __getitem__(self, key: str) -> Any:
        if key == "a":
            return self.t
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(["a", "b"])

    def __len__(self) -> int:
        return 2
