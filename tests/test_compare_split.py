"""A large pair split into ranges that run at once (``--workers`` >= 2) gives exactly the metrics
of the pair compared in one piece, bit for bit, on every path (the fused kernel's whole-tensor
and chunked paths, the torch path, exact mode, integers, complex, squeezed shapes), whatever
order the ranges run in; and splitting loads nothing beyond the pair.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from compare_helpers import Toy, module_run, need_backend
from ilstore_compare import _kernel, compare, engine, metrics
from ilstore_compare.align import RuleMismatch
from ilstore_compare.metrics import Split, compare_tensors
from ilstore_compare.result import Unreadable

needs_cc = pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")),
                              reason="no C compiler: the kernel cannot be built here")


class Recorder:
    """A ``run_all`` that runs the functions in a given order (returning results in input order)
    and counts the calls that had more than one function (real splits)."""

    def __init__(self, order: str = "forward") -> None:
        self.order, self.splits, self.pieces = order, 0, 0

    def __call__(self, fns: Sequence[Callable[[], Any]]) -> list[Any]:
        if len(fns) > 1:
            self.splits += 1
            self.pieces += len(fns)
        indices = list(range(len(fns)))
        if self.order == "reversed":
            indices.reverse()
        results: dict[int, Any] = {}
        for i in indices:
            results[i] = fns[i]()
        return [results[i] for i in range(len(fns))]


def _awkward(n: int, dtype: torch.dtype, ref_dtype: torch.dtype, seed: int,
             ties: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN, +-Inf, +-0, exact matches, huge values (infinite in float16), and the same largest
    finite difference at each of ``ties`` (the first must be reported)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=g, dtype=torch.float64) * 3
    a = b + torch.randn(n, generator=g, dtype=torch.float64) * 1e-3
    a[::17] = b[::17]
    if dtype.is_floating_point and ref_dtype.is_floating_point:
        for t, offset in ((a, 0), (b, 5)):
            t[offset::1013] = float("nan")
            t[offset + 1::2111] = float("inf")
            t[offset + 2::3077] = float("-inf")
            t[offset + 3::401] = 0.0
            t[offset + 4::409] = -0.0
        a[9::4999], b[9::4999] = 2.0**100, 2.0**100  # exact but in float16 (inf there)
    for i in ties:
        a[i], b[i] = 40000.0, 10000.0
    return a.to(dtype), b.to(ref_dtype)


def _same_bits(one: metrics.TensorMetrics, split: metrics.TensorMetrics) -> None:
    assert repr(one) == repr(split)  # repr: floats to the last bit, and -0.0 apart from 0.0


# (candidate, reference) dtypes: the kernel's whole-tensor path (float32/float64, max_ulp in the
# kernel or, for mixed widths, per chunk in torch) and its chunked path (widened dtypes)
FLOAT_PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float32, torch.float64),
               (torch.float64, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
               (torch.bfloat16, torch.bfloat16)]


@needs_cc
@pytest.mark.parametrize(("da", "db"), FLOAT_PAIRS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("order", ["forward", "reversed"])
@pytest.mark.parametrize("parts", [2, 3, 5])
def test_kernel_paths_split_give_the_same_bits(da: torch.dtype, db: torch.dtype, order: str, parts: int) -> None:
    n = 61_000  # 15 kernel blocks, 30 chunks of 2048: ranges of several blocks/chunks, and a ragged end
    a, b = _awkward(n, da, db, seed=parts, ties=(4096 * 2 + 5, 30_000, 4096 * 13 + 1))
    for equal_nan in (False, True):
        for rtol, atol in ((1e-5, 1e-8), (0.0, 0.0), (1e-2, 1e-3)):
            whole = compare_tensors(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan, chunk=2048)
            run = Recorder(order)
            split = compare_tensors(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan, chunk=2048,
                                    split=Split(parts, run, min_elements=1))
            _same_bits(whole, split)
            assert run.splits == 1 and run.pieces == parts
    assert whole.max_abs_diff_index == (4096 * 2 + 5,) or not da.is_floating_point


@needs_cc
def test_the_reported_maximum_is_the_first_of_a_tie_across_ranges() -> None:
    n = 4096 * 8
    b = torch.zeros(n, dtype=torch.float32)
    a = b.clone()
    for i in (4096 * 6 + 3, 4096 * 2 + 7, 4096 * 7):  # the same difference in three ranges
        a[i] = 5.0
    run = Recorder("reversed")
    split = compare_tensors(a, b, rtol=0.0, atol=0.0, split=Split(4, run, min_elements=1))
    assert run.splits == 1 and split.max_abs_diff_index == (4096 * 2 + 7,)
    _same_bits(compare_tensors(a, b, rtol=0.0, atol=0.0), split)


@pytest.mark.parametrize("case", ["exact-same-dtype", "exact-mixed", "int64", "int-mixed", "bool", "complex",
                                  "torch-path-float32", "torch-path-bfloat16"])
@pytest.mark.parametrize("order", ["forward", "reversed"])
def test_torch_paths_split_give_the_same_bits(monkeypatch: pytest.MonkeyPatch, case: str, order: str) -> None:
    n = 10_500
    g = torch.Generator().manual_seed(3)
    exact = case.startswith("exact")
    if case in ("int64", "int-mixed"):
        a = torch.randint(-50, 50, (n,), generator=g)
        b = a.clone()
        b[::7] += 1
        a[100], b[100], a[9000], b[9000] = 1000, 0, 1000, 0  # a tie of the largest difference
        if case == "int-mixed":
            b = b.to(torch.int32)
    elif case == "bool":
        a = torch.rand(n, generator=g) > 0.5
        b = torch.rand(n, generator=g) > 0.5
    elif case == "complex":
        a = torch.randn(n, generator=g, dtype=torch.complex64)
        b = a + 1e-4 * torch.randn(n, generator=g, dtype=torch.complex64)
        a[50] = torch.tensor(complex(float("nan"), 0.0))
        b[7000] = torch.tensor(complex(float("inf"), 1.0))
    else:
        da = torch.bfloat16 if case.endswith("bfloat16") else torch.float32
        db = torch.float64 if case == "exact-mixed" else da
        a, b = _awkward(n, da, db, seed=7, ties=(1500, 8000))
    if case.startswith("torch-path"):
        monkeypatch.setattr(metrics, "fused", lambda *args, **kwargs: None)  # no kernel
        monkeypatch.setattr(metrics, "fused_ranges", lambda *args, **kwargs: None)
    for equal_nan in (False, True):
        whole = compare_tensors(a, b, rtol=1e-5, atol=1e-8, exact=exact, equal_nan=equal_nan, chunk=1000)
        run = Recorder(order)
        split = compare_tensors(a, b, rtol=1e-5, atol=1e-8, exact=exact, equal_nan=equal_nan, chunk=1000,
                                split=Split(3, run, min_elements=1))
        _same_bits(whole, split)
        assert run.splits >= 1  # (2 without the kernel where the kernel's chunks were tried first)


def test_small_pairs_are_not_split() -> None:
    a = torch.randn(1000)
    run = Recorder()
    compare_tensors(a, a + 1, rtol=0.0, atol=0.0, split=Split(2, run, min_elements=1001))
    compare_tensors(a, a + 1, rtol=0.0, atol=0.0, split=Split(1, run, min_elements=1))
    assert run.splits == 0


@needs_cc
def test_fused_ranges_equal_one_call_for_any_edges() -> None:
    rng = np.random.default_rng(0)
    block = _kernel.BLOCK
    n = block * 9 + 123
    for xt, yt in ((np.float32, np.float32), (np.float64, np.float32), (np.float64, np.float64)):
        x = rng.standard_normal(n).astype(xt)
        y = (x * (1 + 1e-4 * rng.standard_normal(n))).astype(yt)
        x[block * 3 + 1] = np.nan
        y[block * 5] = -np.inf
        ulp = xt is yt
        one = _kernel.fused(x, y, rtol=1e-5, atol=1e-8, equal_nan=False, with_ulp=ulp)
        for edges in ([0, n], [0, block, n], [0, block * 4, block * 5, n], list(range(0, n, block)) + [n]):
            got = _kernel.fused_ranges(x, y, edges, Recorder("reversed"), rtol=1e-5, atol=1e-8, equal_nan=False,
                                       with_ulp=ulp)
            assert repr(got) == repr(one), edges


def test_assist_runs_pieces_at_once_in_order_and_raises_the_first_error() -> None:
    with engine._Assist(3) as assist:
        both = threading.Barrier(3, timeout=10)  # broken unless the three pieces run at once

        def piece(i: int) -> int:
            both.wait()
            return i * i

        assert assist.run_all([partial(piece, i) for i in range(3)]) == [0, 1, 4]
        finished: list[int] = []

        def failing(i: int) -> int:
            if i in (1, 2):
                raise ValueError(f"piece {i}")
            finished.append(i)
            return i

        with pytest.raises(ValueError, match="piece 1"):
            assist.run_all([partial(failing, i) for i in range(4)])
        assert sorted(finished) == [0, 3]  # every piece ran before the error was raised


# -- loading both sides at once ---------------------------------------------------------------
def _fake_loads(monkeypatch: pytest.MonkeyPatch, outcomes: dict[str, Callable[[], torch.Tensor]]) -> list[str]:
    tried: list[str] = []

    def load(reader: Any, side: Any, label: str, keep_going: bool = False) -> torch.Tensor:
        tried.append(label)
        return outcomes[label]()

    monkeypatch.setattr(engine, "_load", load)
    return tried


def _lost(label: str) -> Callable[[], torch.Tensor]:
    def fail() -> torch.Tensor:
        raise engine._Unreadable(Unreadable(run=label, run_dir=f"/{label}", key=None,  # type: ignore[arg-type]
                                            file=None, reason="damaged"))
    return fail


def _misfit() -> torch.Tensor:
    raise RuleMismatch("sum of 3 parts does not fit")


def _store_error(label: str) -> Callable[[], torch.Tensor]:
    def fail() -> torch.Tensor:
        raise engine.StoreError(f"{label} unreadable")
    return fail


@pytest.mark.parametrize("case", ["both", "misfit-then-lost", "lost-then-misfit", "both-lost", "error1", "error2"])
def test_loading_both_sides_at_once_has_the_outcome_of_one_after_the_other(
        monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    ones, twos = torch.ones(3), torch.full((3,), 2.0)
    outcomes = {"both": {"dir1": lambda: ones, "dir2": lambda: twos},
                "misfit-then-lost": {"dir1": _misfit, "dir2": _lost("dir2")},
                "lost-then-misfit": {"dir1": _lost("dir1"), "dir2": _misfit},
                "both-lost": {"dir1": _lost("dir1"), "dir2": _lost("dir2")},
                "error1": {"dir1": _store_error("dir1"), "dir2": _store_error("dir2")},
                "error2": {"dir1": lambda: ones, "dir2": _store_error("dir2")}}[case]
    pair = SimpleNamespace(side1=object(), side2=object())
    options = SimpleNamespace(keep_going=True)

    def outcome(assist: engine._Assist | None) -> Any:
        try:
            return engine._load_both(pair, None, None, options, assist=assist)  # type: ignore[arg-type]
        except (RuleMismatch, engine.StoreError) as exc:
            return type(exc), str(exc)

    tried = _fake_loads(monkeypatch, outcomes)
    alone = outcome(None)
    assert tried == (["dir1"] if case in ("misfit-then-lost", "error1") else ["dir1", "dir2"])
    with engine._Assist(2) as assist:
        at_once = outcome(assist)
    if case == "both":
        assert torch.equal(at_once[0], ones) and torch.equal(at_once[1], twos) and at_once[2] == ()
        assert torch.equal(alone[0], ones) and torch.equal(alone[1], twos)
    else:
        assert at_once == alone
    if case == "misfit-then-lost":
        assert alone[0] is RuleMismatch  # what dir2 gave is ignored after dir1's misfit, as before
    if case == "error1":
        assert alone == (engine.StoreError, "dir1 unreadable")


# -- whole compares ---------------------------------------------------------------------------
def _big_runs(tmp_path: Path, backend: str) -> tuple[Path, Path]:
    """Runs whose pairs are large enough to be split (> 4 MiB a pair): integers, float32 with
    NaN/Inf and ties, a bfloat16 candidate against a float32 reference, and shapes that differ
    only in size-1 dimensions (``squeeze_shapes``)."""
    n = 1_300_000
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 1000, (n,), generator=g)
    h = torch.randn(1, n, generator=g)
    w = torch.randn(n, generator=g)
    h2, w2, ids2 = h.reshape(n, 1) * (1 + 1e-6), w.clone(), ids.clone()
    ids2[::1000] += 1
    h[0, 17], h2[700_000, 0] = float("nan"), float("inf")
    h[0, 300], h2[300, 0], h[0, 1_200_000], h2[1_200_000, 0] = 8.0, 1.0, 8.0, 1.0  # a tie across ranges
    run1 = module_run(tmp_path, f"{backend}-one", Toy(), ids, h, w.to(torch.bfloat16), backend=backend)
    run2 = module_run(tmp_path, f"{backend}-two", Toy(), ids2, h2, w2, backend=backend)
    return run1, run2


@pytest.mark.parametrize("backend", ["pt", "safetensors", "hdf5"])
@pytest.mark.parametrize("exact", [False, True])
def test_two_workers_split_large_pairs_and_give_the_one_worker_result(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, backend: str, exact: bool) -> None:
    need_backend(backend)
    run1, run2 = _big_runs(tmp_path, backend)
    one = compare(run1, run2, squeeze_shapes=True, exact=exact, workers=1)
    split_calls: list[int] = []
    run_all = engine._Assist.run_all

    def counting(self: engine._Assist, fns: Sequence[Callable[[], Any]]) -> list[Any]:
        split_calls.append(len(fns))
        return run_all(self, fns)

    monkeypatch.setattr(engine._Assist, "run_all", counting)
    lock, running, peak = threading.Lock(), [0], [0]
    compare_pair = engine._compare_pair

    def tracked(pair: Any, *args: Any) -> Any:  # the tensor bytes of the pairs being compared
        size = engine._pair_bytes(pair)
        with lock:
            running[0] += size
            peak[0] = max(peak[0], running[0])
        try:
            return compare_pair(pair, *args)
        finally:
            with lock:
                running[0] -= size

    monkeypatch.setattr(engine, "_compare_pair", tracked)
    two = compare(run1, run2, squeeze_shapes=True, exact=exact, workers=2)
    assert repr(two.tensors) == repr(one.tensors) and repr(two.summary) == repr(one.summary)
    assert two.exit_code == one.exit_code == 1
    # every large pair (ids, h, w; inputs and outputs) loaded its sides at once and was measured
    # in pieces: four ranges of the torch path's 256 Ki-element chunks (the integers; with
    # ``exact`` every pair) and of the whole float32 one, the two 1 Mi-element chunks of the
    # bfloat16 candidate's widened path
    assert len(split_calls) == 12 and split_calls.count(4) == (6 if exact else 4)
    largest = max(engine._pair_bytes(p) for p in _plan_pairs(run1, run2))
    assert peak[0] <= largest + engine._SLACK
    squeezed = [t for t in one.tensors if t.key.module == "shaped"]
    assert squeezed and all(t.squeezed and t.metrics is not None for t in squeezed)
    assert all(t.metrics is not None and t.metrics.max_abs_diff_index == (300, 0)  # in dir2's shape
               for t in squeezed if not exact)


def _plan_pairs(run1: Path, run2: Path) -> list[Any]:
    from ilstore.store.registry import open_run
    from ilstore_compare.pairing import build_plan

    with open_run(run1) as r1, open_run(run2) as r2:
        return list(build_plan(r1, r2, steps=None, modules=None, name_map=None).pairs)
