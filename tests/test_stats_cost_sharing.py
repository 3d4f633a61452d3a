"""Adaptive sharing of the statistics kernel with torch's threads (the default; ``ILSTORE_STATS_SHARE=auto``).

A shared call that the other threads missed (they took no chunk, or the call was slow: on a busy
machine the caller waits at the region's end for a descheduled thread) makes the next large
tensors be computed alone, twice as many after each further miss; a run of clean shared calls
forgets the misses. The statistics are the same bits whichever way a tensor is computed.

Which calls the threads miss depends on the scheduler, so the library's count of the chunks the
other threads took and the clock are replaced by ones the test drives; the sums themselves are
computed by the real kernel.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
import torch

from ilstore import _stats_kernel as K
from ilstore import records
from ilstore.keys import CallKey

pytestmark = pytest.mark.skipif(K.LIBRARY.load() is None, reason="no C compiler: no kernel to share")

LARGE = 4 * K.SHARED_MIN  # four chunks and more: a tensor the hook path may share


def _bits(x: float) -> int:
    return int(struct.unpack("<Q", struct.pack("<d", x))[0])


def _same(a: K.Sums, b: K.Sums) -> bool:
    return a.finite == b.finite and all(
        _bits(u) == _bits(v) or (math.isnan(u) and math.isnan(v))
        for u, v in ((a.minimum, b.minimum), (a.maximum, b.maximum), (a.total, b.total), (a.squares, b.squares)))


class _Counted:
    """The real kernel library, its count of the chunks other threads took driven by the test."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.helped = 0
        self.helps = True  # whether the next shared call is one the other threads took part in
        self.asked: list[int] = []  # the threads each kernel call was given

    def ilstore_stats_helper_chunks(self) -> int:
        return self.helped

    def ilstore_stats(self, *args: Any) -> None:
        self.asked.append(args[4])
        self.real.ilstore_stats(*args)
        if self.helps and args[4] > 1:
            self.helped += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class _Library:
    def __init__(self, lib: _Counted) -> None:
        self.lib = lib

    def load(self) -> _Counted:
        return self.lib


@pytest.fixture
def lib(monkeypatch: pytest.MonkeyPatch) -> _Counted:
    counted = _Counted(K.LIBRARY.load())
    monkeypatch.setattr(K, "LIBRARY", _Library(counted))
    monkeypatch.setattr(K, "can_share", lambda: True)
    monkeypatch.setattr(K, "_get_num_threads", lambda: 2)
    monkeypatch.setenv("ILSTORE_STATS_SHARE", "auto")
    monkeypatch.setattr(K, "_sharing", None)
    for name in ("_skip", "_misses", "_clean"):
        monkeypatch.setattr(K, name, 0)
    monkeypatch.setattr(K, "_clock", lambda: 0.0)  # every call as fast as can be, unless a test says otherwise
    return counted


def _tensor(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LARGE, generator=g) * 1e3 + 1.0


def _hook_threads(n: int) -> list[int]:
    """What the hook path would ask for the next ``n`` large tensors."""
    return [K.sharing_threads() for _ in range(n)]


def test_auto_shares_until_a_call_is_missed(lib: _Counted) -> None:
    assert _hook_threads(3) == [2, 2, 2]
    x = _tensor(1)
    alone = K.plain_sums(x, torch.float32, LARGE, 1)
    assert _same(K.shared_sums(x, torch.float32, LARGE, 2), alone)  # the threads took part
    assert _hook_threads(2) == [2, 2]
    lib.helps = False  # the caller did every chunk itself: the others missed the call
    assert _same(K.shared_sums(x, torch.float32, LARGE, 2), alone)
    assert _hook_threads(3) == [1, 1, 2]  # 2 tensors alone after the first miss
    assert _same(K.shared_sums(x, torch.float32, LARGE, 2), alone)
    assert _hook_threads(5) == [1, 1, 1, 1, 2]  # then 4
    assert lib.asked == [1, 2, 2, 2]


def test_a_slow_shared_call_is_a_miss(lib: _Counted, monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter([0.0, 1.0])  # one second for the call: far slower than the threads together
    monkeypatch.setattr(K, "_clock", lambda: next(ticks))
    assert K.sharing_threads() == 2
    K.shared_sums(_tensor(2), torch.float32, LARGE, 2)
    assert _hook_threads(3) == [1, 1, 2]


def test_the_waits_grow_to_the_bound_and_a_clean_run_forgets_them(lib: _Counted) -> None:
    x = _tensor(3)
    assert K.sharing_threads() == 2
    lib.helps = False
    for _ in range(30):
        K.shared_sums(x, torch.float32, LARGE, 2)
    assert K._skip == K._MAX_SKIP
    lib.helps = True
    for _ in range(K._CLEAN - 1):
        K.shared_sums(x, torch.float32, LARGE, 2)
    K._skip = 0
    lib.helps = False
    K.shared_sums(x, torch.float32, LARGE, 2)  # a miss among clean calls: the wait still doubles
    assert K._skip == K._MAX_SKIP
    lib.helps = True
    for _ in range(K._CLEAN):
        K.shared_sums(x, torch.float32, LARGE, 2)
    K._skip = 0
    lib.helps = False
    K.shared_sums(x, torch.float32, LARGE, 2)  # after a clean run a miss waits as the first did
    assert K._skip == 2


def test_the_hook_path_after_a_miss_gives_the_same_statistics(lib: _Counted) -> None:
    """mode "stats": the records built while sharing, after a miss and alone hold the statistics
    tensor_stats computes (one thread), bit for bit."""
    x = _tensor(4)
    policy = records.TensorPolicy(store_bodies=False)
    call = CallKey(0, 0, "m", 0)
    expected = records.tensor_stats(x)
    lib.asked.clear()
    lib.helps = False
    for _ in range(4):
        record = records.build_record(call, "outputs", (x,), policy)
        assert dict(record.tensor_nodes())[("0",)]["stats"] == expected
    assert lib.asked == [2, 1, 1, 2]  # shared (missed), alone twice, shared again


@pytest.mark.parametrize(("value", "expected"), [(None, 2), ("0", 1), ("1", 2), ("auto", 2), ("yes", 1)])
def test_what_the_variable_asks_for(lib: _Counted, monkeypatch: pytest.MonkeyPatch, value: str | None,
                                    expected: int) -> None:
    if value is None:
        monkeypatch.delenv("ILSTORE_STATS_SHARE")
    else:
        monkeypatch.setenv("ILSTORE_STATS_SHARE", value)
    K._sharing = None
    assert K.sharing_threads() == expected
    if value == "1":  # always: a missed call changes nothing
        lib.helps = False
        K.shared_sums(_tensor(5), torch.float32, LARGE, 2)
        assert K.sharing_threads() == 2
    if value in (None, "auto"):  # adaptive: a missed call makes the next large tensors computed alone
        lib.helps = False
        K.shared_sums(_tensor(5), torch.float32, LARGE, 2)
        assert K.sharing_threads() == 1
