"""Statistics of device tensors in ``mode: "stats"``, read back once per step.

Computing a CUDA tensor's statistics in the hook and reading them back there
(:func:`ilstore.records.tensor_stats`) makes the model's thread wait for the GPU once per
captured tensor: whatever the GPU still had queued must finish first, and the CPU can no longer
launch ahead of it. :class:`DeferredStats` keeps the same reductions on the device and reads them
back together, once per step:

* in the hook, the tensor is copied into a device buffer kept by the capture (one
  device-to-device copy; the *stash*), and the reductions of :func:`~ilstore.records.tensor_stats`
  are queued on that copy (:func:`~ilstore.records.device_float_sums`,
  :func:`~ilstore.records.int_extremes`); nothing waits for the device;
* at the step's end (:meth:`DeferredStats.resolve`) the small result vectors of every tensor of the
  step are concatenated and copied to the host: one synchronisation per device. Each node's
  statistics are then finished on the host exactly as the per-tensor path finishes them. The few
  tensors whose sums do not suffice (NaN/Inf, a mean that dominates the spread) are read again
  from their stashed copy, so their second pass sees the bytes the hook saw, whatever the model
  did to the tensor afterwards (in-place ops, a freed and reused buffer).

The statistics are therefore bit-identical to the per-tensor path's (the same reductions on the
same elements in the same order). The stash is bounded (:data:`MAX_STASH_BYTES`, environment
``ILSTORE_DEVICE_STATS_BYTES``; ``0`` turns this off): a step whose tensors do not fit reads back
early, once per filling of the stash, and a tensor larger than the bound is read back alone, in
the hook. The stash starts small and doubles when a step fills it, up to the bound and to a
quarter of the device's free memory; the device memory it holds is released with the capture.
Each copy starts at the same address modulo 256 bytes as the tensor (a device's vectorised
reductions split their work by alignment). A read-back that fails (a device error, Ctrl-C while
waiting) leaves its tensors pending and their copies kept, so no statistics are half-filled.
Tensors other than float16/bfloat16/float32/float64, integer and bool ones (complex, float8) keep
the per-tensor path.

Records whose statistics are pending are held by the capture until they are resolved and handed
to the writer in order (:meth:`ilstore.capture.Capture._write`): a writer never sees an unfinished
node.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError
from .records import (
    _ACC,
    device_float_sums,
    device_second_pass,
    finish_device_float_stats,
    finish_int_stats,
    int_extremes,
)

__all__ = ["DeferredStats", "MAX_STASH_BYTES", "stash_limit", "count_cuda_syncs"]

#: The default bound of a capture's stash, per device, in bytes.
MAX_STASH_BYTES = 256 * 2**20
#: The stash's first size (it doubles when a step needs more, up to the bound).
_FIRST_STASH_BYTES = 4 * 2**20
#: Offsets in the stash are multiples of this (any dtype can view its slice; CUDA's own alignment).
_ALIGN = 256
#: Device types whose tensors take this path (tests add "cpu": :attr:`DeferredStats.device_types`).
DEVICE_TYPES = frozenset({"cuda"})


def stash_limit() -> int:
    """The stash's bound from ``ILSTORE_DEVICE_STATS_BYTES`` (bytes; ``0``: statistics of device
    tensors are read back per tensor, in the hook), else :data:`MAX_STASH_BYTES`.

    Raises:
        ConfigError: the variable holds no whole number >= 0.
    """
    value = os.environ.get("ILSTORE_DEVICE_STATS_BYTES", "").strip()
    if not value:
        return MAX_STASH_BYTES
    try:
        limit = int(value)
    except ValueError:
        limit = -1
    if limit < 0:
        raise ConfigError([f"environment ILSTORE_DEVICE_STATS_BYTES={value!r}: expected a whole number of bytes "
                          ">= 0 (the bound of the device buffer of mode \"stats\"; 0 reads each device tensor's "
                          "statistics back in its hook)"])
    return limit


@dataclass
class _Pending:
    stats: dict[str, Any]  # the node's statistics, filled by resolve (shared with de-duplicated nodes)
    sums: torch.Tensor  # the reductions, not read back
    kind: str  # "float" or an int_extremes kind
    copy: torch.Tensor | None  # the stashed 1-D copy (floats), read again where the sums do not suffice
    n: int
    acc: torch.dtype | None
    # the nodes whose statistics these are (the tensor's, and de-duplicated repeats of it): a tensor
    # whose statistics cannot be finished is recorded in them as not captured, as in the hook
    nodes: list[dict[str, Any]] = field(default_factory=list)


def _start(dev: _Device, residue: int) -> int | None:
    """The first offset past what ``dev``'s stash holds where an address is ``residue`` modulo
    :data:`_ALIGN`; None without a stash."""
    if dev.stash is None:
        return None
    return dev.used + (residue - dev.stash.data_ptr() - dev.used) % _ALIGN


class _Device:
    """One device's stash and the tensors pending on it."""

    def __init__(self) -> None:
        self.stash: torch.Tensor | None = None
        self.used = 0  # bytes of the stash taken since the last read-back
        self.pending: list[_Pending] = []
        self.streams: dict[Any, Any] = {}  # the CUDA streams the reductions were queued on
        self.failed: BaseException | None = None  # a stash could not be allocated: per-tensor from then on


class DeferredStats:
    """Statistics of device tensors computed in the hook, read back once per step (module docstring).

    Args:
        limit: the stash's bound per device, in bytes (:func:`stash_limit`).
        device_types: the device types whose tensors take this path (default :data:`DEVICE_TYPES`).
    """

    def __init__(self, limit: int | None = None, device_types: frozenset[str] | None = None) -> None:
        self.limit = stash_limit() if limit is None else max(0, int(limit))
        self.device_types = DEVICE_TYPES if device_types is None else device_types
        self.cpu = "cpu" in self.device_types  # whether CPU tensors take this path too (tests)
        self._devices: dict[torch.device, _Device] = {}
        self.unresolved = 0  # tensors whose statistics are not read back yet
        self.reads = 0  # read-backs made: one per device per resolve (tests, benchmarks)
        self.resolves = 0  # resolve() calls that read something back: records held before one are complete
        self.early_reads = 0  # resolves made because a stash was full
        self.second_reads = 0  # read-backs of second passes (tensors whose mean dominates), at most one per read
        self._by_stats: dict[int, _Pending] = {}  # id of a pending statistics dict -> its entry
        # add() and resolve() of two threads (a model called from two threads) must not reuse a stash
        # that a read-back still reads
        self._lock = threading.RLock()

    def add(self, t: torch.Tensor, n: int, dtype: torch.dtype) -> dict[str, Any] | None:
        """Queue the statistics of ``t`` (``n`` elements, dtype ``dtype``, a dense strided tensor)
        and return its node's statistics dict, empty until :meth:`resolve` fills it; or None when
        ``t`` does not take this path (its statistics are then computed in the hook as before)."""
        if not n or self.limit <= 0 or t.device.type not in self.device_types:
            return None
        acc = _ACC.get(dtype)
        if acc is None and (dtype.is_floating_point or dtype.is_complex):
            return None  # float8 and complex: the per-tensor path
        with self._lock, torch.no_grad():
            if acc is None:  # integer or bool: two extremes, nothing to read again
                sums, kind = int_extremes(t.detach())
                return self._queue(t.device, _Pending({}, sums.view(torch.float64), kind, None, n, None))
            nbytes = n * t.element_size()
            if nbytes + _ALIGN > self.limit:
                return None  # read back alone, in the hook
            # The copy starts where the tensor does within _ALIGN bytes (a fresh contiguous copy, as
            # the per-tensor path reduces a strided tensor through, starts aligned): a device's
            # vectorised reductions split their work by the address's alignment, and the sums must
            # be the ones the per-tensor path gets.
            residue = t.data_ptr() % _ALIGN if t.is_contiguous() else 0
            if residue % t.element_size():
                return None  # (storage not aligned to its elements: the stash cannot view such a copy)
            dev = self._device(t.device)
            if dev.failed is not None:
                return None
            start = _start(dev, residue)
            if start is None or start + nbytes > dev.stash.numel():  # type: ignore[union-attr]
                size = dev.stash.numel() if dev.stash is not None else 0
                if dev.used:  # copies pending in the stash: read back everything first (the stash is reused)
                    self.early_reads += 1
                    try:
                        self.resolve()
                    except Exception:  # noqa: BLE001 - kept pending (read back later); this tensor in its hook
                        return None
                    # a step that fills the stash gets a larger one (a step's tensors, read back once)
                    size *= 2
                if not self._grow(t.device, dev, nbytes + _ALIGN, size):  # room for any start
                    return None
                start = _start(dev, residue)
                assert start is not None
            assert dev.stash is not None
            copy = dev.stash[start:start + nbytes].view(dtype)
            copy.view(t.shape).copy_(t.detach())
            stats = self._queue(t.device, _Pending({}, device_float_sums(copy, n, acc), "float", copy, n, acc))
            dev.used = start + nbytes
            return stats

    def attach(self, stats: dict[str, Any], node: dict[str, Any]) -> None:
        """Say that ``node`` carries ``stats`` (a dict :meth:`add` returned, for the tensor or a
        de-duplicated repeat of it): if its statistics cannot be finished, the node is recorded as
        not captured. Nothing for statistics that are not pending."""
        pending = self._by_stats.get(id(stats))
        if pending is not None and pending.stats is stats:
            pending.nodes.append(node)

    def _device(self, device: torch.device) -> _Device:
        dev = self._devices.get(device)
        if dev is None:
            dev = self._devices[device] = _Device()
        return dev

    def _grow(self, device: torch.device, dev: _Device, need: int, wish: int) -> bool:
        """Make the (empty) stash hold at least ``need`` bytes, ``wish`` if it can: doubled from
        :data:`_FIRST_STASH_BYTES` up to that, within the bound and, on CUDA, a quarter of the
        device's free memory. False when the stash cannot be that large (this tensor is read back
        in its hook); a failed allocation turns the stash off for the device."""
        size = dev.stash.numel() if dev.stash is not None else 0
        wish = min(max(wish, need), self.limit)
        if size >= wish:
            return True
        want = max(_FIRST_STASH_BYTES, size)
        while want < wish:
            want *= 2
        want = min(want, self.limit)
        free = self._free_bytes(device)
        if free is not None:  # never take memory the model may need
            want = min(want, (free + size) // 4)
        if want < need or want <= size:
            return size >= need
        dev.stash = None  # the old one is released first (its pending tensors were read back)
        try:
            dev.stash = self._allocate(want, device)
        except RuntimeError as exc:  # out of memory: never fail the model for a buffer of ours
            dev.failed = exc
            return False
        return True

    @staticmethod
    def _free_bytes(device: torch.device) -> int | None:
        """The device's free memory (CUDA), else None."""
        return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None

    @staticmethod
    def _allocate(size: int, device: torch.device) -> torch.Tensor:
        return torch.empty(size, dtype=torch.uint8, device=device)

    def _queue(self, device: torch.device, pending: _Pending) -> dict[str, Any]:
        dev = self._device(device)
        dev.pending.append(pending)
        self._by_stats[id(pending.stats)] = pending
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device)
            dev.streams[stream] = None
        self.unresolved += 1
        return pending.stats

    def resolve(self) -> None:
        """Read back every pending tensor's statistics (one synchronisation per device) and fill
        their dicts. On a failure (a device error, Ctrl-C while waiting for the device) what was
        not read back stays pending, its stash kept: a later call reads it back (or fails again)."""
        with self._lock:
            if not self.unresolved:
                return
            for device, dev in self._devices.items():
                if dev.pending:
                    self._resolve(device, dev)
            self.resolves += 1

    def discard(self) -> None:
        """Forget what is pending (the records waiting for it are dropped with it)."""
        with self._lock:
            for dev in self._devices.values():
                dev.pending, dev.streams, dev.used = [], {}, 0
            self.unresolved = 0
            self._by_stats.clear()

    def _resolve(self, device: torch.device, dev: _Device) -> None:
        self._read_back(device, dev.pending, dev.streams)
        self.unresolved -= len(dev.pending)
        for p in dev.pending:
            self._by_stats.pop(id(p.stats), None)
        dev.pending, dev.streams, dev.used = [], {}, 0

    def _read_back(self, device: torch.device, pending: list[_Pending], streams: dict[Any, Any]) -> None:
        with torch.no_grad():
            if device.type == "cuda":
                current = torch.cuda.current_stream(device)
                for stream in streams:  # reductions queued on another stream: this one waits for them (no sync)
                    if stream != current:
                        current.wait_stream(stream)
            # one copy to the host: float sums widen exactly to float64, the int64 extremes travel as their bits
            host = torch.cat([p.sums for p in pending]).cpu().numpy()
            self.reads += 1
            floats: list[tuple[_Pending, list[float]]] = []
            at = 0
            for p in pending:
                if p.kind == "float":
                    floats.append((p, host[at:at + 4].tolist()))
                    at += 4
                else:
                    lo, hi = host[at:at + 2].view("int64").tolist()
                    p.stats.update(finish_int_stats(lo, hi, p.kind))
                    at += 2
            # the second passes (a mean that dominates) queued together, read back with a second copy
            seconds: list[tuple[_Pending, list[float], torch.Tensor | None]] = []
            for p, values in floats:
                try:
                    seconds.append((p, values, device_second_pass(p.copy, p.n, p.acc, values)))  # type: ignore[arg-type]
                except Exception as exc:  # noqa: BLE001 - this tensor only (say, no memory for its temporaries)
                    _not_captured(p, exc)
            wanted = [s for _, _, s in seconds if s is not None]
            second_values = iter(torch.stack(wanted).cpu().tolist() if wanted else [])
            if wanted:
                self.second_reads += 1
            for p, values, s in seconds:
                assert p.copy is not None and p.acc is not None
                second = next(second_values) if s is not None else None
                try:
                    p.stats.update(finish_device_float_stats(p.copy, p.n, p.acc, values, second))
                except Exception as exc:  # noqa: BLE001 - this tensor only, as the hook would have
                    _not_captured(p, exc)

    def release(self) -> None:
        """Drop the stashes and whatever is still pending (the capture ends)."""
        with self._lock:
            self.discard()
            for dev in self._devices.values():
                dev.stash = None


def _not_captured(pending: _Pending, exc: Exception) -> None:
    """A tensor whose statistics could not be finished: its nodes say so, as a tensor whose
    capture raised in the hook does (``records._failed_node``)."""
    for node in pending.nodes:
        node.pop("stats", None)
        node.update(stored=False, reason=f"cannot be captured: {type(exc).__name__}: {exc}"[:300])


def count_cuda_syncs(fn: Callable[[], Any]) -> int:
    """How many synchronising CUDA operations ``fn()`` makes (those torch reports under
    ``torch.cuda.set_sync_debug_mode("warn")``: a read-back, a blocking copy, an explicit
    synchronize). For checks and benchmarks on a GPU; pending work is finished first."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)
