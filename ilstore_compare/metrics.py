"""Per-tensor comparison: the elementwise verdict and its metrics, and the statistics check.

Real floating pairs on the CPU (not ``exact``) go through one fused pass of a compiled kernel
(:mod:`._kernel`: every metric in a single loop, no temporaries; float32/float64 read in place,
other floating dtypes widened to float32 chunk by chunk, :data:`CHUNK` elements at a time).
Everything else -- and everything when the kernel cannot be built -- is compared in flat chunks
of :data:`TORCH_CHUNK` elements upcast to float64 (complex128 for complex tensors), so the extra
memory is a few chunks whatever the tensor size. Every sum is accumulated in float64 either
way, and both paths give the same results (the sums to rounding).

Example:
    >>> import torch
    >>> m = compare_tensors(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]), rtol=1e-5, atol=1e-8)
    >>> m.mismatched, m.max_abs_diff, m.max_abs_diff_index
    (1, 0.5, (1,))
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from functools import partial
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._kernel import BLOCK, FileSide, RunAll, Totals, fused, fused_files, fused_ranges, read_pieces

if TYPE_CHECKING:
    from ilstore.store.base import Body

__all__ = ["CHUNK", "TORCH_CHUNK", "SPLIT_MIN", "Split", "TensorMetrics", "MetricInfo", "metric_infos", "max_ulp",
           "StatsCheck", "compare_tensors", "compare_files", "compare_many", "compare_stats", "is_float_dtype"]

#: Elements per chunk: 1 Mi elements, i.e. 8 MiB per float64 temporary.
CHUNK = 1 << 20
#: Elements per chunk of the torch path (:func:`_feed` past the kernel), at most: its chunk is
#: widened to float64 or complex128 and makes about ten temporaries of that size, ~86 MB at
#: :data:`CHUNK` (137 MB complex), which broke the memory bound (2 x the largest tensor + 300
#: MB) by ~30-80 MB for integer, bool, complex and ``exact`` pairs; ~22 MB at 256 Ki.
TORCH_CHUNK = 1 << 18
#: Elements from which :func:`compare_tensors` splits a pair into ranges when given a :class:`Split`.
SPLIT_MIN = 1 << 20


@dataclass(frozen=True)
class Split:
    """How :func:`compare_tensors` may work on one large pair with several threads.

    The pair is cut into ``parts`` contiguous element ranges on the boundaries the one-thread
    computation already has (the kernel's blocks; chunks where values are computed per chunk),
    ``run_all`` computes them (each range's kernel call or torch ops release the GIL), and
    their totals are merged in range order exactly as one thread adds them up: the metrics are
    the same bits as without a split.

    Attributes:
        parts: ranges per pair (the number of threads that can work on it).
        run_all: runs the given functions, maybe at once, and returns their results in order.
        min_elements: smaller pairs are not split.
    """

    parts: int
    run_all: RunAll
    min_elements: int = SPLIT_MIN


def _bounds(n: int, parts: int, unit: int) -> list[int]:
    """Edges of up to ``parts`` ranges of ``n > 0`` elements, as equal as multiples of ``unit``
    allow: ``0 < ... < n``, every range non-empty."""
    units = -(-n // unit)
    return sorted({units * i // parts * unit for i in range(parts)}) + [n]

_FLOAT_STATS = ("mean", "std", "min", "max", "abs_max", "l2_norm")


def is_float_dtype(dtype: str | None) -> bool:
    """Whether a dtype name (``"torch.bfloat16"``) is a floating or complex type."""
    if not dtype:
        return False
    name = dtype.removeprefix("torch.")
    return name.startswith(("float", "bfloat", "complex", "half", "double", "cfloat", "cdouble"))


@dataclass(frozen=True)
class MetricInfo:
    """How a :class:`TensorMetrics` field is computed and reported (the field's ``metadata["metric"]``).

    The reports are driven by these: every field is a JSON key of a tensor entry, every field
    with a ``label`` a column of the markdown and HTML tensor tables, in field order.

    Attributes:
        key: the JSON key (default: the field name).
        label: the column header in the markdown and HTML tables; None: JSON only (another
            field's cell shows it).
        cell: ``cell(metrics, num) -> str`` renders the column (``num`` formats one number);
            None: ``num(value)``.
        chunk: for a metric streamed chunk by chunk beside the built-in ones:
            ``chunk(a_chunk, b_chunk)`` returns the chunk's value (None: nothing to measure in
            it), raw chunks in their own dtypes (``a`` from dir1, ``b`` the reference).
        combine: merges two chunk values (both present); the metric is None when no chunk
            gave a value.
    """

    key: str = ""
    label: str | None = None
    cell: Callable[[Any, Callable[..., str]], str] | None = None
    chunk: Callable[[torch.Tensor, torch.Tensor], Any] | None = None
    combine: Callable[[Any, Any], Any] = max


def _metric(label: str | None, *, key: str = "", cell: Callable[[Any, Callable[..., str]], str] | None = None,
            chunk: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
            combine: Callable[[Any, Any], Any] = max) -> dict[str, MetricInfo]:
    """The ``metadata`` of a :class:`TensorMetrics` field: its :class:`MetricInfo`."""
    return {"metric": MetricInfo(key=key, label=label, cell=cell, chunk=chunk, combine=combine)}


def _index_cell(m: TensorMetrics, num: Callable[..., str]) -> str:
    return str(list(m.max_abs_diff_index)) if m.max_abs_diff_index is not None else "—"


def cosine_text(x: float | None, num: Callable[..., str]) -> str:
    """A cosine as the reports show it: with the digits that tell it from 1 (two beyond the
    first that differs from 9: 0.99996667 shows as ``0.9999667``, not as three significant
    digits' ``1``); ``1`` only when it is 1.

    Example:
        >>> [cosine_text(c, "{:g}".format) for c in (1.0, 0.999966673, 0.9999999999999998, 0.5)]
        ['1', '0.9999667', '1 - 2.2e-16', '0.5']
    """
    if x is None or not math.isfinite(x) or x == 1.0 or abs(x) < 0.999:
        return num(x)
    gap = 1.0 - abs(x)
    decimals = math.ceil(-math.log10(gap)) + 2
    if decimals > 12:  # closer to 1 than a fixed-point figure reads well: the gap itself
        return f"{'-' if x < 0 else ''}1 - {gap:.2g}"
    return f"{x:.{decimals}f}".rstrip("0")


#: Floating dtypes stored as sign and magnitude: the integer type of the same width, the largest
#: magnitude (bits without the sign) that is not NaN, and whether the "negative zero" pattern is
#: NaN (the ``fnuz`` types). Other dtypes (complex, ``float8_e8m0fnu``...) have no ``max_ulp``.
_ULP_LAYOUTS: dict[torch.dtype, tuple[torch.dtype, int, bool]] = {
    torch.float64: (torch.int64, 0x7FF0000000000000, False),
    torch.float32: (torch.int32, 0x7F800000, False),
    torch.float16: (torch.int16, 0x7C00, False),
    torch.bfloat16: (torch.int16, 0x7F80, False),
    **{dtype: layout for name, layout in (("float8_e5m2", (torch.int8, 0x7C, False)),
                                          ("float8_e4m3fn", (torch.int8, 0x7E, False)),
                                          ("float8_e5m2fnuz", (torch.int8, 0x7F, True)),
                                          ("float8_e4m3fnuz", (torch.int8, 0x7F, True)))
       if isinstance(dtype := getattr(torch, name, None), torch.dtype)},
}
_WIDER = {torch.int8: torch.int16, torch.int16: torch.int32, torch.int32: torch.int64}


def max_ulp(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """The largest distance in units in the last place between ``a`` and ``b``, in ``a``'s dtype.

    ``b`` (the reference) is cast to ``a``'s dtype (the candidate's), then the distance of two
    values is how many representable numbers of that dtype lie between them: the difference of
    their positions in the ordered set of its values (the bit patterns read as sign and
    magnitude). ``+0`` and ``-0`` are 0 apart; infinities are the last positions (the largest
    finite value and infinity are 1 apart); elements where either side is NaN are skipped. The
    ``fnuz`` float8 types have no infinity: a reference value beyond their range (or infinite)
    counts as their largest finite value.
    Integer arithmetic, exact for every width (a float64 distance can reach ``2**64 - 2**53``;
    it is returned as a Python int).

    Args:
        a: the candidate (dir1), flat.
        b: the reference (dir2), same number of elements, any real dtype.

    Returns:
        The largest distance; None when ``a`` is not a floating dtype with a sign bit, ``b`` is
        complex, or no element is free of NaN.

    Example:
        >>> one = torch.tensor([1.0])
        >>> max_ulp(torch.nextafter(one, torch.tensor([2.0])), one), max_ulp(torch.tensor([-0.0]), torch.tensor([0.0]))
        (1, 0)
    """
    layout = _ULP_LAYOUTS.get(a.dtype)
    if layout is None or b.is_complex():
        return None
    itype, nan_above, nan_negative_zero = layout
    if nan_negative_zero:
        # the fnuz types have no infinity: a reference beyond their range would cast to NaN and
        # be skipped; saturate it at the largest finite value instead, so it still counts
        limit = torch.finfo(a.dtype).max
        b = b.to(torch.float32).clamp(-limit, limit)
    ia, ib = a.view(itype), b.to(a.dtype).view(itype)
    low = torch.iinfo(itype).min  # the sign bit alone: -0, or NaN for the fnuz types

    def is_nan(i: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return (o.abs() > nan_above) | (i == low) if nan_negative_zero else o.abs() > nan_above

    if itype == torch.int64:
        return _max_ulp_64(ia, ib, is_nan)
    # positions in the ordered set: a negative pattern low + m is the value -m; they fit the
    # integer type, their difference the next wider one
    oa = torch.where(ia < 0, low - ia, ia)
    ob = torch.where(ib < 0, low - ib, ib)
    d = oa.to(_WIDER[itype]).sub_(ob).abs_()
    top, at = d.max(dim=0)
    if not bool(is_nan(ia[at], oa[at]) | is_nan(ib[at], ob[at])):
        return int(top)  # the largest distance is between non-NaN values: NaN elsewhere cannot change it
    top = d.masked_fill_(is_nan(ia, oa) | is_nan(ib, ob), -1).max()
    return int(top) if top >= 0 else None


def _max_ulp_64(ia: torch.Tensor, ib: torch.Tensor,
                is_nan: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> int | None:
    """:func:`max_ulp` for 64-bit patterns, whose distances need 65 bits: opposite signs add
    the magnitudes, which wraps around below -1 from ``2**63`` on; the largest of those is the
    largest distance."""
    mask = (1 << 63) - 1
    ma, mb = ia & mask, ib & mask
    d = torch.where((ia ^ ib) < 0, ma + mb, (ma - mb).abs_()).masked_fill_(is_nan(ia, ma) | is_nan(ib, mb), -1)
    if int(d.min()) < -1:
        return int(d[d < -1].max()) + (1 << 64)
    top = int(d.max())
    return top if top >= 0 else None


@dataclass(frozen=True)
class TensorMetrics:
    """How two tensors of the same shape differ (``a`` from dir1, ``b`` the dir2 reference).

    Difference metrics are taken over the elements finite on both sides; NaN/Inf are counted
    separately (and count as mismatches unless they agree, see :func:`compare_tensors`).
    Each field's :class:`MetricInfo` says how the reports show it.

    Attributes:
        numel: elements compared.
        mismatched: elements failing the verdict.
        mismatched_pct: ``100 * mismatched / numel``.
        max_abs_diff: ``max |a - b|``; None when no element is finite on both sides.
        max_abs_diff_index: the multi-dimensional index of that maximum; None when it is 0.
        mean_abs_diff: ``mean |a - b|``.
        max_rel_diff: ``max |a - b| / |b|`` over elements with ``b != 0``; None when there are none.
        rel_l2: ``||a - b|| / ||b||``; 0 when both are zero, None (infinite) when only b is, and
            None when a float64 sum of squares overflowed (values past ~1e154).
        cosine: ``<a, b> / (||a|| ||b||)``; 1 when both are zero, 0 when only one is; None when
            a float64 sum overflowed.
        nan1, nan2, inf1, inf2: NaN and Inf counts in a and b.
        max_ulp: the largest distance in units in the last place, in a's dtype (see
            :func:`max_ulp`); None for non-floating dtypes or when every element has a NaN.
    """

    numel: int = field(metadata=_metric(None))
    mismatched: int = field(metadata=_metric(
        "mismatched", cell=lambda m, num: f"{m.mismatched} ({num(m.mismatched_pct, pct=True)})"))
    mismatched_pct: float = field(metadata=_metric(None))
    max_abs_diff: float | None = field(metadata=_metric("max abs diff"))
    max_abs_diff_index: tuple[int, ...] | None = field(metadata=_metric("at", cell=_index_cell))
    mean_abs_diff: float | None = field(metadata=_metric("mean abs diff"))
    max_rel_diff: float | None = field(metadata=_metric("max rel diff"))
    rel_l2: float | None = field(metadata=_metric("rel L2"))
    cosine: float | None = field(metadata=_metric("cos", key="cosine_similarity",
                                                  cell=lambda m, num: cosine_text(m.cosine, num)))
    nan1: int = field(default=0, metadata=_metric("NaN 1/2", key="nan_count1", cell=lambda m, _: f"{m.nan1}/{m.nan2}"))
    nan2: int = field(default=0, metadata=_metric(None, key="nan_count2"))
    inf1: int = field(default=0, metadata=_metric("Inf 1/2", key="inf_count1", cell=lambda m, _: f"{m.inf1}/{m.inf2}"))
    inf2: int = field(default=0, metadata=_metric(None, key="inf_count2"))
    max_ulp: int | None = field(default=None, metadata=_metric("max_ulp", chunk=max_ulp))


def metric_infos() -> tuple[tuple[str, MetricInfo], ...]:
    """``(field name, info)`` of every :class:`TensorMetrics` field, in order (``info.key`` filled in)."""
    return _INFOS


_INFOS: tuple[tuple[str, MetricInfo], ...] = tuple(
    (f.name, replace(f.metadata["metric"], key=f.metadata["metric"].key or f.name)) for f in fields(TensorMetrics))
#: Metrics computed chunk by chunk by their own function (``MetricInfo.chunk``).
_STREAMED = tuple((name, info) for name, info in _INFOS if info.chunk is not None)
_STREAMED_INFO = dict(_STREAMED)
#: The dtypes the fused kernel reads as they are; other floating dtypes (float16, bfloat16,
#: float8) are widened to float32 chunk by chunk first, which is exact.
_KERNEL_DTYPES = (torch.float32, torch.float64)


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    index = []
    for dim in reversed(shape):
        index.append(flat % dim)
        flat //= dim
    return tuple(reversed(index))


def _is_exact_type(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex())


@dataclass
class _Accumulator:
    """Running totals of one tensor pair, added to chunk by chunk (sums in float64).

    Attributes:
        mismatched: elements failing the verdict so far.
        finite: elements finite on both sides (the difference metrics' population).
        nan1, nan2, inf1, inf2: NaN and Inf counts on each side.
        sum_abs, dd, aa, bb, ab: ``sum |a-b|``, ``sum |a-b|^2``, ``sum |a|^2``, ``sum |b|^2``,
            ``Re sum a conj(b)`` over the finite elements.
        max_abs, max_at, max_rel: the largest ``|a-b|``, its flat index, the largest relative
            difference (-1: none yet).
        streamed: the values of the metrics with their own chunk function, by field name.
    """

    mismatched: int = 0
    finite: int = 0
    nan1: int = 0
    nan2: int = 0
    inf1: int = 0
    inf2: int = 0
    sum_abs: float = 0.0
    dd: float = 0.0
    aa: float = 0.0
    bb: float = 0.0
    ab: float = 0.0
    max_abs: float = -1.0
    max_at: int = -1
    max_rel: float = -1.0
    streamed: dict[str, Any] = field(default_factory=dict)

    def add_max(self, cmax: float, at: int, crel: float) -> None:
        if cmax > self.max_abs:
            self.max_abs, self.max_at = cmax, at
        self.max_rel = max(self.max_rel, crel)

    def add_finite(self, x: torch.Tensor, y: torch.Tensor, rtol: float, atol: float, start: int) -> bool:
        """Add one float64 chunk with a handful of temporaries; False (nothing added) if any
        element of either side is NaN/Inf (the general path then handles it).

        ``|x - y|`` is finite everywhere exactly when both sides are, and its sum is finite
        exactly when every term is, so one reduction decides; dot products replace elementwise
        squares.
        """
        d = torch.sub(x, y).abs_()
        c_sum = float(d.sum())
        if not math.isfinite(c_sum):
            return False
        yabs = y.abs()
        tol = torch.mul(yabs, rtol).add_(atol)
        self.mismatched += int((d > tol).sum())
        cmax, cidx = d.max(dim=0)
        rel = torch.div(d, yabs, out=tol).masked_fill_(yabs == 0, 0.0)
        self.finite += x.numel()
        self.sum_abs += c_sum
        self.dd += float(torch.dot(d, d))
        self.aa += float(torch.dot(x, x))
        self.bb += float(torch.dot(y, y))
        self.ab += float(torch.dot(x, y))
        self.add_max(float(cmax), start + int(cidx), float(rel.max()))
        return True

    def add_general(self, ok: torch.Tensor, x: torch.Tensor, y: torch.Tensor, start: int,
                    d: torch.Tensor | None = None) -> None:
        """Add one chunk that may hold NaN/Inf, complex values or exact types (``ok``: the verdict;
        ``d``: ``|x - y|`` where it cannot be taken from the float64 values, see :func:`_integer_abs_diff`)."""
        zero = torch.zeros((), dtype=torch.float64)
        finite = torch.isfinite(x) & torch.isfinite(y)
        d = torch.where(finite, (x - y).abs() if d is None else d, zero)
        yabs = y.abs()
        rel = torch.where(finite & (yabs > 0), d / torch.where(yabs > 0, yabs, 1.0), zero)
        xf = torch.where(finite, x, torch.zeros((), dtype=x.dtype))
        yf = torch.where(finite, y, torch.zeros((), dtype=x.dtype))
        cmax, cidx = d.max(dim=0)
        dot = (xf * yf.conj()).sum()
        # one stacked transfer instead of a synchronising .item() per value
        (mis, nan1, nan2, inf1, inf2, fin, s_abs, dd, aa, bb, ab, c_max, c_idx, c_rel) = torch.stack([
            (~ok).sum().double(), torch.isnan(x).sum().double(), torch.isnan(y).sum().double(),
            torch.isinf(x).sum().double(), torch.isinf(y).sum().double(), finite.sum().double(),
            d.sum(), (d * d).sum(), (xf.abs() ** 2).sum(), (yf.abs() ** 2).sum(),
            dot.real if dot.is_complex() else dot, cmax, cidx.double(), rel.max(),
        ]).tolist()
        self.mismatched += int(mis)
        self.nan1, self.nan2 = self.nan1 + int(nan1), self.nan2 + int(nan2)
        self.inf1, self.inf2 = self.inf1 + int(inf1), self.inf2 + int(inf2)
        self.finite += int(fin)
        self.sum_abs, self.dd, self.aa, self.bb, self.ab = (self.sum_abs + s_abs, self.dd + dd, self.aa + aa,
                                                            self.bb + bb, self.ab + ab)
        self.add_max(c_max, start + int(c_idx), c_rel)

    def add_streamed(self, ca: torch.Tensor, cb: torch.Tensor, skip: tuple[str, ...] = ()) -> None:
        for name, info in _STREAMED:
            if name not in skip:
                assert info.chunk is not None
                self.add_value(name, info.chunk(ca, cb))

    def add_value(self, name: str, value: Any) -> None:
        """Combine one more value of a streamed metric (None: nothing measured)."""
        if value is not None:
            old = self.streamed.get(name)
            self.streamed[name] = value if old is None else _STREAMED_INFO[name].combine(old, value)

    def merge(self, part: _Accumulator) -> None:
        """Add what a fresh accumulator measured over one chunk (its indices already absolute):
        the same additions as feeding that chunk to this one."""
        self.mismatched += part.mismatched
        self.finite += part.finite
        self.nan1, self.nan2, self.inf1, self.inf2 = (self.nan1 + part.nan1, self.nan2 + part.nan2,
                                                      self.inf1 + part.inf1, self.inf2 + part.inf2)
        self.sum_abs, self.dd, self.aa, self.bb, self.ab = (self.sum_abs + part.sum_abs, self.dd + part.dd,
                                                            self.aa + part.aa, self.bb + part.bb, self.ab + part.ab)
        self.add_max(part.max_abs, part.max_at, part.max_rel)
        for name, _info in _STREAMED:
            self.add_value(name, part.streamed.get(name))

    def add_totals(self, t: Totals, start: int) -> None:
        """Add what the fused kernel measured over elements ``start...``."""
        self.mismatched += t.mismatched
        self.finite += t.finite
        self.nan1, self.nan2, self.inf1, self.inf2 = (self.nan1 + t.nan1, self.nan2 + t.nan2, self.inf1 + t.inf1,
                                                      self.inf2 + t.inf2)
        self.sum_abs, self.dd, self.aa, self.bb, self.ab = (self.sum_abs + t.sum_abs, self.dd + t.dd, self.aa + t.aa,
                                                            self.bb + t.bb, self.ab + t.ab)
        self.add_max(t.max_abs, start + t.max_at, t.max_rel)

    def result(self, n: int, shape: tuple[int, ...]) -> TensorMetrics:
        if self.finite == 0:
            max_abs_diff = mean_abs = max_rel_diff = None
            index = None
        else:
            max_abs_diff, mean_abs, max_rel_diff = self.max_abs, self.sum_abs / self.finite, self.max_rel
            if max_rel_diff <= 0 and self.bb == 0:  # no reference element is nonzero: nothing to divide by
                max_rel_diff = None
            index = _unravel(self.max_at, shape) if self.max_abs > 0 else None
        # the sums are over finite elements, so an infinite one overflowed (float64 values past
        # ~1e154): the metrics made of it are not known (null), not the inf or NaN they would give
        if mean_abs is not None and not math.isfinite(mean_abs):
            mean_abs = None
        if self.dd == 0:  # equal where finite (however large: these two need no sum)
            rel_l2: float | None = 0.0
        elif not (math.isfinite(self.dd) and math.isfinite(self.bb)):
            rel_l2 = None
        elif self.bb > 0:
            rel_l2 = math.sqrt(self.dd) / math.sqrt(self.bb)
        else:
            rel_l2 = None
        if self.dd == 0 and self.aa == self.bb:  # equal where finite: exactly 1 (or both zero)
            cosine: float | None = 1.0
        elif not (math.isfinite(self.aa) and math.isfinite(self.bb) and math.isfinite(self.ab)):
            cosine = None
        elif self.aa > 0 and self.bb > 0:
            cosine = max(-1.0, min(1.0, self.ab / (math.sqrt(self.aa) * math.sqrt(self.bb))))
        else:
            cosine = 1.0 if self.aa == self.bb == 0 else 0.0
        return TensorMetrics(numel=n, mismatched=self.mismatched,
                             mismatched_pct=100.0 * self.mismatched / n if n else 0.0, max_abs_diff=max_abs_diff,
                             max_abs_diff_index=index, mean_abs_diff=mean_abs, max_rel_diff=max_rel_diff,
                             rel_l2=rel_l2, cosine=cosine if n else None, nan1=self.nan1, nan2=self.nan2,
                             inf1=self.inf1, inf2=self.inf2, **self.streamed)


def compare_tensors(a: torch.Tensor, b: torch.Tensor, *, rtol: float, atol: float, exact: bool = False,
                    equal_nan: bool = False, chunk: int = CHUNK, split: Split | None = None) -> TensorMetrics:
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
        split: work on a pair of at least ``split.min_elements`` elements in ``split.parts``
            ranges at once (same results; see :class:`Split`).

    Returns:
        The metrics; ``mismatched == 0`` means the pair matches.

    Raises:
        ValueError: the shapes differ.
    """
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if split is not None and (split.parts < 2 or a.numel() < split.min_elements):
        split = None
    if split is None and not exact and (done := _fused_whole(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan)):
        return _with_tiny_references(done, a, b)
    acc = _Accumulator()
    _feed(acc, a, b, 0, rtol=rtol, atol=atol, exact=exact, equal_nan=equal_nan, chunk=chunk, split=split)
    return _with_tiny_references(acc.result(a.numel(), tuple(a.shape)), a, b)


#: Bytes of each body :func:`compare_files` asks the system to read ahead at once: a cold compare
#: of two workers then reads at the disk's speed (see docs/performance.md, the second 2026-12-03
#: round), without asking a body larger than the memory to be cached whole.
_READ_AHEAD = 256 * 2**20


def compare_files(a: Body, b: Body, *, rtol: float, atol: float, equal_nan: bool = False,
                  split: Split | None = None) -> TensorMetrics | None:
    """:func:`compare_tensors` (not ``exact``) of two stored tensors, read from their files a piece
    at a time (:func:`._kernel.fused_files`): the same metrics, bit for bit, with memory that does
    not grow with the tensors. Only for a pair the fused kernel measures whole (one dtype,
    float32 or float64, on both sides, not empty); None for any other (nothing read) and without
    the kernel.

    Args:
        a, b: the bodies of dir1's and the reference's tensor
            (:meth:`ilstore.store.StoreReader.open_body`), of one shape.
        rtol, atol, equal_nan, split: as for :func:`compare_tensors`.

    Raises:
        ValueError: the shapes differ.
        ilstore_compare._kernel.ShortRead, OSError: a file ended early or could not be read
            (it changed since the body was opened: load the tensors instead).
    """
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    n = a.numel
    if a.dtype is not b.dtype or a.dtype not in _KERNEL_DTYPES or not _ULP_ONLY or not n:
        return None
    kind = np.dtype(np.float32 if a.dtype is torch.float32 else np.float64)
    x, y = FileSide(a.fd, a.offset, kind, str(a.path)), FileSide(b.fd, b.offset, kind, str(b.path))
    for body in (a, b):  # files not in the page cache: read ahead while the pieces are measured
        with contextlib.suppress(AttributeError, OSError):  # (up to _READ_AHEAD: the system's own read-ahead after)
            os.posix_fadvise(body.fd, body.offset, min(body.nbytes, _READ_AHEAD), os.POSIX_FADV_WILLNEED)
    bounds = run_all = None
    if split is not None and split.parts >= 2 and n >= split.min_elements:
        bounds, run_all = _bounds(n, split.parts, BLOCK), split.run_all
    totals = fused_files(x, y, n, rtol=rtol, atol=atol, equal_nan=equal_nan, with_ulp=True, bounds=bounds,
                         run_all=run_all)
    if totals is None:
        return None
    acc = _Accumulator()
    acc.add_totals(totals, 0)
    acc.add_value("max_ulp", totals.max_ulp)
    m = acc.result(n, a.shape)
    if m.max_rel_diff is None and m.max_abs_diff is not None:  # as _with_tiny_references, from the files
        for _first, u, v in read_pieces(x, y, 0, n):
            if bool(((v != 0) & np.isfinite(v) & np.isfinite(u)).any()):
                return replace(m, max_rel_diff=0.0)
    return m


def _with_tiny_references(m: TensorMetrics, a: torch.Tensor, b: torch.Tensor) -> TensorMetrics:
    """``m`` with ``max_rel_diff`` 0 where it is None only because the reference's nonzero values
    are too small to square in float64 (below ~1e-162: the sum of squares that told "no nonzero
    reference" is 0 then too). Looks at the tensors only when every finite reference element
    squared to 0 (a reference of zeros, mostly)."""
    if m.max_rel_diff is not None or m.max_abs_diff is None:
        return m
    with torch.no_grad():
        for start in range(0, b.numel(), TORCH_CHUNK):
            x, y = a.reshape(-1)[start:start + TORCH_CHUNK], b.reshape(-1)[start:start + TORCH_CHUNK]
            if bool(((y != 0) & torch.isfinite(y) & torch.isfinite(x)).any()):
                return replace(m, max_rel_diff=0.0)
    return m


def compare_many(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], *, rtol: float, atol: float,
                 exact: bool = False, equal_nan: bool = False, chunk: int = CHUNK) -> TensorMetrics:
    """Compare several tensor pairs as one: the metrics of their concatenation, without concatenating.

    What the local error of a module call is made of (all its output tensors together):
    ``rel_l2`` is ``sqrt(sum ||a_i - b_i||^2) / sqrt(sum ||b_i||^2)`` over the pairs, maxima
    (``max_abs_diff``, ``max_ulp``, each in its own pair's dtype) are over every pair, counts
    are summed. The pairs are consumed one at a time (a generator that loads them keeps one
    pair in memory). ``max_abs_diff_index`` is the flat position in the pairs laid end to end.

    Args:
        pairs: ``(a, b)`` tensors, each pair of one shape (``b`` the reference).
        rtol, atol, exact, equal_nan, chunk: as for :func:`compare_tensors`.

    Raises:
        ValueError: a pair's shapes differ.

    Example:
        >>> m = compare_many([(torch.tensor([3.0]), torch.tensor([4.0])), (torch.zeros(2), torch.zeros(2))],
        ...                  rtol=0.0, atol=0.0)
        >>> m.numel, m.mismatched, m.rel_l2, m.max_abs_diff
        (3, 1, 0.25, 1.0)
    """
    acc = _Accumulator()
    n = 0
    for a, b in pairs:
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
        _feed(acc, a, b, n, rtol=rtol, atol=atol, exact=exact, equal_nan=equal_nan, chunk=chunk)
        n += a.numel()
    return acc.result(n, (n,))


def _feed(acc: _Accumulator, a: torch.Tensor, b: torch.Tensor, offset: int, *, rtol: float, atol: float,
          exact: bool, equal_nan: bool, chunk: int, split: Split | None = None) -> None:
    """Add the pair ``(a, b)`` (same shape) to ``acc``, chunk by chunk; ``offset``: its first flat
    position. With ``split``, groups of chunks are computed at once, then added in order."""
    n = a.numel()
    fa, fb = a.reshape(-1), b.reshape(-1)
    bitwise = exact and a.dtype == b.dtype
    integral = _is_exact_type(a) and _is_exact_type(b)
    work = torch.complex128 if (a.is_complex() or b.is_complex()) else torch.float64
    # the side that is a 64-bit integer against a float one (0: a, 1: b): float64 rounds it, so
    # ``exact`` checks its values as integers too
    wide = next((i for i, (t, u) in enumerate(((a, b), (b, a)))
                 if t.dtype in _WIDE_INTEGERS and (u.is_floating_point() or u.is_complex())), None)
    if exact:
        rtol = atol = 0.0
    if (not exact and n and a.is_floating_point() and b.is_floating_point()
            and _feed_fused(acc, fa, fb, offset, rtol=rtol, atol=atol, equal_nan=equal_nan, chunk=chunk,
                            split=split)):
        return

    chunk = min(chunk, TORCH_CHUNK)

    def one(into: _Accumulator, start: int) -> _Accumulator:
        ca, cb = fa[start:start + chunk], fb[start:start + chunk]
        x, y = ca.to(work), cb.to(work)
        if _STREAMED:
            into.add_streamed(ca, cb)
        # the common case: every element finite on both sides
        if (not (bitwise or integral or x.is_complex() or (exact and wide is not None))
                and into.add_finite(x, y, rtol, atol, offset + start)):
            return into
        d = _integer_abs_diff(ca, cb) if integral else None
        if bitwise:
            size = ca.element_size()
            ok = (ca.contiguous().view(torch.uint8).view(-1, size)
                  == cb.contiguous().view(torch.uint8).view(-1, size)).all(dim=1)
        elif d is not None:
            ok = d == 0  # exact: a difference of integers is at least 1 (torch has no uint64 == int64)
        else:
            apart = (x - y).abs()  # within the tolerance and finite (as torch.isclose): an infinite
            ok = (x == y) | ((apart <= atol + rtol * y.abs()) & torch.isfinite(apart))  # reference matches only itself
            if equal_nan:
                ok |= torch.isnan(x) & torch.isnan(y)
            if exact and wide is not None:
                same, d = _against_the_integer(*((ca, cb) if wide == 0 else (cb, ca)))
                ok &= same
        into.add_general(ok, x, y, offset + start, d)
        return into

    with torch.no_grad():
        if split is None or n <= chunk:
            for start in range(0, n, chunk):
                one(acc, start)
            return

        def group(first: int, stop: int) -> list[_Accumulator]:  # each chunk into a fresh accumulator
            with torch.no_grad():
                return [one(_Accumulator(), start) for start in range(first, stop, chunk)]

        edges = _bounds(n, split.parts, chunk)
        for parts in split.run_all([partial(group, lo, hi) for lo, hi in pairwise(edges)]):
            for part in parts:
                acc.merge(part)


#: Whether the kernel measures every streamed metric of a pair of one kernel dtype (``max_ulp``).
_ULP_ONLY = tuple(name for name, _info in _STREAMED) == ("max_ulp",)


def _fused_whole(a: torch.Tensor, b: torch.Tensor, *, rtol: float, atol: float,
                 equal_nan: bool) -> TensorMetrics | None:
    """:func:`compare_tensors` of a pair :func:`_feed_fused` measures in one kernel call (one
    kernel dtype on both sides, contiguous, on the CPU, not empty), made straight from the
    tensors' memory: the same call with the same arguments, without the chunk views, numpy
    arrays and checks around it, which cost more than the kernel on tensors of a few hundred
    elements. None for any other pair (nothing measured)."""
    dtype = a.dtype
    if (dtype is not b.dtype or dtype not in _KERNEL_DTYPES or not _ULP_ONLY or type(a) is not torch.Tensor
            or type(b) is not torch.Tensor or a.device.type != "cpu" or b.device.type != "cpu"
            or not a.is_contiguous() or not b.is_contiguous() or a.is_neg() or b.is_neg()):
        return None
    n = a.numel()
    if not n:
        return None
    totals = fused(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan, with_ulp=True)
    if totals is None:
        return None
    acc = _Accumulator()
    acc.add_totals(totals, 0)
    acc.add_value("max_ulp", totals.max_ulp)
    return acc.result(n, tuple(a.shape))


_WIDE_INTEGERS = (torch.int64, torch.uint64)


def _against_the_integer(ints: torch.Tensor, floats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Whether each float (or complex) value is exactly the integer beside it (``ints``: int64 or
    uint64), which float64 cannot tell where the integer needs more than 53 bits: int64
    ``2**53 + 1`` and float64 ``2.0**53`` are equal as float64. Returns that, and ``|a - b|`` as
    float64 taken on the integers where the float is one in the integer's range (else from the
    float64 values; None for a complex side: its ``|a - b|`` stays the complex one)."""
    i = np.asarray(ints.detach().contiguous().numpy())
    values = floats.detach().contiguous()
    imag_zero = None
    if values.is_complex():
        imag_zero = values.imag.to(torch.float64).numpy() == 0
        values = values.real
    f = values.to(torch.float64).numpy()
    lo, hi = (0.0, 2.0**64) if i.dtype == np.uint64 else (-(2.0**63), 2.0**63)
    with np.errstate(invalid="ignore"):
        fits = (f >= lo) & (f < hi) & (f == np.floor(f))  # NaN, infinities and fractions do not
        as_int = np.where(fits, f, 0.0).astype(i.dtype)
    same = fits & (as_int == i)
    if imag_zero is not None:
        return torch.from_numpy(same & imag_zero), None
    exact = _integer_abs_diff(torch.from_numpy(i), torch.from_numpy(as_int)).numpy()
    with np.errstate(invalid="ignore", over="ignore"):
        rounded = np.abs(i.astype(np.float64) - f)
    return torch.from_numpy(same), torch.from_numpy(np.where(fits, exact, rounded))


def _integer_abs_diff(ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """``|a - b|`` of two integer or bool chunks as float64, from the integers themselves: taken
    from the float64 values, the difference of int64 ``2**62 + 1`` and ``2**62`` would be 0 (both
    round to ``2**62``). Exact, rounded once to float64, except between uint64 and a negative
    signed value (the two magnitudes rounded, then added: such a difference is at least ``2**63``
    when either side needs more than 53 bits)."""
    a, b = (np.asarray(c.detach().contiguous().numpy()) for c in (ca, cb))
    a, b = (v.astype(np.uint8) if v.dtype == np.bool_ else v for v in (a, b))
    if np.uint64 not in (a.dtype, b.dtype):  # every value fits int64; |a - b| < 2**64 fits uint64
        a, b = a.astype(np.int64, copy=False), b.astype(np.int64, copy=False)
        d = (np.maximum(a, b) - np.minimum(a, b)).view(np.uint64)  # wraps modulo 2**64 to the exact value
    elif a.dtype == b.dtype:
        d = np.maximum(a, b) - np.minimum(a, b)
    else:  # uint64 against a signed type
        u, s = (a, b) if a.dtype == np.uint64 else (b, a)
        s = s.astype(np.int64, copy=False)
        near = s.view(np.uint64)  # the signed values that are not negative, as they are
        apart = np.maximum(u, near) - np.minimum(u, near)
        magnitude = np.uint64(0) - near  # |s| of the negative ones, exactly (modulo 2**64)
        return torch.from_numpy(np.where(s < 0, u.astype(np.float64) + magnitude.astype(np.float64),
                                         apart.astype(np.float64)))
    return torch.from_numpy(d.astype(np.float64))


def _kernel_side(t: torch.Tensor) -> Any:
    """A flat chunk as the numpy array the kernel reads (float16/bfloat16/float8 widened to float32)."""
    if t.dtype not in _KERNEL_DTYPES:
        t = t.to(torch.float32)
    return t.detach().contiguous().numpy()


def _streamed_values(fa: torch.Tensor, fb: torch.Tensor, start: int, stop: int, chunk: int,
                     skip: tuple[str, ...]) -> list[tuple[str, Any]]:
    """``(name, value)`` of the streamed metrics (those not in ``skip``) over the chunks from
    ``start`` to ``stop``, in the order :meth:`_Accumulator.add_streamed` adds them."""
    out = []
    with torch.no_grad():
        for c_start in range(start, stop, chunk):
            ca, cb = fa[c_start:c_start + chunk], fb[c_start:c_start + chunk]
            for name, info in _STREAMED:
                if name not in skip:
                    assert info.chunk is not None
                    out.append((name, info.chunk(ca, cb)))
    return out


def _feed_fused(acc: _Accumulator, fa: torch.Tensor, fb: torch.Tensor, offset: int, *, rtol: float, atol: float,
                equal_nan: bool, chunk: int, split: Split | None = None) -> bool:
    """:func:`_feed` through the fused kernel (real floating tensors, flat, on the CPU); False
    (nothing added) when the kernel is not available.

    float32 and float64 tensors are read in place, whole; other dtypes chunk by chunk. The
    kernel measures ``max_ulp`` itself when both sides have one such dtype; other streamed
    metrics are still computed chunk by chunk by their own function. With ``split``, a whole
    pair is measured in ranges at once (:func:`._kernel.fused_ranges`: the same bits), chunked
    pairs in groups of chunks whose totals are then added in order.
    """
    if fa.device.type != "cpu" or fb.device.type != "cpu":
        return False
    n = fa.numel()
    own_ulp = fa.dtype == fb.dtype and fa.dtype in _KERNEL_DTYPES
    whole = fa.dtype in _KERNEL_DTYPES and fb.dtype in _KERNEL_DTYPES
    step = n if whole else chunk
    skip = ("max_ulp",) if own_ulp else ()
    streamed = len(_STREAMED) > len(skip)
    if split is not None and (whole or n > chunk):
        return _feed_split(acc, fa, fb, offset, rtol=rtol, atol=atol, equal_nan=equal_nan, chunk=chunk, split=split,
                           whole=whole, own_ulp=own_ulp, skip=skip)
    with torch.no_grad():
        for start in range(0, n, step):
            ca, cb = fa[start:start + step], fb[start:start + step]
            totals = fused(_kernel_side(ca), _kernel_side(cb), rtol=rtol, atol=atol, equal_nan=equal_nan,
                           with_ulp=own_ulp)
            if totals is None:
                return False
            acc.add_totals(totals, offset + start)
            if own_ulp:
                acc.add_value("max_ulp", totals.max_ulp)
            if streamed:
                for c_start in range(start, min(n, start + step), chunk):
                    acc.add_streamed(fa[c_start:c_start + chunk], fb[c_start:c_start + chunk], skip)
    return True


def _feed_split(acc: _Accumulator, fa: torch.Tensor, fb: torch.Tensor, offset: int, *, rtol: float, atol: float,
                equal_nan: bool, chunk: int, split: Split, whole: bool, own_ulp: bool,
                skip: tuple[str, ...]) -> bool:
    """:func:`_feed_fused` of one pair in ``split.parts`` ranges at once, added up in the order
    one thread adds them (so the same bits)."""
    n = fa.numel()
    streamed = len(_STREAMED) > len(skip)
    if whole:  # one kernel call's totals, computed in ranges (on chunk edges where streamed metrics need them)
        x, y = _kernel_side(fa), _kernel_side(fb)
        edges = _bounds(n, split.parts, math.lcm(chunk, BLOCK) if streamed else BLOCK)
        values: list[list[tuple[str, Any]]] = []

        def run_all(fns: Any) -> list[Any]:  # each range's streamed metrics on the thread of its kernel call
            if not streamed:
                return list(split.run_all(fns))
            both = split.run_all([partial(_then, fn, partial(_streamed_values, fa, fb, lo, hi, chunk, skip))
                                  for fn, (lo, hi) in zip(fns, pairwise(edges), strict=True)])
            values.extend(v for _t, v in both)
            return [t for t, _v in both]

        totals = fused_ranges(x, y, edges, run_all, rtol=rtol, atol=atol, equal_nan=equal_nan, with_ulp=own_ulp)
        if totals is None:
            return False
        acc.add_totals(totals, offset)
        if own_ulp:
            acc.add_value("max_ulp", totals.max_ulp)
        for part in values:
            for name, value in part:
                acc.add_value(name, value)
        return True

    def group(lo: int, hi: int) -> list[tuple[Totals | None, list[tuple[str, Any]]]]:
        out: list[tuple[Totals | None, list[tuple[str, Any]]]] = []
        with torch.no_grad():
            for start in range(lo, hi, chunk):
                ca, cb = fa[start:start + chunk], fb[start:start + chunk]
                totals = fused(_kernel_side(ca), _kernel_side(cb), rtol=rtol, atol=atol, equal_nan=equal_nan,
                               with_ulp=False)
                if totals is None:  # no kernel: the torch path does it all
                    return [(None, [])]
                out.append((totals, _streamed_values(fa, fb, start, min(n, start + chunk), chunk, skip)
                            if streamed else []))
        return out

    edges = _bounds(n, split.parts, chunk)
    results = [r for rs in split.run_all([partial(group, lo, hi) for lo, hi in pairwise(edges)]) for r in rs]
    if any(totals is None for totals, _v in results):
        return False  # (before anything was added)
    for start, (totals, streamed_values) in zip(range(0, n, chunk), results, strict=True):
        assert totals is not None
        acc.add_totals(totals, offset + start)
        for name, value in streamed_values:
            acc.add_value(name, value)
    return True


def _then(first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
    return first(), second()


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
        if v1 != v2 and not is_float and not (isinstance(v1, float) or isinstance(v2, float)):
            failed.append((name, v1, v2))  # integer extremes exactly: as floats 2**62 + 1 == 2**62
            continue
        bound = atol * math.sqrt(max(numel, 0)) + rtol * abs(float(v2)) if name == "l2_norm" else tol
        if v1 != v2 and not abs(float(v1) - float(v2)) <= bound:
            failed.append((name, v1, v2))
    return StatsCheck(matched=not failed, failed=tuple(failed), checked=tuple(checked))
