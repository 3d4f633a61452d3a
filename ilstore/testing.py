"""The storage conformance suite, shipped in the package so every backend runs the same tests.

A backend (built-in or third-party) is tested by subclassing :class:`StoreConformance` in a
pytest module, naming the backend and, so that the backend is never only checked against
itself, overriding :meth:`StoreConformance.native_load` with a "bypass" that reads a tensor
with the file format's own library (``torch.load``, ``safetensors.safe_open``, ``h5py``...):

Example:
    >>> class TestMyStore(StoreConformance):  # doctest: +SKIP
    ...     backend = "mystore"             # a registered name (or an ilstore.backends entry point)
    ...     options = {"level": 3}          # backend_options used by every test
    ...
    ...     def native_load(self, run_dir, key, meta):
    ...         return my_format.read(run_dir / ..., str(key))

The tests drive the backend both through the raw writer API and through :func:`ilstore.capture`
on small models. They need ``pytest`` (not a runtime dependency of ilstore).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import ilstore

from .errors import CorruptFileError
from .keys import CallKey, TensorKey
from .manifest import JOURNAL_NAME, MANIFEST_NAME, new_manifest
from .records import Record, TensorPolicy, build_record, finalize_stats
from .store.base import StepInfo, StoreReader, StoreWriter
from .store.registry import get_backend, open_run

__all__ = ["StoreConformance", "conformance_tensors", "ConformanceModel", "FakeModelOutput", "assert_bits_equal",
           "same_bits", "neutral_meta"]

_INF, _NAN = float("inf"), float("nan")
_FLOAT_STATS = ("min", "max", "mean", "std", "abs_max", "l2_norm", "nan_count", "inf_count")


def _bits_of(values: list[int], int_dtype: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(int_dtype).view(dtype)


def _all_patterns(dtype: torch.dtype) -> torch.Tensor:
    """Every bit pattern of a 1- or 2-byte dtype: all NaN payloads, denormals, -0.0, infinities."""
    if torch.empty((), dtype=dtype).element_size() == 1:
        return torch.arange(256, dtype=torch.int16).to(torch.uint8).view(dtype)
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)


def conformance_tensors() -> dict[str, torch.Tensor]:
    """Tensors of every dtype a backend must store, with special values, 0-dim and empty ones.

    Floats carry NaN (with payloads), ±inf, -0.0, denormals and the extremes; 1- and 2-byte
    floats carry every bit pattern; integers their extremes. Deterministic.
    """
    f64 = [0.0, -0.0, 1.0, -2.5, _INF, -_INF, _NAN, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308,
           -1.7976931348623157e308]
    f32 = [0.0, -0.0, 1.0, -2.5, _INF, -_INF, _NAN, 1e-45, 1.1754944e-38, 3.4028235e38, -3.4028235e38]
    t: dict[str, torch.Tensor] = {
        "float64": torch.tensor(f64, dtype=torch.float64),
        "float64_nan_payloads": _bits_of([0x7FF0000000000001, 0x7FF8DEADBEEF0000, -0x0008000000000001],
                                         torch.int64, torch.float64),
        "float32": torch.tensor(f32, dtype=torch.float32).reshape(1, 11),
        "float32_nan_payloads": _bits_of([0x7F800001, 0x7FC12345, -0x00012345], torch.int32, torch.float32),
        "float16": _all_patterns(torch.float16),
        "bfloat16": _all_patterns(torch.bfloat16),
        "float8_e4m3fn": _all_patterns(torch.float8_e4m3fn),
        "float8_e5m2": _all_patterns(torch.float8_e5m2).reshape(16, 16),
        "int8": torch.arange(-128, 128, dtype=torch.int16).to(torch.int8),
        "int16": torch.tensor([-(2**15), -1, 0, 1, 2**15 - 1], dtype=torch.int16),
        "int32": torch.tensor([-(2**31), -1, 0, 1, 2**31 - 1], dtype=torch.int32),
        "int64": torch.tensor([-(2**63), -1, 0, 1, 2**63 - 1], dtype=torch.int64),
        "uint8": torch.arange(256, dtype=torch.int16).to(torch.uint8),
        "bool": torch.tensor([[True, False, True], [False, False, True]]),
        "complex64": torch.complex(torch.tensor(f32, dtype=torch.float32),
                                   torch.tensor(f32[::-1], dtype=torch.float32)),
        "complex128": torch.complex(torch.tensor(f64, dtype=torch.float64),
                                    torch.tensor(f64[::-1], dtype=torch.float64)),
        "float32_0d": torch.tensor(-0.0),
        "bfloat16_0d": torch.tensor(3.0, dtype=torch.bfloat16),
        "float8_e4m3fn_0d": torch.tensor(448.0).to(torch.float8_e4m3fn),
        "int64_0d": torch.tensor(-(2**63)),
        "bool_0d": torch.tensor(True),
        "complex128_0d": torch.tensor(complex(_NAN, -0.0), dtype=torch.complex128),
        "float32_empty": torch.empty(0),
        "bfloat16_empty": torch.empty(2, 0, 3, dtype=torch.bfloat16),
        "float8_e5m2_empty": torch.empty(0, dtype=torch.float8_e5m2),
        "int8_empty": torch.empty(0, 4, dtype=torch.int8),
        "bool_empty": torch.empty(0, dtype=torch.bool),
        "complex128_empty": torch.empty(0, 2, dtype=torch.complex128),
        "float32_rank5": torch.arange(32.0).reshape(2, 2, 2, 2, 2),
    }
    # dtypes of newer torch versions
    for name in ("float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"):
        if hasattr(torch, name):
            t[name] = _all_patterns(getattr(torch, name))
    for name, ints in (("uint16", torch.int16), ("uint32", torch.int32), ("uint64", torch.int64)):
        if hasattr(torch, name):
            t[name] = torch.tensor([0, 1, -1, 7], dtype=ints).view(getattr(torch, name))
    return t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, same shape, and the same bytes (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def assert_bits_equal(got: torch.Tensor, expected: torch.Tensor, what: object = "") -> None:
    """Assert :func:`same_bits`, with a message that names the tensor and what differs."""
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
    assert got.shape == expected.shape, f"{what}: shape {list(got.shape)} != {list(expected.shape)}"
    assert same_bits(got, expected), f"{what}: values differ in their bits"


def neutral_meta(reader: StoreReader, key: TensorKey) -> dict[str, Any]:
    """A key's metadata without the reader's own locator keys (comparable across backends)."""
    return {k: v for k, v in reader.meta(key).items() if k not in reader.locator_keys}


# -- small models --------------------------------------------------------------------------------
@dataclasses.dataclass
class FakeModelOutput:
    """Stands in for a transformers ``ModelOutput`` (a dataclass of optional fields)."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    extra: dict[str, Any] | None = None
    attentions: torch.Tensor | None = None


class _Clone(nn.Module):
    def forward(self, value: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in value.items()}


class _Echo(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x  # the captured output is the captured input: stored once (same_as)


class _Views(nn.Module):
    def forward(self, transposed: torch.Tensor, strided: torch.Tensor, conj: torch.Tensor,
                neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return transposed.t(), strided[::2]  # outputs are views of the inputs again


class _Nested(nn.Module):
    def forward(self, x: torch.Tensor, pair: tuple[torch.Tensor, torch.Tensor], *, mask: torch.Tensor | None = None,
                scale: float = 1.0, tag: str = "") -> FakeModelOutput:
        assert mask is not None
        return FakeModelOutput(last_hidden_state=x * scale, hidden_states=(x, x + 1),
                               extra={"list": [pair[0] * 2, [pair[1]]], "n": 3, "tag": tag, "mask": mask})


class _InPlace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.add_(1)
        return x * 2


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


class ConformanceModel(nn.Module):
    """A small model whose submodules exercise what a store must keep.

    ``zoo`` takes and returns :func:`conformance_tensors` (every dtype), ``views`` receives
    transposed, strided, conjugate and negative-bit views, ``nested`` takes keyword arguments
    and returns a ModelOutput-like dataclass of nested tuples/lists/dicts, ``echo`` returns its
    input (a de-duplicated tensor), ``inplace`` mutates its input, ``a`` is called twice and
    contains ``a.lin`` (nesting and call indices).
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.zoo = _Clone()
        self.a = _Inner()
        self.b = _Inner()
        self.echo = _Echo()
        self.views = _Views()
        self.nested = _Nested()
        self.inplace = _InPlace()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.zoo(conformance_tensors())
        h = self.b(self.a(self.a(x)))
        h = self.echo(h)
        base = torch.arange(24.0).reshape(4, 6) + x.sum()
        z = torch.complex(base, -base)
        self.views(base.t(), base[:, 1::2], z.conj(), z.conj().imag)
        out = self.nested(h, (x, x[0]), mask=x > 0, scale=2.0, tag="abc")
        return self.inplace(out.last_hidden_state.clone())


# -- the suite ------------------------------------------------------------------------------------
class StoreConformance:
    """Subclass in a test module, set :attr:`backend` (and :attr:`options`), override
    :meth:`native_load`. Every ``test_*`` method is one conformance requirement."""

    #: The backend's registered name.
    backend: ClassVar[str] = ""
    #: ``backend_options`` passed to its writer in every test.
    options: ClassVar[dict[str, Any]] = {}
    #: Whether the reader opens a run whose manifest is gone (dumps of other tools need it).
    reads_without_manifest: ClassVar[bool] = True

    # -- hooks for implementers -------------------------------------------------------------------
    def native_load(self, run_dir: Path, key: TensorKey, meta: dict[str, Any]) -> torch.Tensor:
        """Read one stored tensor with the file format's own library, not with the backend's reader.

        ``meta`` is the key's metadata as the reader gives it (it may name the file). The
        default skips the tests that use it.
        """
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------------------
    def config(self, out_dir: Path, run_id: str = "run", **overrides: Any) -> dict[str, Any]:
        cfg = {"output_dir": str(out_dir), "run_id": run_id, "backend": self.backend,
               "backend_options": dict(self.options), "on_error": "raise"}
        cfg.update(overrides)
        return cfg

    def capture_model(self, out_dir: Path, model: nn.Module, inputs: list[Any], run_id: str = "run",
                      **overrides: Any) -> Path:
        """Capture ``model(x)`` for every ``x`` of ``inputs`` (one step each) and return the run."""
        with torch.no_grad(), ilstore.capture(model, self.config(out_dir, run_id, **overrides)) as cap:
            for x in inputs:
                model(x)
        assert cap.run_dir is not None and cap.error is None, cap.error
        return cap.run_dir

    def new_writer(self, run_dir: Path) -> StoreWriter:
        writer = get_backend(self.backend).writer(run_dir, self.options)
        writer.open(new_manifest(self.backend, {"backend": self.backend}))
        return writer

    @staticmethod
    def record(step: int, module: str, kind: str, value: Any, call: int = 0, **policy: Any) -> Record:
        rec = build_record(CallKey(0, step, module, call), kind, value, TensorPolicy(pin_memory=False, **policy),
                           kwargs={} if kind != "outputs" else None)
        finalize_stats(rec)
        return rec

    def _native(self, run_dir: Path, key: TensorKey, meta: dict[str, Any]) -> torch.Tensor:
        try:
            return self.native_load(run_dir, key, meta)
        except NotImplementedError:
            pytest.skip(f"{type(self).__name__} does not implement native_load (the bypass reader)")

    def _stored_keys(self, run: StoreReader) -> list[TensorKey]:
        return [k for k in run.keys() if run.meta(k).get("stored") is not False]

    # -- registration and options ---------------------------------------------------------------------
    def test_registered_and_options_validated(self) -> None:
        backend = get_backend(self.backend)
        assert issubclass(backend.writer, StoreWriter) and issubclass(backend.reader, StoreReader)
        assert backend.writer.validate_options(self.options) == []
        problems = backend.writer.validate_options({"no_such_option_xyz": 1})
        assert len(problems) == 1 and "backend_options.no_such_option_xyz" in problems[0]
        with pytest.raises(ilstore.ConfigError, match="no_such_option_xyz"):
            ilstore.load_config({"backend": self.backend, "backend_options": {"no_such_option_xyz": 1}})

    # -- values ---------------------------------------------------------------------------------------
    def test_every_dtype_round_trips_bit_exactly(self, tmp_path: Path) -> None:
        tensors = conformance_tensors()
        writer = self.new_writer(tmp_path / "run")
        rec_in = self.record(0, "zoo", "inputs", (tensors["float32"], tensors["bfloat16_0d"]))
        rec_out = self.record(0, "zoo", "outputs", tensors)
        writer.write(rec_in)
        writer.write(rec_out)
        call = rec_out.call
        writer.end_step(StepInfo(0, [call], [call]))
        writer.close()
        with open_run(tmp_path / "run") as run:
            assert run.status == "complete" and run.steps() == [0]
            for name, tensor in tensors.items():
                key = TensorKey(0, "zoo", 0, "outputs", (name,))
                meta = run.meta(key)
                assert meta["dtype"] == str(tensor.dtype) and meta["shape"] == list(tensor.shape), name
                assert_bits_equal(run.load(key), tensor, key)
            assert_bits_equal(run.load(TensorKey(0, "zoo", 0, "inputs", ("1",))), tensors["bfloat16_0d"])

    def test_every_dtype_readable_natively(self, tmp_path: Path) -> None:
        tensors = conformance_tensors()
        writer = self.new_writer(tmp_path / "run")
        rec = self.record(0, "zoo", "outputs", tensors)
        writer.write(rec)
        writer.end_step(StepInfo(0, [rec.call], [rec.call]))
        writer.close()
        with open_run(tmp_path / "run") as run:
            for name, tensor in tensors.items():
                key = TensorKey(0, "zoo", 0, "outputs", (name,))
                assert_bits_equal(self._native(tmp_path / "run", key, run.meta(key)), tensor, f"native {key}")

    def test_zero_dim_and_empty_tensors(self, tmp_path: Path) -> None:
        values = {"scalar": torch.tensor(2.5), "empty": torch.empty(0), "empty_2d": torch.empty(3, 0),
                  "scalar_int": torch.tensor(7, dtype=torch.int32)}
        run_dir = self.capture_model(tmp_path, nn.Sequential(_Clone()), [values])
        with open_run(run_dir) as run:
            assert {k.path[-1] for k in run.keys(0)} == set(values)
            for name, tensor in values.items():
                for key in (TensorKey(0, "0", 0, "inputs", ("0", name)), TensorKey(0, "0", 0, "outputs", (name,))):
                    assert run.meta(key)["shape"] == list(tensor.shape), key
                    assert_bits_equal(run.load(key), tensor, key)

    def test_capture_of_every_dtype_through_a_model(self, tmp_path: Path) -> None:
        run_dir = self.capture_model(tmp_path, ConformanceModel(), [torch.randn(3, 4)])
        expected = conformance_tensors()
        with open_run(run_dir) as run:
            for name, tensor in expected.items():
                assert_bits_equal(run.load(TensorKey(0, "zoo", 0, "inputs", ("0", name))), tensor, name)
                assert_bits_equal(run.load(TensorKey(0, "zoo", 0, "outputs", (name,))), tensor, name)

    def test_noncontiguous_inputs_are_stored_as_their_values(self, tmp_path: Path) -> None:
        x = torch.randn(3, 4)
        run_dir = self.capture_model(tmp_path, ConformanceModel(), [x])
        base = torch.arange(24.0).reshape(4, 6) + x.sum()
        z = torch.complex(base, -base)
        expected = {("inputs", ("0",)): base.t(), ("inputs", ("1",)): base[:, 1::2],
                    ("inputs", ("2",)): z.conj().resolve_conj(), ("inputs", ("3",)): z.conj().imag.resolve_neg(),
                    ("outputs", ("0",)): base, ("outputs", ("1",)): base[:, 1::2][::2]}
        with open_run(run_dir) as run:
            for (kind, path), tensor in expected.items():
                key = TensorKey(0, "views", 0, kind, path)
                got = run.load(key)
                assert got.is_contiguous(), key
                assert_bits_equal(got, tensor.contiguous(), key)

    def test_nested_structures_and_keyword_inputs(self, tmp_path: Path) -> None:
        x = torch.randn(3, 4)
        model = ConformanceModel()
        run_dir = self.capture_model(tmp_path, model, [x])
        with torch.no_grad():
            h = model.b(model.a(model.a(x)))
        with open_run(run_dir) as run:
            call = CallKey(0, 0, "nested", 0)
            inputs = run.structure(call, "inputs")
            assert inputs is not None and inputs["type"] == "tuple" and inputs["items"][1]["type"] == "tuple"
            assert inputs["kwargs"]["scale"] == 2.0 and inputs["kwargs"]["tag"] == "abc"
            assert inputs["kwargs"]["mask"]["type"] == "tensor"
            outputs = run.structure(call, "outputs")
            assert outputs is not None and outputs["type"] == "dict" and outputs["class"] == "FakeModelOutput"
            items = outputs["items"]
            assert items["attentions"] is None and items["hidden_states"]["type"] == "tuple"
            assert items["extra"]["items"]["n"] == 3 and items["extra"]["items"]["list"]["type"] == "list"
            paths = {(k.kind, k.path) for k in run.keys(0) if k.module == "nested"}
            assert paths == {("inputs", ("0",)), ("inputs", ("1", "0")), ("inputs", ("1", "1")), ("inputs", ("mask",)),
                             ("outputs", ("last_hidden_state",)), ("outputs", ("hidden_states", "0")),
                             ("outputs", ("hidden_states", "1")), ("outputs", ("extra", "list", "0")),
                             ("outputs", ("extra", "list", "1", "0")), ("outputs", ("extra", "mask"))}
            values = {("inputs", ("0",)): h, ("inputs", ("1", "1")): x[0], ("inputs", ("mask",)): x > 0,
                      ("outputs", ("last_hidden_state",)): h * 2.0, ("outputs", ("hidden_states", "1")): h + 1,
                      ("outputs", ("extra", "list", "1", "0")): x[0], ("outputs", ("extra", "mask")): x > 0}
            for (kind, path), tensor in values.items():
                assert_bits_equal(run.load(call.tensor(kind, path)), tensor, (kind, path))

    def test_metadata_and_statistics_without_loading(self, tmp_path: Path) -> None:
        run_dir = self.capture_model(tmp_path, ConformanceModel(), [torch.randn(3, 4)])
        with open_run(run_dir) as run:
            for key in run.keys(0):
                meta = run.meta(key)
                assert meta["type"] == "tensor" and meta["device"] == "cpu", key
                assert meta["numel"] == math.prod(meta["shape"]), key
                if meta.get("stored") is False:
                    continue
                tensor = run.load(key)
                assert list(tensor.shape) == meta["shape"] and str(tensor.dtype) == meta["dtype"], key
                stats = meta["stats"]
                if tensor.dtype in (torch.float32, torch.float64) and tensor.numel():
                    finite = tensor[torch.isfinite(tensor)]
                    if finite.numel():
                        assert set(_FLOAT_STATS) <= set(stats), key
                        assert stats["min"] == float(finite.min()) and stats["max"] == float(finite.max()), key
                    assert stats["nan_count"] == int(torch.isnan(tensor).sum()), key
                    assert stats["inf_count"] == int(torch.isinf(tensor).sum()), key
                elif tensor.dtype in (torch.int32, torch.int64) and tensor.numel():
                    assert stats["min"] == int(tensor.min()) and stats["max"] == int(tensor.max()), key

    def test_execution_order_of_calls_and_keys(self, tmp_path: Path) -> None:
        model = ConformanceModel()
        starts: list[str] = []
        ends: list[str] = []
        handles = []
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(lambda m, a, n=name: starts.append(n)))
                handles.append(module.register_forward_hook(lambda m, a, o, n=name: ends.append(n)))
        with torch.no_grad():
            model(torch.randn(3, 4))
        for handle in handles:
            handle.remove()

        def indexed(names: list[str]) -> list[tuple[str, int]]:
            counts: dict[str, int] = {}
            out = []
            for n in names:
                out.append((n, counts.get(n, 0)))
                counts[n] = counts.get(n, 0) + 1
            return out

        run_dir = self.capture_model(tmp_path, model, [torch.randn(3, 4)])
        with open_run(run_dir) as run:
            calls = [(c.module, c.call) for c in run.calls(0)]
            assert calls == indexed(starts)
            assert ("a", 1) in calls and calls.index(("a.lin", 0)) < calls.index(("a", 1))
            assert [c.module for c in run.call_ends(0)] == ends
            order: list[tuple[str, int]] = []
            for key in run.keys(0):
                if not order or order[-1] != (key.module, key.call):
                    order.append((key.module, key.call))
            assert order == calls
            for call in run.calls(0):
                kinds = [k.kind for k in run.keys(0) if k.call_key == call]
                assert kinds == sorted(kinds, key=("inputs", "outputs", "post_fwd_inputs").index), call

    def test_several_steps(self, tmp_path: Path) -> None:
        lin = nn.Sequential(nn.Linear(4, 4))
        xs = [torch.full((1, 4), float(i)) for i in range(4)]
        run_dir = self.capture_model(tmp_path, lin, xs, log_step_ids=[0, 2, 3])
        with open_run(run_dir) as run:
            assert run.steps() == [0, 2, 3] and run.incomplete_steps() == [] and run.status == "complete"
            for step in (0, 2, 3):
                assert [(c.module, c.call) for c in run.calls(step)] == [("0", 0)]
                assert_bits_equal(run.load(TensorKey(step, "0", 0, "inputs", ("0",))), xs[step])
                with torch.no_grad():
                    assert_bits_equal(run.load(TensorKey(step, "0", 0, "outputs")), lin(xs[step]))

    def test_stats_only_records(self, tmp_path: Path) -> None:
        model = nn.Sequential(nn.Linear(4, 64), nn.ReLU())
        x = torch.randn(2, 4)
        stats_dir = self.capture_model(tmp_path, model, [x], run_id="stats", mode="stats")
        with open_run(stats_dir) as run:
            keys = run.keys(0)
            assert keys
            for key in keys:
                meta = run.meta(key)
                assert meta["stored"] is False and meta["stats"] and "max" in meta["stats"], key
                with pytest.raises(KeyError):
                    run.load(key)
        small_dir = self.capture_model(tmp_path, model, [x], run_id="small", max_tensor_size=10)
        with open_run(small_dir) as run:
            big = run.meta(TensorKey(0, "1", 0, "outputs"))
            assert big["stored"] is False and "max_tensor_size" in big["reason"] and big["stats"]["max"] >= 0
            assert_bits_equal(run.load(TensorKey(0, "0", 0, "inputs", ("0",))), x)

    def test_deduplicated_and_post_forward_tensors(self, tmp_path: Path) -> None:
        x = torch.randn(3, 4)
        model = ConformanceModel()
        run_dir = self.capture_model(tmp_path, model, [x], log_post_fwd_inputs=True)
        with torch.no_grad():
            h = model.b(model.a(model.a(x)))
        with open_run(run_dir) as run:
            out = TensorKey(0, "echo", 0, "outputs")
            assert run.meta(out).get("same_as") == str(TensorKey(0, "b", 0, "outputs"))  # h, captured first there
            assert_bits_equal(run.load(out), h)
            assert_bits_equal(run.load(TensorKey(0, "echo", 0, "inputs", ("0",))), h)
            before = run.load(TensorKey(0, "inplace", 0, "inputs", ("0",)))
            after = run.load(TensorKey(0, "inplace", 0, "post_fwd_inputs", ("0",)))
            assert_bits_equal(after, before + 1)

    def test_native_reads_match_the_reader(self, tmp_path: Path) -> None:
        run_dir = self.capture_model(tmp_path, ConformanceModel(), [torch.randn(3, 4)])
        with open_run(run_dir) as run:
            for key in self._stored_keys(run):
                meta = run.meta(key)
                if "same_as" in meta:
                    continue
                assert_bits_equal(self._native(run_dir, key, meta), run.load(key), f"native {key}")

    def test_module_names_that_are_not_file_names(self, tmp_path: Path) -> None:
        names = ["..", "a/b", "/abs", "x#1", "y:z", "%41", ".hidden", "sp ace", "ünï"]
        writer = self.new_writer(tmp_path / "run")
        calls = []
        for i, name in enumerate(names):
            rec = self.record(0, name, "outputs", torch.full((2,), float(i)))
            writer.write(rec)
            calls.append(rec.call)
        writer.end_step(StepInfo(0, calls, calls))
        writer.close()
        written = [Path(dp) / f for dp, _, fs in os.walk(tmp_path) for f in fs]
        assert all((tmp_path / "run").resolve() in p.resolve().parents for p in written), written
        with open_run(tmp_path / "run") as run:
            assert [c.module for c in run.calls(0)] == names
            for i, name in enumerate(names):
                assert_bits_equal(run.load(TensorKey(0, name, 0, "outputs")), torch.full((2,), float(i)), name)

    # -- what the base classes guarantee for every backend ----------------------------------------------
    def test_a_plain_value_structure_comes_back_wrapped(self, tmp_path: Path) -> None:
        writer = self.new_writer(tmp_path / "run")
        call = CallKey(0, 0, "m", 0)
        writer.write(Record(call, "outputs", 42, {}))
        writer.end_step(StepInfo(0, [call], [call]))
        writer.close()
        with open_run(tmp_path / "run") as run:
            assert run.structure(call, "outputs") == {"type": "value", "value": 42}
            assert run.keys(0) == []

    def test_a_promised_body_that_is_missing_is_a_store_error(self, tmp_path: Path) -> None:
        writer = self.new_writer(tmp_path / "run")
        rec = self.record(0, "m", "outputs", torch.ones(3))
        with pytest.raises(ilstore.StoreError, match="body is stored but the record has no tensor"):
            writer.write(dataclasses.replace(rec, tensors={}))
            writer.end_step(StepInfo(0, [rec.call], [rec.call]))
        writer.close("failed", "test")

    # -- crashes and corruption -------------------------------------------------------------------------
    def _write_cut_run(self, run_dir: Path) -> StoreWriter:
        writer = self.new_writer(run_dir)
        for step in (0, 1, 2):
            recs = [self.record(step, "m", "inputs", (torch.full((3,), float(step)),)),
                    self.record(step, "m", "outputs", torch.full((3,), step + 0.5))]
            for rec in recs:
                writer.write(rec)
            if step < 2:
                writer.end_step(StepInfo(step, [recs[0].call], [recs[0].call]))
        return writer  # step 2 is cut: written, never ended, the writer never closed

    def test_writer_interrupted_mid_step(self, tmp_path: Path) -> None:
        run_dir = tmp_path / "run"
        writer = self._write_cut_run(run_dir)
        for closed in (False, True):
            with open_run(run_dir) as run:
                assert run.status == ("failed" if closed else "running")
                assert run.steps() == [0, 1] and run.incomplete_steps() == [2]
                for step in (0, 1):
                    assert_bits_equal(run.load(TensorKey(step, "m", 0, "outputs")), torch.full((3,), step + 0.5))
            writer.close("failed", "killed")

    def test_forward_that_raised_leaves_its_step_incomplete(self, tmp_path: Path) -> None:
        class Flaky(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.lin = nn.Linear(2, 2)
                self.n = 0

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                self.n += 1
                y = self.lin(x)
                if self.n == 2:
                    raise ValueError("model failed")
                return y

        model = Flaky()
        with torch.no_grad(), ilstore.capture(model, self.config(tmp_path, log_step_ids=[])) as cap:
            model(torch.randn(1, 2))
            with pytest.raises(ValueError):
                model(torch.randn(1, 2))
            model(torch.randn(1, 2))
        assert cap.run_dir is not None
        with open_run(cap.run_dir) as run:
            assert run.steps() == [0, 2] and run.incomplete_steps() == [1] and run.status == "complete"
            assert [c.module for c in run.calls(2)] == ["lin"]

    def test_corrupt_files_raise_corrupt_file_error(self, tmp_path: Path) -> None:
        for mode in ("truncate", "garbage"):
            run_dir = self.capture_model(tmp_path, nn.Sequential(nn.Linear(4, 4), nn.ReLU()), [torch.randn(2, 4)],
                                         run_id=mode)
            for dirpath, _dirs, files in os.walk(run_dir):
                for name in files:
                    path = Path(dirpath) / name
                    if name in (MANIFEST_NAME, JOURNAL_NAME):  # the run's own metadata, not the backend's
                        continue
                    data = path.read_bytes()
                    path.write_bytes(data[: len(data) // 2] if mode == "truncate" else b"\x00garbage" * 3)
            errors: list[BaseException] = []
            try:
                with open_run(run_dir) as run:
                    for step in run.steps():
                        try:
                            keys = run.keys(step)
                        except CorruptFileError as exc:
                            errors.append(exc)
                            continue
                        for key in keys:
                            try:
                                run.load(key)
                            except CorruptFileError as exc:
                                errors.append(exc)
            except CorruptFileError as exc:
                errors.append(exc)
            assert errors, f"{mode}: reading a run whose files were damaged raised no CorruptFileError"
            for err in errors:
                assert str(run_dir) in str(err) or (run_dir.name in str(err)), err

    # -- discovery, tools, conversion ---------------------------------------------------------------------
    def test_open_run_detects_the_backend(self, tmp_path: Path) -> None:
        run_dir = self.capture_model(tmp_path, ConformanceModel(), [torch.randn(3, 4)])
        with open_run(run_dir) as run:
            assert run.name == self.backend
            keys = run.keys()
            metas = [neutral_meta(run, k) for k in keys]
        if not self.reads_without_manifest:
            return
        (run_dir / MANIFEST_NAME).unlink()
        with open_run(run_dir) as run:
            assert run.name == self.backend and run.steps() == [0]
            assert run.keys() == keys and [neutral_meta(run, k) for k in keys] == metas

    def test_ls_lists_the_run(self, tmp_path: Path) -> None:
        from click.testing import CliRunner

        from .cli import cli

        run_dir = self.capture_model(tmp_path, ConformanceModel(), [torch.randn(3, 4)])
        result = CliRunner().invoke(cli, ["ls", str(run_dir), "--calls"])
        assert result.exit_code == 0, result.output
        assert f"backend {self.backend}, status complete" in result.output and "nested" in result.output

    def test_journal_totals_match_the_structures(self, tmp_path: Path) -> None:
        """What the writer counted into the step journal is what counting the files gives."""
        from .summary import summarize_run

        run_dir = self.capture_model(tmp_path, ConformanceModel(), [torch.randn(3, 4), torch.randn(3, 4)],
                                     log_step_ids=[], max_tensor_size=6, log_post_fwd_inputs=True)
        detailed, totals_only = summarize_run(run_dir), summarize_run(run_dir, calls=False)
        with open_run(run_dir) as run:
            for step, from_journal in zip(detailed.steps, totals_only.steps, strict=True):
                totals = run.step_totals(step.step)
                assert totals is not None and from_journal.calls is None
                assert (totals["module_calls"], totals["tensors"], totals["stored"], totals["bytes"]) == step.counts()
                assert from_journal.counts() == step.counts() and 0 < step.stored < step.tensors and step.nbytes > 0

    def test_convert_to_pt_and_back_is_bit_exact(self, tmp_path: Path) -> None:
        from .convert import convert

        src = self.capture_model(tmp_path, ConformanceModel(), [torch.randn(3, 4), torch.randn(3, 4)],
                                 log_step_ids=[0, 1])
        other = "safetensors" if self.backend == "pt" else "pt"
        mid = convert(src, tmp_path / "mid", to=other)
        back = convert(mid, tmp_path / "back", to=self.backend, options=self.options)
        with open_run(src) as a, open_run(back) as b:
            assert b.name == self.backend and a.steps() == b.steps() == [0, 1]
            for step in a.steps():
                assert a.calls(step) == b.calls(step) and a.call_ends(step) == b.call_ends(step)
            assert a.keys() == b.keys()
            for key in a.keys():
                assert neutral_meta(a, key) == neutral_meta(b, key), key
                if a.meta(key).get("stored") is not False:
                    assert_bits_equal(b.load(key), a.load(key), key)
