"""Comparisons made of many small tensors (issue 18, "compare at memory speed").

A comparer plans a window of ~4,096 pairs, then loads them. A window of small steps spans many
steps, more than the readers used to keep: each step's metadata was read again when its tensors
loaded (the ``pt`` call directories, the ``safetensors`` indexes), and every structure holding
a ``same_as`` body's original (``safetensors``, ``hdf5``) or every structure of the window (the
``hdf5`` reader's ``prepare_loads``) was parsed again. The readers now keep a window's metadata,
bounded by its size, and look a tensor's node up by key (the hdf5 reader is handed the window's
nodes by the comparer with its planned loads, and keeps 4 steps of structures). These tests count the reads, check the
bounds and that the result is the same whatever the caches hold.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ilstore
from ilstore.keys import TensorKey
from ilstore.store import base, pt
from ilstore.store import safetensors as st
from ilstore_compare import _kernel as metrics_kernel
from ilstore_compare import compare, engine, metrics
from test_stats_compare_divergent import _same  # every field, count and report equal

BACKENDS = ["pt", "safetensors", "hdf5"]
#: More steps than the readers kept before (64), fewer pairs than a window (4,096).
STEPS = 70


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU()).eval()


def _run(out: Path, run_id: str, backend: str, delta: float) -> Path:
    """Every step logged; a ReLU's input is the Linear's output before it (stored ``same_as``)."""
    model = _model()
    x = torch.randn(1, 4, generator=torch.Generator().manual_seed(1)) + delta
    config = {"output_dir": str(out), "run_id": run_id, "backend": backend, "log_step_ids": []}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        for _ in range(STEPS):
            model(x)
    assert cap.run_dir is not None
    return cap.run_dir


@pytest.fixture(scope="module", params=BACKENDS)
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    out = tmp_path_factory.mktemp(f"small-{request.param}")
    return request.param, _run(out, "a", request.param, 0.0), _run(out, "b", request.param, 1e-3)


def _counting(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, key: Any) -> Counter[Any]:
    """Count the calls of ``owner.name`` by ``key(*args)``."""
    seen: Counter[Any] = Counter()
    original = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        seen[key(*args)] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return seen


def test_the_runs_have_same_as_bodies(runs: tuple[str, Path, Path]) -> None:
    """What the read counts below are about: bodies stored once and referred to."""
    _backend, a, _b = runs
    with ilstore.open_run(a) as run:
        keys = run.keys(STEPS - 1)
        assert any("same_as" in run.meta(k) for k in keys) and len(keys) == 8


def test_each_structure_is_read_once(runs: tuple[str, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each side of each call is read from the files once per comparison: loading a ``same_as``
    body looks its node up in the window's structures; the hdf5 reader's ``prepare_loads`` is handed
    the plan's nodes."""
    backend, a, b = runs
    cls = type(ilstore.open_run(a))
    reads = _counting(monkeypatch, cls, "_read_structure", lambda self, call, kind: (str(self.run_dir), call, kind))
    result = compare(a, b)
    assert result.exit_code == 1 and len(result.tensors) == STEPS * 8
    assert len({(run, call) for run, call, _kind in reads}) == 2 * STEPS * 4  # two runs, four calls a step
    assert max(reads.values()) == 1, [k for k, n in reads.items() if n > 1][:3]


def test_each_step_is_listed_once(runs: tuple[str, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A step's own metadata (``pt``: its call directories; ``safetensors``: its index) is read
    once per comparison, not once to plan and again to load."""
    backend, a, b = runs
    if backend == "pt":
        reads = _counting(monkeypatch, pt.PtReader, "_remember", lambda self, step, mapping: (str(self.run_dir), step))
    elif backend == "safetensors":
        reads = _counting(monkeypatch, st, "_parse_index", lambda path, step, data: str(path))
    else:
        pytest.skip("an hdf5 step is its file: see test_each_structure_is_read_once")
    compare(a, b)
    assert len(reads) == 2 * STEPS and max(reads.values()) == 1


@pytest.mark.parametrize("pairs", [5, 4096])
def test_the_smallest_caches_give_the_same_result(runs: tuple[str, Path, Path], monkeypatch: pytest.MonkeyPatch,
                                                  pairs: int) -> None:
    """Metadata dropped from every cache as soon as it may be (and read again): the same result."""
    _backend, a, b = runs
    with monkeypatch.context() as m:
        m.setattr(engine, "_WINDOW_PAIRS", pairs)
        usual = compare(a, b)
    with monkeypatch.context() as m:
        m.setattr(engine, "_WINDOW_PAIRS", pairs)
        m.setattr(base, "_CACHED_STEPS", 1)
        m.setattr(base, "_CACHED_NODES", 1)
        m.setattr(pt, "_CACHED_CALLS", 1)
        m.setattr(st, "_KEEP_INDEX_ENTRIES", 1)
        small = compare(a, b)
    _same(small, usual)


def test_the_structure_cache_is_bounded_and_answers_as_the_files(runs: tuple[str, Path, Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    backend, a, _b = runs
    monkeypatch.setattr(base, "_CACHED_NODES", 20)
    with ilstore.open_run(a) as fresh:
        want = {k: dict(fresh.meta(k)) for k in fresh.keys()}
    with ilstore.open_run(a) as run:
        for step in run.steps():
            for key in run.keys(step):
                assert run.meta(key) == want[key]
            cache = run._structures
            assert step in cache
            assert run._cached_weight == sum(s.weight for s in cache.values())
            # steps beyond the fourth only for a reader that looks nodes up again, while they
            # and their nodes are 20 or fewer
            bound = 20 if run.window_nodes else 0
            assert len(cache) <= base._CACHED_STEPS or run._cached_weight <= bound
            assert len(cache) <= max(base._CACHED_STEPS, bound)
        # a node looked up by key is the one a walk of its structure gives
        key = run.keys(0)[0]
        walked = dict(run.tensor_nodes(key.call_key, key.kind))
        assert run.meta(key) is walked[key]
        with pytest.raises(KeyError, match="no tensor"):
            run.meta(TensorKey(0, key.module, 0, key.kind, ("7",)))
        with pytest.raises(KeyError):
            run.meta(TensorKey(0, "no.such.module", 0, "inputs", ()))
        run.close()
        assert run._cached_weight == 0 and not run._structures


def test_structures_read_alone_weigh_too(runs: tuple[str, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Convert and replay only ask for structures, never for their nodes: those sides must weigh
    as soon as they are read (they once weighed nothing until walked, so a reader kept up to
    ``_CACHED_NODES`` steps of them: 1,200 steps of a 30-module statistics run held 122-169 MiB)."""
    _backend, a, _b = runs
    monkeypatch.setattr(base, "_CACHED_NODES", 20)
    with ilstore.open_run(a) as run:
        for step in run.steps():
            for call in run.calls(step):
                for kind in ("inputs", "outputs"):
                    run.structure(call, kind)
            assert run._cached_weight == sum(s.weight for s in run._structures.values())
            assert all(s.weight >= len(s) for s in run._structures.values())  # every side weighs 1 at least
            assert len(run._structures) <= max(base._CACHED_STEPS, 20 // 4)
        indexes = getattr(run, "_indexes", None)
        if indexes is not None:  # safetensors: an index weighs its records too
            from ilstore.store.safetensors import _index_weight

            index = next(iter(indexes.values()))
            assert _index_weight(index) > len(index.tensors) + 1


def test_pt_call_directories_kept_by_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``pt`` reader keeps steps' call directories up to ``_CACHED_CALLS`` calls (the last
    step's always), and a step dropped reads the same again."""
    a = _run(tmp_path, "a", "pt", 0.0)
    with ilstore.open_run(a) as run:
        want = {key: run.load(key).clone() for key in run.keys() if run.meta(key).get("stored", True)}
    monkeypatch.setattr(pt, "_CACHED_CALLS", 10)
    with ilstore.open_run(a) as run:
        assert isinstance(run, pt.PtReader)
        for _sweep in range(2):
            for step in run.steps():
                for key in run.keys(step):
                    if key in want:
                        assert torch.equal(run.load(key), want[key])
                dirs = run._call_dirs
                assert run._dir_calls == sum(len(m) for m in dirs.values()) <= 10 and step in dirs
                assert {call.step for call in run._dir_strs} <= set(dirs)


def test_safetensors_recent_weighs_its_items() -> None:
    recent = st._Recent(5, len, 6)
    recent.keep(1, "abc")
    recent.keep(2, "de")
    assert list(recent) == [1, 2] and recent.weight == 5
    recent.keep(3, "fg")  # 7 > 6: the oldest goes
    assert list(recent) == [2, 3] and recent.weight == 4
    recent.keep(2, "xyzuvw")  # replaced: weighed again; alone over the budget, it stays
    assert list(recent) == [2] and recent.weight == 6
    recent.keep(4, "0123456789")
    assert list(recent) == [4] and recent.weight == 10
    recent.clear()
    assert recent.weight == 0
    plain = st._Recent(2)
    for i in range(4):
        plain.keep(i, "x" * 100)
    assert list(plain) == [2, 3] and plain.weight == 0


# -- the metrics of a small pair straight from the tensors' memory ------------------------------
def _general(a: torch.Tensor, b: torch.Tensor, **options: Any) -> metrics.TensorMetrics:
    """:func:`compare_tensors` as it was before its one-call path: everything through ``_feed``."""
    acc = metrics._Accumulator()
    metrics._feed(acc, a, b, 0, exact=False, chunk=metrics.CHUNK, **options)
    return acc.result(a.numel(), tuple(a.shape))


def _values(dtype: torch.dtype, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    b = (a.double() + torch.randn(n, generator=gen, dtype=torch.float64) * 1e-3).to(dtype)
    info = torch.finfo(dtype)
    special = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, info.tiny / 4, -info.tiny / 8, info.max]
    for i, value in enumerate(special):  # on either side, or both
        if seed % 3 != 1:
            a[(i * 7 + seed) % n] = value
        if seed % 3 != 2:
            b[(i * 5 + seed) % n] = value
    a[-1], b[-1] = -0.0, 0.0
    return a, b


@pytest.mark.skipif(not metrics_kernel.enabled(), reason="the fused kernel is not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("options", [{"rtol": 1e-5, "atol": 1e-8, "equal_nan": False},
                                     {"rtol": 0.0, "atol": 0.0, "equal_nan": True},
                                     {"rtol": 0.5, "atol": 1e-3, "equal_nan": True}], ids=["usual", "zero", "loose"])
def test_one_call_metrics_equal_the_general_ones_bit_for_bit(dtype: torch.dtype, seed: int,
                                                             options: dict[str, Any]) -> None:
    for n in (1, 3, 64, 257):
        a, b = _values(dtype, max(n, 16), seed)
        a, b = a[:n].clone().reshape(1, n), b[:n].clone().reshape(1, n)
        fast = metrics._fused_whole(a, b, **options)
        assert fast is not None
        assert repr(fast) == repr(_general(a, b, **options)) == repr(metrics.compare_tensors(a, b, **options))
    a, b = _values(dtype, 300, seed)
    assert repr(metrics.compare_tensors(a, b, **options)) == repr(_general(a, b, **options))


@pytest.mark.parametrize("pair", ["bf16", "f16", "mixed", "int", "bool", "complex", "strided", "offset", "empty",
                                  "neg_view"])
def test_other_pairs_take_the_general_path(pair: str) -> None:
    """Only a contiguous CPU pair of one kernel dtype goes the one-call way; the others are measured
    as before (a strided pair or a view with an offset that does go is read at its own elements)."""
    a, b = _values(torch.float32, 64, 4)
    if pair == "bf16":
        a, b = a.bfloat16(), b.bfloat16()
    elif pair == "f16":
        a, b = a.half(), b.half()
    elif pair == "mixed":
        b = b.double()
    elif pair == "int":
        a, b = torch.arange(64), torch.arange(64).flip(0)
    elif pair == "bool":
        a, b = torch.arange(64) % 2 == 0, torch.arange(64) % 3 == 0
    elif pair == "complex":
        a, b = torch.complex(a.nan_to_num(), b.nan_to_num()), torch.complex(b.nan_to_num(), a.nan_to_num())
    elif pair == "strided":
        a, b = a.reshape(8, 8).t(), b.reshape(8, 8).t()
    elif pair == "offset":  # contiguous views that do not start their storage: the one-call path, rightly read
        a, b = a[5:37], b[9:41]
    elif pair == "empty":
        a, b = a[:0], b[:0]
    elif pair == "neg_view":
        a, b = torch._neg_view(a), b
    options = {"rtol": 1e-5, "atol": 1e-8, "equal_nan": False}
    if pair == "neg_view":
        assert metrics._fused_whole(a, b, **options) is None
        return
    fast = metrics._fused_whole(a, b, **options)
    assert (fast is not None) == (pair == "offset" and metrics_kernel.enabled())
    assert repr(metrics.compare_tensors(a, b, **options)) == repr(_general(a.contiguous(), b.contiguous(), **options))


def test_without_the_kernel_the_general_path_measures(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _values(torch.float32, 64, 0)
    options = {"rtol": 1e-5, "atol": 1e-8, "equal_nan": False}
    want = repr(metrics.compare_tensors(a, b, **options))
    monkeypatch.setattr(metrics, "fused", lambda *args, **kwargs: None)
    assert metrics._fused_whole(a, b, **options) is None
    assert repr(metrics.compare_tensors(a, b, **options)) == want
