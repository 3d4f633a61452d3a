"""Small C kernels compiled at first use and loaded through ctypes (shared by ilstore and ilstore-compare).

A :class:`NativeLibrary` is one C99 source. :meth:`~NativeLibrary.load` compiles it once per
machine with the system's C compiler (``$CC``, else ``cc``, else ``gcc``) into
``$ILSTORE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/ilstore``, else ``~/.cache/ilstore``) and
loads it (about a millisecond once compiled). The file's name carries the library's name, its
version and a hash of the source, the compiler, the flags and the CPU's features (``-march=native``
makes the file specific to the kind of CPU; a cache directory shared by several machines keeps
one file per kind), so a changed kernel is never confused with an older file. The file is
written under a temporary name and renamed into place: processes building the same file at the
same time are harmless.

Without a compiler, when compiling or loading fails, or when the library's switch variable is
``0``, :meth:`~NativeLibrary.load` returns None, decided once per process (logged at INFO when
switched off, as a WARNING when the compiler is missing or the build fails), and the caller uses
its fallback. Loading is thread-safe; a ctypes call releases the GIL.

Why ctypes and not numba: numba's LLVM costs ~110 MB of resident memory and 0.4-1.5 s at first
use, more than these kernels save in most processes.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["NativeLibrary", "cache_dir", "FLAGS", "EXACT_FP"]

#: C macros for a kernel's entry points: ``EXACT_FP_BEGIN`` clears the calling thread's
#: flush-to-zero and denormals-are-zero modes (x86 MXCSR) and ``EXACT_FP_END`` restores them, so
#: subnormal inputs count exactly whatever the thread set (``torch.set_flush_denormal(True)``
#: sets both on the thread that calls it): the kernels' results must not depend on which thread
#: runs them. Elsewhere the macros do nothing.
EXACT_FP = r"""
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define EXACT_FP_BEGIN const unsigned int mxcsr_ = _mm_getcsr(); _mm_setcsr(mxcsr_ & ~0x8040u);
#define EXACT_FP_END _mm_setcsr(mxcsr_);
#else
#define EXACT_FP_BEGIN
#define EXACT_FP_END
#endif
"""

_log = logging.getLogger(__name__)

#: The compiler flags of every kernel: vectorised for this CPU, IEEE arithmetic exactly as
#: written (no fused multiply-adds, no reassociation).
FLAGS = ("-O3", "-march=native", "-std=gnu99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    explicit = os.environ.get("ILSTORE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ilstore"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _detail(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        return (exc.stderr or b"").decode(errors="replace")[-500:].strip()
    return str(exc)


#: Every :class:`NativeLibrary`, for :func:`_fresh_locks`.
_LIBRARIES: weakref.WeakSet[NativeLibrary] = weakref.WeakSet()


def _fresh_locks() -> None:
    """In a forked child: a fresh lock for every library. A parent's thread may have held one at
    the fork (the writer thread loads the statistics kernel at a capture's first record), and
    the child's first load would then wait forever."""
    for lib in list(_LIBRARIES):
        lib._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_locks)


class NativeLibrary:
    """One C source, compiled into the cache at first use and loaded once per process.

    Args:
        name: the file's stem (``<name>-v<version>-<hash>.so``).
        version: bumped whenever the kernel's results change.
        source: the C99 source.
        defines: ``-D`` definitions (``{"LANES": 16}``).
        switch: the environment variable that switches the kernel off when ``0``.
        what: how log and error messages name the kernel.
        declare: sets the loaded library's functions' ``argtypes`` and ``restype``.
        optional: flags used where the compiler takes them (``-fopenmp``): the kernel is compiled
            without them otherwise (its source tests what they define).
    """

    def __init__(self, name: str, version: int, source: str, defines: dict[str, int], switch: str, what: str,
                 declare: Callable[[Any], None], optional: Sequence[str] = ()) -> None:
        self.name, self.version, self.source, self.switch, self.what = name, version, source, switch, what
        self.flags: Sequence[str] = (*FLAGS, *(f"-D{k}={v}" for k, v in defines.items()))
        self._declare = declare
        self.optional = tuple(optional)
        self._lib: Any = None
        self._failed = False
        self._lock = threading.Lock()
        _LIBRARIES.add(self)

    def compile(self) -> Path | None:
        """The compiled file in the cache (compiled now if it is not there yet); None without a compiler.

        Raises:
            OSError, subprocess.SubprocessError: compiling failed.
        """
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            return None
        tag = hashlib.sha256("\0".join([self.source, cc, *self.flags, *self.optional, platform.machine(),
                                         _cpu_flags()]).encode())
        target = cache_dir() / f"{self.name}-v{self.version}-{tag.hexdigest()[:16]}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / f"{self.name}.c"
            src.write_text(self.source)
            out = Path(tmp) / target.name
            # with the optional flags, then without; each with -march=native, then without (a
            # compiler without it: clang on some targets)
            native = list(self.flags)
            portable = [f for f in self.flags if f != "-march=native"]
            attempts = [[*native, *self.optional], [*portable, *self.optional]] if self.optional else []
            attempts += [native, portable]
            for i, flags in enumerate(attempts):
                try:
                    subprocess.run([*cc.split(), *flags, "-o", str(out), str(src), "-lm"], check=True,
                                   capture_output=True, timeout=120)
                    break
                except subprocess.CalledProcessError:
                    if i == len(attempts) - 1:
                        raise
            os.replace(out, target)  # atomic: another process may be building the same file
        return target

    def load(self) -> Any:
        """The loaded library, or None (no compiler, a failure, or switched off); decided once."""
        if self._lib is not None or self._failed:
            return self._lib
        with self._lock:
            if self._lib is None and not self._failed:
                try:
                    if os.environ.get(self.switch, "1") == "0":
                        raise RuntimeError(f"switched off by {self.switch}=0")
                    path = self.compile()
                    if path is None:
                        raise RuntimeError("no C compiler ($CC, cc or gcc)")
                    lib = ctypes.CDLL(str(path))
                    self._declare(lib)
                    self._lib = lib
                except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
                    # switched off on purpose: a note; missing: a warning, the fallback is several times slower
                    level = logging.INFO if os.environ.get(self.switch, "1") == "0" else logging.WARNING
                    _log.log(level, "ilstore: no %s (%s); using its slower fallback (see docs/performance.md)",
                             self.what, _detail(exc))
                    self._failed = True
        return self._lib

    def build(self) -> Path:
        """Compile into the cache now, if the file is not there yet, and load it once (for set-up
        scripts and images). The switch variable does not stop this.

        Raises:
            RuntimeError: no C compiler, or compiling or loading failed (the message says why).
        """
        try:
            path = self.compile()
            if path is None:
                raise RuntimeError("no C compiler ($CC, cc or gcc); torch computes instead")
            self._declare(ctypes.CDLL(str(path)))
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
            raise RuntimeError(f"cannot build the {self.what}: {_detail(exc)}") from None
        return path

    def reset(self) -> None:
        """Forget the loaded library and any failure (tests; a changed environment)."""
        with self._lock:
            self._lib = None
            self._failed = False
