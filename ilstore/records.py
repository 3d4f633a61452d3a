"""Records: what capture hands to a store writer, and the JSON structure that describes them.

A :class:`Record` is one side (inputs, outputs or post-forward inputs) of one module call. Its
``structure`` is a JSON tree in the documented format (SPEC §4.2): tensors are
``{"type": "tensor", "shape", "dtype", "numel", "device", "path", "stored", "stats"...}``,
containers ``{"type": "tuple"|"list"|"dict", "items": ...}``, plain JSON values stay as they
are and anything else becomes ``{"type": "value", "class": ..., "repr": ...}``. The tensor
bodies travel beside it in ``tensors``, keyed by path.

A dict's items are named by their keys made strings; a key whose string an earlier key of the same
dict already gave (``1`` and ``"1"``) is named ``<key>~2`` (``~3``... the first name free), and the
dict node lists such items in ``"renamed"`` (item name -> repr of the original key), so no tensor
is lost. A key holding a lone surrogate, which no backend can write (names are UTF-8), is named
with the surrogate escaped (``k\\ud800``) and listed in ``"renamed"`` too. One odd value never
stops a capture (SPEC section 8): a container that cannot be walked (a ``__getitem__`` or a
dataclass field that raises, a key whose ``str()`` raises) is recorded as one ``"value"`` node
with a ``"reason"``, and none of its tensors is captured.

A sparse or quantized tensor is a ``"dict"`` container with ``"class": "torch.Tensor"`` and an
``"encoding"`` whose items are ordinary dense tensors (indices and values; the integer
representation, scale and zero point), so every backend, convert and compare handle it as
they handle any dict of tensors; :func:`rebuild_tensor` and :func:`load_tensor` put it back
together bit-exactly. See ``docs/format-pt.md`` ("Sparse and quantized tensors").
"""

from __future__ import annotations

import dataclasses
import math
import struct
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from . import _stats_kernel
from .errors import StoreError
from .keys import CallKey, TensorKey, encode_part

__all__ = ["Record", "TensorPolicy", "Deduper", "build_record", "finalize_stats", "iter_tensor_nodes", "tensor_stats",
           "dtype_from_str", "ENCODINGS", "node_at", "rebuild_tensor", "load_tensor"]

_MAX_DEPTH = 32


@dataclass(frozen=True)
class Record:
    """One captured side of one module call.

    Attributes:
        call: which module call.
        kind: ``inputs``, ``outputs`` or ``post_fwd_inputs``.
        structure: the JSON tree describing the captured value (tensor leaves carry ``path``).
            A stored tensor node may carry ``"same_as": "<key>"``: the tensor is identical to an
            earlier one of the same step (de-duplicated) and has no body in ``tensors``.
        tensors: contiguous CPU snapshots of the stored tensors, keyed by path.
        ready: a CUDA event that completes when the snapshots' device-to-host copies are done.
        nodes: the structure's tensor nodes ``(path, node)`` exactly as :func:`iter_tensor_nodes`
            yields them, collected by :func:`build_record` while it built them (so a writer need
            not walk the tree again); None when unknown (walk ``structure``). Whoever adds or
            removes tensor nodes of ``structure`` afterwards must drop it.
    """

    call: CallKey
    kind: str
    structure: Any
    tensors: Mapping[tuple[str, ...], torch.Tensor]
    ready: Any = None
    nodes: list[tuple[tuple[str, ...], dict[str, Any]]] | None = field(default=None, compare=False, repr=False)

    def tensor_nodes(self) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
        """``(path, node)`` of each tensor node of the structure, in :func:`iter_tensor_nodes` order."""
        nodes = self.nodes
        return list(iter_tensor_nodes(self.structure)) if nodes is None else nodes

    def key(self, path: tuple[str, ...]) -> TensorKey:
        return self.call.tensor(self.kind, path)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def wait_ready(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()


def finalize_stats(record: Record) -> None:
    """Fill the statistics of stored tensors from their snapshots (deferred off the hook)."""
    if not record.tensors:  # nothing stored (mode: "stats"): every statistic is already there
        return
    for path, node in iter_tensor_nodes(record.structure):
        stats = node.get("stats")
        if stats == {} and path in record.tensors and "same_as" not in node:
            stats.update(tensor_stats(record.tensors[path]))


class Deduper:
    """Recognises a tensor captured again unchanged within one step.

    The identity is (storage, offset, shape, strides, dtype, version counter) and the first
    tensor object must still be alive (checked through a weak reference), so a freed storage
    whose address is reused can never be mistaken for the earlier tensor; no reference that
    would keep an activation alive is held.
    """

    def __init__(self) -> None:
        self._seen: dict[tuple[Any, ...], tuple[Any, str | None, dict[str, Any]]] = {}

    def clear(self) -> None:
        self._seen.clear()

    @staticmethod
    def _identity(t: torch.Tensor, shape: torch.Size | None = None,
                  dtype: torch.dtype | None = None) -> tuple[Any, ...] | None:
        """The identity of ``t``; ``shape`` and ``dtype``: ``t.shape`` and ``t.dtype`` when the
        caller has them already (a ``torch.Size`` hashes and compares as the tuple it is)."""
        try:
            version = t._version
        except RuntimeError:  # inference-mode tensors track no version: never de-duplicated
            return None
        return (t.untyped_storage().data_ptr(), t.device, t.storage_offset(),
                tuple(t.shape) if shape is None else shape, t.stride(), t.dtype if dtype is None else dtype, version)

    def hit(self, ident: tuple[Any, ...]) -> tuple[str | None, dict[str, Any]] | None:
        """What :meth:`lookup` returns for the tensor of identity ``ident``."""
        hit = self._seen.get(ident)
        if hit is None or hit[0]() is None:
            return None
        return hit[1], hit[2]

    def find(self, t: torch.Tensor) -> tuple[tuple[Any, ...] | None, tuple[str | None, dict[str, Any]] | None]:
        """``(identity, hit)``: the identity to pass to :meth:`add` (None: never de-duplicated)
        and what :meth:`lookup` returns, computing the identity once for both."""
        ident = self._identity(t)
        if ident is None:
            return None, None
        return ident, self.hit(ident)

    def add(self, ident: tuple[Any, ...] | None, t: torch.Tensor, key: str | None, stats: dict[str, Any]) -> None:
        """:meth:`remember` with the identity :meth:`find` gave for ``t``."""
        if ident is None:
            return
        try:
            ref = weakref.ref(t)
        except TypeError:
            return
        self._seen[ident] = (ref, key, stats)

    def lookup(self, t: torch.Tensor) -> tuple[str | None, dict[str, Any]] | None:
        """``(key of the stored copy or None if its body was not stored, its statistics)``."""
        return self.find(t)[1]

    def remember(self, t: torch.Tensor, key: str | None, stats: dict[str, Any]) -> None:
        self.add(self._identity(t), t, key, stats)


@dataclass(frozen=True)
class TensorPolicy:
    """Decides, per tensor, whether its body is stored (statistics are always kept).

    Attributes:
        store_bodies: False in ``mode: "stats"``.
        max_numel: tensors with more elements keep metadata and statistics only.
        device_ok: predicate on ``str(tensor.device)``; tensors on other devices are skipped.
    """

    store_bodies: bool = True
    max_numel: int | None = None
    device_ok: Callable[[str], bool] = lambda _d: True
    pin_memory: bool = True
    #: Hand the writer a CPU tensor's own memory instead of a copy where that memory holds exactly
    #: the tensor (:func:`_borrowed`). Only for a writer that has written every body before its
    #: ``write`` returns (``StoreWriter.borrows_bodies``), called inline in the hook
    #: (``async_writes: false``): nothing can change the tensor before its bytes are out.
    borrow: bool = False
    #: ``mode: "stats"``: an :class:`ilstore.device_stats.DeferredStats` that computes the statistics
    #: of device tensors without reading them back in the hook (once per step instead), or None.
    deferred: Any = None
    # device name -> device_ok(name), asked once per device (the predicate is asked for every tensor)
    _devices: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def logs_device(self, device: str) -> bool:
        """:attr:`device_ok`, remembered per device name."""
        ok = self._devices.get(device)
        if ok is None:
            ok = self._devices[device] = bool(self.device_ok(device))
        return ok


def dtype_from_str(name: str) -> torch.dtype:
    """``"torch.bfloat16"`` (or ``"bfloat16"``) → ``torch.bfloat16``; ValueError if unknown."""
    attr = name.removeprefix("torch.")
    dtype = getattr(torch, attr, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


_WIDE_UNSIGNED = tuple(getattr(torch, n, None) for n in ("uint16", "uint32", "uint64"))
_INT64_MIN = -2**63


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


#: The floating dtypes with fast reductions, and the dtype their sums are accumulated in.
_ACC = {torch.float32: torch.float32, torch.float64: torch.float64, torch.float16: torch.float32,
        torch.bfloat16: torch.float32}


def tensor_stats(t: torch.Tensor) -> dict[str, Any]:
    """Statistics of a tensor, computed without modifying it.

    Floating tensors get min, max, mean, std (population), abs_max, l2_norm over their finite
    elements, plus nan_count and inf_count. Complex tensors get abs_max, l2_norm and the counts.
    Integer and bool tensors get min and max. Empty tensors get only what is defined.

    The common case (all finite) reads the tensor itself, no copy of a contiguous one:

    * on the CPU, one pass of ilstore's own algorithm (:mod:`._stats_kernel`, a compiled C loop,
      or a numpy fallback with the same bits): min and max exact (-0.0 below +0.0), the sum and
      the sum of squares of the elements widened to float64 and added in float64 in a fixed
      documented order, NaN/Inf detected in the same pass;
    * on another device, three torch reductions: ``aminmax`` (which also reveals NaN/Inf), a sum
      and an L2 norm, accumulated in float32 (float64 for float64 tensors), in a fixed row order,
      read back with one sync (one ``tolist``).

    mean, std and l2_norm derive from the sums; std is recomputed with a two-pass variance when
    the mean dominates so cancellation could bite. With NaN/Inf the statistics are those of the
    finite elements, computed by a slower exact path.

    The result does not depend on the thread that computes it nor on the thread count (on the
    CPU, on the CPU's kind either), so a tensor gets bit-identical statistics whether the hook,
    the writer thread (single-threaded) or the producer computed them.
    """
    # no autograd graph is recorded for a detached tensor (nor for one that needs no gradient):
    # no_grad is not needed
    x = t.detach() if t.requires_grad else t
    acc = _ACC.get(x.dtype)
    if acc is None:
        return _other_stats(x)
    n = x.numel()
    if n == 0:
        return {"nan_count": 0, "inf_count": 0}
    return _float_stats(x, n, acc)


def _other_stats(x: torch.Tensor) -> dict[str, Any]:
    """:func:`tensor_stats` of a complex, integer, bool or float8 tensor."""
    with torch.no_grad():
        n = x.numel()
        if n == 0:
            return {"nan_count": 0, "inf_count": 0} if (x.is_floating_point() or x.is_complex()) else {}
        if x.is_complex():
            return _slow_stats(x)
        if not x.is_floating_point():
            extremes, kind = int_extremes(x)
            lo, hi = extremes.tolist()
            return finish_int_stats(lo, hi, kind)
        return _float_stats(x.float(), n, torch.float32)  # float8 variants have few kernels


def int_extremes(x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The minimum and maximum of a non-empty integer or bool tensor, not read back (no sync):
    an int64 tensor ``[lo, hi]`` and how :func:`finish_int_stats` reads it (``"bool"``, ``"int"``
    or ``"uint64"``, whose extremes are taken with the sign bit flipped, which preserves the order
    in int64)."""
    if x.dtype == torch.bool:
        return torch.stack(torch.aminmax(x)).to(torch.int64), "bool"
    if x.dtype in _WIDE_UNSIGNED[2:]:
        return torch.stack(torch.aminmax(x.view(torch.int64) ^ _INT64_MIN)), "uint64"
    if x.dtype in _WIDE_UNSIGNED[:2]:  # no min/max kernels for uint16/uint32
        x = x.to(torch.int64)
    return torch.stack(torch.aminmax(x)).to(torch.int64), "int"


def finish_int_stats(lo: int, hi: int, kind: str) -> dict[str, Any]:
    """The statistics of an integer or bool tensor from :func:`int_extremes` read back."""
    if kind == "bool":
        return {"min": bool(lo), "max": bool(hi)}
    if kind == "uint64":
        return {"min": lo - _INT64_MIN, "max": hi - _INT64_MIN}
    return {"min": lo, "max": hi}


def _float_stats(x: torch.Tensor, n: int, acc: torch.dtype) -> dict[str, Any]:
    """:func:`tensor_stats` of a non-empty float32/float64/float16/bfloat16 tensor (``n`` elements)."""
    if x.is_cpu:
        return _cpu_float_stats(x, n)
    return _device_float_stats(x, n, acc)


def _cpu_float_stats(x: torch.Tensor, n: int, plain_dtype: torch.dtype | None = None,
                     threads: int = 1) -> dict[str, Any]:
    """:func:`_float_stats` of a CPU tensor: ilstore's own one-pass sums (:mod:`._stats_kernel`:
    min/max exact, sum and sum of squares in float64 in a fixed order), the same bits for any
    thread count and CPU, with or without the compiled kernel. A strided tensor is read through
    a contiguous copy.

    The variance is ``E[x^2] - mean^2`` unless the mean dominates (``mean^2 > 1e3 var``), where
    that could lose digits to cancellation: then a second pass sums ``(x - mean)^2``.

    ``plain_dtype``: ``x.dtype``, given when ``x`` is a ``torch.Tensor`` itself (no subclass).
    ``threads``: how many threads the kernel may share a large tensor among (the same bits for
    any); the hook's path gives torch's intra-op thread count, whose threads wait while a hook runs.
    """
    if plain_dtype is None:
        s = _stats_kernel.sums(x, 0.0, threads)
    elif threads > 1:  # shared with torch's threads (sharing_threads): adapts to a busy machine
        s = _stats_kernel.shared_sums(x, plain_dtype, n, threads)
    else:
        s = _stats_kernel.plain_sums(x, plain_dtype, n, threads)
    if not (s.finite and math.isfinite(s.squares)):  # NaN/Inf, or float64 squares past the range
        return _slow_stats(x)
    mn, mx, sq = s.minimum, s.maximum, s.squares
    mean = s.total / n
    var = max(sq / n - mean * mean, 0.0)
    if mean * mean > 1e3 * var:
        centered = _stats_kernel.sums(x, mean, threads).squares
        if not math.isfinite(centered):
            return _slow_stats(x)
        var = centered / n
    return {"nan_count": 0, "inf_count": 0, "min": mn, "max": mx, "mean": mean, "std": math.sqrt(var),
            "abs_max": max(-mn, mx), "l2_norm": math.sqrt(sq)}


def _device_float_stats(x: torch.Tensor, n: int, acc: torch.dtype, gather: bool | None = None) -> dict[str, Any]:
    """:func:`_float_stats` off the CPU, on the device: torch's reductions in a fixed row order
    (``aminmax``, a sum and an L2 norm accumulated in ``acc``: :func:`device_float_sums`), read
    back and finished by :func:`finish_device_float_stats`.

    ``gather``: read the reduced values back through one tensor and one ``tolist`` (the default
    off the CPU) rather than one ``item()`` each (the default on the CPU); the values are the same.
    """
    if gather is None:
        gather = not x.is_cpu
    flat = x.reshape(-1)
    sums = device_float_sums(flat, n, acc)
    values = sums.tolist() if gather else [v.item() for v in sums]
    return finish_device_float_stats(flat, n, acc, values)


def device_float_sums(flat: torch.Tensor, n: int, acc: torch.dtype) -> torch.Tensor:
    """The reductions of :func:`_device_float_stats` over the ``n`` elements of a 1-D float tensor,
    not read back (no sync): ``[min, max, sum, last]`` in ``acc``, ``last`` being the L2 norm
    below two rows of :data:`_ROW` (squared by :func:`finish_device_float_stats`, as ``.square()``
    would) and the sum of squares from two rows on. Widening the extremes to ``acc`` is exact."""
    lo, hi = torch.aminmax(flat)
    if n < 2 * _ROW:
        # The common small tensor: the reductions _fixed_order_sums makes (3 dispatches instead of 10)
        return torch.stack([lo.to(acc), hi.to(acc), flat.sum(dtype=acc), torch.linalg.vector_norm(flat, dtype=acc)])
    return torch.cat([torch.stack([lo, hi]).to(acc), _fixed_order_sums(flat, acc)])


def _first_pass(n: int, acc: torch.dtype, values: Sequence[float]) -> tuple[float, float, float, float, float, str]:
    """``(min, max, sum of squares, mean, variance, need)`` from :func:`device_float_sums` read back;
    ``need``: ``"slow"`` (NaN/Inf, or float64 squares past the range: :func:`_slow_stats`),
    ``"centred"`` or ``"two_pass"`` (a second pass over the elements gives the variance), or ``""``."""
    mn, mx, sm, last = values
    if n < 2 * _ROW:  # the norm is squared in ``acc``, as .square() would (a float32 product is exact in a double)
        sq = last * last if acc == torch.float64 else _as_float32(last * last)
    else:
        sq = last
    mean = sm / n
    var = max(sq / n - mean * mean, 0.0)
    if not (math.isfinite(mn) and math.isfinite(mx) and math.isfinite(sq)):
        need = "slow"
    elif acc != torch.float64 and mean * mean > var:
        # Sums in float32 carry ~1e-7..1e-5 relative error, which E[x^2] - mean^2 multiplies by
        # 1 + mean^2 / var: identical tensors captured here and on the CPU (float64 sums) would
        # differ in std by 1e-4..1e-2 (randn + 20 in bfloat16). The deviations from the mean, summed
        # in float32 a chunk at a time, carry only the sums' own error.
        need = "centred"
    elif mean * mean > 1e3 * var:
        need = "two_pass"
    else:
        need = ""
    return mn, mx, sq, mean, var, need


def device_second_pass(flat: torch.Tensor, n: int, acc: torch.dtype, values: Sequence[float]) -> torch.Tensor | None:
    """The second pass :func:`finish_device_float_stats` needs for ``values``, queued on the device
    and not read back: a 0-dim float64 tensor, the sum of the squared deviations from the mean
    (:func:`_centered_sumsq_on_device` or :func:`_two_pass_sumsq_on_device`); None when none is needed (or
    the NaN/Inf path is)."""
    _, _, _, mean, _, need = _first_pass(n, acc, values)
    if need == "centred":
        return _centered_sumsq_on_device(flat, mean)
    if need == "two_pass":
        return _two_pass_sumsq_on_device(flat.double())
    return None


def finish_device_float_stats(flat: torch.Tensor, n: int, acc: torch.dtype, values: Sequence[float],
                              second: float | None = None) -> dict[str, Any]:
    """The statistics from ``values``, :func:`device_float_sums` of ``flat`` read back. ``flat`` is
    read again only where the sums do not suffice: NaN/Inf (:func:`_slow_stats`), or a mean that
    dominates (a second pass: :func:`device_second_pass`, whose result ``second`` is, when the
    caller read it back already); its elements must still be the ones the sums were taken of."""
    mn, mx, sq, mean, var, need = _first_pass(n, acc, values)
    if need == "slow":
        return _slow_stats(flat)
    if need:
        if second is None:
            pending = device_second_pass(flat, n, acc, values)
            assert pending is not None
            second = float(pending)
        var = second / n
    return {"nan_count": 0, "inf_count": 0, "min": mn, "max": mx, "mean": mean, "std": math.sqrt(var),
            "abs_max": max(-mn, mx), "l2_norm": math.sqrt(sq)}


#: Elements per chunk of :func:`_centered_sumsq_on_device`: its float32 temporary is at most 64 MB.
_CENTERED_CHUNK = 1 << 24


def _centered_sumsq_on_device(flat: torch.Tensor, mean: float) -> torch.Tensor:
    """``sum((x - mean)^2)`` of a 1-D float tensor off the CPU, not read back: each chunk's deviations
    in float32 (a temporary of at most :data:`_CENTERED_CHUNK` elements, whatever the tensor's size),
    their squares summed in float32, the chunks' sums added in float64 on the device."""
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for chunk in flat.split(_CENTERED_CHUNK):
        total += torch.linalg.vector_norm(chunk.to(torch.float32) - mean, dtype=torch.float32).double().square()
    return total


_FLOAT32 = struct.Struct("<f")


def _as_float32(value: float) -> float:
    """``value`` rounded to float32 (to nearest, as a float32 multiplication rounds); inf past its range."""
    try:
        return float(_FLOAT32.unpack(_FLOAT32.pack(value))[0])
    except OverflowError:
        return math.copysign(math.inf, value)


# Reductions are split into rows of this many elements. Below torch's parallel grain size
# (32768), so a row, and any reduction of fewer than 2 rows, is summed by one thread; a
# reduction over several rows is parallelised across rows only. Each row is then summed in the
# same order whatever the thread count, and so is the sum of the row sums.
_ROW = 16384


def _fixed_order_sum(v: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Sum of a 1-D tensor, accumulated in ``acc``, bit-identical for any intra-op thread count
    (a plain ``sum()`` of a large tensor splits the work per thread, so its rounding varies)."""
    m = v.numel() // _ROW
    if m < 2:
        return v.sum(dtype=acc)
    rows = v[: m * _ROW].view(m, _ROW).sum(dim=1, dtype=acc)
    return _fixed_order_sum(torch.cat([rows, v[m * _ROW:].sum(dtype=acc).reshape(1)]), acc)


def _fixed_order_sumsq(v: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Sum of squares of a 1-D tensor, like :func:`_fixed_order_sum` (row L2 norms, squared)."""
    m = v.numel() // _ROW
    if m < 2:
        return torch.linalg.vector_norm(v, dtype=acc).square()
    rows = torch.linalg.vector_norm(v[: m * _ROW].view(m, _ROW), dim=1, dtype=acc)
    tail = torch.linalg.vector_norm(v[m * _ROW:], dtype=acc).reshape(1)
    return _fixed_order_sum(torch.cat([rows, tail]).square(), acc)


def _fixed_order_sums(v: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``[sum, sum of squares]`` of a 1-D tensor, as :func:`_fixed_order_sum` and
    :func:`_fixed_order_sumsq` define them, in fewer operations for the common sizes (each
    costs a few microseconds of dispatch; a capture computes this for every tensor).

    A tensor of fewer than two rows is reduced whole (one thread). A whole number of rows,
    fewer than ``_ROW`` of them, takes one row-wise sum and one row-wise norm, then both
    columns of row results are summed together, each by one thread (the pair of reductions
    is below torch's parallel grain size).
    """
    n = v.numel()
    m = n // _ROW
    if m < 2:
        return torch.stack([v.sum(dtype=acc), torch.linalg.vector_norm(v, dtype=acc).square()])
    if m * _ROW == n and m < _ROW:
        rows = v.view(m, _ROW)
        per_row = torch.stack([rows.sum(dim=1, dtype=acc), torch.linalg.vector_norm(rows, dim=1, dtype=acc)])
        per_row[1].square_()
        return per_row.sum(dim=1)
    return torch.stack([_fixed_order_sum(v, acc), _fixed_order_sumsq(v, acc)])


def _two_pass_var(x64: torch.Tensor, n: int) -> float:
    """Population variance of a float64 tensor: mean first, then the mean squared deviation,
    with fixed-order sums (``var_mean``'s result depends on the thread count)."""
    return float(_two_pass_sumsq_on_device(x64.reshape(-1))) / n


def _two_pass_sumsq_on_device(flat: torch.Tensor) -> torch.Tensor:
    """The sum of the squared deviations from the mean of a 1-D float64 tensor, mean first, with
    fixed-order sums, not read back (a 0-dim tensor). The mean stays on the device: a float64 sum
    divided by the count there, and subtracted, rounds as the same operations on the host. The
    count is a tensor too: CUDA divides by a Python number as a multiplication by its reciprocal,
    which can differ from the division in the last bit."""
    count = torch.full((), float(flat.numel()), dtype=torch.float64, device=flat.device)
    mean = _fixed_order_sum(flat, torch.float64) / count
    return _fixed_order_sum((flat - mean).square(), torch.float64)


def _slow_stats(x: torch.Tensor) -> dict[str, Any]:
    """Statistics over the finite elements when there are NaN/Inf (and for complex)."""
    if x.is_complex():
        mag = x.abs().double()
        nan = int(torch.isnan(mag).sum())
        inf = int(torch.isinf(mag).sum())
        fin = mag[torch.isfinite(mag)] if nan or inf else mag.reshape(-1)
        out: dict[str, Any] = {"nan_count": nan, "inf_count": inf}
        if fin.numel():
            out.update(abs_max=_finite_or_none(float(fin.max())),
                       l2_norm=_finite_or_none(math.sqrt(float(_fixed_order_sumsq(fin, torch.float64)))))
        return out
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(work)
    nan = int(torch.isnan(xf).sum())
    inf = int(torch.isinf(xf).sum())
    fin = xf[torch.isfinite(xf)] if nan or inf else xf.reshape(-1)
    out = {"nan_count": nan, "inf_count": inf}
    if fin.numel():
        fin64 = fin.double()
        out.update(
            min=_finite_or_none(float(fin.min())),
            max=_finite_or_none(float(fin.max())),
            mean=_finite_or_none(float(_fixed_order_sum(fin64, torch.float64)) / fin64.numel()),
            std=_finite_or_none(math.sqrt(_two_pass_var(fin64, fin64.numel()))),
            abs_max=_finite_or_none(float(fin.abs().max())),
            l2_norm=_finite_or_none(math.sqrt(float(_fixed_order_sumsq(fin64, torch.float64)))),
        )
    return out


def _snapshot(t: torch.Tensor, pin_memory: bool) -> tuple[torch.Tensor, bool]:
    """A CPU copy of just the view's own elements, contiguous, detached from autograd.

    ``resolve_conj``/``resolve_neg`` materialise lazy views that some writers would otherwise
    store wrongly; a fresh buffer is used even for a tensor that is already contiguous (a
    slice's ``.contiguous()`` would still share the whole base storage). Device tensors are
    copied into pinned host memory without blocking; the second value says so, and the caller
    records an event the writer waits on before touching the copy.
    """
    with torch.no_grad():
        x = t.detach().resolve_conj().resolve_neg()
        if x.device.type == "cuda":
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=pin_memory)
            host.copy_(x, non_blocking=pin_memory)
            return host, pin_memory
        return x.to("cpu", memory_format=torch.contiguous_format, copy=True), False


def _borrowed(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` detached, when it is a plain dense CPU tensor that owns exactly its contiguous storage
    (what :func:`_snapshot` would copy it into); None otherwise (a view into a larger storage, a
    lazy conjugate or negation, a device tensor, a subclass): those are copied."""
    if type(t) is not torch.Tensor or t.device.type != "cpu" or t.is_conj() or t.is_neg() or not t.is_contiguous() \
            or t.storage_offset():
        return None
    x = t.detach()
    return x if x.untyped_storage().nbytes() == x.numel() * x.element_size() else None


#: Sparse layouts stored as their parts, and the names of a compressed layout's two index tensors.
_COMPRESSED = {torch.sparse_csr: ("crow_indices", "col_indices"), torch.sparse_bsr: ("crow_indices", "col_indices"),
               torch.sparse_csc: ("ccol_indices", "row_indices"), torch.sparse_bsc: ("ccol_indices", "row_indices")}
_SPARSE_LAYOUTS = {str(layout): layout for layout in (torch.sparse_coo, *_COMPRESSED)}
#: Quantized dtypes whose ``int_repr`` has one element per element (quint4x2 and quint2x4 pack
#: several into a byte, and torch cannot build them back from it).
_QUANTIZED_DTYPES = (torch.qint8, torch.quint8, torch.qint32)
_PER_TENSOR = (torch.per_tensor_affine,)
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_affine_float_qparams)

#: The ``"encoding"`` of a container node that stands for one sparse or quantized tensor.
ENCODINGS = ("sparse_coo", "sparse_compressed", "quantized_per_tensor", "quantized_per_channel")


def _unsupported(t: torch.Tensor) -> str | None:
    if t.is_nested:
        return "nested tensors (torch.nested) are not supported"
    if t.device.type == "meta":
        return "meta tensors have no data"
    if t.layout != torch.strided and str(t.layout) not in _SPARSE_LAYOUTS:
        return f"layout {t.layout} is not supported"
    if t.is_quantized:
        if t.dtype not in _QUANTIZED_DTYPES:
            return f"quantized dtype {t.dtype} is not supported (its integer representation is packed)"
        if t.qscheme() not in _PER_TENSOR + _PER_CHANNEL:
            return f"quantization scheme {t.qscheme()} is not supported"
    if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        return f"tensor subclass {type(t).__name__} is not supported"
    return None


def _encode(x: torch.Tensor) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """``(encoding, descriptive fields, dense parts)`` of a sparse or quantized tensor.

    The parts are the tensor's own representation, unchanged: an uncoalesced COO tensor keeps
    its duplicate indices (coalescing would sum them, which may round), so the rebuilt tensor
    has the same bits, not merely the same value.
    """
    if x.layout == torch.sparse_coo:
        return "sparse_coo", {"layout": str(x.layout), "sparse_dim": x.sparse_dim(), "dense_dim": x.dense_dim(),
                              "coalesced": x.is_coalesced()}, {"indices": x._indices(), "values": x._values()}
    if x.layout in _COMPRESSED:
        compressed, plain = _COMPRESSED[x.layout]
        by_row = x.layout in (torch.sparse_csr, torch.sparse_bsr)
        return "sparse_compressed", {"layout": str(x.layout), "dense_dim": x.dense_dim()}, {
            compressed: x.crow_indices() if by_row else x.ccol_indices(),
            plain: x.col_indices() if by_row else x.row_indices(),
            "values": x.values()}
    if x.qscheme() in _PER_TENSOR:
        return "quantized_per_tensor", {"qscheme": str(x.qscheme())}, {
            "int_repr": x.int_repr(),
            "scale": torch.tensor(x.q_scale(), dtype=torch.float64, device=x.device),
            "zero_point": torch.tensor(x.q_zero_point(), dtype=torch.int64, device=x.device)}
    return "quantized_per_channel", {"qscheme": str(x.qscheme()), "axis": x.q_per_channel_axis()}, {
        "int_repr": x.int_repr(), "scales": x.q_per_channel_scales(), "zero_points": x.q_per_channel_zero_points()}


@dataclass(slots=True)
class _Ctx:
    policy: TensorPolicy
    out: dict[tuple[str, ...], torch.Tensor]
    call: CallKey
    kind: str
    dedup: Deduper | None
    async_copy: bool = False
    known_stats: Callable[[torch.Tensor], dict[str, Any] | None] | None = None
    _prefix: str | None = None
    # the tensor nodes made so far, in the order iter_tensor_nodes yields them; None once that
    # order is no longer known (a tensor node given kwargs)
    nodes: list[tuple[tuple[str, ...], dict[str, Any]]] | None = field(default_factory=list)
    stats_only: bool = False  # no body is stored (policy.store_bodies is false)

    def key(self, path: tuple[str, ...]) -> str:
        """The string key of the tensor at ``path`` (the record's prefix made once, when first needed)."""
        if self._prefix is None:
            self._prefix = str(self.call.tensor(self.kind))
        return self._prefix + "".join("/" + encode_part(p) for p in path)


def _shape_of(t: torch.Tensor) -> list[int] | None:
    """The shape as a list of ints; None when the tensor has none (nested tensors: ragged or no sizes)."""
    try:
        shape = list(t.shape)
    except Exception:  # a strided nested tensor has no sizes
        return None
    return shape if all(isinstance(d, int) for d in shape) else None


def _unsupported_node(t: torch.Tensor, path: tuple[str, ...], reason: str) -> dict[str, Any]:
    """Metadata of a tensor whose body cannot be captured, as far as the tensor can tell it."""
    node: dict[str, Any] = {"type": "tensor", "shape": _shape_of(t), "dtype": None, "numel": None, "device": None,
                            "path": list(path), "stored": False, "reason": reason}
    for field_name, get in (("dtype", lambda: str(t.dtype)), ("numel", t.numel), ("device", lambda: str(t.device))):
        try:
            node[field_name] = get()
        except Exception:  # noqa: S112 - whatever the tensor cannot tell stays null
            continue
    if node["shape"] is None:
        try:
            node["size"] = repr(tuple(t.shape))  # a ragged size as text, e.g. "(2, j1, 3)"
        except Exception:  # noqa: S110 - a strided nested tensor has no size at all
            pass
    if type(t) is not torch.Tensor:
        node["class"] = f"{type(t).__module__}.{type(t).__qualname__}"
    return node


def _tensor_node(t: torch.Tensor, path: tuple[str, ...], ctx: _Ctx) -> dict[str, Any]:
    if type(t) is not torch.Tensor:  # a DTensor: its local shard, with its layout (ilstore.layout)
        from .layout import LAYOUT_KEY, split_dtensor

        split = split_dtensor(t)
        if split is not None:
            node = _tensor_node(split[0], path, ctx)
            if split[1] is not None:
                node[LAYOUT_KEY] = split[1]
            return node
    try:  # the common dense tensor answers the first test; anything else is asked in detail
        plain = type(t) is torch.Tensor and t.layout == _STRIDED and not t.is_quantized and not t.is_nested \
            and not t.is_meta
        reason = None if plain else _unsupported(t)
    except Exception as exc:  # a tensor-like object that cannot even say what it is
        reason = f"cannot be inspected: {type(exc).__name__}: {exc}"
    nodes = ctx.nodes
    if reason is not None:
        node = _unsupported_node(t, path, reason)
        if nodes is not None:
            nodes.append((path, node))
        return node
    made = len(nodes) if nodes is not None else 0
    try:
        if plain and ctx.stats_only:
            return _stats_only_node(t, path, ctx)
        if not plain and (t.layout != _STRIDED or t.is_quantized):
            return _encoded_node(t, path, ctx)
        return _supported_node(t, path, ctx)
    except Exception as exc:  # never stop the capture for one tensor: record why instead
        return _failed_node(t, path, ctx, made, exc)


def _failed_node(t: torch.Tensor, path: tuple[str, ...], ctx: _Ctx, made: int, exc: Exception) -> dict[str, Any]:
    """The node of a tensor whose capture raised ``exc``; ``made``: how many nodes ``ctx`` had before."""
    node = _unsupported_node(t, path, f"cannot be captured: {type(exc).__name__}: {exc}")
    if ctx.nodes is not None:
        del ctx.nodes[made:]  # the parts of an encoded tensor made before the failure
        ctx.nodes.append((path, node))
    return node


def _encoded_node(t: torch.Tensor, path: tuple[str, ...], ctx: _Ctx) -> dict[str, Any]:
    """A sparse or quantized tensor as a container of dense tensor nodes (see :func:`_encode`).

    ``max_tensor_size`` applies to the parts together (what would be written), so either all
    parts are stored or none is. The parts are fresh tensors or aliases that die with the
    record, so they are never de-duplicated: a sparse tensor captured twice is written twice.
    """
    with torch.no_grad():
        encoding, fields, parts = _encode(t.detach())
    node: dict[str, Any] = {"type": "dict", "class": "torch.Tensor", "encoding": encoding, "shape": list(t.shape),
                            "dtype": str(t.dtype), "numel": t.numel(), "device": str(t.device), "path": list(path),
                            **fields}
    limit = ctx.policy.max_numel
    total = sum(p.numel() for p in parts.values())
    over = f"numel {total} of the {encoding} parts > max_tensor_size {limit}" if limit is not None and total > limit \
        else None
    node["items"] = {name: _supported_node(part, path + (name,), ctx, over_limit=over, dedup=False)
                     for name, part in parts.items()}
    return node


def _supported_node(t: torch.Tensor, path: tuple[str, ...], ctx: _Ctx, over_limit: str | None = None,
                    dedup: bool = True) -> dict[str, Any]:
    """A dense tensor's node; its body snapshotted into ``ctx.out`` unless the policy says otherwise.

    ``over_limit``: the reason the tensor is too large to store, decided by the caller (the parts
    of a sparse or quantized tensor are judged together); ``dedup``: whether to look it up and
    remember it in ``ctx.dedup``.
    """
    policy = ctx.policy
    device = str(t.device)
    numel = t.numel()
    node: dict[str, Any] = {
        "type": "tensor",
        "shape": list(t.shape),
        "dtype": _dtype_name(t.dtype),
        "numel": numel,
        "device": device,
        "path": list(path),
    }
    if not policy.logs_device(device):
        node.update(stored=False, reason="device not in device_names")
        if ctx.nodes is not None:
            ctx.nodes.append((path, node))
        return node
    deduper = ctx.dedup if dedup else None
    ident, hit = deduper.find(t) if deduper is not None else (None, None)
    if not policy.store_bodies or over_limit or (policy.max_numel is not None and numel > policy.max_numel):
        reason = "mode=stats" if not policy.store_bodies else \
            over_limit or f"numel {numel} > max_tensor_size {policy.max_numel}"
        # The same unchanged tensor seen earlier in the step: reuse its statistics. Otherwise
        # they are computed now, in the hook, from the live tensor (no copy of it is made):
        # later in-place changes cannot reach values already computed.
        known = ctx.known_stats(t) if hit is None and ctx.known_stats is not None else None
        stats = hit[1] if hit is not None else dict(known) if known else tensor_stats(t)
        node.update(stats=stats, stored=False, reason=reason)
        if hit is None and deduper is not None:
            deduper.add(ident, t, None, stats)
    elif hit is not None and hit[0] is not None:
        node.update(stored=True, same_as=hit[0], stats=hit[1])  # shares the first node's (deferred) stats
    else:
        node["stored"] = True
        known = ctx.known_stats(t) if ctx.known_stats is not None else None
        # filled from the snapshot by finalize_stats, off the hook, unless already known (replay)
        node["stats"] = dict(known) if known else {}
        own = _borrowed(t) if policy.borrow else None
        if own is not None:
            ctx.out[path] = own
        else:
            ctx.out[path], pending = _snapshot(t, policy.pin_memory)
            ctx.async_copy |= pending
        if deduper is not None:
            deduper.add(ident, t, ctx.key(path), node["stats"])
    if ctx.nodes is not None:
        ctx.nodes.append((path, node))
    return node


_STRIDED = torch.strided


_CPU = torch.device("cpu")
#: Bytes per element of the dtypes in _ACC.
_ITEMSIZE = {dtype: torch.empty(0, dtype=dtype).element_size() for dtype in _ACC}


def _cpu_identity(t: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> tuple[Any, ...] | None:
    """:meth:`Deduper._identity` of a CPU tensor of a dtype in ``_ACC``, the same tuple in fewer
    calls into torch: the storage's address is the data pointer less the offset's bytes (no storage
    object is made) and the device is the CPU's. A null data pointer (no elements, or a zero tensor,
    which has no storage) is asked the general way."""
    ptr = t.data_ptr()
    if not ptr:
        return Deduper._identity(t, shape, dtype)
    try:
        version = t._version
    except RuntimeError:  # inference-mode tensors track no version: never de-duplicated
        return None
    offset = t.storage_offset()
    return ptr - offset * _ITEMSIZE[dtype], _CPU, offset, shape, t.stride(), dtype, version


def _stats_only_node(t: torch.Tensor, path: tuple[str, ...], ctx: _Ctx, dtype: torch.dtype | None = None,
                     cpu_float: bool = False) -> dict[str, Any]:
    """:func:`_supported_node` of a plain dense tensor when no body is stored (``mode: "stats"``):
    the same node, with each of the tensor's attributes asked once (each costs a call into torch).
    ``dtype``: ``t.dtype`` when the caller read it; ``cpu_float``: the caller found ``t`` on the
    CPU with a dtype of ``_ACC``."""
    shape = t.shape
    if dtype is None:
        dtype = t.dtype
    is_cpu = cpu_float or t.is_cpu
    device = "cpu" if is_cpu else str(t.device)
    numel = t.numel()
    if not ctx.policy.logs_device(device):
        node = {"type": "tensor", "shape": list(shape), "dtype": _dtype_name(dtype), "numel": numel,
                "device": device, "path": list(path), "stored": False, "reason": "device not in device_names"}
    else:
        deduper = ctx.dedup
        ident = None if deduper is None else _cpu_identity(t, shape, dtype) if cpu_float else \
            Deduper._identity(t, shape, dtype)
        hit = deduper.hit(ident) if ident is not None else None  # type: ignore[union-attr]
        if hit is not None:
            stats = hit[1]
        else:
            # Computed now, in the hook, from the live tensor (no copy of it is made): later
            # in-place changes cannot reach values already computed. A device tensor's are queued
            # on a copy instead and read back at the step's end (ilstore.device_stats).
            known = ctx.known_stats(t) if ctx.known_stats is not None else None
            deferred = ctx.policy.deferred
            if known:
                stats = dict(known)
            elif deferred is not None and (not is_cpu or deferred.cpu) \
                    and (pending := deferred.add(t, numel, dtype)) is not None:
                stats = pending  # filled at the step's end, in one read-back with the step's others
            elif is_cpu and numel and dtype in _ACC and not t.requires_grad:
                # what tensor_stats computes for it; a large tensor shared with the forward's own
                # threads, which wait for the hook (the same bits)
                stats = _cpu_float_stats(t, numel, dtype,
                                         _stats_kernel.sharing_threads() if numel >= _stats_kernel.SHARED_MIN else 1)
            else:
                stats = tensor_stats(t)
            if ident is not None:
                deduper.add(ident, t, None, stats)  # type: ignore[union-attr]
        node = {"type": "tensor", "shape": list(shape), "dtype": _dtype_name(dtype), "numel": numel,
                "device": device, "path": list(path), "stats": stats, "stored": False, "reason": "mode=stats"}
        if not stats and ctx.policy.deferred is not None:  # read back at the step's end (or empty)
            ctx.policy.deferred.attach(stats, node)
    if ctx.nodes is not None:
        ctx.nodes.append((path, node))
    return node


_DTYPE_NAMES: dict[torch.dtype, str] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    """``str(dtype)``, remembered (it is asked for every captured tensor)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype)
    return name


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return _value_node(value)


def _value_node(value: Any, why: BaseException | None = None) -> dict[str, Any]:
    """The ``{"type": "value"}`` node of a value that is recorded as its class and repr only; ``why``:
    why a container was not walked (recorded as ``"reason"``). Never raises."""
    try:
        cls = type(value)
        name = f"{cls.__module__}.{cls.__qualname__}"
    except Exception:  # noqa: BLE001 - a metaclass whose __module__ or __qualname__ raises
        name = "?"
    node: dict[str, Any] = {"type": "value", "class": name, "repr": _repr(value)}
    if why is not None:
        node["reason"] = f"cannot be walked: {_why(why)}"[:200]
    return node


def _why(exc: BaseException) -> str:
    """``"<exception class>: <message>"``, or the class alone when the message cannot be made."""
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:  # noqa: BLE001 - an exception whose str() raises too
        return type(exc).__name__


def _encodable(key: str) -> str:
    """``key``, or, when it holds a lone surrogate (``"k\\ud800"``, which no backend can write: names
    are UTF-8), the same with each such character written as its escape (``"k\\\\ud800"``)."""
    if key.isascii():
        return key
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return key.encode("utf-8", "backslashreplace").decode("utf-8")
    return key


def _item_name(key: str, items: Mapping[str, Any]) -> str:
    """The name of a dict item whose key, made a string, is ``key``, given the names taken so far:
    ``key`` itself (:func:`_encodable`), or, when an earlier key made the same string (``1`` and
    ``"1"``), ``key~2``, ``key~3``... the first not taken, so no tensor is lost and the names depend
    only on the order of the keys (the same spirit as the pt backend's ``fc_1~2`` directories)."""
    key = _encodable(key)
    if key not in items:
        return key
    n = 2
    while f"{key}~{n}" in items:
        n += 1
    return f"{key}~{n}"


def _repr(value: Any) -> str:
    """``repr(value)``, its first 200 characters. A repr that fails (a ``__repr__`` that raises, a
    structure nested too deep to print) is recorded as having failed, with the exception: one odd
    value never stops a capture (SPEC section 8)."""
    try:
        return repr(value)[:200]
    except Exception as exc:  # noqa: BLE001 - whatever a user's __repr__ raises
        return f"<repr failed: {_why(exc)}>"[:200]


def _walk(value: Any, path: tuple[str, ...], ctx: _Ctx, depth: int) -> Any:
    if type(value) is torch.Tensor and ctx.stats_only:  # the common case of mode: "stats", in fewest calls
        try:
            dtype = value.dtype
            # a CPU float tensor is neither quantized (its dtypes are others) nor a meta tensor
            cpu_float = dtype in _ACC and value.is_cpu and value.layout is _STRIDED and not value.is_nested
            plain = cpu_float or (value.layout is _STRIDED and not value.is_quantized and not value.is_nested
                                  and not value.is_meta)
        except Exception:  # noqa: S110 - asked again by _tensor_node, which records the failure
            plain = False
        if plain:
            made = len(ctx.nodes) if ctx.nodes is not None else 0
            try:
                return _stats_only_node(value, path, ctx, dtype, cpu_float)
            except Exception as exc:  # never stop the capture for one tensor: record why instead
                return _failed_node(value, path, ctx, made, exc)
    cls = type(value)
    if value is None or cls is bool or cls is int or cls is str:  # what _plain returns for them, at once
        return value
    if isinstance(value, torch.Tensor):
        return _tensor_node(value, path, ctx)
    if depth >= _MAX_DEPTH:
        return _plain(value)
    if cls is tuple or cls is list:  # the common containers, before the (slower) test against Mapping
        return {"type": "tuple" if cls is tuple else "list",
                "items": [_walk(v, path + (str(i),), ctx, depth + 1) for i, v in enumerate(value)]}
    try:
        members = _members(value, cls)
    except Exception as exc:  # noqa: BLE001 - one odd value never stops a capture (SPEC section 8)
        return _value_node(value, exc)
    if members is None:
        return _plain(value)
    kind, named, is_dataclass = members
    node: dict[str, Any] = {"type": kind}
    if is_dataclass:
        node["class"] = cls.__qualname__
    if kind == "dict":
        items: dict[str, Any] = {}
        renamed: dict[str, str] = {}
        for key, original, v in named:
            name = _item_name(key, items)
            if name != key:
                renamed[name] = _repr(original)
            items[name] = _walk(v, path + (name,), ctx, depth + 1)
        node["items"] = items
        if renamed:
            node["renamed"] = renamed
    else:
        node["items"] = [_walk(v, path + (str(i),), ctx, depth + 1) for i, (_, _, v) in enumerate(named)]
    if cls is not dict and "class" not in node:
        node["class"] = cls.__qualname__
    return node


def _members(value: Any, cls: type) -> tuple[str, list[tuple[str, Any, Any]], bool] | None:
    """What :func:`_walk` needs of a container, all asked before any of its members is walked, so a
    container that fails to tell (a ``__getitem__`` that raises, a dataclass field never set, a key
    whose ``str()`` raises) becomes one value node and leaves no half-made tensor nodes behind.

    Returns:
        ``(kind, [(name, key, member), ...], is_dataclass)``: ``kind`` is ``"dict"`` (a mapping or
        a dataclass), ``"tuple"`` or ``"list"``; ``name`` is the key made a string (``""`` in a
        sequence). None when ``value`` is no container (a plain value).

    Raises:
        Exception: whatever the value raises while it is asked.
    """
    if cls is dict or isinstance(value, Mapping):
        return "dict", [(str(k), k, v) for k, v in value.items()], False
    if isinstance(value, (tuple, list)):  # a subclass (a named tuple...)
        return "tuple" if isinstance(value, tuple) else "list", [("", None, v) for v in value], False
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "dict", [(f.name, f.name, getattr(value, f.name)) for f in dataclasses.fields(value)], True
    return None


def build_record(call: CallKey, kind: str, value: Any, policy: TensorPolicy,
                 kwargs: Mapping[str, Any] | None = None, dedup: Deduper | None = None,
                 known_stats: Callable[[torch.Tensor], dict[str, Any] | None] | None = None) -> Record:
    """Describe ``value`` as a JSON tree and snapshot the tensors whose bodies are stored.

    For inputs, ``value`` is the positional-argument tuple and ``kwargs`` the keyword
    arguments: keyword tensors get the keyword name as their path and the tree carries a
    ``"kwargs"`` dict beside the positional ``"items"``. Statistics of stored tensors are left
    empty here and filled by :func:`finalize_stats` (on the writer thread when writes are
    asynchronous); statistics of tensors whose body is not stored are computed now.
    ``known_stats`` may supply the statistics of a tensor whose exact bits were read from a run
    that already computed them (replay), so they are not computed twice.
    """
    ctx = _Ctx(policy, {}, call, kind, dedup, known_stats=known_stats, stats_only=not policy.store_bodies)
    structure = _walk(value, (), ctx, 0)
    if kwargs is not None:
        # iter_tensor_nodes does not look into a tensor node's kwargs
        if isinstance(structure, dict) and structure.get("type") == "tensor":
            ctx.nodes = None
        names = kwarg_names(kwargs, len(value) if isinstance(value, (tuple, list)) else 0)
        if names is None:
            structure["kwargs"] = {k: _walk(v, (k,), ctx, 1) for k, v in kwargs.items()}
        else:  # a keyword named as a positional index ("0"), or holding a lone surrogate
            structure["kwargs"] = {name: _walk(v, (name,), ctx, 1)
                                   for name, v in zip(names, kwargs.values(), strict=True)}
            renamed = {name: _repr(k) for name, k in zip(names, kwargs, strict=True) if name != k}
            if renamed:
                structure["renamed"] = renamed
    ready = None
    if ctx.async_copy:
        ready = torch.cuda.Event()
        ready.record()
    return _new_record(call, kind, structure, ctx.out, ready, ctx.nodes)


def kwarg_names(kwargs: Collection[str], positional: int) -> list[str] | None:
    """The names keyword arguments are recorded under, in order, or None when each keeps its own
    (the common case: ASCII names that are not digits). A keyword whose name a positional
    argument's path already is (``**{"0": x}`` beside a first positional argument) or that holds a
    lone surrogate is named as a dict's item would be (``0~2``, the surrogate escaped; listed in the
    structure's ``"renamed"``). Replay names them the same way."""
    if all(k.isascii() and not k.isdigit() for k in kwargs):
        return None
    taken: dict[str, None] = dict.fromkeys(str(i) for i in range(positional))
    names = []
    for key in kwargs:
        name = _item_name(key, taken)
        taken[name] = None
        names.append(name)
    return names


_new_object = object.__new__


def _new_record(call: CallKey, kind: str, structure: Any, tensors: Mapping[tuple[str, ...], torch.Tensor], ready: Any,
                nodes: list[tuple[tuple[str, ...], dict[str, Any]]] | None) -> Record:
    """``Record(call, kind, structure, tensors, ready, nodes)`` without the frozen dataclass's
    ``__init__`` (one ``object.__setattr__`` per field: a capture makes a record per captured side)."""
    record = _new_object(Record)
    record.__dict__.update(call=call, kind=kind, structure=structure, tensors=tensors, ready=ready, nodes=nodes)
    return record


def iter_tensor_nodes(structure: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    """Yield ``(path, node)`` for each tensor node of a structure, in a stable order.

    Paths are derived from the position in the tree (positional index, dict key, keyword
    name), so trees written without ``"path"`` (the earlier vLLM dumps) work too.
    """
    if not isinstance(structure, dict):
        return
    kind = structure.get("type")
    if kind == "tensor":
        yield path, structure
        return
    items = structure.get("items")
    if kind in ("tuple", "list") and isinstance(items, list):
        for i, item in enumerate(items):
            yield from iter_tensor_nodes(item, path + (str(i),))
    elif kind == "dict" and isinstance(items, dict):
        for k, item in items.items():
            yield from iter_tensor_nodes(item, path + (str(k),))
    kwargs = structure.get("kwargs")
    if isinstance(kwargs, dict):
        for k, item in kwargs.items():
            yield from iter_tensor_nodes(item, path + (str(k),))


_MISSING = object()


def node_at(structure: Any, path: tuple[str, ...]) -> Any:
    """The node of ``structure`` at ``path``, with paths as :func:`iter_tensor_nodes` derives them.

    Raises:
        KeyError: nothing is at ``path``.

    Example:
        >>> tree = {"type": "tuple", "items": [{"type": "tensor"}], "kwargs": {"mask": None}}
        >>> node_at(tree, ("0",)), node_at(tree, ("mask",))
        ({'type': 'tensor'}, None)
    """
    node = structure
    for part in path:
        found: Any = _MISSING
        if isinstance(node, dict):
            items = node.get("items")
            if node.get("type") in ("tuple", "list") and isinstance(items, list) and part.isdigit() \
                    and str(int(part)) == part and int(part) < len(items):
                found = items[int(part)]
            elif node.get("type") == "dict" and isinstance(items, dict):
                found = items.get(part, _MISSING)
            kwargs = node.get("kwargs")
            if found is _MISSING and isinstance(kwargs, dict):
                found = kwargs.get(part, _MISSING)
        if found is _MISSING:
            raise KeyError(f"no node at path {'/'.join(path) or '(top)'}")
        node = found
    return node


def rebuild_tensor(node: Any, load: Callable[[tuple[str, ...]], torch.Tensor],
                   path: tuple[str, ...] = (), *, name: str | None = None) -> torch.Tensor:
    """The tensor a structure node describes: a stored tensor, or a sparse or quantized one rebuilt from its parts.

    Args:
        node: a ``"tensor"`` node, or a container node with an ``"encoding"`` (:data:`ENCODINGS`).
        load: loads the dense tensor at a path (e.g. ``lambda p: reader.load(call.tensor(kind, p))``).
        path: the path of ``node``; its parts are at ``path + (part name,)``.
        name: how error messages name the tensor (default: its path).

    Returns:
        The tensor on the CPU, bit-exact: a sparse tensor with the same indices, values and
        coalesced flag; a quantized one with the same integer representation, scales and zero points.

    Raises:
        KeyError: a body was not stored (from ``load``).
        StoreError: ``node`` is no tensor, or its parts do not make the tensor it describes.

    Example:
        >>> t = torch.tensor([[0.0, 2.0], [0.0, 0.0]]).to_sparse()
        >>> record = build_record(CallKey(0, 0, "m", 0), "outputs", t, TensorPolicy(pin_memory=False))
        >>> torch.equal(rebuild_tensor(record.structure, record.tensors.__getitem__).to_dense(), t.to_dense())
        True
    """
    where = name or "/".join(path) or "(top)"
    if not isinstance(node, dict):
        raise StoreError(f"{where}: not a tensor but {type(node).__name__} {node!r:.60}")
    if node.get("type") == "tensor":
        return load(path)
    encoding = node.get("encoding")
    items = node.get("items")
    if node.get("type") != "dict" or encoding not in ENCODINGS or not isinstance(items, dict):
        raise StoreError(f"{where}: not a tensor but a {node.get('type')!r} node")

    def part(part_name: str) -> torch.Tensor:
        if part_name not in items:
            raise StoreError(f"{where}: the {encoding} tensor has no {part_name!r} part")
        return load(path + (part_name,))

    shape, dtype = node.get("shape"), node.get("dtype")
    try:
        if encoding == "sparse_coo":
            out = torch.sparse_coo_tensor(part("indices"), part("values"), shape, check_invariants=True,
                                          is_coalesced=bool(node.get("coalesced")))
        elif encoding == "sparse_compressed":
            layout = _SPARSE_LAYOUTS.get(str(node.get("layout")))
            if layout not in _COMPRESSED:
                raise StoreError(f"{where}: unknown compressed sparse layout {node.get('layout')!r}")
            compressed, plain = _COMPRESSED[layout]
            out = torch.sparse_compressed_tensor(part(compressed), part(plain), part("values"), shape, layout=layout,
                                                 check_invariants=True)
        elif encoding == "quantized_per_tensor":
            scale, zero_point = part("scale"), part("zero_point")
            out = torch._make_per_tensor_quantized_tensor(part("int_repr"), float(scale), int(zero_point))
        else:
            out = torch._make_per_channel_quantized_tensor(part("int_repr"), part("scales"), part("zero_points"),
                                                           int(node.get("axis", 0)))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise StoreError(f"{where}: the parts of the {encoding} tensor do not make one: {exc}") from None
    qscheme = node.get("qscheme")
    if (list(out.shape) != shape or str(out.dtype) != dtype
            or qscheme is not None and str(out.qscheme()) != qscheme):
        got = f"{out.dtype} {list(out.shape)}" + (f" {out.qscheme()}" if out.is_quantized else "")
        raise StoreError(f"{where}: the parts make a {got} tensor but the metadata says {dtype} {shape}"
                         + (f" {qscheme}" if qscheme else ""))
    return out


class _Reader(Protocol):
    def structure(self, call: CallKey, kind: str) -> Any: ...

    def load(self, key: TensorKey) -> torch.Tensor: ...


def load_tensor(reader: _Reader, key: TensorKey) -> torch.Tensor:
    """Load the tensor at ``key`` from a run: a stored tensor as ``reader.load`` gives it, a
    sparse or quantized one rebuilt from its parts (:func:`rebuild_tensor`).

    ``key`` names the tensor as it was captured (``outputs/0``); the parts of a sparse or
    quantized tensor have keys of their own below it (``outputs/0/values``) that
    ``reader.keys()`` lists and ``reader.load`` loads.

    Raises:
        KeyError: the call, side or path does not exist, or a body was not stored.
        StoreError: what :func:`rebuild_tensor` and ``reader.load`` raise.

    Example:
        >>> with ilstore.open_run(run_dir) as reader:  # doctest: +SKIP
        ...     weight = load_tensor(reader, TensorKey(0, "fc", 0, "inputs", ("0",)))
    """
    call = key.call_key
    structure = reader.structure(call, key.kind)
    if structure is None:
        raise KeyError(f"{key}: no {key.kind} were captured for this call")
    try:
        node = node_at(structure, key.path)
    except KeyError:
        raise KeyError(f"no tensor {key}") from None
    return rebuild_tensor(node, lambda p: reader.load(call.tensor(key.kind, p)), key.path, name=str(key))
