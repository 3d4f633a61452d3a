"""The statistics kernel sharing a large tensor's chunks with torch's own OpenMP threads
(ilstore/_stats_kernel.py): every block's sums are added in block order whichever thread
computed them, so the results are bit-identical for any thread count, to one thread and to the
numpy fallback, whichever chunks the other threads took, with NaN/Inf and signed zeros anywhere,
callers on several threads at once, and in a forked child (which computes alone)."""

from __future__ import annotations

import math
import os
import select
import shutil
import signal
import struct
import threading
import time
from pathlib import Path

import pytest
import torch

import ilstore
from ilstore import _stats_kernel as K
from ilstore import records
from ilstore.keys import CallKey

pytestmark = pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
                                or os.environ.get("ILSTORE_STATS_KERNEL") == "0",
                                reason="no C compiler (or ILSTORE_STATS_KERNEL=0): the kernel is not used here")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SPAN = K.CHUNK * K.BLOCK  # elements per chunk
#: around the sizes from which a tensor is shared: one chunk, two, a short last block or chunk
SIZES = [SPAN - 1, SPAN, SPAN + 1, 2 * SPAN, 2 * SPAN + 17, 3 * SPAN - K.BLOCK + 5, 11 * SPAN + K.LANES + 3]


def _bits(v: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", v))[0]


def _same(a: K.Sums | None, b: K.Sums | None) -> bool:
    """Equal bit for bit (the sign of zero counts)."""
    assert a is not None and b is not None
    return a.finite == b.finite and all(_bits(x) == _bits(y) for x, y in zip(a[1:], b[1:], strict=True))


def _random(n: int, dtype: torch.dtype, seed: int, scale: float = 3.0, offset: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


def _helper_chunks() -> int:
    lib = K.LIBRARY.load()
    assert lib is not None
    return int(lib.ilstore_stats_helper_chunks())


needs_sharing = pytest.mark.skipif(not K.can_share(), reason="the kernel shares no tensor here (no OpenMP, or a second "
                                   "OpenMP runtime)")


def _shared_until_helped(x: torch.Tensor, center: float = 0.0, threads: int = 2, budget_s: float = 120.0) -> K.Sums:
    """``native_sums(x, center, threads)``, repeated until another thread took part of the tensor
    (one that starts late finds no chunk left: on a loaded machine it may take many tries); the
    results of every try must agree."""
    first = None
    deadline = time.monotonic() + budget_s
    tries = 0
    while time.monotonic() < deadline:
        tries += 1
        before = _helper_chunks()
        got = K.native_sums(x, center, threads)
        assert got is not None
        assert first is None or _same(got, first), (got, first)
        first = got
        if _helper_chunks() > before:
            return got
    pytest.fail(f"no other thread took a chunk of {x.numel()} elements in {tries} tries ({budget_s} s)")


def _shared(x: torch.Tensor, center: float = 0.0, threads: int = 2) -> K.Sums:
    """``native_sums(x, center, threads)``, asked three times (other threads take part or not,
    as they happen to be free): the same bits each time."""
    got = [K.native_sums(x, center, threads) for _ in range(3)]
    assert all(_same(g, got[0]) for g in got), got
    assert got[0] is not None
    return got[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_any_thread_count_gives_the_same_bits(dtype: torch.dtype) -> None:
    for seed, n in enumerate(SIZES):
        for scale, offset in ((3.0, 1.0), (1e4, -7.0)):
            x = _random(n, dtype, seed, scale, offset)
            for center in (0.0, -0.0, float(x.double().mean())):
                alone, slow = K.native_sums(x, center, 1), K.fallback_sums(x, center)
                assert _same(alone, slow), (n, center, alone, slow)
                for threads in (2, 3, 4, 64):
                    got = K.native_sums(x, center, threads)
                    assert _same(got, alone), (n, threads, center, got, alone)


@needs_sharing
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_the_chunks_a_helper_took_give_the_same_bits(dtype: torch.dtype) -> None:
    """A tensor large enough that a helper surely wakes while the caller is still busy; the sums
    depend on the order of their additions (large and tiny magnitudes mixed)."""
    x = _random(64 * SPAN + 3, dtype, 5, 1e3, 0.0)
    x[::7] *= 1e-3 if dtype in (torch.float16, torch.bfloat16) else 1e-9
    for center in (0.0, 0.25):
        got = _shared_until_helped(x, center)
        assert _same(got, K.native_sums(x, center, 1))
        assert _same(got, K.fallback_sums(x, center))


@needs_sharing
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_extremes_and_non_finite_values_in_any_chunk(dtype: torch.dtype) -> None:
    n = 48 * SPAN + 9
    for where in (0, SPAN + 3, n // 2, n - 1):
        x = _random(n, dtype, where, 2.0, 0.0)
        x[where] = -100.0  # the minimum, in one chunk only
        x[(where + n // 3) % n] = 100.0
        got = _shared(x)
        assert got.finite and got.minimum == -100.0 and got.maximum == 100.0
        assert _same(got, K.fallback_sums(x))
        for bad in (math.nan, math.inf, -math.inf, -math.nan):
            y = x.clone()
            y[where] = bad
            got = _shared(y)
            assert not got.finite, (where, bad)
    zeros = torch.zeros(48 * SPAN, dtype=dtype)
    zeros[-1] = -0.0  # -0.0 is the minimum in IEEE total order, in the last chunk
    got = _shared(zeros)
    assert got.finite and _bits(got.minimum) == _bits(-0.0) and _bits(got.maximum) == _bits(0.0)
    zeros[-1] = 0.0
    zeros[0] = -0.0
    got = _shared(zeros)
    assert _bits(got.minimum) == _bits(-0.0) and _bits(got.maximum) == _bits(0.0)


def test_callers_on_several_threads_at_once() -> None:
    """Each caller's thread leads its own team of threads: the same bits."""
    tensors = [_random(9 * SPAN + i, dtype, i) for i, dtype in enumerate(DTYPES * 2)]
    expected = [K.native_sums(t, 0.0, 1) for t in tensors]
    failures: list[str] = []
    barrier = threading.Barrier(len(tensors))

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(20):
            got = K.native_sums(tensors[i], 0.0, 2)
            if not _same(got, expected[i]):
                failures.append(f"{i}: {got} != {expected[i]}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(tensors))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


@needs_sharing
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_computes_alone() -> None:
    """OpenMP's threads do not survive a fork, and a region started in the child would wait for
    them forever: the child computes alone, with the same bits, and does not hang."""
    x = _random(64 * SPAN + 1, torch.float32, 3)
    expected = _shared_until_helped(x)  # the parent's threads have taken part
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read)
            got = K.native_sums(x, 0.0, 2)
            code = 0 if _same(got, expected) else 2
        except BaseException:  # noqa: BLE001 - the child reports by its exit code
            code = 3
        finally:
            os.write(write, bytes([code]))
            os._exit(code)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 60)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    answer = os.read(read, 1) if ready else b"hung"
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"\x00"


@needs_sharing
def test_the_hook_path_shares_a_large_tensor_with_the_same_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """mode "stats" with sharing switched on asks the kernel with torch's thread count for a large
    CPU float tensor (a record built in the hook): its statistics are those tensor_stats computes (one thread, as the
    writer thread does in tensors mode)."""
    x = _random(64 * SPAN + 5, torch.float32, 11)
    small = _random(K.SHARED_MIN - 1, torch.float32, 12)
    asked: list[int] = []
    plain = K.plain_sums

    def spy(t: torch.Tensor, dtype: torch.dtype, n: int, threads: int = 1) -> K.Sums:
        asked.append(threads)
        return plain(t, dtype, n, threads)

    monkeypatch.setattr(K, "plain_sums", spy)
    monkeypatch.setattr(K, "_get_num_threads", lambda: 2)
    monkeypatch.setattr(K, "_sharing", True)  # as ILSTORE_STATS_SHARE=1 decides
    policy = records.TensorPolicy(store_bodies=False)
    call = CallKey(0, 0, "m", 0)
    before = _helper_chunks()
    for _ in range(200):
        record = records.build_record(call, "outputs", (x, small), policy)
        nodes = dict(record.tensor_nodes())
        assert nodes[("0",)]["stats"] == records.tensor_stats(x)
        assert nodes[("1",)]["stats"] == records.tensor_stats(small)
        if _helper_chunks() > before:
            break
    assert _helper_chunks() > before
    assert set(asked[0::2]) == {2} and set(asked[1::2]) == {1}  # one chunk: nothing to share


def test_sharing_is_on_unless_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(K, "_get_num_threads", lambda: 4)
    shared = 4 if K.can_share() else 1
    for name in ("_skip", "_misses", "_clean"):  # no back-off left by earlier shared calls of this process
        monkeypatch.setattr(K, name, 0)
    for value, expected in ((None, shared), ("auto", shared), ("0", 1), ("no", 1), ("1", shared)):
        if value is None:
            monkeypatch.delenv("ILSTORE_STATS_SHARE", raising=False)
        else:
            monkeypatch.setenv("ILSTORE_STATS_SHARE", value)
        monkeypatch.setattr(K, "_sharing", None)
        assert K.sharing_threads() == expected, value


def test_stats_captures_on_several_threads_with_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sharing is on by default: three stats-mode captures on three Python threads at once, the
    main thread running torch's own parallel operators meanwhile, finish (no thread waits forever
    for a team) and record the statistics one thread computes."""
    monkeypatch.delenv("ILSTORE_STATS_SHARE", raising=False)
    monkeypatch.setattr(K, "_sharing", None)
    x = torch.randn(128, 512, generator=torch.Generator().manual_seed(1))  # outputs of 65,536 elements: shared

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512))

    with torch.no_grad():
        expected = [records.tensor_stats(t) for t in (x, model()[0](x), model()[:2](x), model()(x))]
    failures: list[BaseException] = []

    models = [model() for _ in range(3)]  # made here: torch's generator is global, seeding it on three threads races

    def job(i: int) -> None:
        try:
            m = models[i]
            with torch.no_grad(), ilstore.capture(m, {"output_dir": str(tmp_path), "run_id": f"r{i}", "mode": "stats",
                                                      "log_step_ids": []}):
                for _ in range(10):
                    m(x)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads = [threading.Thread(target=job, args=(i,), daemon=True) for i in range(3)]
        for t in threads:
            t.start()
        for _ in range(20):
            (x @ x.T).sum()
        for t in threads:
            t.join(120)
    finally:
        torch.set_num_threads(previous)
    assert not any(t.is_alive() for t in threads) and not failures
    assert K._sharing is (K._AUTO if K.can_share() else False)  # the default was taken
    for i in range(3):
        run = ilstore.open_run(tmp_path / f"r{i}")
        for step in (0, 9):
            got = {(k.module, k.kind): run.meta(k)["stats"] for k in run.keys(step)}
            assert got == {("0", "inputs"): expected[0], ("0", "outputs"): expected[1],
                           ("1", "inputs"): expected[1], ("1", "outputs"): expected[2],
                           ("2", "inputs"): expected[2], ("2", "outputs"): expected[3]}
