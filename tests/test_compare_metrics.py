"""Unit tests of the comparer's building blocks: metrics, statistics check, name map, option parsing."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ilstore.keys import CallKey, TensorKey
from ilstore.records import tensor_stats
from ilstore_compare.divergence import analyse_calls
from ilstore_compare.errors import CompareError, NameMapError
from ilstore_compare.mapping import NameMap
from ilstore_compare.metrics import compare_stats, compare_tensors
from ilstore_compare.pairing import PlannedCall, parse_steps, split_patterns
from ilstore_compare.result import TensorResult

TOL = dict(rtol=1e-5, atol=1e-8)


def test_metrics_of_a_known_pair() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[1.0, 2.0], [3.5, 4.0]])
    m = compare_tensors(a, b, **TOL)
    assert (m.numel, m.mismatched, m.mismatched_pct) == (4, 1, 25.0)
    assert m.max_abs_diff == 0.5 and m.max_abs_diff_index == (1, 0) and m.mean_abs_diff == 0.125
    assert math.isclose(m.max_rel_diff, 0.5 / 3.5)
    assert math.isclose(m.rel_l2, 0.5 / math.sqrt(1 + 4 + 12.25 + 16))
    expected_cos = float(torch.nn.functional.cosine_similarity(a.reshape(1, -1).double(), b.reshape(1, -1).double()))
    assert math.isclose(m.cosine, expected_cos, rel_tol=1e-12)


def test_chunks_give_the_same_metrics_as_one_pass() -> None:
    torch.manual_seed(0)
    a = torch.randn(7, 13, 11)
    b = a + 1e-5 * torch.randn_like(a)
    whole = compare_tensors(a, b, **TOL)
    chunked = compare_tensors(a, b, **TOL, chunk=97)
    assert whole.mismatched == chunked.mismatched and whole.max_abs_diff_index == chunked.max_abs_diff_index
    for name in ("max_abs_diff", "mean_abs_diff", "max_rel_diff", "rel_l2", "cosine"):
        assert math.isclose(getattr(whole, name), getattr(chunked, name), rel_tol=1e-9), name


def test_verdict_agrees_with_torch_isclose() -> None:
    torch.manual_seed(1)
    a = torch.randn(1000)
    b = a + torch.randn(1000) * 1e-5
    b[::50] = float("nan")
    a[::100] = float("nan")
    b[7] = a[7] = float("inf")
    for equal_nan in (False, True):
        m = compare_tensors(a, b, rtol=1e-4, atol=1e-6, equal_nan=equal_nan)
        expected = int((~torch.isclose(a.double(), b.double(), rtol=1e-4, atol=1e-6, equal_nan=equal_nan)).sum())
        assert m.mismatched == expected


def test_integer_bool_complex_empty_and_scalar() -> None:
    big = torch.tensor([2 ** 62, 5], dtype=torch.int64)
    assert compare_tensors(big, big + torch.tensor([1, 0]), **TOL).mismatched == 1  # exact beyond float64 precision
    assert compare_tensors(torch.tensor([True, False]), torch.tensor([True, True]), **TOL).mismatched == 1
    c = compare_tensors(torch.tensor([1 + 1j, 2j]), torch.tensor([1 + 1j, 2j]), **TOL)
    assert c.mismatched == 0 and c.cosine == pytest.approx(1.0)
    empty = compare_tensors(torch.zeros(0, 3), torch.zeros(0, 3), **TOL)
    assert empty.mismatched == 0 and empty.max_abs_diff is None
    scalar = compare_tensors(torch.tensor(2.0), torch.tensor(3.0), **TOL)
    assert scalar.max_abs_diff_index == () and scalar.mismatched == 1
    with pytest.raises(ValueError):
        compare_tensors(torch.zeros(2), torch.zeros(3), **TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.uint8, torch.int32])
def test_exact_is_bitwise_for_every_dtype(dtype: torch.dtype) -> None:
    a = torch.tensor([0.0, 1.0, 2.0, 3.0]).to(dtype)
    assert compare_tensors(a, a.clone(), rtol=0, atol=0, exact=True).mismatched == 0
    b = a.clone()
    b[1] = torch.tensor(3.0).to(dtype)
    assert compare_tensors(a, b, rtol=0, atol=0, exact=True).mismatched == 1


def test_zero_reference() -> None:
    m = compare_tensors(torch.ones(3), torch.zeros(3), **TOL)
    assert m.rel_l2 is None and m.cosine == 0.0 and m.max_rel_diff is None  # no element with b != 0
    z = compare_tensors(torch.zeros(3), torch.zeros(3), **TOL)
    assert z.rel_l2 == 0.0 and z.cosine == 1.0 and z.max_rel_diff is None
    some = compare_tensors(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 2.0]), **TOL)
    assert some.max_rel_diff == 0.0  # the one element with b != 0 agrees


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=40),
       st.floats(0, 1e-3), st.integers(0, 2 ** 31))
def test_a_pair_that_matches_elementwise_passes_the_statistics_check(values: list[float], rtol: float,
                                                                     seed: int) -> None:
    b = torch.tensor(values, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    noise = (torch.rand(len(values), generator=g, dtype=torch.float64) * 2 - 1)
    a = b + noise * (1e-6 + rtol * b.abs()) * 0.999
    assert compare_tensors(a, b, rtol=rtol, atol=1e-6).mismatched == 0
    check = compare_stats(tensor_stats(a), tensor_stats(b), numel=b.numel(), is_float=True, rtol=rtol, atol=1e-6)
    assert check.matched, check.failed


def test_statistics_check_catches_differences() -> None:
    a, b = torch.randn(100, generator=torch.Generator().manual_seed(0)), None
    b = a + 0.1
    check = compare_stats(tensor_stats(a), tensor_stats(b), numel=100, is_float=True, **TOL)
    assert not check.matched and {"mean", "min", "max"} <= {name for name, *_ in check.failed}
    nan = tensor_stats(torch.tensor([1.0, float("nan")]))
    assert not compare_stats(nan, nan, numel=2, is_float=True, **TOL).matched
    assert compare_stats(nan, nan, numel=2, is_float=True, equal_nan=True, **TOL).matched
    ints = compare_stats({"min": 0, "max": 5}, {"min": 0, "max": 6}, numel=3, is_float=False, **TOL)
    assert [name for name, *_ in ints.failed] == ["max"]


def test_name_map_rules_apply_in_order() -> None:
    m = NameMap.from_dict({"rules": [["^transformer\\.h\\.", "model.layers."],
                                     {"pattern": "\\.attn\\.c_attn$", "replacement": ".self_attn.qkv_proj"},
                                     ["^model\\.layers\\.(\\d+)\\.mlp$", "model.layers.\\1.ffn"]]})
    assert m.rename("transformer.h.3.attn.c_attn") == "model.layers.3.self_attn.qkv_proj"
    assert m.rename("transformer.h.0.mlp") == "model.layers.0.ffn"
    assert m.rename("lm_head") == "lm_head"
    assert NameMap.from_dict(m.to_dict()).rename("transformer.h.0.mlp") == "model.layers.0.ffn"
    with pytest.raises(NameMapError, match=r"rules\[1\]"):
        NameMap.from_dict({"rules": [["a", "b"], ["", "c"]]})


def test_parse_steps_and_split_patterns() -> None:
    assert parse_steps("0,2, 5-7,2") == (0, 2, 5, 6, 7)
    for bad in ("", "a", "3-1", "-1", "1,,2"):
        with pytest.raises(CompareError):
            parse_steps(bad)
    assert split_patterns(r"layers\.0\.,lm_head") == [r"layers\.0\.", "lm_head"]
    assert split_patterns(r"a{1,3},(?:b|c),[,x]\,y") == ["a{1,3}", "(?:b|c)", r"[,x]\,y"]


def _entry(call: CallKey, kind: str, status: str, rel: float | None = None) -> TensorResult:
    from ilstore_compare.metrics import TensorMetrics

    metrics = None
    if rel is not None:
        metrics = TensorMetrics(numel=1, mismatched=int(status == "mismatch"), mismatched_pct=0.0, max_abs_diff=rel,
                                max_abs_diff_index=None, mean_abs_diff=rel, max_rel_diff=rel, rel_l2=rel, cosine=1.0)
    return TensorResult(TensorKey(call.step, call.module, call.call, kind, (), call.rank), status, metrics=metrics)


def test_origin_rules() -> None:
    """parent(child_a, child_b) then leaf: child_b introduces, parent inherits via nesting, leaf via inputs."""
    parent, a, b, leaf = (CallKey(0, 0, name, 0) for name in ("p", "p.a", "p.b", "leaf"))
    planned = [PlannedCall(parent, "both", 0, 2, 1), PlannedCall(a, "both", 1, 0, 1), PlannedCall(b, "both", 2, 1, 1),
               PlannedCall(leaf, "both", 3, 3, 1)]
    tensors = [
        _entry(parent, "inputs", "match", 0.0), _entry(parent, "outputs", "mismatch", 1e-2),
        _entry(a, "inputs", "match", 0.0), _entry(a, "outputs", "match", 0.0),
        _entry(b, "inputs", "match", 1e-7), _entry(b, "outputs", "mismatch", 1e-3),
        _entry(leaf, "inputs", "mismatch", 1e-2), _entry(leaf, "outputs", "mismatch", 1e-1),
    ]
    calls, first, introduced = analyse_calls(planned, tensors)
    origin = {c.call.module: c.origin for c in calls}
    assert origin == {"p": "inherited", "p.a": None, "p.b": "introduced", "leaf": "inherited"}
    assert first is not None and first.module == "p.b" and first.growth == pytest.approx(1e4)
    assert [d.module for d in introduced] == ["p.b"]
    assert [c.order for c in calls] == [2, 0, 1, 3]


def test_options_are_validated_once_and_name_the_option() -> None:
    from ilstore_compare import CompareOptions, OptionError

    o = CompareOptions(steps=[2, 0, 2], modules=["a,b{1,2}", "c"], rtol=1)
    assert o.steps == (0, 2) and o.modules == ("a", "b{1,2}", "c") and o.rtol == 1.0 and o.squeeze_shapes is False
    with pytest.raises(OptionError, match=r"^modules: bad regex") as err:
        CompareOptions(modules="(")
    assert err.value.option == "modules"
    with pytest.raises(OptionError, match="did you mean 'rtol'"):
        CompareOptions.create(rtoll=1.0)
    assert CompareOptions.create(o, atol=0.5).atol == 0.5 and CompareOptions.create(o) is o
    with pytest.raises(OptionError, match=r"^steps: "):
        parse_steps("x")


def test_max_ulp_exact_values() -> None:
    one = torch.tensor([1.0, -1.0, 0.0, 3.0])
    up = torch.nextafter(one, torch.full_like(one, 10.0))
    assert compare_tensors(up, one, **TOL).max_ulp == 1  # nextafter neighbours, across zero too (0 -> denormal)
    assert compare_tensors(torch.tensor([-0.0, 0.0]), torch.tensor([0.0, -0.0]), **TOL).max_ulp == 0
    tiny = torch.tensor([-1.4e-45, 1.4e-45])  # the smallest denormals on either side of zero: 2 apart
    assert compare_tensors(tiny[:1], tiny[1:], **TOL).max_ulp == 2
    nan = torch.tensor([float("nan"), 1.0])
    assert compare_tensors(nan, torch.tensor([5.0, torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))]),
                           **TOL).max_ulp == 1  # the NaN element is skipped
    assert compare_tensors(nan[:1], torch.tensor([1.0]), **TOL).max_ulp is None
    big = torch.finfo(torch.float32).max
    assert compare_tensors(torch.tensor([big]), torch.tensor([float("inf")]), **TOL).max_ulp == 1
    # bf16 candidate against an fp32 reference: the reference is rounded to bf16 first
    bf = torch.tensor([1.0, 2.0, 3.0]).to(torch.bfloat16)
    ref = torch.tensor([1.0 + 2 ** -9, 2.0 + 2 ** -6, 3.0 - 3 * 2 ** -6])  # 0 (rounds to 1), 1 and 3 bf16 ulps
    assert compare_tensors(bf, ref, **TOL).max_ulp == 3
    f64 = torch.tensor([2.0, -2.0], dtype=torch.float64)  # 2**63 apart: beyond int64, still exact
    assert compare_tensors(f64, -f64, **TOL).max_ulp == 2 * 0x4000000000000000
    assert compare_tensors(torch.tensor([1, 2]), torch.tensor([1, 3]), **TOL).max_ulp is None
    assert compare_tensors(torch.tensor([1j]), torch.tensor([1j]), **TOL).max_ulp is None
    assert compare_tensors(torch.zeros(0), torch.zeros(0), **TOL).max_ulp is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
def test_max_ulp_matches_a_brute_force_count_in_chunks(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    a = (torch.randn(500, generator=g, dtype=torch.float64) * 4).to(dtype)
    b = torch.randn(500, generator=g, dtype=torch.float64) * 4
    b[7] = float("nan")
    width = 8 * a.element_size()
    itype = {8: torch.int8, 16: torch.int16, 32: torch.int32, 64: torch.int64}[width]

    def position(bits: int) -> int:
        bits &= (1 << width) - 1
        magnitude = bits & ((1 << (width - 1)) - 1)
        return -magnitude if bits >> (width - 1) else magnitude

    cast = b.to(dtype)
    pairs = [(p, q) for p, q, nan in zip(a.view(itype).tolist(), cast.view(itype).tolist(),
                                         (a.double().isnan() | cast.double().isnan()).tolist(), strict=True) if not nan]
    expected = max(abs(position(p) - position(q)) for p, q in pairs)
    assert compare_tensors(a, b, **TOL, chunk=64).max_ulp == expected == compare_tensors(a, b, **TOL).max_ulp


def test_max_ulp_fnuz_reference_out_of_range_saturates() -> None:
    """A float8 fnuz candidate has no infinity; a reference beyond its range must not turn into a
    NaN that max_ulp skips (which would report 0 ULP for a real mismatch)."""
    from ilstore_compare.metrics import max_ulp

    dtype = getattr(torch, "float8_e4m3fnuz", None)
    if dtype is None:
        pytest.skip("this torch has no float8_e4m3fnuz")
    a = torch.tensor([1.0, 1.0]).to(dtype)
    top = torch.tensor([torch.finfo(dtype).max]).to(dtype)
    expected = max_ulp(a[1:], top)  # 1.0 against the largest finite value
    assert expected is not None and expected > 0
    assert max_ulp(a, torch.tensor([1.0, 1000.0])) == expected
    assert max_ulp(a, torch.tensor([1.0, float("inf")])) == expected


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64, "exact"])
def test_the_torch_path_widens_at_most_torch_chunk_elements_at_a_time(dtype: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Pairs the kernel does not take (integer, bool, complex, ``exact``) are widened to float64
    (complex128) a chunk at a time, and each chunk makes about ten temporaries of its size: at
    1 Mi elements that was ~86 MB (137 MB complex), over the memory bound's 300 MB beside two
    tensors. The chunks are now at most metrics.TORCH_CHUNK elements, with the same verdict."""
    from ilstore_compare import metrics

    n = 3 * metrics.TORCH_CHUNK + 5
    exact = dtype == "exact"
    real = torch.float32 if exact else dtype
    a = (torch.arange(n) % 7).to(real)
    b = a.clone()
    b[-1] = (not bool(a[-1])) if real is torch.bool else a[-1] + 1
    seen: list[int] = []
    for name in ("add_general", "add_finite"):
        real_fn = getattr(metrics._Accumulator, name)

        def spy(self: Any, ok_or_x: Any, *args: Any, _fn: Any = real_fn) -> Any:
            seen.append(int(ok_or_x.numel()))
            return _fn(self, ok_or_x, *args)

        monkeypatch.setattr(metrics._Accumulator, name, spy)
    m = compare_tensors(a, b, rtol=0.0, atol=0.0, exact=exact)
    assert m.mismatched == 1
    assert seen and max(seen) <= metrics.TORCH_CHUNK and sum(seen) >= n


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.float64])
def test_equal_tensors_have_a_cosine_of_exactly_one(dtype: torch.dtype) -> None:
    """<a, a> / (||a|| ||a||) rounds below 1 for some tensors (3, 5, 7, 11, 13: 0.9999999999999999):
    equal tensors report a cosine of 1, as the reports then print it."""
    a = torch.tensor([3, 5, 7, 11, 13]).to(dtype)
    assert compare_tensors(a, a.clone(), rtol=1e-5, atol=1e-8).cosine == 1.0
