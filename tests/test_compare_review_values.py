"""Values and verdicts the 2026-12-02 review of the comparer found wrong: an infinite reference
matched anything (the tolerance ``atol + rtol * inf`` is infinite), integer differences past 2**53
were measured after rounding to float64, integer statistics were compared as floats, ``--exact``
let an int64 equal a float64 it only rounds to, and float64 sums of squares that overflowed gave a
cosine of 1."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from compare_helpers import module_run
from ilstore_compare import compare, metrics
from ilstore_compare.metrics import compare_stats, compare_tensors
from ilstore_compare.report_json import report_dict
from ilstore_compare.report_md import render_markdown

INF = float("inf")
TOL = dict(rtol=1e-5, atol=1e-8)


class Const(nn.Module):
    """Returns the tensor it was made with, whatever its input."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.clone()


def _paths(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    if path == "torch":  # the kernel declines: the torch path computes
        monkeypatch.setattr(metrics, "fused", lambda *a, **k: None)


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_an_infinite_reference_matches_only_the_same_infinity(monkeypatch: pytest.MonkeyPatch, path: str,
                                                               dtype: torch.dtype) -> None:
    _paths(monkeypatch, path)
    a = torch.tensor([INF, 1.0, -INF, 5.0, INF, -INF]).to(dtype)
    b = torch.tensor([-INF, 1.0, INF, INF, INF, -INF]).to(dtype)
    m = compare_tensors(a, b, **TOL)
    assert m.mismatched == 3  # -inf/inf, inf/-inf and 5/inf; equal infinities match
    assert (m.inf1, m.inf2) == (4, 5)
    # a finite value as large as the dtype allows is still not infinity
    big = torch.full((1,), torch.finfo(dtype).max, dtype=dtype)
    assert compare_tensors(big, torch.tensor([INF]).to(dtype), rtol=1.0, atol=1.0).mismatched == 1
    assert compare_tensors(torch.tensor([INF]).to(dtype), big, rtol=1.0, atol=1.0).mismatched == 1


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_infinities_across_dtypes_and_complex(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    _paths(monkeypatch, path)
    a = torch.tensor([INF, 3.0, -INF]).to(torch.bfloat16)
    b = torch.tensor([-INF, INF, -INF])  # float32 reference
    assert compare_tensors(a, b, **TOL).mismatched == 2
    c = torch.tensor([complex(INF, 0), complex(1, 1)])
    d = torch.tensor([complex(-INF, 0), complex(1, 1)])
    assert compare_tensors(c, d, **TOL).mismatched == 1
    assert compare_tensors(c, c.clone(), **TOL).mismatched == 0


def test_a_run_against_an_infinite_reference_fails(tmp_path: Path) -> None:
    a = module_run(tmp_path, "a", Const(torch.tensor([INF, 1.0, 5.0])), torch.zeros(1))
    b = module_run(tmp_path, "b", Const(torch.tensor([-INF, 1.0, INF])), torch.zeros(1))
    result = compare(a, b)
    assert result.exit_code == 1
    [out] = [t for t in result.tensors if t.key.kind == "outputs"]
    assert out.metrics is not None and out.metrics.mismatched == 2
    assert compare(a, a).exit_code == 0


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint64])
def test_integer_differences_are_measured_on_the_integers(dtype: torch.dtype) -> None:
    a = torch.tensor([2**62 + 1, 7, 2**62 - 3], dtype=dtype)
    b = torch.tensor([2**62, 7, 2**62 + 5], dtype=dtype)
    m = compare_tensors(a, b, **TOL)
    assert m.mismatched == 2
    assert m.max_abs_diff == 8.0 and m.max_abs_diff_index == (2,)
    assert m.mean_abs_diff == 3.0
    assert m.rel_l2 is not None and math.isclose(m.rel_l2, math.sqrt(65) / math.sqrt(2 * 2.0**124 + 49 + 10 * 2.0**62),
                                                 rel_tol=1e-9)
    exact = compare_tensors(a, b, rtol=0.0, atol=0.0, exact=True)
    assert (exact.mismatched, exact.max_abs_diff) == (2, 8.0)


def test_integer_differences_across_integer_dtypes() -> None:
    extremes = torch.tensor([-(2**63), 2**63 - 1, 0, -5])
    m = compare_tensors(extremes, torch.tensor([2**63 - 1, -(2**63), 0, 5]), **TOL)
    assert m.max_abs_diff == 2.0**64 and m.max_abs_diff_index == (0,)  # 2**64 - 1, rounded once
    assert compare_tensors(torch.tensor([3, -2], dtype=torch.int8), torch.tensor([1, 2], dtype=torch.int16),
                           **TOL).max_abs_diff == 4.0
    flags = compare_tensors(torch.tensor([True, False, True]), torch.tensor([False, False, True]), **TOL)
    assert (flags.mismatched, flags.max_abs_diff, flags.mean_abs_diff) == (1, 1.0, 1 / 3)
    huge = torch.tensor([2**64 - 1, 3], dtype=torch.uint64)
    mixed = compare_tensors(huge, torch.tensor([-1, 2**62 + 1]), **TOL)  # uint64 against int64
    assert mixed.max_abs_diff == 2.0**64 and mixed.max_abs_diff_index == (0,)
    assert compare_tensors(torch.tensor([5], dtype=torch.uint64), torch.tensor([-3]), **TOL).max_abs_diff == 8.0
    assert compare_tensors(torch.tensor([9], dtype=torch.uint64), torch.tensor([2]), **TOL).max_abs_diff == 7.0


@pytest.mark.parametrize("value1, value2", [(2**62 + 1, 2**62), (-(2**63), -(2**63) + 1), (True, False)])
def test_integer_statistics_compare_exactly(value1: Any, value2: Any) -> None:
    s1, s2 = {"min": 0, "max": value1}, {"min": 0, "max": value2}
    check = compare_stats(s1, s2, numel=2, is_float=False, **TOL)
    assert not check.matched and check.failed == (("max", value1, value2),)
    assert compare_stats(s1, dict(s1), numel=2, is_float=False, **TOL).matched


def test_exact_int64_against_float64_compares_the_integers() -> None:
    ints = torch.tensor([2**53 + 1, 2**53, -(2**63), 2**63 - 1, 3])
    floats = torch.tensor([2.0**53, 2.0**53, -(2.0**63), 2.0**63, 3.0], dtype=torch.float64)
    m = compare_tensors(ints, floats, rtol=0.0, atol=0.0, exact=True)
    assert m.mismatched == 2  # 2**53 + 1 and 2**63 - 1 are not the floats they round to
    assert compare_tensors(floats, ints, rtol=0.0, atol=0.0, exact=True).mismatched == 2
    nonfinite = torch.tensor([float("nan"), INF, 0.5], dtype=torch.float64)
    assert compare_tensors(torch.tensor([0, 0, 0]), nonfinite, rtol=0.0, atol=0.0, exact=True).mismatched == 3
    unsigned = torch.tensor([2**64 - 1, 2**53 + 1], dtype=torch.uint64)
    assert compare_tensors(unsigned, torch.tensor([2.0**64, 2.0**53], dtype=torch.float64), rtol=0.0, atol=0.0,
                           exact=True).mismatched == 2
    # without --exact the values are compared after the documented upcast to float64
    assert compare_tensors(ints, floats, rtol=0.0, atol=0.0).mismatched == 0


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_overflowing_float64_sums_leave_cosine_and_rel_l2_unknown(monkeypatch: pytest.MonkeyPatch,
                                                                  path: str) -> None:
    _paths(monkeypatch, path)
    a = torch.tensor([1e200, -1e200], dtype=torch.float64)
    m = compare_tensors(a, -a, **TOL)
    assert m.mismatched == 2
    assert m.cosine is None and m.rel_l2 is None  # not the 1.0 that min(1.0, nan) gave
    assert m.max_abs_diff == 2e200 and m.mean_abs_diff == 2e200
    huge = torch.full((4,), 1.5e308, dtype=torch.float64)
    assert compare_tensors(huge, huge.clone(), **TOL).mean_abs_diff == 0.0
    assert compare_tensors(huge, huge * 0.5, **TOL).mean_abs_diff is None  # its sum overflowed
    small = compare_tensors(a * 1e-100, -a * 1e-100, **TOL)  # the same pair scaled into range
    assert small.cosine == -1.0 and small.rel_l2 == 2.0


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_max_rel_diff_is_unknown_without_a_nonzero_reference(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    _paths(monkeypatch, path)
    m = compare_tensors(torch.tensor([1.0, 2.0]), torch.zeros(2), **TOL)
    assert m.mismatched == 2 and m.max_rel_diff is None
    assert compare_tensors(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 2.0]), **TOL).max_rel_diff == 0.0
    assert compare_tensors(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.0]), **TOL).max_rel_diff == 0.5


def test_the_report_shows_unknown_metrics_as_null(tmp_path: Path) -> None:
    value = torch.tensor([1e200, -1e200], dtype=torch.float64)
    a = module_run(tmp_path, "a", Const(value), torch.zeros(1))
    b = module_run(tmp_path, "b", Const(-value), torch.zeros(1))
    result = compare(a, b)
    assert result.exit_code == 1
    [entry] = [t for t in json.loads(json.dumps(report_dict(result)))["tensors"] if t["kind"] == "outputs"]
    assert entry["cosine_similarity"] is None and entry["rel_l2"] is None


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_identical_huge_float64_tensors_match_exactly(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Their sums of squares overflow too, but equal tensors need no sum: rel_l2 0, cosine 1."""
    _paths(monkeypatch, path)
    a = torch.full((4,), 1e200, dtype=torch.float64)
    m = compare_tensors(a, a.clone(), **TOL)
    assert (m.mismatched, m.rel_l2, m.cosine, m.max_rel_diff) == (0, 0.0, 1.0, 0.0)


def test_a_replay_of_huge_float64_outputs(tmp_path: Path) -> None:
    """Bit-identical replayed outputs past 1e154: local error 0 (it was reported infinite, 'the
    reference's outputs are zero'); different ones: not measured (fails closed), never infinite."""
    import ilstore

    class Big(nn.Module):
        def __init__(self, scale: float) -> None:
            super().__init__()
            self.scale = scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    def run(model: nn.Module, name: str, **extra: Any) -> Path:
        config = {"output_dir": str(tmp_path), "run_id": name, "log_step_ids": [], **extra}
        with torch.no_grad(), ilstore.capture(model, config) as cap:
            model(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
        assert cap.run_dir is not None
        return cap.run_dir

    same = nn.Sequential(Big(1e200))
    ref = run(same, "ref")
    result = compare(run(same, "rep", replay_from=str(ref)), ref)
    [error] = result.local.errors
    assert error.rel_l2 == 0.0 and error.compared and result.exit_code == 0
    other = run(nn.Sequential(Big(-1e200)), "other", replay_from=str(ref))
    [error] = compare(other, ref).local.errors
    assert not error.compared and "overflows" in (error.reason or "")


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_max_rel_diff_with_references_too_small_to_square(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    _paths(monkeypatch, path)
    b = torch.tensor([1e-170, 2e-170], dtype=torch.float64)
    assert compare_tensors(b.clone(), b, **TOL).max_rel_diff == 0.0
    assert compare_tensors(b.clone(), b, rtol=0.0, atol=0.0, exact=True).max_rel_diff == 0.0
    assert compare_tensors(torch.zeros(2), torch.zeros(2), **TOL).max_rel_diff is None


def test_exact_int64_against_a_float_measures_on_the_integers() -> None:
    ints = torch.tensor([2**53 + 1, 7])
    m = compare_tensors(ints, torch.tensor([2.0**53, 7.5], dtype=torch.float64), rtol=0.0, atol=0.0, exact=True)
    assert m.mismatched == 2 and m.max_abs_diff == 1.0 and m.max_abs_diff_index == (0,)
    c = compare_tensors(ints, torch.tensor([2.0**53 + 0j, 7 + 0j]), rtol=0.0, atol=0.0, exact=True)
    assert c.mismatched == 1  # int64 against complex128: the integers too
    assert compare_tensors(torch.tensor([2**53, 7]), torch.tensor([2.0**53 + 0j, 7 + 1j]), rtol=0.0, atol=0.0,
                           exact=True).mismatched == 1  # an imaginary part is a difference


def test_a_stats_only_pair_failed_by_nan_alone_says_so(tmp_path: Path) -> None:
    """Two stats-mode runs of the same tensor holding NaN: without ``--equal-nan`` the pair fails on
    its NaN count, which is equal on both sides; the note says that, not "nan_count 3 vs 3"."""
    value = torch.tensor([1.0, float("nan"), 2.0, float("nan"), float("nan")])
    model = nn.Sequential(Const(value))
    a = module_run(tmp_path, "a", model, torch.zeros(1), mode="stats")
    b = module_run(tmp_path, "b", model, torch.zeros(1), mode="stats")
    md = render_markdown(compare(a, b, allow_stats_only=True), verbose=True)
    assert "nan_count 3 on both sides (NaN matches NaN only with --equal-nan)" in md
    assert "nan_count 3 vs 3" not in md
    assert compare(a, b, allow_stats_only=True, equal_nan=True).exit_code == 0
