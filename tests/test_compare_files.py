"""Large float32/float64 pairs are compared straight from their files, a piece at a time
(``StoreReader.open_body`` + ``metrics.compare_files``): the result is the loaded comparison's,
bit for bit and report for report, in every backend and with any number of workers; what cannot
be read that way (other dtypes, small tensors, a pt header not learned yet, encoded or damaged
bodies) is loaded as before; a file that changes after its body was opened is reported as a load
reports it; and every descriptor opened is closed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import ilstore
from compare_helpers import BACKENDS, need_backend
from ilstore.store import open_run
from ilstore.testing import conformance_tensors
from ilstore_compare import _kernel, compare, engine, metrics
from ilstore_compare.result import SHAPE_MISMATCH, UNREADABLE
from test_stats_compare_divergent import _same

needs_kernel = pytest.mark.skipif(not _kernel.enabled(), reason="the fused kernel is not built here")


class Emit(nn.Module):
    """One pass-through child per input tensor: each tensor is a root input, a child's input and
    output and a root output (de-duplicated: one body, the others refer to it)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.parts = nn.ModuleList(Pass() for _ in range(n))

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(part(x) for part, x in zip(self.parts, xs, strict=True))


class Pass(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _tensors(variant: str) -> list[torch.Tensor]:
    """Large float32/float64 tensors with NaN, +-inf, -0, ties of the largest difference, tiny
    references; a small one and a bfloat16 one (loaded). ``b`` perturbs some elements."""
    g = torch.Generator().manual_seed(7)
    f32 = torch.randn(300, 1000, generator=g)
    f32.view(-1)[::977] = float("nan")
    f32.view(-1)[5::1013] = float("inf")
    f32.view(-1)[9::1019] = -0.0
    f32.view(-1)[[50_000, 250_000]] = 1.0
    f64 = torch.randn(131_072 + 77, generator=g, dtype=torch.float64)  # not a whole number of pieces
    f64[100::4099] = float("-inf")
    tiny = torch.full((70_000,), 1e-170, dtype=torch.float64)  # equal, squares to 0: max_rel_diff 0 from the values
    exact = torch.randn(200_000, generator=g)  # equal on both sides
    small = torch.randn(1000, generator=g)
    half = torch.randn(300_000, generator=g).to(torch.bfloat16)
    if variant == "b":
        f32 = f32.clone()
        f32.view(-1)[3::1009] *= 1 + 1e-4
        f32.view(-1)[50_000] += 5.0  # the same largest difference twice: the first is reported
        f32.view(-1)[250_000] += 5.0
        f32.view(-1)[11::2003] = float("nan")
        f64 = f64 * (1 + 1e-9)
        small = small + 1e-3
        half = (half.float() * 1.01).to(torch.bfloat16)
    return [f32, f64, tiny, exact, small, half, f32[:2].clone()]


def _runs(tmp_path: Path, backend: str, b_shape: tuple[int, ...] | None = None) -> tuple[Path, Path]:
    """Runs a and b of :func:`_tensors`; ``b_shape``: b's large float32 tensor reshaped so."""
    need_backend(backend)
    out = []
    for variant in ("a", "b"):
        xs = _tensors(variant)
        if variant == "b" and b_shape is not None:
            xs[0] = xs[0].reshape(b_shape)
        model = Emit(len(xs))
        cfg = {"output_dir": str(tmp_path), "run_id": variant, "backend": backend}
        with torch.no_grad(), ilstore.capture(model, cfg) as cap:
            model(*xs)
        assert cap.run_dir is not None
        out.append(cap.run_dir)
    return out[0], out[1]


class _Spy:
    """Counts the pairs compare_files measured (not None)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.measured: list[str] = []
        real = engine.compare_files

        def spy(a: Any, b: Any, **kw: Any) -> Any:
            found = real(a, b, **kw)
            if found is not None:
                self.measured.append(str(a.dtype))
            return found

        monkeypatch.setattr(engine, "compare_files", spy)


def _loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "_FILE_BYTES", 1 << 62)  # no pair is large enough: every one is loaded


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@needs_kernel
@pytest.mark.parametrize("backend", BACKENDS)
def test_from_the_files_is_the_loaded_comparison(tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _runs(tmp_path, backend)
    spy = _Spy(monkeypatch)
    before = _fds()
    for workers in (1, 2):
        with monkeypatch.context() as m:
            _loaded(m)
            loaded = compare(a, b, rtol=1e-5, atol=1e-8, workers=workers)
        assert loaded.summary.mismatched > 0
        spy.measured.clear()
        streamed = compare(a, b, rtol=1e-5, atol=1e-8, workers=workers)
        _same(streamed, loaded)
        # both large dtypes went the files' way (pt: once torch.load has read a file of the shape)
        assert {"torch.float32", "torch.float64"} <= set(spy.measured), (workers, spy.measured)
        assert _fds() == before
    # the details of the pairs that went that way: ties, NaN counts, tiny references
    outputs = [t.metrics for t in streamed.tensors if t.key.kind == "outputs" and t.metrics is not None]
    f32 = next(m for m in outputs if m.numel == 300_000)
    assert f32.max_abs_diff_index is not None and np.ravel_multi_index(f32.max_abs_diff_index, (300, 1000)) == 50_000
    assert f32.nan1 > 0 and f32.nan2 > f32.nan1
    tiny = next(m for m in outputs if m.numel == 70_000)
    assert tiny.max_rel_diff == 0.0  # the reference squares to 0, but is not 0


@needs_kernel
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_cut_short_after_it_was_opened_is_reported_as_a_load_reports_it(
        tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _runs(tmp_path, backend)
    compare(a, b)  # (pt: headers learned)
    real, cut = engine.compare_files, []

    def cut_first(x: Any, y: Any, **kw: Any) -> Any:
        if not cut and x.dtype is torch.float32:
            os.truncate(y.path, y.offset + y.nbytes // 2)  # the reference's file, after its body was opened
            cut.append(str(y.path))
        return real(x, y, **kw)

    monkeypatch.setattr(engine, "compare_files", cut_first)
    before = _fds()
    result = compare(a, b, keep_going=True)
    assert cut
    lost = [t for t in result.tensors if t.status == UNREADABLE]
    # named as the load names it: the file (pt, safetensors), or the run and the call it lost (hdf5)
    assert lost and any(Path(cut[0]).name in (t.note or "") or f"{b} (dir2)" in (t.note or "") for t in lost), \
        [t.note for t in lost]
    assert result.exit_code != 0
    assert _fds() == before
    with pytest.raises(ilstore.StoreError):
        compare(a, b)  # without keep_going: the load's error
    assert _fds() == before
    with pytest.raises(ilstore.StoreError):
        compare(a, b, workers=2)
    assert _fds() == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_body_gives_the_loaded_bytes_or_nothing(tmp_path: Path, backend: str) -> None:
    """Every stored tensor of every dtype: a body is exactly the loaded tensor's bytes, dtype and
    shape (de-duplicated ones: their original's), or None (then only a load reads it)."""
    need_backend(backend)
    model = nn.Sequential(nn.Identity(), nn.Identity())
    values = dict(conformance_tensors())
    values["large"] = torch.randn(200_000)
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "r",
                                                  "backend": backend}) as cap:
        model(values)
    assert cap.run_dir is not None
    opened = 0
    with open_run(cap.run_dir) as reader:
        keys = reader.keys()
        for key in keys:  # (pt: torch.load reads each header once)
            if reader.meta(key).get("stored") is not False:
                reader.load(key)
        for key in keys:
            node = reader.meta(key)
            body = reader.open_body(key, node)
            if node.get("stored") is False:
                assert body is None
                continue
            tensor = reader.load(key)
            if body is None:
                continue
            with body:
                opened += 1
                assert body.dtype == tensor.dtype and body.shape == tuple(tensor.shape), key
                data = os.pread(body.fd, body.nbytes, body.offset)
                want = tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
                assert data == want, key
    # float32 and float64 bodies are where the tensor's memory is in every backend
    assert opened >= 4


@needs_kernel
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_files_is_fused_to_the_bit(tmp_path: Path, dtype: Any) -> None:
    rng = np.random.default_rng(3)
    n = 3 * _kernel.FILE_CHUNK // np.dtype(dtype).itemsize + 1234
    b = rng.standard_normal(n).astype(dtype)
    a = (b + rng.standard_normal(n).astype(dtype) * dtype(1e-3)).astype(dtype)
    a[::101] = np.nan
    b[7::211] = np.inf
    a[::5] = b[::5]
    a[1000], a[n - 10] = b[1000] + 9, b[n - 10] + 9  # a tie: the first is reported
    paths = []
    for name, values, head in (("a", a, 24), ("b", b, 7)):
        path = tmp_path / name
        path.write_bytes(b"h" * head + values.tobytes())
        paths.append((path, head))
    want = _kernel.fused(a, b, rtol=1e-4, atol=1e-6, equal_nan=False, with_ulp=True)
    assert want is not None and want.max_at == 1000
    fds = [os.open(p, os.O_RDONLY) for p, _h in paths]
    try:
        x, y = (_kernel.FileSide(fd, head, np.dtype(dtype), str(p)) for fd, (p, head) in zip(fds, paths, strict=True))
        for bounds in (None, metrics._bounds(n, 4, _kernel.BLOCK)):
            got = _kernel.fused_files(x, y, n, rtol=1e-4, atol=1e-6, equal_nan=False, with_ulp=True, bounds=bounds,
                                      run_all=(lambda fns: [f() for f in reversed(fns)][::-1]) if bounds else None)
            assert repr(got) == repr(want)
        os.truncate(paths[1][0], paths[1][1] + (n - 1) * np.dtype(dtype).itemsize)
        with pytest.raises(_kernel.ShortRead):
            _kernel.fused_files(x, y, n, rtol=1e-4, atol=1e-6, equal_nan=False, with_ulp=True)
    finally:
        for fd in fds:
            os.close(fd)


class _FakeBody:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_large_pairs_opened_from_their_files_run_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two large pairs whose bodies were opened run at once (the barrier breaks otherwise), each
    handed its bodies; one that could not be opened still waits for the memory of the one
    before; results come in order, and every body opened is closed, also after an error."""
    import threading

    mib = 2**20
    sizes = {"big1": 400 * mib, "big2": 400 * mib, "shut": 400 * mib, "big3": 400 * mib}
    monkeypatch.setattr(engine, "_pair_bytes", lambda pair: sizes[pair])
    made: dict[str, tuple[_FakeBody, _FakeBody]] = {}

    def opened(pair: str) -> Any:
        if pair == "shut":
            return None
        made[pair] = (_FakeBody(), _FakeBody())
        return made[pair]

    together = threading.Barrier(2, timeout=10)
    lock, running, peak, given = threading.Lock(), [0], [0], {}

    def fn(pair: str, bodies: Any = None) -> str:
        given[pair] = bodies
        loaded = 0 if isinstance(bodies, tuple) else sizes[pair]
        with lock:
            running[0] += loaded
            peak[0] = max(peak[0], running[0])
        if pair in ("big1", "big2"):
            together.wait()
        with lock:
            running[0] -= loaded
        for body in bodies or ():
            body.close()
        return pair.upper()

    order = ["big1", "big2", "shut", "big3"]
    assert list(engine._stream(order, fn, 2, None, opened=opened)) == [p.upper() for p in order]  # type: ignore[arg-type]
    assert given["shut"] is False and given["big1"] is made["big1"] and given["big3"] is made["big3"]
    assert peak[0] <= 400 * mib  # the loaded pair ran alone
    assert all(b.closed for pair in made.values() for b in pair)

    made.clear()

    def failing(pair: str, bodies: Any = None) -> str:
        try:
            if pair == "big1":
                raise RuntimeError("bad pair big1")
            return pair.upper()
        finally:  # as the engine's pair function does
            for body in bodies or ():
                body.close()

    with pytest.raises(RuntimeError, match="bad pair big1"):
        list(engine._stream(order, failing, 2, None, opened=opened))  # type: ignore[arg-type]
    # each opened body is closed: by the pair that was handed it, or, never handed, by the stream
    assert made and all(b.closed for pair in made.values() for b in pair)

    made.clear()

    def interrupted(pair: str) -> Any:  # Ctrl-C while the third pair's files are opened
        if pair == "shut":
            raise KeyboardInterrupt
        return opened(pair)

    with pytest.raises(KeyboardInterrupt):
        list(engine._stream(order, fn, 2, None, opened=interrupted))  # type: ignore[arg-type]
    assert set(made) == {"big1", "big2"} and all(b.closed for pair in made.values() for b in pair)


@pytest.mark.parametrize("backend", ["pt"])
def test_without_the_kernel_no_body_is_opened(tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch path (no compiler, ``ILSTORE_COMPARE_KERNEL=0``) loads every pair: no file is
    opened for pieces it would not read."""
    from ilstore.store.base import StoreReader

    a, b = _runs(tmp_path, backend)
    want = compare(a, b, workers=2)
    opened: list[object] = []
    real = StoreReader.open_body
    monkeypatch.setattr(StoreReader, "open_body", lambda self, *x: opened.append(x) or real(self, *x))
    monkeypatch.setattr(engine, "kernel_enabled", lambda: False)
    monkeypatch.setattr(_kernel.LIBRARY, "load", lambda: None)
    got = compare(a, b, workers=2)
    assert not opened
    assert [(t.key, t.status) for t in got.tensors] == [(t.key, t.status) for t in want.tensors]


def _edit_index(run: Path, edit: Any) -> int:
    """``edit(doc)`` on each step's safetensors ``index.json`` of ``run``, written back; what the
    edits return, added up."""
    import json

    edited = 0
    for path in sorted(run.glob("step_*/index.json")):
        doc = json.loads(path.read_text())
        edited += edit(doc)
        path.write_text(json.dumps(doc))
    return edited


def _edit_nodes(doc: Any, edit: Any) -> int:
    """Apply ``edit`` to every tensor node (a dict with a ``dtype``) in a JSON document."""
    count = 0
    if isinstance(doc, dict):
        if "dtype" in doc and "shape" in doc:
            count += edit(doc) or 0
        for value in doc.values():
            count += _edit_nodes(value, edit)
    elif isinstance(doc, list):
        for value in doc:
            count += _edit_nodes(value, edit)
    return count


def _both_ways(a: Path, b: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> tuple[Any, Any]:
    with monkeypatch.context() as m:
        _loaded(m)
        loaded = compare(a, b, keep_going=True, workers=workers)
    return compare(a, b, keep_going=True, workers=workers), loaded


@needs_kernel
def test_a_safetensors_encoding_the_load_refuses_is_not_read_from_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An index entry whose ``encoding`` is null: the load reports it (unknown encoding), and so
    does the comparison, instead of reading the bytes as they are."""
    a, b = _runs(tmp_path, "safetensors")

    def null_encodings(doc: dict[str, Any]) -> int:
        for entry in doc["tensors"].values():
            entry["encoding"] = None
        return len(doc["tensors"])

    assert _edit_index(b, null_encodings)
    for workers in (1, 2):
        streamed, loaded = _both_ways(a, b, monkeypatch, workers)
        assert any(t.status == UNREADABLE for t in loaded.tensors)
        _same(streamed, loaded)


@needs_kernel
@pytest.mark.parametrize("backend", ["safetensors"])
def test_a_de_duplicated_node_that_disagrees_with_its_original_is_loaded(
        tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``same_as`` node that says another shape than its original (a damaged or hand-edited
    run), the same shape as the other run's tensor: its body is not the node's tensor, so it is
    loaded, and the comparison is the loaded one (here: shape mismatches), not an error."""
    a, b = _runs(tmp_path, backend, b_shape=(1000, 300))

    def transpose(node: dict[str, Any]) -> int:
        if "same_as" in node and node["shape"] == [300, 1000]:
            node["shape"] = [1000, 300]
            return 1
        return 0

    assert _edit_index(a, lambda doc: _edit_nodes(doc, transpose))
    for workers in (1, 2):
        streamed, loaded = _both_ways(a, b, monkeypatch, workers)
        assert any(t.status == SHAPE_MISMATCH for t in loaded.tensors)
        _same(streamed, loaded)


def test_at_most_two_units_a_worker_hold_their_bodies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bodies are opened as their pair is about to start, not as it comes within reach: however
    many large pairs are queued, at most _OPEN_AHEAD per worker hold descriptors at once."""
    import threading

    monkeypatch.setattr(engine, "_pair_bytes", lambda pair: 400 * 2**20)
    lock, open_now, peak = threading.Lock(), [0], [0]

    class Counted(_FakeBody):
        def __init__(self) -> None:
            super().__init__()
            with lock:
                open_now[0] += 1
                peak[0] = max(peak[0], open_now[0])

        def close(self) -> None:
            if not self.closed:
                with lock:
                    open_now[0] -= 1
            super().close()

    def fn(pair: int, bodies: Any = None) -> int:
        try:
            return pair
        finally:
            for body in bodies or ():
                body.close()

    for workers in (2, 4):
        peak[0] = 0
        order = list(range(100))
        got = list(engine._stream(order, fn, workers, None, opened=lambda p: (Counted(), Counted())))  # type: ignore[arg-type]
        assert got == order and open_now[0] == 0
        assert 2 < peak[0] <= 2 * engine._OPEN_AHEAD * workers
