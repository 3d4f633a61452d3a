"""Shared helpers of bench_compare.py and bench_convert.py (not a benchmark itself).

* :func:`workload`: a deterministic list of float32 tensor shapes of mixed sizes adding up to
  about ``--size-mb`` (largest 64 MiB, or smaller for small runs), shuffled so that large and
  small tensors alternate as in a real forward.
* :func:`write_run`: writes one run through ``ilstore.capture`` (one module per tensor,
  outputs only, synchronous writes), in any backend; variant ``"b"`` differs slightly.
* :class:`PeakRss`: peak RSS growth from the kernel's high-water mark (no thread).
* :class:`RssSampler`: peak RSS growth sampled from ``/proc/self/statm`` every 2 ms, both the
  whole resident set and its anonymous part (resident minus file-backed/shared pages; the
  difference is mostly memory-mapped file pages, e.g. safetensors shards, which the kernel can
  drop at any time).
* :func:`drop_page_cache`: ``fsync`` + ``posix_fadvise(DONTNEED)`` on files (cold reads).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

MiB = 1 << 20
KiB = 1 << 10

#: (bytes per tensor, share of the run's bytes). A class larger than a sixth of the run is
#: folded into the next smaller one, so small runs still hold several tensors.
SIZE_CLASSES: tuple[tuple[int, float], ...] = (
    (64 * MiB, 0.40), (16 * MiB, 0.26), (4 * MiB, 0.13), (1 * MiB, 0.13), (256 * KiB, 0.075), (16 * KiB, 0.004),
    (1 * KiB, 0.0001),
)
SEED = 1234
#: One element in PERTURB_EVERY of run "b" is scaled by 1 + PERTURB (a mismatch at rtol 1e-5).
PERTURB_EVERY = 1009
PERTURB = 1e-4


def workload(size_mb: float) -> list[tuple[int, ...]]:
    """Shapes (float32) whose bytes add up to about ``size_mb`` MB (10^6 bytes)."""
    total = size_mb * 1e6
    carry = 0.0
    shapes: list[tuple[int, ...]] = []
    for nbytes, share in SIZE_CLASSES:
        if nbytes > total / 6 and nbytes > SIZE_CLASSES[-1][0]:
            carry += share
            continue
        count = max(1, round((share + carry) * total / nbytes))
        carry = 0.0
        numel = nbytes // 4
        shape = (numel // 1024, 1024) if numel >= 4096 else (numel,)
        shapes.extend([shape] * count)
    random.Random(SEED).shuffle(shapes)
    return shapes


def nbytes_of(shapes: Iterable[tuple[int, ...]]) -> int:
    return sum(math.prod(s) * 4 for s in shapes)


def make_tensor(i: int, shape: tuple[int, ...], variant: str) -> torch.Tensor:
    """Tensor ``i`` of run ``variant`` ("a" or "b"): the same values, b with a few perturbed."""
    gen = torch.Generator().manual_seed(SEED + i)
    t = torch.randn(shape, generator=gen)
    if variant == "b":
        flat = t.view(-1)
        flat[i % PERTURB_EVERY::PERTURB_EVERY] *= 1 + PERTURB
    return t


class _Emitter(torch.nn.Module):
    """Root module: child ``i`` returns tensor ``i`` of the workload (no inputs)."""

    def __init__(self, shapes: list[tuple[int, ...]], variant: str) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_One(i, s, variant) for i, s in enumerate(shapes))

    def forward(self) -> None:
        for layer in self.layers:
            layer()


class _One(torch.nn.Module):
    def __init__(self, i: int, shape: tuple[int, ...], variant: str) -> None:
        super().__init__()
        self.i, self.shape, self.variant = i, shape, variant

    def forward(self) -> torch.Tensor:
        return make_tensor(self.i, self.shape, self.variant)


def write_run(parent: Path, run_id: str, backend: str, shapes: list[tuple[int, ...]], variant: str) -> Path:
    """One step, one module call per tensor, outputs only, written by ``ilstore.capture``."""
    import ilstore

    model = _Emitter(shapes, variant)
    cfg = {"output_dir": str(parent), "run_id": run_id, "backend": backend, "log_inputs": False,
           "async_writes": False, "dedup": False, "on_error": "raise"}
    with ilstore.capture(model, cfg) as cap:
        with torch.no_grad():
            model()
    assert cap.run_dir is not None and cap.error is None
    return cap.run_dir


def write_raw(out: Path, shapes: list[tuple[int, ...]], variant: str) -> list[Path]:
    """The same tensors as raw float32 files, one per tensor (the floor's input)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, shape in enumerate(shapes):
        path = out / f"{i:05d}.bin"
        make_tensor(i, shape, variant).numpy().tofile(path)
        paths.append(path)
    return paths


def files_under(path: Path) -> list[Path]:
    return sorted(Path(dp) / f for dp, _dn, fs in os.walk(path) for f in fs)


def dir_size(path: Path) -> tuple[int, int]:
    """(bytes on disk counting each inode once — hard links are de-duplicated tensors, files).

    ``os.scandir`` entries, not sorted ``Path`` objects: a 100,000-step pt tensors run holds
    ~6.5 M names, which :func:`files_under` and a ``Path.stat`` each took over 10 minutes to add up."""
    sizes: dict[tuple[int, int], int] = {}
    files = 0
    pending = [os.fspath(path)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    sizes[(st.st_dev, st.st_ino)] = st.st_size
                    files += 1
    return sum(sizes.values()), files


def read_all(paths: Iterable[Path]) -> None:
    """Read files once (warms the page cache)."""
    buf = bytearray(16 * MiB)
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def drop_page_cache(paths: Iterable[Path]) -> None:
    """Write back and evict the files' pages, so the next read comes from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> tuple[int, int]:
    """(resident bytes, anonymous resident bytes = resident - file-backed/shared)."""
    with open("/proc/self/statm") as fh:
        fields = fh.read().split()
    resident, shared = int(fields[1]) * _PAGE, int(fields[2]) * _PAGE
    return resident, resident - shared


class RssSampler:
    """Peak RSS (and anonymous RSS) growth over the value at entry, sampled every 2 ms."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.base = self.peak = self.base_anon = self.peak_anon = 0
        self._stop = threading.Event()

    def __enter__(self) -> RssSampler:
        self.base, self.base_anon = rss()
        self.peak, self.peak_anon = self.base, self.base_anon
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _sample(self) -> None:
        r, a = rss()
        self.peak, self.peak_anon = max(self.peak, r), max(self.peak_anon, a)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self._sample()

    @property
    def growth(self) -> int:
        return self.peak - self.base

    @property
    def growth_anon(self) -> int:
        return self.peak_anon - self.base_anon


class PeakRss:
    """Peak RSS growth over the value at entry, without a sampling thread: Linux's high-water
    mark (``VmHWM``) is reset on entry (``/proc/self/clear_refs``, Linux 4.0+) and read on exit.
    A sampling thread wakes every few ms and takes the GIL, which slowed the timed forward by
    up to 10 % (measured on 2 cores); the kernel's mark also misses no short peak. Falls back
    to :class:`RssSampler` where the mark cannot be reset."""

    def __enter__(self) -> PeakRss:
        self._sampler: RssSampler | None = None
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            self._sampler = RssSampler().__enter__()
            return self
        self.base = rss()[0]
        self.peak = self.base
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sampler is not None:
            self._sampler.__exit__(*exc)
            return
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    self.peak = max(self.base, int(line.split()[1]) * 1024)
                    break

    @property
    def growth(self) -> int:
        return self._sampler.growth if self._sampler is not None else self.peak - self.base


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``), so
    that a row's RSS growth is not hidden by memory an earlier row freed but the heap kept."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def memory_note(where: str | Path | None) -> str | None:
    """A warning when the machine's memory state would distort the figures, else None: a tmpfs at
    ``where`` already holding more than a GB (its pages are memory, and on this project's VMs a
    row that needs fresh memory then pays for it: in one session 9 GB left in ``/dev/shm`` took
    the pt replay row from 1.35 to 1.75-2.6 x the capture), or less than 4 GB of memory available."""
    notes = []
    target = Path(where) if where else Path(tempfile.gettempdir())
    try:
        usage = shutil.disk_usage(target)
        with open("/proc/mounts") as fh:
            mounts = [line.split() for line in fh]
        resolved = str(target.resolve())
        under = [m for m in mounts if len(m) > 2 and (resolved == m[1] or resolved.startswith(m[1].rstrip("/") + "/"))]
        mount = max(under, key=lambda m: len(m[1]), default=None)
        if mount is not None and mount[2] == "tmpfs" and usage.used > 1e9:
            notes.append(f"{mount[1]} (tmpfs) already holds {usage.used / 1e9:.1f} GB: empty it for figures that "
                         "compare")
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            available = next((int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:")), None)
        if available is not None and available < 4e9:
            notes.append(f"only {available / 1e9:.1f} GB of memory available")
    except OSError:
        pass
    return "warning: " + "; ".join(notes) if notes else None


def _cpu_jiffies() -> tuple[int, int] | None:
    """(steal, all) of the CPUs' time since boot, in clock ticks (``/proc/stat``'s ``cpu`` line:
    user, nice, system, idle, iowait, irq, softirq, steal), or None where there is none."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (fields[7], sum(fields)) if len(fields) == 8 else None


class Steal:
    """The share of the CPUs' time the VM's host took from this machine (steal time) while the
    ``with`` blocks ran, added up over every block: on a VM a vCPU the host runs something else
    on stops in the middle of whatever it does, in time that is neither the process's CPU time
    nor a wait for a core (this project's VM: 2.1 s of steal during a ~30 s capture benchmark on
    two CPUs, whose single writes took 8-58 ms longer than their CPU time and their waits for a
    core). A figure taken while it is more than a few percent is the host's as much as the code's.
    NaN where not known."""

    def __init__(self) -> None:
        self.steal = self.all = 0
        self._start: tuple[int, int] | None = None

    def __enter__(self) -> Steal:
        self._start = _cpu_jiffies()
        return self

    def __exit__(self, *exc: object) -> None:
        end = _cpu_jiffies()
        if self._start is not None and end is not None:
            self.steal += end[0] - self._start[0]
            self.all += end[1] - self._start[1]

    @property
    def percent(self) -> float:
        return 100.0 * self.steal / self.all if self.all else math.nan


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "?"


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, RssSampler, Any]:
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        t1 = time.perf_counter()
    return t1 - t0, sampler, out
