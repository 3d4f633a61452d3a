"""ilstore's own statistics of CPU float tensors (ilstore/_stats_kernel.py): the compiled one-pass
kernel and the numpy fallback give the same bits, for any size, dtype, layout, thread count and
contents, and the sums are what the documented order says (float64, close to exact)."""

from __future__ import annotations

import math
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch

from ilstore import _stats_kernel as K
from ilstore.records import _slow_stats, tensor_stats

needs_cc = pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
                              or os.environ.get("ILSTORE_STATS_KERNEL") == "0",
                              reason="no C compiler (or ILSTORE_STATS_KERNEL=0): the kernel is not used here")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [1, 2, 15, 16, 17, 31, 100, K.BLOCK - 1, K.BLOCK, K.BLOCK + 1, 2 * K.BLOCK + 17, 33 * K.BLOCK,
         40 * K.BLOCK + 5, 300_001]


def _bits(v: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", v))[0]


def _same_sums(a: K.Sums, b: K.Sums) -> bool:
    """Equal bit for bit (the sign of zero counts)."""
    return a.finite == b.finite and all(_bits(x) == _bits(y) for x, y in zip(a[1:], b[1:], strict=True))


def _random(n: int, dtype: torch.dtype, seed: int, scale: float = 3.0, offset: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


def _exact(x: torch.Tensor) -> list[float]:
    return x.double().reshape(-1).tolist()


@needs_cc
def test_the_kernel_is_built_and_used() -> None:
    assert K.LIBRARY.load() is not None
    got = K.native_sums(torch.tensor([1.0, -2.0, 3.5]))
    assert got == K.Sums(True, -2.0, 3.5, 2.5, 17.25)


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_kernel_and_fallback_agree_bit_for_bit(dtype: torch.dtype) -> None:
    for seed, n in enumerate(SIZES):
        for scale, offset in ((3.0, 1.0), (1e-3, 1e4), (1e4, -7.0)):
            x = _random(n, dtype, seed, scale, offset)
            for center in (0.0, -0.0, float(x.double().mean())):
                fast, slow = K.native_sums(x, center), K.fallback_sums(x, center)
                assert fast is not None and _same_sums(fast, slow), (n, scale, center, fast, slow)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_an_empty_tensor_gets_the_same_answer_on_every_path(dtype: torch.dtype) -> None:
    # Before, the fallback raised (numpy's min of nothing) and the kernel answered its initial
    # state (float16: extremes -131008, "finite").
    for x in (torch.empty(0, dtype=dtype), torch.empty(3, 0, dtype=dtype), torch.empty(4, 0, dtype=dtype).t()):
        answers = [K.fallback_sums(x), K.fallback_sums(x, 2.5), K.sums(x), K.plain_sums(x, dtype, 0)]
        native = K.native_sums(x)
        answers += [native] if native is not None else []
        for got in answers:
            assert _same_sums(got, K.EMPTY), (x.shape, got)
    assert K.EMPTY.finite and math.isnan(K.EMPTY.minimum) and math.isnan(K.EMPTY.maximum)


@needs_cc
def test_the_order_is_the_documented_one() -> None:
    """A float64 tensor whose sums depend on the order: lanes, then the tree, then the blocks."""
    n = K.BLOCK + 37
    x = _random(n, torch.float64, 7, 1e8, 0.0)
    x[::5] *= 1e-9
    vals = x.tolist()
    total = squares = 0.0
    for start in range(0, n, K.BLOCK):
        block = vals[start:start + K.BLOCK]
        lanes, lanes_sq = [-0.0] * K.LANES, [-0.0] * K.LANES
        for i, v in enumerate(block):
            lanes[i % K.LANES] += v
            lanes_sq[i % K.LANES] += v * v
        while len(lanes) > 1:
            lanes = [lanes[2 * i] + lanes[2 * i + 1] for i in range(len(lanes) // 2)]
            lanes_sq = [lanes_sq[2 * i] + lanes_sq[2 * i + 1] for i in range(len(lanes_sq) // 2)]
        total += lanes[0]
        squares += lanes_sq[0]
    expected = K.Sums(True, min(vals), max(vals), total, squares)
    assert _same_sums(K.native_sums(x), expected)
    assert _same_sums(K.fallback_sums(x), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_sums_are_close_to_exact(dtype: torch.dtype) -> None:
    """Every element widened exactly, added in float64: within the error bound of the order
    from math.fsum (positive terms, so no cancellation: chains of BLOCK / LANES additions per
    lane, log2(LANES) in the tree, one per block, each at most half an ulp of the total), and in
    practice within a few tens of ulp; float32 and narrower squares are exact in float64."""
    for n in (5, 4096, 100_003):
        x = _random(n, dtype, n, 2.0, 0.0).abs()
        vals = _exact(x)
        bound = min(n, K.BLOCK // K.LANES) + int(math.log2(K.LANES)) + -(-n // K.BLOCK)
        for s in (K.sums(x), K.fallback_sums(x)):
            assert s.minimum == min(vals) and s.maximum == max(vals)
            exact_sum, exact_sq = math.fsum(vals), math.fsum(v * v for v in vals)
            assert abs(s.total - exact_sum) <= min(bound, 40) * math.ulp(exact_sum), (n, s.total, exact_sum)
            assert abs(s.squares - exact_sq) <= min(bound, 40) * math.ulp(exact_sq), (n, s.squares, exact_sq)


def test_min_max_and_non_finite_values() -> None:
    for dtype in DTYPES:
        info = torch.finfo(dtype)
        specials = [0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4, -info.tiny / 8, info.max, -info.max, 1.0]
        x = torch.tensor(specials * 3, dtype=torch.float64).to(dtype)
        for s in (K.sums(x), K.fallback_sums(x)):
            assert s.finite and (s.minimum, s.maximum) == (-info.max, info.max), dtype
        zeros = torch.tensor([0.0, -0.0, 0.0], dtype=dtype)
        for s in (K.sums(zeros), K.fallback_sums(zeros)):  # total order: -0.0 below +0.0
            assert _bits(s.minimum) == _bits(-0.0) and _bits(s.maximum) == _bits(0.0)
        for bad in (float("nan"), float("inf"), -float("inf"), -float("nan")):
            y = _random(5000, dtype, 1)
            y[4097] = bad
            assert not K.sums(y).finite and not K.fallback_sums(y).finite, (dtype, bad)
            assert tensor_stats(y) == _slow_stats(y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_subnormals_are_exact(dtype: torch.dtype) -> None:
    """Every subnormal of the narrow formats is widened exactly (the half conversion is done by hand)."""
    width = torch.finfo(dtype).bits
    if width == 16:
        bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
        x = bits.view(dtype)
        x = x[torch.isfinite(x)]
    else:
        x = (torch.arange(1, 4000, dtype=torch.int32) * 997).view(torch.float32)  # subnormal float32 patterns
        x = torch.cat([x, -x])
    vals = _exact(x)
    for s in (K.sums(x), K.fallback_sums(x)):
        assert s.finite and s.minimum == min(vals) and s.maximum == max(vals)
        assert _same_sums(s, K.fallback_sums(x))
    small = x[x.abs() < torch.finfo(dtype).tiny][:15]  # fewer than LANES, multiples of the smallest: exact
    assert K.sums(small).total == math.fsum(_exact(small))


def test_huge_float64_squares_go_the_exact_way() -> None:
    x = torch.tensor([1e200, -3e200, 5.0], dtype=torch.float64)
    assert math.isinf(K.sums(x).squares)
    assert tensor_stats(x) == _slow_stats(x)
    y = torch.tensor([3e38, -3e38, 1.0])  # float32: its squares fit in float64
    stats = tensor_stats(y)
    v = float(y[0])
    assert stats["l2_norm"] == math.sqrt((v * v + v * v) + 1.0)  # lanes 0-2, then the tree
    assert stats["nan_count"] == 0 and stats["max"] == v


def test_statistics_do_not_depend_on_layout_or_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """tensor_stats of a strided view and of its contiguous copy, with the kernel and with the
    fallback (ILSTORE_STATS_KERNEL=0): one result. (The thread count: tests/test_pipeline.py's
    test_stats_do_not_depend_on_the_thread_count, whose CPU float tensors take this path.)"""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(700, 600, generator=g) * 5 + 2
    tensors = [base, base.t(), base[::3, 1::2], base + 4000.0, base.double(), base.half(), base.bfloat16().t(),
               torch.randn(2_000_003, generator=g), torch.tensor(3.25), torch.tensor([-0.0, -0.0])]
    results = [tensor_stats(t) for t in tensors]
    assert results[1] == tensor_stats(base.t().contiguous())
    assert results[2] == tensor_stats(base[::3, 1::2].contiguous())
    monkeypatch.setenv("ILSTORE_STATS_KERNEL", "0")
    monkeypatch.setattr(K.LIBRARY, "_lib", None)
    monkeypatch.setattr(K.LIBRARY, "_failed", False)
    assert K.LIBRARY.load() is None
    assert [tensor_stats(t) for t in tensors] == results


def test_mean_and_std_are_accurate() -> None:
    """Against float64 references: the one-pass variance, and the two-pass one where the mean dominates."""
    for offset in (0.0, 1e3, 1e6):
        x = _random(50_000, torch.float32, 3, 1.0, offset)
        ref = x.double()
        stats = tensor_stats(x)
        assert math.isclose(stats["mean"], float(ref.mean()), rel_tol=1e-13, abs_tol=1e-13)
        assert math.isclose(stats["std"], float(ref.std(unbiased=False)), rel_tol=1e-9), offset
        assert math.isclose(stats["l2_norm"], float(ref.norm()), rel_tol=1e-13)


@needs_cc
def test_the_kernel_is_compiled_into_the_cache_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ILSTORE_CACHE_DIR", str(tmp_path))
    first = K.LIBRARY.compile()
    assert first is not None and first.parent == tmp_path and first.name.startswith(f"stats-v{K.LIBRARY.version}-")
    stamp = first.stat().st_mtime_ns
    assert K.LIBRARY.compile() == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_without_a_compiler_the_fallback_answers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    x = _random(10_000, torch.bfloat16, 9)
    expected = tensor_stats(x)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ILSTORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(K.LIBRARY, "_lib", None)
    monkeypatch.setattr(K.LIBRARY, "_failed", False)
    assert K.LIBRARY.load() is None
    assert tensor_stats(x) == expected
    with pytest.raises(RuntimeError, match="cannot build the statistics kernel.*no-such-compiler"):
        K.LIBRARY.build()


def test_first_use_from_many_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads that reach the kernel together load it once and all get the same results."""
    monkeypatch.setattr(K.LIBRARY, "_lib", None)
    monkeypatch.setattr(K.LIBRARY, "_failed", False)
    x = _random(100_000, torch.float32, 4)
    expected = K.fallback_sums(x)
    out: list[K.Sums] = []
    barrier = threading.Barrier(6)

    def work() -> None:
        barrier.wait()
        for _ in range(20):
            out.append(K.sums(x))

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 120 and all(_same_sums(s, expected) for s in out)


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_extremes_are_the_total_order_ones_for_any_bits(dtype: torch.dtype) -> None:
    """The kernel's min and max are the elements first and last in IEEE total order (-NaN < -inf <
    ... < -0.0 < +0.0 < ... < inf < NaN), whatever the bits: all negative, all positive, mixed,
    NaN and infinity among them (the other extreme then still exact); ``finite`` says whether every
    element is."""
    width = torch.finfo(dtype).bits
    ints = {16: torch.int16, 32: torch.int32, 64: torch.int64}[width]
    g = torch.Generator().manual_seed(5)
    magnitude = (1 << (width - 1)) - 1
    for case in range(60):
        n = (1, 3, 16, 17, 100, K.BLOCK + 3)[case % 6]
        bits = torch.randint(-(2 ** 62), 2 ** 62, (n,), generator=g, dtype=torch.int64)
        if width < 64:
            bits = bits % (1 << width) - (1 << (width - 1))
        bits = bits.to(ints)
        if case % 5 == 1:  # every element negative (sign bit set)
            bits = bits | (-(1 << (width - 1)))
        elif case % 5 == 2:  # every element non-negative
            bits = bits & magnitude
        elif case % 5 == 3:  # finite values only: both signs, both zeros
            x = _random(n, torch.float64, case, 10.0, 0.0).to(dtype)
            x[:: 7] = 0.0
            x[3:: 11] = -0.0
            bits = x.view(ints)
        x = bits.view(dtype)
        keys = [b ^ magnitude if b < 0 else b for b in bits.tolist()]
        lo_i, hi_i = keys.index(min(keys)), keys.index(max(keys))
        got = K.native_sums(x)
        assert got is not None
        assert got.finite == bool(torch.isfinite(x).all()), (case, dtype)
        for value, i in ((got.minimum, lo_i), (got.maximum, hi_i)):
            want = float(x[i].double())
            if math.isfinite(want):  # a non-finite extreme's value is not defined (Sums: only when finite)
                assert _bits(value) == _bits(want), (case, dtype, value, want)


@needs_cc
def test_flush_to_zero_on_the_calling_thread_changes_nothing() -> None:
    """torch.set_flush_denormal(True) sets the thread's denormals-are-zero mode, which would make
    the kernel read subnormals as zero: the kernel clears it for its call and puts it back."""
    tiny = (torch.arange(1, 4000, dtype=torch.int32) * 997).view(torch.float32)  # subnormal float32 patterns
    cases = [tiny, torch.cat([tiny, -tiny[::2], torch.tensor([1.0, -2.5])]), tiny.to(torch.bfloat16)]
    before = [K.sums(v) for v in cases]
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        after = [K.sums(v) for v in cases]
        assert float((torch.tensor([1e-40]) * 1.0)[0]) == 0.0  # the thread's mode is as the caller set it
    finally:
        torch.set_flush_denormal(False)
    for b, a in zip(before, after, strict=True):
        assert _same_sums(a, b)
    assert before[0].minimum > 0 and before[0].total > 0 and before[2].maximum > 0  # the subnormals count
