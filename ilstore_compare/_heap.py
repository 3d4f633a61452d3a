"""Keep the C heap from holding on to freed tensor memory during a long compare (glibc only).

Comparing pair after pair frees tensors of many sizes; glibc keeps freed memory in pieces that
later requests of other sizes do not reuse, so RSS grows far beyond what is live (two 500 MB
hdf5 runs: +870-900 MB). ``malloc_trim`` returns free pages to the OS, but the next allocation
then faults them back in, so it is called only when the process has actually grown by more
than a slack since the compare started.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable
from typing import Any

__all__ = ["HeapGuard"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], Any] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to do
        return None


def _rss() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class HeapGuard:
    """Call :meth:`after` when a pair's tensors have been freed.

    Args:
        slack: RSS growth over the value at creation that is tolerated before freed memory is
            handed back.
    """

    def __init__(self, slack: int = 128 * 2**20) -> None:
        self._trim = _malloc_trim()
        self._start = _rss() if self._trim is not None else None
        self.slack = slack
        self.trims = 0

    def after(self, freed_bytes: int) -> None:
        """Trim the heap if ``freed_bytes`` is large and the process has outgrown the slack."""
        if self._start is None or self._trim is None or freed_bytes < 2**20:
            return
        now = _rss()
        if now is not None and now - self._start > self.slack:
            self._trim(0)
            self.trims += 1
