"""The fused metrics kernel (C, compiled on first use) gives the results of the torch path of
ilstore_compare.metrics.

Counts, maxima, their index and max_ulp must be identical; the five float64 sums (mean |a-b|,
rel L2, cosine) are added in another order, so they agree to rounding.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from ilstore_compare import _kernel, metrics
from ilstore_compare.metrics import TensorMetrics, compare_many, compare_tensors

needs_cc = pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")),
                              reason="no C compiler: the kernel cannot be built here")
pytestmark = needs_cc

SUMS = ("mean_abs_diff", "rel_l2", "cosine")


def _torch_path(monkeypatch: pytest.MonkeyPatch, fn, *args, **kwargs) -> TensorMetrics:
    with monkeypatch.context() as m:
        m.setattr(metrics, "fused", lambda *a, **k: None)
        return fn(*args, **kwargs)


def _same(fast: TensorMetrics, slow: TensorMetrics) -> None:
    for f in dataclasses.fields(TensorMetrics):
        x, y = getattr(fast, f.name), getattr(slow, f.name)
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x):
            assert math.isnan(y), (f.name, x, y)
        elif f.name in SUMS and x is not None and y is not None:
            assert math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-300), (f.name, x, y)
        else:
            assert x == y, (f.name, x, y)


def _awkward(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A pair with NaN, +-Inf, +-0, equal values, ties of the largest difference and huge values."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=g, dtype=torch.float64) * 3
    a = b + torch.randn(n, generator=g, dtype=torch.float64) * 1e-4
    a[::17] = b[::17]  # exact matches
    big = torch.finfo(dtype).max if dtype.is_floating_point else 1e30
    for t, offset in ((a, 0), (b, 5)):
        t[offset::101] = float("nan")
        t[offset + 1::211] = float("inf")
        t[offset + 2::307] = float("-inf")
        t[offset + 3::401] = 0.0
        t[offset + 4::409] = -0.0
    a[7::997], b[7::997] = big / 2, -big / 2  # opposite huge values
    a[n // 2], b[n // 2] = 40.0, 10.0  # a tie of the largest finite difference, the first one wins
    a[n - 3], b[n - 3] = 70.0, 40.0
    return a.to(dtype), b.to(dtype)


PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float16),
         (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float64), (torch.bfloat16, torch.float32),
         (torch.float64, torch.float16)]


def test_the_kernel_is_built_and_used() -> None:
    assert _kernel.enabled()
    t = _kernel.fused(torch.tensor([1.0, 2.0]).numpy(), torch.tensor([1.0, 2.5]).numpy(), rtol=0.0, atol=0.0,
                      equal_nan=False, with_ulp=True)
    # 2.5 is 2**21 float32 values above 2.0
    assert t is not None and (t.mismatched, t.max_abs, t.max_at, t.max_ulp) == (1, 0.5, 1, 1 << 21)


@pytest.mark.parametrize(("da", "db"), PAIRS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("equal_nan", [False, True])
def test_kernel_matches_the_torch_path(monkeypatch: pytest.MonkeyPatch, da: torch.dtype, db: torch.dtype,
                                       equal_nan: bool) -> None:
    a, _ = _awkward(3 * _kernel.BLOCK + 123, da, seed=1)
    _, b = _awkward(3 * _kernel.BLOCK + 123, db, seed=1)
    for tol in (dict(rtol=1e-5, atol=1e-8), dict(rtol=0.0, atol=0.0), dict(rtol=1e-2, atol=1.0)):
        fast = compare_tensors(a, b, equal_nan=equal_nan, chunk=1000, **tol)
        slow = _torch_path(monkeypatch, compare_tensors, a, b, equal_nan=equal_nan, chunk=1000, **tol)
        _same(fast, slow)
    assert fast.nan1 and fast.inf2 and fast.max_ulp is not None


def _lane_sums(a: list[float], b: list[float]) -> tuple[float, ...]:
    """The five sums in the kernel's documented order, one IEEE double operation at a time: element
    i of a block into lane (i - block start) % LANES, only where both sides are finite; each
    block's lanes added to the totals lane by lane."""
    totals = [0.0] * 5
    for start in range(0, len(a), _kernel.BLOCK):
        lanes = [[0.0] * _kernel.LANES for _ in range(5)]
        for i in range(start, min(start + _kernel.BLOCK, len(a))):
            x, y = a[i], b[i]
            if not (math.isfinite(x) and math.isfinite(y)):
                continue
            d, lane = abs(x - y), (i - start) % _kernel.LANES
            for k, v in enumerate((d, d * d, x * x, y * y, x * y)):
                lanes[k][lane] += v
        for lane in range(_kernel.LANES):
            for k in range(5):
                totals[k] += lanes[k][lane]
    return tuple(totals)


@pytest.mark.parametrize(("da", "db"), [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                        (torch.float32, torch.float64)], ids=str)
def test_kernel_sums_are_the_lane_order_to_the_bit(da: torch.dtype, db: torch.dtype) -> None:
    """The lanes are vectors in C (4 or 2 doubles wide): each must still add its own elements in
    the scalar order, whatever the width, including the elements after a block's last whole row."""
    n = 2 * _kernel.BLOCK + 3 * _kernel.LANES + 5
    g = torch.Generator().manual_seed(7)
    scale = 10 ** (torch.rand(n, generator=g, dtype=torch.float64) * 6 - 3)
    b = torch.randn(n, generator=g, dtype=torch.float64) * scale
    a = b + torch.randn(n, generator=g, dtype=torch.float64) * 1e-3  # magnitudes apart: the order shows in the bits
    a[3::97], b[5::89], b[11::331] = float("nan"), float("inf"), float("-inf")
    a, b = a.to(da), b.to(db)
    t = _kernel.fused(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-8, equal_nan=False, with_ulp=False)
    assert t is not None
    expected = _lane_sums(a.double().tolist(), b.double().tolist())
    assert (t.sum_abs, t.dd, t.aa, t.bb, t.ab) == expected  # exact: no tolerance
    assert t.finite < n and t.nan1 and t.inf2  # the gating by finiteness was exercised


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_on_plain_data_and_edge_shapes(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    for shape in [(1,), (_kernel.BLOCK,), (_kernel.BLOCK + 1,), (5, 7, 301)]:
        b = torch.randn(shape, dtype=dtype)
        for a in (b.clone(), b + 1e-6 * torch.randn(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)):
            _same(compare_tensors(a, b, rtol=1e-5, atol=1e-8),
                  _torch_path(monkeypatch, compare_tensors, a, b, rtol=1e-5, atol=1e-8))


def test_max_ulp_of_opposite_huge_float64_needs_64_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    big = torch.finfo(torch.float64).max
    a = torch.tensor([big, 1.0, float("nan")], dtype=torch.float64)
    b = torch.tensor([-big, 1.0, 2.0], dtype=torch.float64)
    fast = compare_tensors(a, b, rtol=0.0, atol=0.0)
    assert fast.max_ulp == 2 * 0x7FEFFFFFFFFFFFFF > 2**63
    _same(fast, _torch_path(monkeypatch, compare_tensors, a, b, rtol=0.0, atol=0.0))


def test_all_nan_pair_has_no_difference_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    a = b = torch.full((10,), float("nan"))
    fast = compare_tensors(a, b, rtol=1e-5, atol=1e-8)
    assert fast.max_abs_diff is None and fast.max_ulp is None and fast.mismatched == 10
    _same(fast, _torch_path(monkeypatch, compare_tensors, a, b, rtol=1e-5, atol=1e-8))


def test_compare_many_with_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = [_awkward(500, torch.float32, seed=s) for s in range(3)] + [_awkward(700, torch.bfloat16, seed=9)]
    pairs.append((torch.tensor([0.0, 5e38], dtype=torch.float64), torch.tensor([0.0, -5e38], dtype=torch.float64)))
    fast = compare_many(pairs, rtol=1e-5, atol=1e-8)
    _same(fast, _torch_path(monkeypatch, compare_many, pairs, rtol=1e-5, atol=1e-8))
    assert fast.max_abs_diff == 1e39 and fast.max_abs_diff_index == (2201,)  # flat over the pairs end to end


def test_exact_and_integer_pairs_keep_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("the kernel was called")

    monkeypatch.setattr(metrics, "fused", refuse)
    assert compare_tensors(torch.tensor([0.0]), torch.tensor([-0.0]), rtol=0, atol=0, exact=True).mismatched == 1
    assert compare_tensors(torch.tensor([1, 2]), torch.tensor([1, 3]), rtol=0, atol=0).mismatched == 1


def test_without_a_compiler_the_torch_path_answers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ILSTORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_kernel.LIBRARY, "_lib", None)
    monkeypatch.setattr(_kernel.LIBRARY, "_failed", False)
    assert not _kernel.enabled()
    a, b = _awkward(2000, torch.float32, seed=4)
    m = compare_tensors(a, b, rtol=1e-5, atol=1e-8)
    monkeypatch.undo()
    _same(compare_tensors(a, b, rtol=1e-5, atol=1e-8), m)


def test_the_kernel_is_compiled_into_the_cache_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ILSTORE_CACHE_DIR", str(tmp_path))
    first = _kernel.LIBRARY.compile()
    assert first is not None and first.parent == tmp_path and first.exists()
    assert first.name.startswith(f"fused-v{_kernel.LIBRARY.version}-")
    stamp = first.stat().st_mtime_ns
    assert _kernel.LIBRARY.compile() == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


def test_build_kernel_option_compiles_into_the_cache_and_exits(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """``ilstore-compare --build-kernel`` (no runs needed): the kernel lands in the cache, its path
    on stdout, exit 0; a second call finds it; without a compiler, exit 2 and the reason."""
    from click.testing import CliRunner

    from ilstore_compare.cli import compare_cmd

    monkeypatch.setenv("ILSTORE_CACHE_DIR", str(tmp_path / "cache"))
    first = CliRunner().invoke(compare_cmd, ["--build-kernel"])
    assert first.exit_code == 0, first.output
    built = Path(first.output.strip())
    assert built.parent == tmp_path / "cache" and built.exists() and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    again = CliRunner().invoke(compare_cmd, ["--build-kernel"])
    assert again.exit_code == 0 and Path(again.output.strip()) == built and built.stat().st_mtime_ns == stamp
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ILSTORE_CACHE_DIR", str(tmp_path / "other"))
    failed = CliRunner().invoke(compare_cmd, ["--build-kernel"])
    assert failed.exit_code == 2 and "cannot build the fused metrics kernel" in failed.output
    assert "no-such-compiler" in failed.output


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_over_the_whole_exponent_range(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """Subnormal to huge magnitudes, so the largest relative difference is found however the
    products and quotients round."""
    g = torch.Generator().manual_seed(11)
    info = torch.finfo(dtype)
    n = 5 * _kernel.BLOCK
    exponents = torch.empty(n, dtype=torch.float64).uniform_(math.log2(info.smallest_normal) - 20,
                                                             math.log2(info.max) - 2, generator=g)
    b = (torch.randn(n, generator=g, dtype=torch.float64).sign() * torch.exp2(exponents)).to(dtype)
    a = (b.double() * (1 + torch.randn(n, generator=g, dtype=torch.float64) * 1e-3)).to(dtype)
    a[::7] = b[::7]
    for tol in (dict(rtol=1e-5, atol=1e-8), dict(rtol=0.0, atol=0.0)):
        _same(compare_tensors(a, b, **tol), _torch_path(monkeypatch, compare_tensors, a, b, **tol))


def test_flush_to_zero_on_the_calling_thread_changes_nothing() -> None:
    """Metrics of subnormal values are the same whether the thread flushes denormals or not."""
    import numpy as np

    a = (np.arange(1, 5000, dtype=np.int32) * 991).view(np.float32)  # subnormal float32 patterns
    b = np.zeros_like(a)
    b[::3] = a[::3]
    before = _kernel.fused(a, b, rtol=0.0, atol=0.0, equal_nan=False, with_ulp=True)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        after = _kernel.fused(a, b, rtol=0.0, atol=0.0, equal_nan=False, with_ulp=True)
    finally:
        torch.set_flush_denormal(False)
    assert after == before and before.mismatched > 0 and before.max_abs > 0
