"""Per-tensor comparison: the elementwise verdict and its metrics, and the statistics check.

Tensors are compared in flat chunks of :data:`CHUNK` elements upcast to float64 (complex128
for complex tensors), so the extra memory is a few chunks whatever the tensor size, and every
sum is accumulated in float64.

Example:
    >>> import torch
    >>> m = compare_tensors(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]), rtol=1e-5, atol=1e-8)
    >>> m.mismatched, m.max_abs_diff, m.max_abs_diff_index
    (1, 0.5, (1,))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CHUNK", "TensorMetrics", "StatsCheck", "compare_tensors", "compare_stats", "is_float_dtype"]

#: Elements per chunk: 1 Mi elements, i.e. 8 MiB per float64 temporary.
CHUNK = 1 << 20

_FLOAT_STATS = ("mean", "std", "min", "max", "abs_max", "l2_norm")


def is_float_dtype(dtype: str | None) -> bool:
    """Whether a dtype name (``"torch.bfloat16"``) is a floating or complex type."""
    if not dtype:
        return False
    name = dtype.removeprefix("torch.")
    return name.startswith(("float", "bfloat", "complex", "half", "double", "cfloat", "cdouble"))


@dataclass(frozen=True)
class TensorMetrics:
    """How two tensors of the same shape differ (``a`` from dir1, ``b`` the dir2 reference).

    Difference metrics are taken over the elements finite on both sides; NaN/Inf are counted
    separately (and count as mismatches unless they agree, see :func:`compare_tensors`).

    Attributes:
        numel: elements compared.
        mismatched: elements failing the verdict.
        mismatched_pct: ``100 * mismatched / numel``.
        max_abs_diff: ``max |a - b|``; None when no element is finite on both sides.
        max_abs_diff_index: the multi-dimensional index of that maximum; None when it is 0.
        mean_abs_diff: ``mean |a - b|``.
        max_rel_diff: ``max |a - b| / |b|`` over elements with ``b != 0``.
        rel_l2: ``||a - b|| / ||b||``; 0 when both are zero, None (infinite) when only b is.
        cosine: ``<a, b> / (||a|| ||b||)``; 1 when both are zero, 0 when only one is.
        nan1, nan2, inf1, inf2: NaN and Inf counts in a and b.
    """

    numel: int
    mismatched: int
    mismatched_pct: float
    max_abs_diff: float | None
    max_abs_diff_index: tuple[int, ...] | None
    mean_abs_diff: float | None
    max_rel_diff: float | None
    rel_l2: float | None
    cosine: float | None
    nan1: int = 0
    nan2: int = 0
    inf1: int = 0
    inf2: int = 0


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    index = []
    for dim in reversed(shape):
        index.append(flat % dim)
        flat //= dim
    return tuple(reversed(index))


def _is_exact_type(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex())


def _finite_chunk(x: torch.Tensor, y: torch.Tensor, rtol: float, atol: float) -> tuple[Any, ...] | None:
    """Metrics of one float64 chunk with a handful of temporaries, or None if any element of
    either side is NaN/Inf (the general path then handles it).

    ``|x - y|`` is finite everywhere exactly when both sides are, and its sum is finite exactly
    when every term is, so one reduction decides; dot products replace elementwise squares.
    """
    d = torch.sub(x, y).abs_()
    c_sum = float(d.sum())
    if not math.isfinite(c_sum):
        return None
    yabs = y.abs()
    tol = torch.mul(yabs, rtol).add_(atol)
    c_mis = int((d > tol).sum())
    cmax, cidx = d.max(dim=0)
    rel = torch.div(d, yabs, out=tol).masked_fill_(yabs == 0, 0.0)
    return (c_mis, c_sum, float(torch.dot(d, d)), float(torch.dot(x, x)), float(torch.dot(y, y)),
            float(torch.dot(x, y)), float(cmax), int(cidx), float(rel.max()))


def compare_tensors(a: torch.Tensor, b: torch.Tensor, *, rtol: float, atol: float, exact: bool = False,
                    equal_nan: bool = False, chunk: int = CHUNK) -> TensorMetrics:
    """Compare two tensors of the same shape elementwise.

    An element matches when ``|a - b| <= atol + rtol * |b|`` or ``a == b`` (so equal
    infinities match); NaN matches NaN only with ``equal_nan``. Integer and bool pairs match
    only when equal. With ``exact`` and equal dtypes the bits are compared (``-0.0 != 0.0``,
    identical NaNs match); with ``exact`` and different dtypes the upcast values must be equal.

    Args:
        a: the tensor from dir1.
        b: the reference tensor from dir2, same shape as ``a``.
        rtol: relative tolerance (against ``|b|``).
        atol: absolute tolerance.
        exact: compare bits instead of using the tolerances.
        equal_nan: NaN in the same place on both sides counts as equal.
        chunk: elements processed at a time.

    Returns:
        The metrics; ``mismatched == 0`` means the pair matches.

    Raises:
        ValueError: the shapes differ.
    """
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    shape = tuple(a.shape)
    n = a.numel()
    fa, fb = a.reshape(-1), b.reshape(-1)
    bitwise = exact and a.dtype == b.dtype
    integral = _is_exact_type(a) and _is_exact_type(b)
    work = torch.complex128 if (a.is_complex() or b.is_complex()) else torch.float64
    if exact:
        rtol = atol = 0.0
    mismatched = nan1 = nan2 = inf1 = inf2 = n_fin = 0
    sum_abs = dd = aa = bb = ab = 0.0
    max_abs, max_at, max_rel = -1.0, -1, -1.0
    zero = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, n, chunk):
            ca, cb = fa[start:start + chunk], fb[start:start + chunk]
            x, y = ca.to(work), cb.to(work)
            if not (bitwise or integral or x.is_complex()):
                fast = _finite_chunk(x, y, rtol, atol)
                if fast is not None:  # the common case: every element finite on both sides
                    c_mis, c_sum, c_dd, c_aa, c_bb, c_ab, cmax, cidx, crel = fast
                    mismatched += c_mis
                    n_fin += x.numel()
                    sum_abs, dd, aa, bb, ab = sum_abs + c_sum, dd + c_dd, aa + c_aa, bb + c_bb, ab + c_ab
                    if cmax > max_abs:
                        max_abs, max_at = cmax, start + cidx
                    max_rel = max(max_rel, crel)
                    continue
            if bitwise:
                size = ca.element_size()
                ok = (ca.contiguous().view(torch.uint8).view(-1, size)
                      == cb.contiguous().view(torch.uint8).view(-1, size)).all(dim=1)
            elif integral:
                ok = ca == cb
            else:
                ok = (x == y) | ((x - y).abs() <= atol + rtol * y.abs())
                if equal_nan:
                    ok |= torch.isnan(x) & torch.isnan(y)
            finite = torch.isfinite(x) & torch.isfinite(y)
            d = torch.where(finite, (x - y).abs(), zero)
            yabs = y.abs()
            rel = torch.where(finite & (yabs > 0), d / torch.where(yabs > 0, yabs, 1.0), zero)
            xf = torch.where(finite, x, torch.zeros((), dtype=work))
            yf = torch.where(finite, y, torch.zeros((), dtype=work))
            cmax, cidx = d.max(dim=0)
            dot = (xf * yf.conj()).sum()
            vals = torch.stack([
                (~ok).sum().double(), torch.isnan(x).sum().double(), torch.isnan(y).sum().double(),
                torch.isinf(x).sum().double(), torch.isinf(y).sum().double(), finite.sum().double(),
                d.sum(), (d * d).sum(), (xf.abs() ** 2).sum(), (yf.abs() ** 2).sum(),
                dot.real if dot.is_complex() else dot, cmax, cidx.double(), rel.max(),
            ]).tolist()
            mismatched += int(vals[0])
            nan1, nan2, inf1, inf2, n_fin = (nan1 + int(vals[1]), nan2 + int(vals[2]), inf1 + int(vals[3]),
                                             inf2 + int(vals[4]), n_fin + int(vals[5]))
            sum_abs, dd, aa, bb, ab = sum_abs + vals[6], dd + vals[7], aa + vals[8], bb + vals[9], ab + vals[10]
            if vals[11] > max_abs:
                max_abs, max_at = vals[11], start + int(vals[12])
            max_rel = max(max_rel, vals[13])
    if n_fin == 0:
        max_abs_diff = mean_abs = max_rel_diff = None
        index = None
    else:
        max_abs_diff, mean_abs, max_rel_diff = max_abs, sum_abs / n_fin, max_rel
        index = _unravel(max_at, shape) if max_abs > 0 else None
    if bb > 0:
        rel_l2: float | None = math.sqrt(dd) / math.sqrt(bb)
    else:
        rel_l2 = 0.0 if dd == 0 else None
    if aa > 0 and bb > 0:
        cosine: float | None = max(-1.0, min(1.0, ab / (math.sqrt(aa) * math.sqrt(bb))))
    else:
        cosine = 1.0 if aa == bb == 0 else 0.0
    return TensorMetrics(numel=n, mismatched=mismatched, mismatched_pct=100.0 * mismatched / n if n else 0.0,
                         max_abs_diff=max_abs_diff, max_abs_diff_index=index, mean_abs_diff=mean_abs,
                         max_rel_diff=max_rel_diff, rel_l2=rel_l2, cosine=cosine if n else None,
                         nan1=nan1, nan2=nan2, inf1=inf1, inf2=inf2)


@dataclass(frozen=True)
class StatsCheck:
    """The outcome of comparing two tensors through their recorded statistics.

    Attributes:
        matched: every statistic agrees within its bound.
        failed: the statistics that disagree, each ``(name, value1, value2)``.
        checked: the statistics that were compared.
    """

    matched: bool
    failed: tuple[tuple[str, Any, Any], ...]
    checked: tuple[str, ...]


def compare_stats(s1: Mapping[str, Any], s2: Mapping[str, Any], *, numel: int, is_float: bool, rtol: float,
                  atol: float, exact: bool = False, equal_nan: bool = False) -> StatsCheck:
    """Compare two tensors by the statistics ilstore records (when a body was not stored).

    The bounds are the ones an elementwise match implies, so a pair that would match
    elementwise always passes: with ``tol = atol + rtol * abs_max(b)``, each of mean, std,
    min, max and abs_max may differ by ``tol``, and the L2 norm by
    ``atol * sqrt(numel) + rtol * ||b||``. NaN counts must agree (and be zero without
    ``equal_nan``), Inf counts must agree. Integer statistics (min, max) must be equal. Passing
    is necessary for a match, not proof of one.

    Args:
        s1: statistics of the dir1 tensor.
        s2: statistics of the dir2 (reference) tensor.
        numel: number of elements (of the reference).
        is_float: floating or complex tensors (else min/max compare exactly).
        rtol: relative tolerance.
        atol: absolute tolerance.
        exact: all statistics must be equal.
        equal_nan: NaNs on both sides are acceptable if their counts agree.
    """
    if exact or not is_float:
        rtol = atol = 0.0
    failed: list[tuple[str, Any, Any]] = []
    checked: list[str] = []
    for name in ("nan_count", "inf_count"):
        v1, v2 = s1.get(name), s2.get(name)
        if v1 is None and v2 is None:
            continue
        checked.append(name)
        if v1 != v2 or (name == "nan_count" and not equal_nan and (v1 or v2)):
            failed.append((name, v1, v2))
    ref = s2.get("abs_max")
    if not isinstance(ref, (int, float)):
        ref = max((abs(v) for v in (s2.get("min"), s2.get("max")) if isinstance(v, (int, float))), default=0.0)
    tol = atol + rtol * float(ref)
    for name in _FLOAT_STATS if is_float else ("min", "max"):
        v1, v2 = s1.get(name), s2.get(name)
        if name not in s1 and name not in s2:
            continue
        checked.append(name)
        if not isinstance(v1, (int, float)) or not isinstance(v2, (int, float)):
            if v1 != v2:
                failed.append((name, v1, v2))
            continue
        bound = atol * math.sqrt(max(numel, 0)) + rtol * abs(float(v2)) if name == "l2_norm" else tol
        if v1 != v2 and not abs(float(v1) - float(v2)) <= bound:
            failed.append((name, v1, v2))
    return StatsCheck(matched=not failed, failed=tuple(failed), checked=tuple(checked))
