"""One fused pass over a pair of float tensors: every metric of :mod:`.metrics` in a single loop.

Why a compiled loop: the torch path makes ~15 passes over float64 temporaries per chunk (widen
both sides, ``|a-b|``, the tolerance, the verdict, the maximum, the relative difference, four
dot products, and ``max_ulp``'s integer passes); one loop that reads each element once and keeps
every total in registers is several times faster on one core and needs no temporaries.

Why C through ctypes, not numba: numba does the same in Python syntax, but importing it and
loading its cached machine code cost ~110 MB of resident memory (LLVM) and 0.4-1.5 s at the
first comparison, which alone breaks the comparer's memory bound (the whole process within 2 x
the largest tensor + 300 MB; torch itself is ~220 MB) and its start-up on small runs. The loop
below is ~150 lines of plain C99, compiled once per machine with the system's C compiler
(``$CC`` or ``cc``) into ``$ILSTORE_CACHE_DIR`` (default ``~/.cache/ilstore``) by
:mod:`ilstore._native` (shared with the statistics kernel), then loaded in about a
millisecond; ctypes releases the GIL during the call, so compare workers run it on several
cores. Without a compiler (or with ``ILSTORE_COMPARE_KERNEL=0``) :func:`fused` returns
None and :mod:`.metrics` takes its torch path, with the same results.

Exactness: elementwise the loop does the float64 arithmetic of the torch path (float32 inputs
are widened exactly; ``-ffp-contract=off``: no fused multiply-adds), so the verdict, the NaN/Inf
counts, ``max |a-b|`` and its (first) index, the largest relative difference and ``max_ulp``
are identical. The five float64 sums (``sum |a-b|``, ``||a-b||^2``, ``||a||^2``, ``||b||^2``,
``<a, b>``) are kept in :data:`LANES` interleaved partial sums per block of :data:`BLOCK`
elements, then added up lane by lane and block by block: another order than torch's, so mean
|a-b|, rel L2 and cosine can differ from the torch path in the last bits. The lanes are written
as vectors (GCC/Clang vector extensions: 4 doubles with AVX, else 2), each lane doing the
scalar loop's operations in its order, so the results do not depend on the vector width or on
whether the compiler vectorises; before that, GCC 12 left the loop mostly scalar (float32
pairs: 7-12 ns a pair against 2.6-3.8 with the vectors on an AVX2 VM).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ilstore._native import EXACT_FP, NativeLibrary
from ilstore.store._pread import pread_into

__all__ = ["BLOCK", "FILE_CHUNK", "LANES", "LIBRARY", "FileSide", "RunAll", "ShortRead", "Totals", "fused",
           "fused_files", "fused_ranges", "read_pieces", "enabled", "build"]

#: Elements per block: partial sums are added to the totals, and the maxima checked, per block.
BLOCK = 4096
#: Interleaved partial sums within a block.
LANES = 8

_SOURCE = r"""
#include <float.h>
#include <math.h>
#include <stdint.h>

/* BLOCK and LANES come from the command line (-D) */

typedef struct {
    int64_t mis, fin, nan1, nan2, inf1, inf2;
    double s_abs, dd, aa, bb, ab, max_abs;
    int64_t max_at;
    double max_rel;
    uint64_t top;  /* the largest ulp distance + 1; 0: none */
} totals;

#define LOAD(p, k, i) ((k) == 4 ? (double)((const float *)(p))[i] : ((const double *)(p))[i])

/* the largest ulp distance over [start, stop) of 32-bit patterns (sign and magnitude: -m is at
   position -m, so +0 and -0 are 0 apart), elements with NaN on either side skipped. Kept as
   distance + 1 (0: no pair free of NaN), which fits: distances are at most 2 x infinity's bits */
static void ulp32(const int32_t *a, const int32_t *b, int64_t start, int64_t stop, totals *t) {
    int64_t top = 0;
    for (int64_t i = start; i < stop; i++) {  /* branch-free: the signs are unpredictable */
        int64_t sa = a[i] >> 31, sb = b[i] >> 31;  /* 0 or -1 */
        int64_t ma = a[i] & 0x7FFFFFFF, mb = b[i] & 0x7FFFFFFF;
        int64_t diff = ((ma ^ sa) - sa) - ((mb ^ sb) - sb);
        int64_t dist = (diff < 0 ? -diff : diff) + 1;
        int64_t valid = (ma <= 0x7F800000) & (mb <= 0x7F800000);
        dist &= -valid;
        top = dist > top ? dist : top;
    }
    if ((uint64_t)top > t->top) t->top = (uint64_t)top;
}

/* the same for 64-bit patterns (unsigned 64-bit distances) */
static void ulp64(const int64_t *a, const int64_t *b, int64_t start, int64_t stop, totals *t) {
    const uint64_t mask = 0x7FFFFFFFFFFFFFFFULL, inf = 0x7FF0000000000000ULL;
    uint64_t top = 0;
    for (int64_t i = start; i < stop; i++) {
        uint64_t ma = (uint64_t)a[i] & mask, mb = (uint64_t)b[i] & mask;
        uint64_t apart = (uint64_t)((a[i] ^ b[i]) >> 63);  /* all ones: opposite signs, through zero */
        uint64_t near = ma > mb ? ma - mb : mb - ma;
        uint64_t dist = (((ma + mb) & apart) | (near & ~apart)) + 1;
        dist &= -(uint64_t)((ma <= inf) & (mb <= inf));
        top = dist > top ? dist : top;
    }
    if (top > t->top) t->top = top;
}

/* one element i into lane l of the block's partial sums: the elements after a block's last whole
   row of LANES (the rows go through VLANES, which does the same in each lane) */
#define ELEMENT(i_, l_) { \
    const int64_t e_i = (i_); const int e_l = (l_); \
    double xv = LOAD(x, xk, e_i), yv = LOAD(y, yk, e_i); \
    double d = fabs(xv - yv), ay = fabs(yv); \
    int xn = xv != xv, yn = yv != yv; \
    /* a difference within the tolerance must be finite too (as torch.isclose): an infinite reference \
       makes the tolerance infinite, and inf <= inf would match anything to it */ \
    int good = (xv == yv) | ((d <= ay * rtol + atol) & (d <= DBL_MAX)) | (equal_nan & xn & yn); \
    int xf = fabs(xv) <= DBL_MAX, yf = ay <= DBL_MAX; \
    int ok = xf & yf; \
    mis += !good; fin += ok; nan1 += xn; nan2 += yn; inf1 += !(xf | xn); inf2 += !(yf | yn); \
    double dz = ok ? d : 0.0, xz = ok ? xv : 0.0, yz = ok ? yv : 0.0; \
    pa[e_l] += dz; pd[e_l] += dz * dz; px[e_l] += xz * xz; py[e_l] += yz * yz; pxy[e_l] += xz * yz; \
    /* d / ay > m_rel implies d >= m_rel * ay (rounding is monotone): no division here */ \
    beats |= ok & ((d > m_abs) | ((ay > 0.0) & (d > 0.0) & (d >= m_rel * ay))); \
}

/* The lanes loop of run in vectors (GCC/Clang vector extensions): VW_ doubles a vector, 4 with
   AVX, else 2 (SSE2, NEON), VN_ = LANES / VW_ vectors a row of LANES elements. Lane l of vector j
   is lane j * VW_ + l of ELEMENT, with the same IEEE operations in the same order per lane, so
   every total is the same to the bit; the compiler need not find the vectorisation itself. */
#if defined(__AVX__)
#define VW_ 4
#else
#define VW_ 2
#endif
#define VN_ (LANES / VW_)
#if LANES % VW_
#error LANES must be a multiple of the vector width
#endif
typedef double vd_ __attribute__((vector_size(8 * VW_)));
typedef int64_t vl_ __attribute__((vector_size(8 * VW_)));
typedef float vf_ __attribute__((vector_size(4 * VW_)));
static inline __attribute__((always_inline)) void vload_(vd_ *out, const void *p, int k, int64_t i) {
    if (k == 4) { vf_ f; __builtin_memcpy(&f, (const float *)p + i, sizeof f); *out = __builtin_convertvector(f, vd_); }
    else __builtin_memcpy(out, (const double *)p + i, sizeof *out);
}
#define VSPLAT_(T, v, s) T v; for (int l_ = 0; l_ < VW_; l_++) v[l_] = (s);
#define VABS_(v) ((vd_)((vl_)(v) & vabs_mask))
#define VAND_(v, m) ((vd_)((vl_)(v) & (m)))
#define VLANES(x, xk, y, yk) \
    vd_ va[VN_], vdd[VN_], vx[VN_], vy[VN_], vxy[VN_]; \
    vl_ cmis[VN_], cfin[VN_], cn1[VN_], cn2[VN_], ci1[VN_], ci2[VN_], vbeats[VN_]; \
    VSPLAT_(vd_, vzero, 0.0) VSPLAT_(vl_, vnone, 0) \
    for (int j = 0; j < VN_; j++) { \
        va[j] = vdd[j] = vx[j] = vy[j] = vxy[j] = vzero; \
        cmis[j] = cfin[j] = cn1[j] = cn2[j] = ci1[j] = ci2[j] = vbeats[j] = vnone; \
    } \
    VSPLAT_(vd_, vrtol, rtol) VSPLAT_(vd_, vatol, atol) VSPLAT_(vd_, vmax, DBL_MAX) \
    VSPLAT_(vd_, vmabs, m_abs) VSPLAT_(vd_, vmrel, m_rel) \
    VSPLAT_(vl_, veq, -(int64_t)(equal_nan != 0)) VSPLAT_(vl_, vabs_mask, INT64_MAX) \
    for (int64_t base = start; base < whole; base += LANES) { \
        for (int j = 0; j < VN_; j++) { \
            vd_ xv, yv; \
            vload_(&xv, x, xk, base + j * VW_); \
            vload_(&yv, y, yk, base + j * VW_); \
            vd_ d = VABS_(xv - yv), ay = VABS_(yv); \
            vl_ xn = xv != xv, yn = yv != yv; \
            vl_ good = (xv == yv) | ((d <= ay * vrtol + vatol) & (d <= vmax)) | (veq & xn & yn); \
            vl_ xf = VABS_(xv) <= vmax, yf = ay <= vmax; \
            vl_ ok = xf & yf; \
            cmis[j] -= ~good; cfin[j] -= ok; cn1[j] -= xn; cn2[j] -= yn; ci1[j] -= ~(xf | xn); ci2[j] -= ~(yf | yn); \
            vd_ dz = VAND_(d, ok), xz = VAND_(xv, ok), yz = VAND_(yv, ok); \
            va[j] += dz; vdd[j] += dz * dz; vx[j] += xz * xz; vy[j] += yz * yz; vxy[j] += xz * yz; \
            vbeats[j] |= ok & ((d > vmabs) | ((ay > vzero) & (d > vzero) & (d >= vmrel * ay))); \
        } \
    } \
    for (int j = 0; j < VN_; j++) { \
        for (int l = 0; l < VW_; l++) { \
            pa[j * VW_ + l] = va[j][l]; pd[j * VW_ + l] = vdd[j][l]; px[j * VW_ + l] = vx[j][l]; \
            py[j * VW_ + l] = vy[j][l]; pxy[j * VW_ + l] = vxy[j][l]; \
            mis += cmis[j][l]; fin += cfin[j][l]; nan1 += cn1[j][l]; nan2 += cn2[j][l]; \
            inf1 += ci1[j][l]; inf2 += ci2[j][l]; beats |= vbeats[j][l] != 0; \
        } \
    }

/* lanes: NULL (the block sums are added to t's sums, lane by lane, block by block), or room for
   5 x LANES doubles per block, where each block's partial sums are stored instead (in the order
   s_abs, dd, aa, bb, ab; ilstore_fold adds them up in the same order later) */
static inline __attribute__((always_inline)) void run(
        const void *x, const int xk, const void *y, const int yk, int64_t n, double rtol, double atol,
        int equal_nan, int ulp, totals *t, double *lanes) {
    int64_t mis = 0, fin = 0, nan1 = 0, nan2 = 0, inf1 = 0, inf2 = 0;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t stop = start + BLOCK < n ? start + BLOCK : n;
        double pa[LANES] = {0}, pd[LANES] = {0}, px[LANES] = {0}, py[LANES] = {0}, pxy[LANES] = {0};
        const double m_abs = t->max_abs, m_rel = t->max_rel;
        int beats = 0;
        const int64_t whole = start + (stop - start) / LANES * LANES;
        {  /* whole rows of LANES elements in vectors; the rest (fewer than LANES) one at a time */
            VLANES(x, xk, y, yk)
        }
        for (int64_t i = whole; i < stop; i++) ELEMENT(i, i - whole)
        if (lanes) {
            double *o = lanes + (start / BLOCK) * 5 * LANES;
            for (int l = 0; l < LANES; l++) {
                o[l] = pa[l];
                o[LANES + l] = pd[l];
                o[2 * LANES + l] = px[l];
                o[3 * LANES + l] = py[l];
                o[4 * LANES + l] = pxy[l];
            }
        } else {
            for (int l = 0; l < LANES; l++) {
                t->s_abs += pa[l];
                t->dd += pd[l];
                t->aa += px[l];
                t->bb += py[l];
                t->ab += pxy[l];
            }
        }
        if (beats) { /* rare after the first blocks: the new maxima, first occurrence */
            for (int64_t i = start; i < stop; i++) {
                double xv = LOAD(x, xk, i), yv = LOAD(y, yk, i);
                if (fabs(xv) <= DBL_MAX && fabs(yv) <= DBL_MAX) {
                    double d = fabs(xv - yv);
                    if (d > t->max_abs) {
                        t->max_abs = d;
                        t->max_at = i;
                    }
                    if (yv != 0.0 && d / fabs(yv) > t->max_rel) t->max_rel = d / fabs(yv);
                }
            }
        }
        if (ulp == 4) ulp32((const int32_t *)x, (const int32_t *)y, start, stop, t);
        else if (ulp == 8) ulp64((const int64_t *)x, (const int64_t *)y, start, stop, t);
    }
    t->mis = mis; t->fin = fin; t->nan1 = nan1; t->nan2 = nan2; t->inf1 = inf1; t->inf2 = inf2;
}

/* x, y: n float32 (kind 4) or float64 (kind 8) values; ulp: 0, or the common width of both;
   lanes: NULL, or 5 x LANES doubles per block of n (see run) */
void ilstore_fused_lanes(const void *x, int xk, const void *y, int yk, int64_t n, double rtol, double atol,
                         int equal_nan, int ulp, totals *t, double *lanes) {
    EXACT_FP_BEGIN
    t->s_abs = t->dd = t->aa = t->bb = t->ab = 0.0;
    t->max_abs = -1.0;
    t->max_at = -1;
    t->max_rel = 0.0;
    t->top = 0;
    if (xk == 4 && yk == 4) run(x, 4, y, 4, n, rtol, atol, equal_nan, ulp, t, lanes);
    else if (xk == 4) run(x, 4, y, 8, n, rtol, atol, equal_nan, ulp, t, lanes);
    else if (yk == 4) run(x, 8, y, 4, n, rtol, atol, equal_nan, ulp, t, lanes);
    else run(x, 8, y, 8, n, rtol, atol, equal_nan, ulp, t, lanes);
    EXACT_FP_END
}

void ilstore_fused(const void *x, int xk, const void *y, int yk, int64_t n, double rtol, double atol,
                   int equal_nan, int ulp, totals *t) {
    ilstore_fused_lanes(x, xk, y, yk, n, rtol, atol, equal_nan, ulp, t, 0);
}

#if defined(__unix__) || defined(__APPLE__)
#include <errno.h>
#include <unistd.h>

/* nbytes at byte off of fd into buf: 0 done, 1 the file ended first, -1 a read failed (errno) */
static int read_at_(int fd, char *buf, int64_t nbytes, int64_t off) {
    while (nbytes > 0) {
        ssize_t got = pread(fd, buf, (size_t)nbytes, (off_t)off);
        if (got < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (got == 0) return 1;
        buf += got;
        nbytes -= got;
        off += got;
    }
    return 0;
}

/* ilstore_fused_lanes of elements [start, stop) of two files -- x's elements from byte xo of fx,
   y's from byte yo of fy -- read step elements at a time into bx and by (step x kind bytes each),
   each piece measured while it is in the cache; start and step multiples of BLOCK. The pieces'
   totals merged in order into t (counts added, the first largest |a-b|, its index relative to
   start); the sums are in lanes (add them with ilstore_fold). Returns 0, 1 when a file ended
   early, -1 when a read failed (errno), 2 when this build cannot read 64-bit offsets. */
int ilstore_fused_files(int fx, int64_t xo, int xk, int fy, int64_t yo, int yk, int64_t start, int64_t stop,
                        int64_t step, double rtol, double atol, int equal_nan, int ulp, totals *t, double *lanes,
                        char *bx, char *by) {
    totals p;
    if (sizeof(off_t) < sizeof(int64_t)) return 2;  /* offsets past 2 GiB would wrap: not measured here */
    t->mis = t->fin = t->nan1 = t->nan2 = t->inf1 = t->inf2 = 0;
    t->s_abs = t->dd = t->aa = t->bb = t->ab = 0.0;
    t->max_abs = -1.0;
    t->max_at = -1;
    t->max_rel = 0.0;
    t->top = 0;
    for (int64_t first = start; first < stop; first += step) {
        int64_t m = stop - first < step ? stop - first : step;
        int r = read_at_(fx, bx, m * xk, xo + first * xk);
        if (r == 0) r = read_at_(fy, by, m * yk, yo + first * yk);
        if (r != 0) return r;
        ilstore_fused_lanes(bx, xk, by, yk, m, rtol, atol, equal_nan, ulp, &p, lanes + (first / BLOCK) * 5 * LANES);
        t->mis += p.mis; t->fin += p.fin; t->nan1 += p.nan1; t->nan2 += p.nan2; t->inf1 += p.inf1; t->inf2 += p.inf2;
        if (p.max_abs > t->max_abs) {  /* strictly: the first occurrence, as in one call */
            t->max_abs = p.max_abs;
            t->max_at = first - start + p.max_at;
        }
        if (p.max_rel > t->max_rel) t->max_rel = p.max_rel;
        if (p.top > t->top) t->top = p.top;
    }
    return 0;
}
#endif

/* adds nblocks blocks of stored lanes (ilstore_fused_lanes) to sums[0..4] exactly as run adds
   them to its totals: lane by lane, block by block */
void ilstore_fold(const double *lanes, int64_t nblocks, double *sums) {
    EXACT_FP_BEGIN
    double s_abs = sums[0], dd = sums[1], aa = sums[2], bb = sums[3], ab = sums[4];
    for (int64_t b = 0; b < nblocks; b++) {
        const double *o = lanes + b * 5 * LANES;
        for (int l = 0; l < LANES; l++) {
            s_abs += o[l];
            dd += o[LANES + l];
            aa += o[2 * LANES + l];
            bb += o[3 * LANES + l];
            ab += o[4 * LANES + l];
        }
    }
    sums[0] = s_abs; sums[1] = dd; sums[2] = aa; sums[3] = bb; sums[4] = ab;
    EXACT_FP_END
}
"""


class _Totals(ctypes.Structure):
    """The C ``totals`` struct."""

    _fields_ = [("mis", ctypes.c_int64), ("fin", ctypes.c_int64), ("nan1", ctypes.c_int64), ("nan2", ctypes.c_int64),
                ("inf1", ctypes.c_int64), ("inf2", ctypes.c_int64), ("s_abs", ctypes.c_double),
                ("dd", ctypes.c_double), ("aa", ctypes.c_double), ("bb", ctypes.c_double), ("ab", ctypes.c_double),
                ("max_abs", ctypes.c_double), ("max_at", ctypes.c_int64), ("max_rel", ctypes.c_double),
                ("top", ctypes.c_uint64)]


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


def _declare(lib: Any) -> None:
    args = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double,
            ctypes.c_double, ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Totals)]
    lib.ilstore_fused.restype = None
    lib.ilstore_fused.argtypes = args
    lib.ilstore_fused_lanes.restype = None
    lib.ilstore_fused_lanes.argtypes = [*args, ctypes.c_void_p]
    lib.ilstore_fold.restype = None
    lib.ilstore_fold.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    files = getattr(lib, "ilstore_fused_files", None)  # (POSIX only)
    if files is not None:
        files.restype = ctypes.c_int
        files.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int,
                          ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_double, ctypes.c_double,
                          ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Totals), ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_void_p]


#: The compiled kernel (see :mod:`ilstore._native`), switched off by ``ILSTORE_COMPARE_KERNEL=0``.
LIBRARY = NativeLibrary("fused", 1, EXACT_FP + _SOURCE, {"BLOCK": BLOCK, "LANES": LANES}, "ILSTORE_COMPARE_KERNEL",
                        "fused metrics kernel", _declare)


def build() -> Path:
    """Compile the kernel into the cache now, if it is not there yet, and load it once.

    For set-up scripts and images (``ilstore-compare --build-kernel``): the first comparison then
    finds it (compiling takes about a second). ``ILSTORE_COMPARE_KERNEL=0`` does not stop this; it
    stops comparisons from using the kernel.

    Returns:
        The compiled file.

    Raises:
        RuntimeError: no C compiler, or compiling or loading failed (the message says why).
    """
    return LIBRARY.build()


def enabled() -> bool:
    """Whether the fused kernel is used (compiled or found in the cache, not switched off)."""
    return LIBRARY.load() is not None


def fused(x: Any, y: Any, *, rtol: float, atol: float, equal_nan: bool,
          with_ulp: bool) -> Totals | None:
    """Every metric of the pair ``(x, y)`` in one pass; None without the kernel.

    Args:
        x: the candidate, 1-D contiguous float32 or float64: a numpy array, or a contiguous CPU
            tensor of any shape (read from its memory, with no numpy array made: a few
            microseconds a pair, which count on tensors of a few hundred elements).
        y: the reference, the same (same length).
        rtol, atol: the tolerances of the verdict.
        equal_nan: NaN on both sides matches.
        with_ulp: also measure ``max_ulp`` (``x`` and ``y`` must then have the same dtype).
    """
    if type(x) is np.ndarray:
        assert x.flags.c_contiguous and y.flags.c_contiguous and x.size == y.size
        return fused_at(x.ctypes.data, x.itemsize, y.ctypes.data, y.itemsize, x.size, rtol=rtol, atol=atol,
                        equal_nan=equal_nan, with_ulp=with_ulp)
    assert x.is_contiguous() and y.is_contiguous() and x.numel() == y.numel()
    return fused_at(x.data_ptr(), x.element_size(), y.data_ptr(), y.element_size(), x.numel(), rtol=rtol, atol=atol,
                    equal_nan=equal_nan, with_ulp=with_ulp)


def fused_at(x: int, x_size: int, y: int, y_size: int, n: int, *, rtol: float, atol: float, equal_nan: bool,
             with_ulp: bool) -> Totals | None:
    """:func:`fused` of ``n`` contiguous elements at addresses ``x`` and ``y`` (float32 or float64,
    ``x_size`` and ``y_size`` bytes each; with ``with_ulp``, the same size); the caller keeps the
    memory alive."""
    lib = LIBRARY.load()
    if lib is None:
        return None
    t = _Totals()
    lib.ilstore_fused(x, x_size, y, y_size, n, float(rtol), float(atol), int(bool(equal_nan)),
                      x_size if with_ulp else 0, ctypes.byref(t))
    return Totals(t.mis, t.fin, t.nan1, t.nan2, t.inf1, t.inf2, t.s_abs, t.dd, t.aa, t.bb, t.ab, t.max_abs, t.max_at,
                  t.max_rel, int(t.top) - 1 if t.top else None)


#: Runs the given functions, maybe several at once, and returns their results in order.
RunAll = Callable[[Sequence[Callable[[], Any]]], Sequence[Any]]


def fused_ranges(x: np.ndarray, y: np.ndarray, bounds: Sequence[int], run_all: RunAll, *, rtol: float,
                 atol: float, equal_nan: bool, with_ulp: bool) -> Totals | None:
    """Exactly :func:`fused` of ``(x, y)``, bit for bit, computed as contiguous ranges that may run
    at once (on several cores: each kernel call releases the GIL); None without the kernel.

    Each range's kernel call stores its blocks' partial sums instead of adding them up; they are
    then added in the order one call adds them (lane by lane, block by block), and the ranges'
    counts, maxima (the first index of the largest ``|a-b|``: the earlier range wins a tie) and
    ``max_ulp`` are merged in range order. Extra memory: 5 x :data:`LANES` doubles per block of
    :data:`BLOCK` elements (1/400 of float32 inputs).

    Args:
        x, y, rtol, atol, equal_nan, with_ulp: as for :func:`fused`.
        bounds: the ranges' edges: ``0``, increasing multiples of :data:`BLOCK`, ``x.size``.
        run_all: runs one function per range and returns their results in order.
    """
    lib = LIBRARY.load()
    if lib is None:
        return None
    n = x.size
    assert x.flags.c_contiguous and y.flags.c_contiguous and y.size == n
    assert bounds[0] == 0 and bounds[-1] == n and all(b % BLOCK == 0 for b in bounds[:-1])
    nblocks = -(-n // BLOCK)
    lanes = np.empty(nblocks * 5 * LANES, dtype=np.float64)
    stride = 5 * LANES * lanes.itemsize
    ulp = x.itemsize if with_ulp else 0

    def part(start: int, stop: int) -> _Totals:
        t = _Totals()
        lib.ilstore_fused_lanes(x.ctypes.data + start * x.itemsize, x.itemsize, y.ctypes.data + start * y.itemsize,
                                y.itemsize, stop - start, float(rtol), float(atol), int(bool(equal_nan)), ulp,
                                ctypes.byref(t), lanes.ctypes.data + start // BLOCK * stride)
        return t

    ranges = [(a, b) for a, b in pairwise(bounds) if b > a]
    parts: Sequence[_Totals] = run_all([partial(part, a, b) for a, b in ranges])
    return _merged(lib, lanes, nblocks, [(start, t) for (start, _stop), t in zip(ranges, parts, strict=True)])


def _merged(lib: Any, lanes: np.ndarray, nblocks: int, parts: Sequence[tuple[int, _Totals]]) -> Totals:
    """The totals of one call over every block, from the calls of consecutive ranges
    (``(first element, totals)`` in order) that stored their blocks' partial sums in ``lanes``:
    the sums added in the order one call adds them, the counts, maxima (the first index of the
    largest ``|a-b|``: the earlier range wins a tie) and ``max_ulp`` merged in range order."""
    sums = np.zeros(5, dtype=np.float64)
    lib.ilstore_fold(lanes.ctypes.data, nblocks, sums.ctypes.data)
    mis = fin = nan1 = nan2 = inf1 = inf2 = top = 0
    max_abs, max_at, max_rel = -1.0, -1, 0.0
    for start, t in parts:
        mis, fin, nan1, nan2, inf1, inf2 = (mis + t.mis, fin + t.fin, nan1 + t.nan1, nan2 + t.nan2, inf1 + t.inf1,
                                            inf2 + t.inf2)
        if t.max_abs > max_abs:  # strictly: the first occurrence, as in one call
            max_abs, max_at = t.max_abs, start + t.max_at
        max_rel = max(max_rel, t.max_rel)
        top = max(top, int(t.top))
    s_abs, dd, aa, bb, ab = (float(v) for v in sums)
    return Totals(mis, fin, nan1, nan2, inf1, inf2, s_abs, dd, aa, bb, ab, max_abs, max_at, max_rel,
                  top - 1 if top else None)


class ShortRead(OSError):
    """A file read by :func:`fused_files` ended before the elements it was said to hold."""


#: Bytes of each side read at a time by :func:`fused_files`: both sides' pieces (1 MiB) stay in a
#: core's L2 cache from the read to the kernel. Measured on the compare benchmark's 2 x 300 MB
#: float32 workload (2 cores, 1 MiB of L2 each), read + kernel per pair: 256 KiB and 512 KiB
#: 0.40-0.42 s with one thread, 0.23-0.25 s with two; 2 MiB 0.46 s and 0.42 s (the pieces no longer fit).
FILE_CHUNK = 1 << 19
_PIECES = threading.local()  # each thread's two read buffers (FILE_CHUNK bytes each, reused)


def _buffers() -> tuple[np.ndarray, np.ndarray]:
    found = getattr(_PIECES, "buffers", None)
    if found is None:
        found = _PIECES.buffers = (np.empty(FILE_CHUNK, dtype=np.uint8), np.empty(FILE_CHUNK, dtype=np.uint8))
    return found


def read_pieces(x: FileSide, y: FileSide, start: int, stop: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Elements ``start`` to ``stop`` of both files, a piece at a time: ``(first element, x piece,
    y piece)``, numpy arrays of each side's dtype in this thread's buffers (valid until the next
    piece). Pieces start at multiples of :data:`BLOCK` elements when ``start`` does.

    Raises:
        ShortRead: a file ended early (it changed since it was checked).
        OSError: a read failed.
    """
    bx, by = _buffers()
    step = _piece(x, y)
    for first in range(start, stop, step):
        m = min(step, stop - first)
        views = []
        for side, buf in ((x, bx), (y, by)):
            nbytes = m * side.itemsize
            view = buf[:nbytes]
            if pread_into(side.fd, (view,), side.offset + first * side.itemsize) != nbytes:
                raise ShortRead(f"{side.path}: the file ends before element {first + m} (it changed since "
                                "it was opened)")
            views.append(view.view(side.dtype))
        yield first, views[0], views[1]


class FileSide(NamedTuple):
    """One side of a pair measured from its file: the elements' bytes at ``offset`` in ``fd``."""

    fd: int
    offset: int
    dtype: np.dtype[Any]
    path: str

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


def fused_files(x: FileSide, y: FileSide, n: int, *, rtol: float, atol: float, equal_nan: bool, with_ulp: bool,
                bounds: Sequence[int] | None = None, run_all: RunAll | None = None) -> Totals | None:
    """Exactly :func:`fused` of the ``n`` elements of each file, bit for bit, read a piece at a
    time (:data:`FILE_CHUNK` bytes a side) into buffers of the thread's own that are reused: the
    memory is the same whatever ``n`` is, and the kernel reads each piece while it is in the
    cache. The reading and the measuring are one call into the kernel (no Python, the GIL
    released, between pieces: with several workers a thread that came back from each read
    would wait for the interpreter). None without the kernel (or on a platform without
    ``pread``, or a 32-bit ``off_t``). With ``bounds`` and ``run_all`` (as for :func:`fused_ranges`) the ranges are read
    and measured at once, each on its own thread's buffers.

    Raises:
        ShortRead: a file ended early (it changed since it was checked); nothing measured.
        OSError: a read failed.
    """
    lib = LIBRARY.load()
    files = getattr(lib, "ilstore_fused_files", None) if lib is not None else None
    if lib is None or files is None:
        return None
    nblocks = -(-n // BLOCK)
    lanes = np.empty(nblocks * 5 * LANES, dtype=np.float64)
    ulp = x.itemsize if with_ulp else 0
    step = _piece(x, y)

    def part(start: int, stop: int) -> _Totals:
        bx, by = _buffers()
        t = _Totals()
        code = files(x.fd, x.offset, x.itemsize, y.fd, y.offset, y.itemsize, start, stop, step, float(rtol),
                     float(atol), int(bool(equal_nan)), ulp, ctypes.byref(t), lanes.ctypes.data, bx.ctypes.data,
                     by.ctypes.data)
        if code == 2:
            raise _NoOffsets
        if code == 1:
            raise ShortRead(f"{x.path} or {y.path}: a file ends before element {stop} (it changed since it was opened)")
        if code:
            raise OSError(f"cannot read {x.path} or {y.path}")
        return t

    if bounds is None or run_all is None:
        bounds, run_all = (0, n), _one_by_one
    assert bounds[0] == 0 and bounds[-1] == n and all(b % BLOCK == 0 for b in bounds[:-1])
    ranges = [(a, b) for a, b in pairwise(bounds) if b > a]
    try:
        results = run_all([partial(part, a, b) for a, b in ranges])
    except _NoOffsets:
        return None
    return _merged(lib, lanes, nblocks, [(start, t) for (start, _stop), t in zip(ranges, results, strict=True)])


class _NoOffsets(Exception):
    """A build whose ``off_t`` has 32 bits (nothing read: the tensors are loaded instead)."""


def _piece(x: FileSide, y: FileSide) -> int:
    """Elements read at a time: :data:`FILE_CHUNK` bytes of the wider side, whole blocks."""
    return max(BLOCK, FILE_CHUNK // max(x.itemsize, y.itemsize) // BLOCK * BLOCK)


def _one_by_one(fns: Sequence[Callable[[], Any]]) -> list[Any]:
    return [fn() for fn in fns]
