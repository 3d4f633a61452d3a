"""``mode: "stats"`` computes statistics in the hook from the live tensor, without copying it.

The values must be those of a copy taken at hook time: bit for bit (floats compared with their
sign and NaN-ness), whatever the dtype, layout or contents, and whatever happens to the tensor
after the hook (in-place changes). And they must equal the statistics the tensors mode computes
later from its snapshots.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import ilstore
from ilstore.records import _ACC, _device_float_stats, tensor_stats


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal keys, equal value types, floats equal bit for bit (-0.0 is not 0.0, NaN is NaN)."""
    if a.keys() != b.keys():
        return False
    for k, x in a.items():
        y = b[k]
        if type(x) is not type(y):
            return False
        if isinstance(x, float):
            if math.copysign(1.0, x) != math.copysign(1.0, y) or not (x == y or (math.isnan(x) and math.isnan(y))):
                return False
        elif x != y:
            return False
    return True


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 1500, generator=g)
    out: dict[str, torch.Tensor] = {}
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for n in (1, 64, 32_767, 32_768, 16_384 * 5, 100_003):
            out[f"{name}_{n}"] = (torch.randn(n, generator=g) * 3 + 1).to(dtype)
        nan = torch.randn(50_000, generator=g).to(dtype)
        nan[::101] = float("nan")
        out[f"{name}_nan"] = nan
        inf = torch.randn(300, generator=g).to(dtype)
        inf[7], inf[9] = float("inf"), -float("inf")
        out[f"{name}_inf"] = inf
        zeros = torch.zeros(1000, dtype=dtype)
        zeros[::3] = -0.0
        out[f"{name}_signed_zeros"] = zeros
        out[f"{name}_offset_mean"] = (torch.randn(40_000, generator=g) + 3000.0).to(dtype)
        out[f"{name}_empty"] = torch.zeros(0, 4, dtype=dtype)
        out[f"{name}_0d"] = torch.tensor(-2.5, dtype=dtype)
        out[f"{name}_transposed"] = base.to(dtype).t()
        out[f"{name}_strided"] = base.to(dtype)[3:40:2, ::3]
    for dtype in (torch.int8, torch.uint8, torch.int32, torch.int64):
        ints = torch.randint(0, 100, (2000,), generator=g).to(dtype)
        out[str(dtype).removeprefix("torch.")] = ints if dtype == torch.uint8 else ints - 50
    out["int64_strided"] = torch.arange(1000).view(10, 100).t()[::2]
    out["int_empty"] = torch.zeros(0, dtype=torch.int64)
    out["int_0d"] = torch.tensor(-7)
    out["bool"] = torch.rand(500, generator=g) > 0.3
    out["bool_0d"] = torch.tensor(True)
    out["complex64"] = torch.randn(1000, dtype=torch.complex64, generator=g)
    if hasattr(torch, "float8_e4m3fn"):
        out["float8"] = torch.randn(400, generator=g).to(torch.float8_e4m3fn)
    out["huge_values"] = torch.tensor([3e38, -3e38, 1.0])  # the sum of squares overflows float32
    return out


class _Emit(torch.nn.Module):
    """Returns the tensors it was built with (its outputs are the live tensors themselves)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.tensors = tensors

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.tensors


class _Scribble(torch.nn.Module):
    """Changes every floating tensor it gets in place (after the emitter's hook has run)."""

    def forward(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for t in tensors.values():
            if t.is_floating_point() and t.numel():
                t.copy_((t.float() * 2 + 1).to(t.dtype))
            elif t.dtype in (torch.int64, torch.int32) and t.numel():
                t.add_(1000)
        return tensors


def _stats_by_path(run_dir: Path, module: str, kind: str) -> dict[str, dict[str, Any]]:
    out = {}
    with ilstore.open_run(run_dir) as run:
        for key in run.keys(0):
            if key.module == module and key.kind == kind:
                out["/".join(key.path)] = run.meta(key)["stats"]
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_stats_mode_values_are_those_of_a_hook_time_copy(out_dir: Path, threads: int) -> None:
    """Statistics of the live tensors equal those of copies taken when the hook ran, although the
    next module then changes every tensor in place."""
    live = _cases()  # the views among them stay views: the hook sees them strided
    expected = {k: tensor_stats(v.clone()) for k, v in live.items()}
    model = torch.nn.Sequential(_Emit(live), _Scribble(), torch.nn.Identity())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad(), ilstore.capture(model, {"output_dir": str(out_dir), "run_id": f"t{threads}",
                                                      "mode": "stats"}) as cap:
            model(torch.zeros(1))
    finally:
        torch.set_num_threads(before)
    got = _stats_by_path(cap.run_dir, "0", "outputs")
    assert got.keys() == expected.keys()
    for k in expected:
        assert _same(got[k], expected[k]), (k, got[k], expected[k])
    # the tensors did change after the hook, and the scribbler's outputs have the new values
    changed = _stats_by_path(cap.run_dir, "1", "outputs")
    for k in ("float32_64", "bfloat16_transposed", "int64"):
        assert not _same(changed[k], expected[k]), k
        assert _same(changed[k], tensor_stats(live[k])), k
    assert _same(_stats_by_path(cap.run_dir, "1", "inputs")["0/float32_64"], expected["float32_64"])


def test_stats_mode_equals_the_statistics_of_tensors_mode(out_dir: Path) -> None:
    """Tensors mode computes statistics later, from its contiguous snapshots; stats mode in the hook,
    from the live (possibly strided) tensors: the same values for every node."""
    from tests.support import fixture_inputs, fixture_model

    runs = {}
    for mode in ("tensors", "stats"):
        model = fixture_model()
        with torch.no_grad(), ilstore.capture(model, {"output_dir": str(out_dir), "run_id": mode, "mode": mode}) as cap:
            for x in fixture_inputs():
                model(x)
        with ilstore.open_run(cap.run_dir) as run:
            runs[mode] = {str(k): run.meta(k)["stats"] for step in run.steps() for k in run.keys(step)}
    assert runs["tensors"].keys() == runs["stats"].keys() and runs["stats"]
    for k, stats in runs["tensors"].items():
        assert _same(runs["stats"][k], stats), k


def test_scalar_and_gathered_readback_agree() -> None:
    """The torch path of tensors off the CPU reads the reduced values back through one gathered
    tensor; one ``item()`` at a time gives the same bits (run here on CPU tensors)."""
    for name, t in _cases().items():
        acc = _ACC.get(t.dtype)
        if acc is None or t.numel() == 0:
            continue
        scalar = _device_float_stats(t, t.numel(), acc, gather=False)
        gathered = _device_float_stats(t, t.numel(), acc, gather=True)
        assert _same(scalar, gathered), (name, scalar, gathered)


def test_inplace_after_hook_with_dedup_gets_fresh_statistics(out_dir: Path) -> None:
    """A tensor changed in place between two hooks is not taken for the earlier (de-duplicated) one."""

    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Identity(), torch.nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            y.mul_(3)
            return self.b(y)

    x = torch.randn(100, generator=torch.Generator().manual_seed(5))
    first, second = tensor_stats(x.clone()), tensor_stats(x.clone() * 3)
    model = Twice()
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(out_dir), "run_id": "d", "mode": "stats"}) as cap:
        model(x)
    assert _same(_stats_by_path(cap.run_dir, "a", "outputs")[""], first)
    assert _same(_stats_by_path(cap.run_dir, "b", "inputs")["0"], second)
