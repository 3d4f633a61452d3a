"""The statistics of a CPU float tensor in one pass: min, max, sum and sum of squares.

ilstore defines these sums by its own algorithm (not torch's summation order, which depends on
the thread count and on the SIMD width torch dispatches to), so they are bit-identical for any
thread count, on any CPU, whether the C kernel or the torch fallback computes them:

* every element is widened exactly to float64 (float32, float16, bfloat16; float64 as is);
* the elements are cut into blocks of :data:`BLOCK` consecutive elements (the last one may be
  shorter). Within a block, element ``i`` (counted from the block's start) goes to lane
  ``i mod LANES`` of :data:`LANES` partial sums, each adding its elements in increasing order to
  -0.0 (so a lane's sum starts with its first element exactly, even -0.0); the lanes are then
  combined by a fixed pairwise tree (``((l0 + l1) + (l2 + l3)) + ...``);
* the block results are added in block order, starting from +0.0;
* the sum of squares does the same with ``(x - c) * (x - c)`` rounded to float64, ``c`` being
  0 (exact squares for float32 and narrower inputs) or, for the two-pass variance, the mean;
* min and max are exact and taken in IEEE total order (-0.0 < +0.0); NaN and infinity are
  revealed in the same pass. The kernel takes three integer extremes of the elements' bits (the
  unsigned minimum and maximum and the signed maximum: the total order's extremes are among
  them), the fallback the order-preserving integer key of each element's bits (negative values'
  magnitude bits flipped): the same elements.

The C kernel (compiled at first use by :mod:`ilstore._native`, ``-O3 -march=native
-ffp-contract=off``, no fast-math: the lanes let the compiler vectorise without reordering
anything; where the target has a fast fused multiply-add, a float32 or narrower square with a
zero centre is added by one, which rounds exactly as the addition alone since such a square is
exact in float64) and :func:`fallback_sums` (numpy's sequential scans along the lanes, used
without a compiler or with ``ILSTORE_STATS_KERNEL=0``; several times slower) implement that same
order.

Threads: asked with ``threads`` > 1 (a capture's hook asks with torch's intra-op thread count,
adaptively by default or always with ``ILSTORE_STATS_SHARE=1``: :func:`sharing_threads`), the
kernel shares a tensor of more than :data:`CHUNK` blocks among that many threads: where the
compiler takes ``-fopenmp`` and the process has one OpenMP runtime (torch's, which the kernel
then joins: the forward's own threads, waiting for the next operator, take part), the caller
takes chunks of :data:`CHUNK` blocks from the front and the others from the back; every block's
two sums are kept, and added in block order once all are done: the same additions in the same
order as one thread makes, so the same bits for any thread count. A forked child computes alone
(OpenMP's threads do not survive a fork).
"""

from __future__ import annotations

import ctypes
import math
import os
import struct
import time
from typing import Any, NamedTuple

import numpy as np
import torch

from ._native import EXACT_FP, NativeLibrary

__all__ = ["BLOCK", "LANES", "CHUNK", "SHARED_MIN", "can_share", "sharing_threads", "shared_sums", "DTYPES", "EMPTY",
           "Sums", "sums", "plain_sums", "native_sums", "fallback_sums", "LIBRARY"]

#: Partial sums per block (16: two AVX-512 or four AVX2 registers of float64 per sum).
LANES = 16
#: Elements per block.
BLOCK = 4096
#: Blocks per chunk: the unit the threads sharing a large tensor take in turn (128 KB of float32).
CHUNK = 8
#: Elements from which a tensor has two chunks or more: the kernel shares smaller ones with no thread.
SHARED_MIN = CHUNK * BLOCK + 1

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>

/* LANES, BLOCK and CHUNK come from the command line (-D) */

/* The loops ask for the cache lines this many bytes ahead of the one they read (a hint, which
   never faults past the end): a tensor a hook sees has often left the core's own caches already,
   and the hardware's prefetchers alone kept the loop waiting for memory ~40 % of its time. */
#define PREFETCH 8192

typedef struct { double sum, sumsq, lo, hi; int64_t finite; } stats;

/* What a range of blocks measured: the running sums (when no block array is given) and the three
   integer extremes of the elements' bits, widened (the comparisons keep their results). */
typedef struct { double sum, sumsq; uint64_t un, ux; int64_t sx; } part;

static const part IDENTITY = {0.0, 0.0, UINT64_MAX, 0, INT64_MIN};

static inline void merge(part *into, const part *p) {
    if (p->un < into->un) into->un = p->un;
    if (p->ux > into->ux) into->ux = p->ux;
    if (p->sx > into->sx) into->sx = p->sx;
}

/* the fixed pairwise tree over the lanes: ((l0 + l1) + (l2 + l3)) + ... */
static inline double tree(const double *s) {
    double t[LANES];
    for (int l = 0; l < LANES; l++) t[l] = s[l];
    for (int w = LANES / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) t[l] = t[2 * l] + t[2 * l + 1];
    return t[0];
}

static inline double from_f32(float v) { return (double)v; }
static inline double from_f64(double v) { return v; }
static inline double f32_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return (double)f; }
static inline double f64_bits(uint64_t b) { double f; memcpy(&f, &b, 8); return f; }
static inline double from_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return (double)f;
}
/* exact for normal and subnormal halves, with integer operations and one exact product (no
   subnormal float is formed: the result does not depend on the denormals-are-zero mode) */
static inline double from_f16(uint16_t b) {  /* branch-free, so that the loop vectorises */
    int32_t e = (b >> 10) & 31, normal = e != 0;
    double mant = (double)((b & 1023) | (normal << 10));
    uint64_t pb = (uint64_t)((e | !normal) + (1023 - 25)) << 52; double p; memcpy(&p, &pb, 8);
    double v = mant * p; uint64_t vb; memcpy(&vb, &v, 8);
    vb |= (uint64_t)(b & 0x8000) << 48; memcpy(&v, &vb, 8);
    return v;
}

static inline double bf16_bits(uint16_t b) { return from_bf16(b); }
static inline double f16_bits(uint16_t b) { return from_f16(b); }

/* A square added to a lane: q + d * d. For float32 and narrower inputs with a zero center the
   product is exact in float64 (at most 2 x 24 significant bits, no overflow or underflow), so one
   fused multiply-add rounds exactly as the addition alone: the same bits in fewer operations,
   where the target has a fast one. */
#if defined(FP_FAST_FMA)
#define EXACT_SQUARE(q_, d_) q_ = fma(d_, d_, q_)
#else
#define EXACT_SQUARE(q_, d_) q_ += d_ * d_
#endif
#define ROUNDED_SQUARE(q_, d_) q_ += d_ * d_

/* one element i into lane l. The extremes in IEEE total order (-NaN < -inf < ... < -0.0 < +0.0 <
   ... < inf < NaN) come from three integer extremes of the elements' bits: the unsigned maximum
   (the negative element of largest magnitude: the minimum, when there is a negative one), the
   signed maximum (the largest non-negative element: the maximum, when there is one) and the
   unsigned minimum (the other case of each). DIFF is v - center, or v itself when the center is
   zero (x - 0.0 is x, bit for bit, and (-x)^2 is x^2: the same squares, fewer operations) */
#define ELEMENT(i_, l_, UT, ST, CONV, DIFF, SQUARE) { \
    UT u; memcpy(&u, x + (i_), sizeof u); ST sg = (ST)u; \
    umin[l_] = u < umin[l_] ? u : umin[l_]; umax[l_] = u > umax[l_] ? u : umax[l_]; \
    smax[l_] = sg > smax[l_] ? sg : smax[l_]; \
    double v = CONV(x[i_]), d = DIFF; s[l_] += v; SQUARE(q[l_], d); \
}

/* Elements [first, stop) (first a multiple of BLOCK): each block's sums either added in block
   order to o's running sums (blocks NULL) or stored in blocks[2k], blocks[2k + 1] for the range's
   k-th block (to be added in block order by the caller); the extremes merged into o's. */
#define STATS_FN(NAME, T, UT, ST, SMIN, UMAX, CONV, DIFF, SQUARE) \
static void NAME(const void *data, int64_t first, int64_t n, double center, double *blocks, part *o) { \
    const T *x = (const T *)data; \
    double sum = o->sum, sq = o->sumsq; \
    UT umin[LANES], umax[LANES]; ST smax[LANES]; \
    for (int l = 0; l < LANES; l++) { umin[l] = UMAX; umax[l] = 0; smax[l] = SMIN; } \
    for (int64_t start = first; start < n; start += BLOCK) { \
        int64_t stop = start + BLOCK < n ? start + BLOCK : n; \
        double s[LANES], q[LANES]; \
        for (int l = 0; l < LANES; l++) { s[l] = -0.0; q[l] = -0.0; } \
        int64_t whole = start + (stop - start) / LANES * LANES; \
        for (int64_t b = start; b < whole; b += LANES) { \
            for (int c = 0; c < (int)sizeof(T) * LANES; c += 64) \
                __builtin_prefetch((const char *)(x + b) + PREFETCH + c); \
            for (int l = 0; l < LANES; l++) ELEMENT(b + l, l, UT, ST, CONV, DIFF, SQUARE) \
        } \
        for (int64_t i = whole; i < stop; i++) ELEMENT(i, i - whole, UT, ST, CONV, DIFF, SQUARE) \
        if (blocks) { *blocks++ = tree(s); *blocks++ = tree(q); } \
        else { sum += tree(s); sq += tree(q); } \
    } \
    UT un = umin[0], ux = umax[0]; ST sx = smax[0]; \
    for (int l = 1; l < LANES; l++) { \
        un = umin[l] < un ? umin[l] : un; ux = umax[l] > ux ? umax[l] : ux; sx = smax[l] > sx ? smax[l] : sx; } \
    o->sum = sum; o->sumsq = sq; \
    part p = {0.0, 0.0, un, ux, sx}; merge(o, &p); \
}

/* the extremes' floats, and whether there is no +inf or NaN (bits at or above +inf's, sign
   clear) and no -inf or -NaN (sign set) */
#define FINISH_FN(NAME, UT, ST, SIGN, INF, BITS) \
static void NAME(const part *p, stats *o) { \
    UT un = (UT)p->un, ux = (UT)p->ux; ST sx = (ST)p->sx; \
    o->finite = sx < (ST)(INF) && ux < (UT)((SIGN) | (INF)); \
    o->sum = p->sum; o->sumsq = p->sumsq; \
    o->lo = BITS(ux >= (SIGN) ? ux : un); o->hi = BITS(sx >= 0 ? (UT)sx : un); \
}

#define STATS_FNS(NAME, T, UT, ST, SMIN, UMAX, SIGN, CONV, INF, BITS, SQUARE0) \
    STATS_FN(NAME, T, UT, ST, SMIN, UMAX, CONV, v - center, ROUNDED_SQUARE) \
    STATS_FN(NAME##_0, T, UT, ST, SMIN, UMAX, CONV, v, SQUARE0) \
    FINISH_FN(NAME##_finish, UT, ST, SIGN, INF, BITS)

STATS_FNS(stats_f32, float, uint32_t, int32_t, INT32_MIN, UINT32_MAX, 0x80000000u, from_f32, 0x7F800000u, f32_bits,
          EXACT_SQUARE)
STATS_FNS(stats_f64, double, uint64_t, int64_t, INT64_MIN, UINT64_MAX, 0x8000000000000000ull, from_f64,
          0x7FF0000000000000ull, f64_bits, ROUNDED_SQUARE)
STATS_FNS(stats_bf16, uint16_t, uint16_t, int16_t, INT16_MIN, UINT16_MAX, 0x8000u, from_bf16, 0x7F80u, bf16_bits,
          EXACT_SQUARE)
STATS_FNS(stats_f16, uint16_t, uint16_t, int16_t, INT16_MIN, UINT16_MAX, 0x8000u, from_f16, 0x7C00u, f16_bits,
          EXACT_SQUARE)

typedef void (*range_fn)(const void *, int64_t, int64_t, double, double *, part *);
typedef void (*finish_fn)(const part *, stats *);
static const range_fn CENTERED[4] = {stats_f32, stats_f64, stats_bf16, stats_f16};
static const range_fn ZERO[4] = {stats_f32_0, stats_f64_0, stats_bf16_0, stats_f16_0};
static const finish_fn FINISH[4] = {stats_f32_finish, stats_f64_finish, stats_bf16_finish, stats_f16_finish};

/* ---- a large tensor's chunks of CHUNK blocks shared among OpenMP threads ----
   The library is linked with the OpenMP runtime torch uses (libgomp.so.1, already loaded), so a
   parallel region started in a hook is run by the forward's own intra-op threads, which are
   waiting for the next operator. The threads take chunks until none is left; every block's sums
   go to its own slot, and the caller adds the slots in block order after the region: the same
   additions in the same order as one thread makes, so the same bits for any thread count. */
static int64_t helper_chunks;  /* atomic: chunks threads other than the caller have taken (tests ask) */

int64_t ilstore_stats_helper_chunks(void) { return __atomic_load_n(&helper_chunks, __ATOMIC_RELAXED); }

#ifdef _OPENMP
#include <omp.h>
#include <pthread.h>

#define MAX_THREADS 64

/* GNU OpenMP's threads do not survive a fork, and a region in a child of a process that started
   one waits for them forever: a forked child computes alone */
static int forked;
static void after_fork_in_child(void) { forked = 1; }
__attribute__((constructor)) static void at_load(void) { pthread_atfork(NULL, NULL, after_fork_in_child); }

int ilstore_stats_openmp(void) { return 1; }

/* The next chunk to compute, or -1 when none is left: the caller takes them from the front, the
   other threads from the back (a tensor an operator has just written with torch's threads lies
   half in each core's cache, the first half in the caller's: each side reads mostly its own). */
static int64_t claim(uint64_t *span, int from_back) {
    uint64_t state = __atomic_load_n(span, __ATOMIC_SEQ_CST);
    for (;;) {
        uint64_t lo = state & 0xFFFFFFFFu, hi = state >> 32;
        if (lo >= hi) return -1;
        uint64_t want = from_back ? lo | ((hi - 1) << 32) : (lo + 1) | (hi << 32);
        if (__atomic_compare_exchange_n(span, &state, want, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return (int64_t)(from_back ? hi - 1 : lo);
    }
}

/* 1 when the job was shared (o filled), 0 when the caller must compute alone */
static int shared(const void *x, int kind, int64_t n, double center, int threads, stats *o) {
    int64_t nblocks = (n + BLOCK - 1) / BLOCK, chunks = (nblocks + CHUNK - 1) / CHUNK;
    if (threads < 2 || chunks < 2 || chunks > INT32_MAX || forked || omp_in_parallel()) return 0;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > chunks) threads = (int)chunks;  /* a thread without a chunk would only wait */
    double *blocks = malloc((size_t)nblocks * 2 * sizeof(double));
    if (!blocks) return 0;
    range_fn fn = center == 0.0 ? ZERO[kind] : CENTERED[kind];
    uint64_t span = (uint64_t)chunks << 32;  /* the chunks not taken yet, [low 32 bits, high 32 bits) */
    part parts[MAX_THREADS];
    for (int t = 0; t < threads; t++) parts[t] = IDENTITY;
    #pragma omp parallel num_threads(threads)
    {
        EXACT_FP_BEGIN
        int t = omp_get_thread_num();
        part p = IDENTITY;
        for (int64_t c; (c = claim(&span, t != 0)) >= 0;) {
            if (t) __atomic_fetch_add(&helper_chunks, 1, __ATOMIC_RELAXED);
            int64_t first = c * CHUNK * BLOCK, stop = first + CHUNK * BLOCK;
            fn(x, first, stop < n ? stop : n, center, blocks + 2 * c * CHUNK, &p);
        }
        parts[t] = p;
        EXACT_FP_END
    }
    part p = parts[0];
    for (int t = 1; t < threads; t++) merge(&p, &parts[t]);
    double sum = 0.0, sq = 0.0;  /* the blocks' sums in block order, as one thread adds them */
    for (int64_t b = 0; b < nblocks; b++) { sum += blocks[2 * b]; sq += blocks[2 * b + 1]; }
    p.sum = sum; p.sumsq = sq;
    free(blocks);
    FINISH[kind](&p, o);
    return 1;
}
#else
int ilstore_stats_openmp(void) { return 0; }
static int shared(const void *x, int kind, int64_t n, double center, int threads, stats *o) {
    (void)x; (void)kind; (void)n; (void)center; (void)threads; (void)o;
    return 0;
}
#endif

/* kind: 0 float32, 1 float64, 2 bfloat16, 3 float16; n >= 0 contiguous elements; threads: how
   many threads may share a large tensor (1: the calling thread alone) */
void ilstore_stats(const void *x, int kind, int64_t n, double center, int threads, stats *o) {
    EXACT_FP_BEGIN
    if (!shared(x, kind, n, center, threads, o)) {
        part p = IDENTITY;
        (center == 0.0 ? ZERO : CENTERED)[kind](x, 0, n, center, NULL, &p);  /* +0.0 or -0.0: zero */
        FINISH[kind](&p, o);
    }
    EXACT_FP_END
}
"""


class _Out(ctypes.Structure):
    _fields_ = [("sum", ctypes.c_double), ("sumsq", ctypes.c_double), ("lo", ctypes.c_double), ("hi", ctypes.c_double),
                ("finite", ctypes.c_int64)]


def _declare(lib: Any) -> None:
    lib.ilstore_stats.restype = None
    lib.ilstore_stats.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double, ctypes.c_int,
                                  ctypes.POINTER(_Out)]
    lib.ilstore_stats_helper_chunks.restype = ctypes.c_int64
    lib.ilstore_stats_helper_chunks.argtypes = []
    lib.ilstore_stats_openmp.restype = ctypes.c_int
    lib.ilstore_stats_openmp.argtypes = []


#: The compiled kernel, switched off by ``ILSTORE_STATS_KERNEL=0``.
LIBRARY = NativeLibrary("stats", 2, EXACT_FP + _SOURCE, {"LANES": LANES, "BLOCK": BLOCK, "CHUNK": CHUNK},
                        "ILSTORE_STATS_KERNEL", "statistics kernel", _declare, optional=("-fopenmp",))


class _Kind(NamedTuple):
    code: int  # the kernel's kind
    bits: torch.dtype  # the integer dtype of the same width (the torch path's keys)
    width: int  # bits
    infinity: int  # the bits of +inf
    pack: struct.Struct  # bits (shifted left by ``shift``) -> bytes
    unpack: struct.Struct  # bytes -> float
    shift: int  # bfloat16 is read as the top half of a float32


_KINDS = {
    torch.float32: _Kind(0, torch.int32, 32, 0x7F800000, struct.Struct("<I"), struct.Struct("<f"), 0),
    torch.float64: _Kind(1, torch.int64, 64, 0x7FF0000000000000, struct.Struct("<Q"), struct.Struct("<d"), 0),
    torch.bfloat16: _Kind(2, torch.int16, 16, 0x7F80, struct.Struct("<I"), struct.Struct("<f"), 16),
    torch.float16: _Kind(3, torch.int16, 16, 0x7C00, struct.Struct("<H"), struct.Struct("<e"), 0),
}
#: The dtypes :func:`sums` takes.
DTYPES = frozenset(_KINDS)
_CODES = {dtype: kind.code for dtype, kind in _KINDS.items()}


class Sums(NamedTuple):
    """What one pass measured. ``minimum``/``maximum``/``total``/``squares`` are meaningful only
    when ``finite`` (no NaN, no infinity)."""

    finite: bool
    minimum: float
    maximum: float
    total: float
    squares: float


#: What every path answers for a tensor with no elements: nothing non-finite, sums of zero, no
#: extremes (NaN). The kernel's own answer for no elements is its initial state (not defined).
EMPTY = Sums(True, math.nan, math.nan, 0.0, 0.0)


def _decode(kind: _Kind, kmin: int, kmax: int, total: float, squares: float) -> Sums:
    """The floats behind the extreme keys (a key is its bits, negative values' magnitude flipped)."""
    inf = kind.infinity
    if kmax >= inf or kmin < -inf:  # the key of -inf is -inf - 1; NaN of either sign lies beyond
        return Sums(False, 0.0, 0.0, total, squares)
    mask = (1 << (kind.width - 1)) - 1
    full = (1 << kind.width) - 1
    lo, hi = (float(kind.unpack.unpack(kind.pack.pack(((k ^ mask if k < 0 else k) & full) << kind.shift))[0])
              for k in (kmin, kmax))
    return Sums(True, lo, hi, total, squares)


def native_sums(x: torch.Tensor, center: float = 0.0, threads: int = 1) -> Sums | None:
    """:class:`Sums` of a contiguous CPU tensor of one of :data:`DTYPES` by the C kernel; None
    without it. ``threads``: how many threads may share a large tensor (the same bits for any)."""
    lib = LIBRARY.load()
    if lib is None:
        return None
    n = x.numel()
    if n == 0:
        return EMPTY
    out = _Out()
    lib.ilstore_stats(x.data_ptr(), _KINDS[x.dtype].code, n, center, threads, out)  # ctypes passes out by reference
    return Sums(bool(out.finite), out.lo, out.hi, out.sum, out.sumsq)


_get_num_threads = torch.get_num_threads
#: Whether the kernel may share large tensors with torch's own OpenMP threads (decided once):
#: None not yet decided, False never (``ILSTORE_STATS_SHARE=0``), True always (``=1``), :data:`_AUTO`
#: while the threads answer (the default, or ``=auto``: :func:`sharing_threads`).
_sharing: Any = None
_AUTO = "auto"
#: Adaptive sharing: large tensors still to compute alone before sharing is tried again; shared
#: calls the other threads missed since sharing last ran clean (each doubles the wait, up to
#: :data:`_MAX_SKIP` tensors: about 60 forwards of a 110-module model); shared calls in a row
#: they took part in (:data:`_CLEAN` of them and the misses are forgotten).
_skip = 0
_misses = 0
_clean = 0
_MAX_SKIP = 8192
_CLEAN = 64
#: A shared call slower than this many seconds per element (4 GB/s of float32: half the kernel's
#: speed alone on data the caches lost, a quarter of what two threads reach) was missed too: the
#: caller waited at the region's end for a thread that took a chunk and was then descheduled.
_SLOW_S_PER_ELEMENT = 1e-9
_clock = time.perf_counter


def _one_openmp_runtime() -> bool:
    """Whether the process has exactly one OpenMP runtime mapped (so the kernel's is torch's, not
    a second one with threads of its own): read from ``/proc/self/maps`` (Linux; elsewhere no)."""
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "omp" in line and ".so" in line}
    except OSError:
        return False
    runtimes = {os.path.realpath(p) for p in paths if os.path.basename(p).startswith(("libgomp", "libiomp", "libomp"))}
    return len(runtimes) == 1


def can_share() -> bool:
    """Whether the kernel can share a tensor with torch's own threads: it was built with OpenMP
    and the process has one OpenMP runtime (torch's)."""
    lib = LIBRARY.load()
    return lib is not None and bool(lib.ilstore_stats_openmp()) and _one_openmp_runtime()


def sharing_threads() -> int:
    """How many threads a hook's kernel call may share a large tensor among: torch's intra-op
    thread count (the forward's own threads, which wait while a hook runs, take part) where
    asked and :func:`can_share`, else 1.

    By default (``ILSTORE_STATS_SHARE`` unset, or ``auto``) sharing adapts to the machine
    (:func:`shared_sums`): on a machine whose cores other processes keep busy, a parallel region
    waits for a descheduled thread, so after a shared call that the other threads missed (they
    took no chunk, or the call was slow) the next large tensors are computed alone, twice as many
    after each further miss, up to :data:`_MAX_SKIP`, until :data:`_CLEAN` shared calls in a row
    were made by all the threads (measured at load 8 on 2 cores, the kernel's wall time in a
    stats-mode forward of the benchmark model: 29 ms alone, 50 ms adaptive over the first 15
    forwards, 490-700 ms sharing every tensor; on a quiet 2-core machine adaptive sharing took
    0.05-0.07 x the forward off a stats-mode capture, docs/performance.md, the 2026-12-02 second
    round). ``ILSTORE_STATS_SHARE=1`` shares every large tensor whatever the machine does; ``0``
    (or any other value) never shares.
    """
    global _sharing, _skip
    if _sharing is None:
        asked = os.environ.get("ILSTORE_STATS_SHARE") or _AUTO  # unset or empty: the default
        _sharing = True if asked == "1" else _AUTO if asked == _AUTO else False
        if _sharing is not False and not can_share():
            _sharing = False
    if _sharing is False:
        return 1
    if _skip and _sharing is _AUTO:
        _skip -= 1
        return 1
    return _get_num_threads()


def shared_sums(x: torch.Tensor, dtype: torch.dtype, n: int, threads: int) -> Sums:
    """:func:`plain_sums` of a large tensor that :func:`sharing_threads` let ``threads`` (> 1)
    threads share: the same bits. With adaptive sharing, a call the other threads missed (they
    took no chunk: the caller did every chunk and then waited for them at the region's end, or
    the call was slower than :data:`_SLOW_S_PER_ELEMENT`) makes the next large tensors be
    computed alone (:func:`sharing_threads`)."""
    global _skip, _misses, _clean
    lib = LIBRARY.load()
    if _sharing is not _AUTO or lib is None:
        return plain_sums(x, dtype, n, threads)
    helped, started = lib.ilstore_stats_helper_chunks(), _clock()
    got = plain_sums(x, dtype, n, threads)
    if _clock() - started > n * _SLOW_S_PER_ELEMENT or lib.ilstore_stats_helper_chunks() == helped:
        _misses, _clean = min(_misses + 1, 20), 0
        _skip = min(1 << _misses, _MAX_SKIP)
    else:  # a few clean calls between misses are no quiet machine: only a run of them resets the waits
        _clean += 1
        if _clean >= _CLEAN:
            _misses = 0
    return got


#: Full blocks per fallback chunk (bounds its float64 temporaries to a few MB).
_CHUNK_BLOCKS = 256
#: From this many blocks in a chunk, the fallback adds the lanes row by row (one vector add per
#: row of ``LANES``, across the chunk's blocks) rather than by ``numpy.add.accumulate``: the same
#: additions in the same order, faster for many blocks, slower for a few.
_ROW_LOOP_BLOCKS = 32


def _tree(lanes: np.ndarray) -> np.ndarray:
    """The kernel's pairwise tree over the last dimension (``LANES`` wide)."""
    while lanes.shape[-1] > 1:
        lanes = lanes[..., 0::2] + lanes[..., 1::2]
    return lanes[..., 0]


def _lanes(rows: np.ndarray) -> np.ndarray:
    """Each lane's sequential sum over dimension -2 of ``(..., rows, LANES)`` float64 (from its first
    element: -0.0 plus it)."""
    if rows.ndim == 2 or rows.shape[0] < _ROW_LOOP_BLOCKS:
        return np.add.accumulate(rows, axis=-2)[..., -1, :]
    acc = np.full((rows.shape[0], LANES), -0.0)
    for r in range(rows.shape[1]):
        np.add(acc, rows[:, r], out=acc)
    return acc


def fallback_sums(x: torch.Tensor, center: float = 0.0) -> Sums:
    """:class:`Sums` of a CPU tensor of one of :data:`DTYPES` without the kernel, in its order.

    The elements are widened to float64 by torch (exactly), then added by numpy:
    ``numpy.add.accumulate`` along an axis is a sequential scan by definition (``out[i] =
    out[i-1] + a[i]``), whatever the machine, so its last row over a block's rows of ``LANES``
    elements is each lane's sequential sum; for many blocks at once a loop of vector adds over
    the rows does the same additions, faster.
    """
    x = x.detach()
    if x.is_neg():  # a lazily negated view (z.conj().imag): its bits are not viewable; the values are
        x = x.resolve_neg()
    elif x._is_zerotensor():  # an autograd zero tensor: no memory to view
        x = x.clone()
    with np.errstate(all="ignore"):  # NaN, infinity and overflowing squares are the caller's to judge
        return _fallback_sums(_KINDS[x.dtype], x.reshape(-1), center)


def _fallback_sums(kind: _Kind, flat: torch.Tensor, center: float) -> Sums:
    n = flat.numel()
    if n == 0:
        return EMPTY
    keys = flat.view(kind.bits).numpy()
    keys = keys ^ ((keys >> (kind.width - 1)) & ((1 << (kind.width - 1)) - 1))
    kmin, kmax = int(keys.min()), int(keys.max())
    blocks: list[float] = []
    blocks_sq: list[float] = []
    full = n // BLOCK
    for first in range(0, full, _CHUNK_BLOCKS):
        stop = min(full, first + _CHUNK_BLOCKS)
        v = flat[first * BLOCK: stop * BLOCK].to(torch.float64).numpy().reshape(stop - first, BLOCK // LANES, LANES)
        d = v - center if center else v  # x - 0.0 is x, bit for bit
        blocks += _tree(_lanes(v)).tolist()
        blocks_sq += _tree(_lanes(d * d)).tolist()
    if n > full * BLOCK:  # the last, shorter block: whole rows of lanes, then the rest into the first lanes
        v = flat[full * BLOCK:].to(torch.float64).numpy()
        rows = v.size // LANES
        lanes = np.full((2, LANES), -0.0)
        if rows:
            body = v[: rows * LANES].reshape(rows, LANES)
            d = body - center
            lanes = np.stack([_lanes(body), _lanes(d * d)])
        rest = v[rows * LANES:]
        d = rest - center
        lanes[:, : rest.size] += np.stack([rest, d * d])
        total, squares = _tree(lanes).tolist()
        blocks.append(total)
        blocks_sq.append(squares)
    sm = sq = 0.0
    for b, b2 in zip(blocks, blocks_sq, strict=True):
        sm += b
        sq += b2
    return _decode(kind, kmin, kmax, sm, sq)


#: Tensor classes whose memory the kernel may read directly (a subclass may have none).
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_sums(x: torch.Tensor, dtype: torch.dtype, n: int, threads: int = 1) -> Sums:
    """``sums(x)`` of a ``torch.Tensor`` (the class itself, no subclass) whose dtype ``dtype`` (one
    of :data:`DTYPES`) and element count ``n`` the caller has read already: the same result, with
    fewer calls into torch (a capture asks this for every tensor it sees). ``threads``: how many
    threads may share a large tensor (the same bits for any)."""
    if n == 0:
        return EMPTY
    if not x.is_neg() and not x._is_zerotensor():
        lib = LIBRARY.load()
        if lib is not None:
            out = _Out()
            dense = x if x.is_contiguous() else x.contiguous()  # held until the kernel has read it
            lib.ilstore_stats(dense.data_ptr(), _CODES[dtype], n, 0.0, threads, out)
            return Sums(bool(out.finite), out.lo, out.hi, out.sum, out.sumsq)
    return fallback_sums(x)


def sums(x: torch.Tensor, center: float = 0.0, threads: int = 1) -> Sums:
    """:class:`Sums` of a CPU tensor of one of :data:`DTYPES`, of any layout (a strided one is read
    through a contiguous copy): by the kernel when it is there and the tensor is a plain one, by
    :func:`fallback_sums` otherwise (the same bits). ``threads``: how many threads may share a
    large tensor (the same bits for any)."""
    if type(x) in _PLAIN and not x.is_neg() and not x._is_zerotensor():
        got = native_sums(x if x.is_contiguous() else x.contiguous(), center, threads)
        if got is not None:
            return got
    return fallback_sums(x, center)
