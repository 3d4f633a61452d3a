"""build_record's collected tensor nodes (Record.nodes) and its mode: "stats" fast path.

A writer uses ``Record.nodes`` instead of walking the structure again, so it must be exactly what
``iter_tensor_nodes`` yields (same paths, same node objects, same order) for every kind of value,
and the stats-only nodes must be the nodes the general path makes.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from typing import Any

import pytest
import torch

from ilstore.keys import CallKey
from ilstore.records import (  # the general path the fast one must match
    Deduper,
    TensorPolicy,
    _Ctx,
    _supported_node,
    build_record,
    iter_tensor_nodes,
)
from support import HalfReadableMapping

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),  # deprecated, still what users have
    pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled:UserWarning"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning"),
]

CALL = CallKey(0, 0, "m", 0)
_CASES = 13


@dataclasses.dataclass
class _Pair:
    a: Any
    b: Any


class _Unprintable:
    def __repr__(self) -> str:
        return "<unprintable>"


def _values() -> list[tuple[Any, dict[str, Any] | None]]:
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sparse = torch.tensor([[0.0, 2.0], [3.0, 0.0]]).to_sparse()
    quant = torch.quantize_per_tensor(torch.rand(4), 0.1, 3, torch.quint8)
    return [
        (x, None),
        ((x, x[1:], None, 3, "s"), None),
        ((x,), {"mask": x > 2, "n": 4, "emb": (x.double(), x.half())}),
        ({"a": x, "b": [x.bfloat16(), {"c": torch.tensor(5)}]}, None),
        (OrderedDict(z=x, y=x.t()), None),
        ({1: x, "1": x + 1}, None),  # keys that collide as strings: the second is "1~2"
        (_Pair(x, (x, sparse)), None),
        ([sparse, quant, torch.empty(0), torch.tensor(float("nan"))], None),
        ((torch.empty(2, device="meta"), torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])), None),
        (x, {"k": x}),  # a tensor value with kwargs (what build_record accepts, not what capture makes)
        ((torch.zeros(2, dtype=torch.complex64), torch.ones(3, dtype=torch.int16), torch.ones(2, dtype=torch.bool)),
         None),
        ((_Unprintable(), x), {"x": [[[x]]]}),
        ((HalfReadableMapping(x.double()), x), {"m": HalfReadableMapping(x)}),  # each a value node, none of its tensors
    ]


@pytest.mark.parametrize("store_bodies", [True, False])
@pytest.mark.parametrize("case", range(_CASES))
def test_collected_nodes_are_what_the_walk_yields(case: int, store_bodies: bool) -> None:
    values = _values()
    assert len(values) == _CASES
    value, kwargs = values[case]
    record = build_record(CALL, "inputs" if kwargs is not None else "outputs", value,
                          TensorPolicy(store_bodies=store_bodies, pin_memory=False), kwargs, Deduper())
    walked = list(iter_tensor_nodes(record.structure))
    got = record.tensor_nodes()
    assert [p for p, _ in got] == [p for p, _ in walked]
    assert all(a is b for (_, a), (_, b) in zip(got, walked, strict=True))
    assert record.nodes is None or record.nodes == walked


def test_nodes_are_dropped_when_a_tensor_gets_kwargs() -> None:
    x = torch.ones(2)
    policy = TensorPolicy(store_bodies=False)
    record = build_record(CALL, "outputs", {1: x, "1": x + 1}, policy)
    assert record.nodes is not None and [p for p, _ in record.nodes] == [("1",), ("1~2",)]
    assert build_record(CALL, "inputs", x, policy, {"k": x}).nodes is None
    assert build_record(CALL, "inputs", (x,), policy, {"k": x}).nodes is not None


def _general_node(t: torch.Tensor, policy: TensorPolicy, dedup: Deduper | None) -> dict[str, Any]:
    ctx = _Ctx(policy, {}, CALL, "outputs", dedup)
    return _supported_node(t, (), ctx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                   torch.bool, torch.complex64, torch.uint8])
def test_stats_fast_path_makes_the_general_paths_node(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    base = torch.randn(5, 7) * 3
    values = [base.to(dtype), base.to(dtype)[:, 1:], base.to(dtype).t(), torch.empty(0, dtype=dtype)]
    if dtype.is_floating_point:
        values += [torch.tensor([1.0, float("nan"), -float("inf")], dtype=dtype), base.to(dtype).requires_grad_()]
    policy = TensorPolicy(store_bodies=False, pin_memory=False)
    for t in values:
        record = build_record(CALL, "outputs", t, policy, None, Deduper())
        assert json.dumps(record.structure) == json.dumps(_general_node(t, policy, Deduper()))


def test_stats_fast_path_devices_and_dedup() -> None:
    x = torch.randn(4, 4)
    off = TensorPolicy(store_bodies=False, device_ok=lambda d: d != "cpu")
    node = build_record(CALL, "outputs", x, off).structure
    assert node == _general_node(x, off, None) and node["reason"] == "device not in device_names"
    assert "stats" not in node
    dedup = Deduper()
    policy = TensorPolicy(store_bodies=False)
    record = build_record(CALL, "outputs", (x, x, x.view(16), x), policy, None, dedup)
    items = record.structure["items"]
    assert items[1]["stats"] is items[0]["stats"] and items[3]["stats"] is items[0]["stats"]
    assert items[2]["stats"] is not items[0]["stats"] and items[2]["stats"] == items[0]["stats"]
    x.add_(1)  # a new version: computed again
    again = build_record(CALL, "outputs", x, policy, None, dedup).structure
    assert again["stats"] is not items[0]["stats"] and again["stats"]["mean"] == pytest.approx(
        items[0]["stats"]["mean"] + 1)


def test_stats_fast_path_failure_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    from ilstore import records

    def broken(*args: Any) -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setattr(records, "_cpu_float_stats", broken)
    x = torch.ones(3)
    record = build_record(CALL, "outputs", (x, torch.ones(2, dtype=torch.int32)), TensorPolicy(store_bodies=False))
    first, second = record.structure["items"]
    assert first["stored"] is False and first["reason"] == "cannot be captured: RuntimeError: boom"
    assert second["reason"] == "mode=stats"
    assert [n for _, n in record.tensor_nodes()] == [first, second]


@pytest.mark.parametrize("kernel", [True, False])
def test_plain_sums_is_sums(kernel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from ilstore import _stats_kernel as K

    if not kernel:
        monkeypatch.setattr(K.LIBRARY, "_lib", None)
        monkeypatch.setattr(K.LIBRARY, "_failed", True)
    torch.manual_seed(1)
    base = torch.randn(64, 129) * 5
    for dtype in K.DTYPES:
        x = base.to(dtype)
        for t in (x, x[:, 3:], x.t(), x[::2], torch.tensor([1.0, float("nan")]).to(dtype),
                  torch.ones(3, dtype=dtype).expand(4, 3)):
            got, want = K.plain_sums(t, dtype, t.numel()), K.sums(t)
            assert got.finite == want.finite
            if want.finite:
                assert [v.hex() for v in got[1:]] == [v.hex() for v in want[1:]]
        # neither reads a negative view's memory as it is: both take the fallback, which reads its
        # values (resolved), the sums of the negated tensor
        neg = x._neg_view()
        resolved = K.sums(neg.resolve_neg())
        for got in (K.sums(neg), K.plain_sums(neg, dtype, neg.numel())):
            assert got.finite and [v.hex() for v in got[1:]] == [v.hex() for v in resolved[1:]]


def test_the_cpu_identity_is_the_deduper_identity() -> None:
    """The stats fast path's identity of a CPU float tensor (from its data pointer) is the tuple
    Deduper._identity makes, for views at any offset and of any dtype, empty and zero tensors;
    an inference tensor has none."""
    from ilstore.records import _ACC, _cpu_identity

    g = torch.Generator().manual_seed(3)
    for dtype in _ACC:
        base = (torch.randn(6, 10, generator=g) * 4).to(dtype)
        views = [base, base[2:], base[:, 3:], base.t(), base[1::2, 5:], base.view(-1)[7:19], base[3:3],
                 torch.empty(0, dtype=dtype), base[4, 6]]
        if dtype == torch.float32:
            views.append(base.view(torch.bfloat16)[1:, 3:])  # another dtype's view of the same storage
        for t in views:
            assert _cpu_identity(t, t.shape, t.dtype) == Deduper._identity(t), (dtype, t.shape)
    zero = torch._efficientzerotensor(3, 4)  # no storage: the general way answers (and raises) as before
    with pytest.raises(RuntimeError) as general:
        Deduper._identity(zero)
    with pytest.raises(RuntimeError) as fast:
        _cpu_identity(zero, zero.shape, zero.dtype)
    assert str(fast.value) == str(general.value)
    with torch.inference_mode():
        frozen = torch.ones(3)
    assert _cpu_identity(frozen, frozen.shape, frozen.dtype) is None is Deduper._identity(frozen)


def test_stats_fast_path_nodes_of_odd_cpu_float_tensors() -> None:
    """Zero, negative-view, empty and inference tensors take the fast path's checks and get the
    node the general path makes (or, where the general path fails, the same failure)."""
    policy = TensorPolicy(store_bodies=False, pin_memory=False)
    with torch.inference_mode():
        frozen = torch.arange(6.0).reshape(2, 3)
    for t in (torch.empty(0, 3), frozen, torch.ones(3)[1:], torch.tensor(2.5, dtype=torch.float64)):
        record = build_record(CALL, "outputs", t, policy, None, Deduper())
        assert json.dumps(record.structure) == json.dumps(_general_node(t, policy, Deduper()))
    zero = torch._efficientzerotensor(2, 2)
    node = build_record(CALL, "outputs", zero, policy, None, Deduper()).structure
    assert node["stored"] is False and node["reason"].startswith("cannot be captured: RuntimeError")


@pytest.mark.parametrize("store_bodies", [True, False])
def test_a_container_that_fails_midway_leaves_nothing_behind(store_bodies: bool) -> None:
    x = torch.ones(3)
    dedup = Deduper()
    record = build_record(CALL, "outputs", (HalfReadableMapping(x), [x]), TensorPolicy(store_bodies=store_bodies,
                                                                                 pin_memory=False), dedup=dedup)
    odd, listed = record.structure["items"]
    assert odd["type"] == "value" and odd["reason"] == "cannot be walked: KeyError: 'b'"
    assert record.tensor_nodes() == list(iter_tensor_nodes(record.structure)) and [p for p, _ in record.nodes] == [
        ("1", "0")]
    assert list(record.tensors) == ([("1", "0")] if store_bodies else [])
    assert "same_as" not in listed["items"][0]  # x was first seen in the list, not in the failed mapping
