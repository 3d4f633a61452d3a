"""One fused pass over a pair of float tensors: every metric of :mod:`.metrics` in a single loop.

Why a compiled loop: the torch path makes ~15 passes over float64 temporaries per chunk (widen
both sides, ``|a-b|``, the tolerance, the verdict, the maximum, the relative difference, four
dot products, and ``max_ulp``'s integer passes); one loop that reads each element once and keeps
every total in registers is 5-15 times faster on one core, and needs no temporaries. Why numba:
a well-kept, widely used compiler of exactly this kind of numpy loop, no C toolchain at install
or run time, and its machine code is cached on disk (``cache=True``: compiled once per
machine, ~3 s, then loaded in ~0.1 s). ``nogil``: compare workers run it on several cores.

Exactness: elementwise the loop does the float64 arithmetic of the torch path (float32 inputs
are widened exactly; no contraction into fused multiply-adds), so the verdict, the NaN/Inf
counts, ``max |a-b|`` and its (first) index, the largest relative difference and ``max_ulp``
are identical. The only fast-math flag is ``reassoc``, which lets the compiler vectorise the five
float64 sums (``sum |a-b|``, ``||a-b||^2``, ``||a||^2``, ``||b||^2``, ``<a, b>``): they are added
in another order than torch adds them (lanes within blocks of :data:`BLOCK` elements, then the
blocks), so mean |a-b|, rel L2 and cosine can differ from the torch path in the last bits.

numba is optional: without it (or with ``ILSTORE_COMPARE_KERNEL=0``) :func:`fused` returns None
and :mod:`.metrics` takes its torch path.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, NamedTuple

import numpy as np

__all__ = ["BLOCK", "Totals", "fused", "enabled"]

_log = logging.getLogger(__name__)

#: Elements summed into one partial sum before it is added to the totals.
BLOCK = 4096

#: The sign-magnitude layouts of the bits the kernel reads for ``max_ulp``: numpy integer type,
#: mask of the magnitude bits, the largest magnitude that is not NaN (infinity).
_ULP = {np.dtype(np.float32): (np.int32, 0x7FFFFFFF, 0x7F800000),
        np.dtype(np.float64): (np.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000)}


class Totals(NamedTuple):
    """What one kernel call measured (indices relative to its first element)."""

    mismatched: int
    finite: int
    nan1: int
    nan2: int
    inf1: int
    inf2: int
    sum_abs: float
    dd: float
    aa: float
    bb: float
    ab: float
    max_abs: float
    max_at: int
    max_rel: float
    max_ulp: int | None


def _source(x: Any, y: Any, xb: Any, yb: Any, ulp: Any, mag: Any, nan_above: Any, rtol: float, atol: float,
            equal_nan: bool, block: int) -> Any:
    """The loop (compiled). ``x``, ``y``: float32/float64, same length; ``ulp``: one of the
    ``_ulp_*`` functions, called per block on ``xb``, ``yb`` (the bits of ``x`` and ``y``).

    Branch-free within a block, so that the compiler vectorises it; the block's largest
    difference is located (first occurrence) only when it beats the largest so far.
    """
    n = x.size
    big = 1.7976931348623157e308  # the largest finite float64: NaN and infinities compare above it or unordered
    mis = fin = nan1 = nan2 = inf1 = inf2 = 0
    s_abs = dd = aa = bb = ab = 0.0
    max_abs = -1.0
    max_at = -1
    max_rel = 0.0
    top = np.uint64(0)
    any_ulp = False
    for start in range(0, n, block):
        stop = min(start + block, n)
        p_abs = p_dd = p_aa = p_bb = p_ab = 0.0
        m_abs = max_abs
        m_rel = max_rel
        beats = 0
        for i in range(start, stop):
            xv = np.float64(x[i])
            yv = np.float64(y[i])
            d = abs(xv - yv)
            ay = abs(yv)
            x_nan = xv != xv
            y_nan = yv != yv
            good = (xv == yv) | (d <= ay * rtol + atol) | (equal_nan & x_nan & y_nan)
            mis += np.int64(1) - np.int64(good)
            x_fin = abs(xv) <= big
            y_fin = ay <= big
            ok = x_fin & y_fin
            fin += np.int64(ok)
            nan1 += np.int64(x_nan)
            nan2 += np.int64(y_nan)
            inf1 += np.int64(x_fin | x_nan) ^ 1
            inf2 += np.int64(y_fin | y_nan) ^ 1
            dz = d if ok else 0.0
            xz = xv if ok else 0.0
            yz = yv if ok else 0.0
            p_abs += dz
            p_dd += dz * dz
            p_aa += xz * xz
            p_bb += yz * yz
            p_ab += xz * yz
            r = d / ay
            beats += np.int64(ok & ((d > m_abs) | ((ay > 0.0) & (r > m_rel))))
        s_abs += p_abs
        dd += p_dd
        aa += p_aa
        bb += p_bb
        ab += p_ab
        if beats > 0:  # rare after the first blocks: find the new maxima (first occurrence) one by one
            for i in range(start, stop):
                xv = np.float64(x[i])
                yv = np.float64(y[i])
                if abs(xv) <= big and abs(yv) <= big:
                    d = abs(xv - yv)
                    if d > max_abs:
                        max_abs = d
                        max_at = i
                    if yv != 0.0 and d / abs(yv) > max_rel:
                        max_rel = d / abs(yv)
        b_top, b_any = ulp(xb, yb, start, stop, mag, nan_above)
        any_ulp |= b_any
        if b_top > top:
            top = b_top
    return (mis, fin, nan1, nan2, inf1, inf2, s_abs, dd, aa, bb, ab, max_abs, max_at, max_rel, top, any_ulp)


def _no_ulp(xb: Any, yb: Any, start: int, stop: int, mag: Any, nan_above: Any) -> Any:
    """No ``max_ulp`` (the two sides have different dtypes)."""
    return np.uint64(0), False


def _ulp_narrow(xb: Any, yb: Any, start: int, stop: int, mag: Any, nan_above: Any) -> Any:
    """The largest ulp distance over ``[start, stop)`` of 8- to 32-bit patterns (in int64) and
    whether any pair was free of NaN. A negative pattern (sign and magnitude ``m``) is at
    position ``-m`` of the ordered values, so ``+0`` and ``-0`` are 0 apart."""
    top = np.int64(-1)
    for i in range(start, stop):
        ia = np.int64(xb[i])
        ib = np.int64(yb[i])
        ma = ia & mag
        mb = ib & mag
        oa = -ma if ia < 0 else ma
        ob = -mb if ib < 0 else mb
        dist = abs(oa - ob)
        dist = dist if (ma <= nan_above) & (mb <= nan_above) else np.int64(-1)
        top = max(top, dist)
    return np.uint64(max(top, 0)), top >= 0


def _ulp_wide(xb: Any, yb: Any, start: int, stop: int, mag: Any, nan_above: Any) -> Any:
    """:func:`_ulp_narrow` for 64-bit patterns: a distance needs 64 unsigned bits."""
    top = np.uint64(0)
    found = False
    for i in range(start, stop):
        ia = xb[i]
        ib = yb[i]
        ma = ia & mag
        mb = ib & mag
        valid = (ma <= nan_above) & (mb <= nan_above)
        apart = np.uint64(ma) + np.uint64(mb)  # opposite signs: the distance passes through zero
        near = np.uint64(ma - mb) if ma >= mb else np.uint64(mb - ma)
        dist = apart if (ia ^ ib) < 0 else near
        dist = dist if valid else np.uint64(0)
        found |= valid
        top = dist if dist > top else top
    return top, found


_compiled: Any = None
_failed = False
_ulps: dict[int, Any] = {}
_lock = threading.Lock()


def enabled() -> bool:
    """Whether the fused kernel is used (numba importable, not switched off)."""
    return _kernel() is not None


def _kernel() -> Any:
    global _compiled, _failed
    if _compiled is not None or _failed:
        return _compiled
    with _lock:
        if _compiled is None and not _failed:
            if os.environ.get("ILSTORE_COMPARE_KERNEL", "1") == "0":
                _failed = True
                return None
            try:
                import numba
            except ImportError:
                _log.debug("numba is not installed: the comparer computes its metrics with torch")
                _failed = True
                return None
            jit = numba.njit(nogil=True, cache=True, error_model="numpy")
            _ulps.update({0: jit(_no_ulp), 4: jit(_ulp_narrow), 8: jit(_ulp_wide)})
            _compiled = numba.njit(nogil=True, cache=True, error_model="numpy", fastmath={"reassoc"})(_source)
    return _compiled


def fused(x: np.ndarray, y: np.ndarray, *, rtol: float, atol: float, equal_nan: bool,
          with_ulp: bool) -> Totals | None:
    """Every metric of the pair ``(x, y)`` in one pass; None without the kernel.

    Args:
        x: the candidate, 1-D float32 or float64.
        y: the reference, 1-D float32 or float64, same length.
        rtol, atol: the tolerances of the verdict.
        equal_nan: NaN on both sides matches.
        with_ulp: also measure ``max_ulp`` (``x`` and ``y`` must then have the same dtype).
    """
    kernel = _kernel()
    if kernel is None:
        return None
    if with_ulp:
        itype, mag, nan_above = _ULP[x.dtype]
        xb, yb = x.view(itype), y.view(itype)
        ulp, mag, nan_above = _ulps[xb.itemsize], itype(mag), itype(nan_above)
    else:
        xb = yb = np.empty(0, dtype=np.int32)
        ulp, mag, nan_above = _ulps[0], np.int32(0), np.int32(0)
    out = kernel(x, y, xb, yb, ulp, mag, nan_above, float(rtol), float(atol), bool(equal_nan), BLOCK)
    (mis, fin, nan1, nan2, inf1, inf2, s_abs, dd, aa, bb, ab, max_abs, max_at, max_rel, top, any_ulp) = out
    return Totals(int(mis), int(fin), int(nan1), int(nan2), int(inf1), int(inf2), float(s_abs), float(dd), float(aa),
                  float(bb), float(ab), float(max_abs), int(max_at), float(max_rel),
                  int(top) if any_ulp else None)
