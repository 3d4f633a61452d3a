"""Shared helpers for the compare tests: small captured runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ilstore
from ilstore.demo import DEMO_PROMPT, tiny_llama
from ilstore.errors import BackendError

BACKENDS = ["pt", "safetensors", "hdf5"]
PERTURBED = "model.layers.1.mlp.down_proj"


def need_backend(name: str) -> None:
    """Skip when a backend is not available (yet)."""
    try:
        ilstore.get_backend(name)
    except BackendError as exc:
        pytest.skip(f"backend {name!r} not available: {exc}")


def llama_run(out_dir: Path, run_id: str, *, backend: str = "pt", perturb: str | None = None,
              **config: Any) -> Path:
    """Capture two steps of the tiny Llama with fixed inputs; ``perturb`` adds 1e-3 to that module's output."""
    model = tiny_llama()
    if perturb is not None:  # registered before capture's hooks, so capture sees the perturbed output
        model.get_submodule(perturb).register_forward_hook(lambda m, a, out: out + 1e-3)
    ids = torch.tensor(DEMO_PROMPT)
    cfg = {"output_dir": str(out_dir), "run_id": run_id, "log_step_ids": [0, 1], "backend": backend, **config}
    with torch.no_grad(), ilstore.capture(model, cfg) as cap:
        model(input_ids=ids, use_cache=False)
        model(input_ids=torch.cat([ids, torch.tensor([[17]])], dim=1), use_cache=False)
    assert cap.run_dir is not None
    return cap.run_dir


def module_run(out_dir: Path, run_id: str, model: nn.Module, *inputs: Any, **config: Any) -> Path:
    """Capture one forward of ``model`` (every module) as one run."""
    cfg = {"output_dir": str(out_dir), "run_id": run_id, **config}
    with torch.no_grad(), ilstore.capture(model, cfg) as cap:
        model(*inputs)
    assert cap.run_dir is not None
    return cap.run_dir


class Passthrough(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Toy(nn.Module):
    """Three pass-through children fed by the root's three inputs (integer, float, float)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids = Passthrough()
        self.shaped = Passthrough()
        self.cast = Passthrough()

    def forward(self, ids: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.ids(ids), self.shaped(h), self.cast(w)


class Named(nn.Module):
    """A Linear under a configurable child name (for the name map)."""

    def __init__(self, child: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.add_module(child, nn.Linear(4, 4))
        self.child = child

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.child)(x)


def by_status(result: Any, status: str) -> list[Any]:
    return [t for t in result.tensors if t.status == status]


Factory = Callable[..., Path]


# -- the same computation laid out like vLLM and like Hugging Face (for maps) -------------------
class _Weighted(nn.Module):
    def __init__(self, seed: int, shape: tuple[int, int]) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.w = nn.Parameter(torch.randn(*shape))


class Block(_Weighted):
    """A residual block: vLLM style returns ``(delta, residual)``, Hugging Face style their sum."""

    def __init__(self, split: bool) -> None:
        super().__init__(1, (4, 4))
        self.split = split

    def forward(self, h: torch.Tensor) -> Any:
        delta = torch.tanh(h @ self.w)
        return (delta, h) if self.split else h + delta


class Proj(_Weighted):
    """A linear: vLLM style returns ``(output, None)``."""

    def __init__(self, seed: int, tuple_out: bool) -> None:
        super().__init__(seed, (4, 4))
        self.tuple_out = tuple_out

    def forward(self, h: torch.Tensor) -> Any:
        y = h @ self.w
        return (y, None) if self.tuple_out else y


class Fused(nn.Module):
    """vLLM style: two projections in one, outputs concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.cat([Proj(2, False).w, Proj(3, False).w], dim=1).detach())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.w


class Act(nn.Module):
    """``act``: vLLM's takes ``[gate, up]`` and returns ``silu(gate) * up``, HF's ``silu(gate)``."""

    def __init__(self, and_mul: bool) -> None:
        super().__init__()
        self.and_mul = and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.and_mul:
            gate, up = x.chunk(2, dim=-1)
            return torch.nn.functional.silu(gate) * up
        return torch.nn.functional.silu(x)


class Head(_Weighted):
    """Logits: vLLM style for the last token only (``[1, V]``), HF style for every position."""

    def __init__(self, last_only: bool) -> None:
        super().__init__(4, (4, 6))
        self.last_only = last_only

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h[-1:] if self.last_only else h) @ self.w


class EngineLike(nn.Module):
    """One computation in vLLM's layout (``style="vllm"``: token ids ``[T]``, tensors ``[T, H]``,
    split residual, tuple outputs, a fused projection, last-token logits) or Hugging Face's
    (``[1, T]``, ``[1, T, H]``, ...). Both give the same logits for the last token.

    Modules: ``embed``, ``block``, ``proj``, ``fused`` (vLLM) or ``a`` and ``b`` (HF), ``act``, ``head``.
    """

    def __init__(self, style: str) -> None:
        super().__init__()
        self.vllm = style == "vllm"
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.block = Block(split=self.vllm)
        self.proj = Proj(5, tuple_out=self.vllm)
        if self.vllm:
            self.fused = Fused()
        else:
            self.a, self.b = Proj(2, False), Proj(3, False)
        self.act = Act(and_mul=self.vllm)
        self.head = Head(last_only=self.vllm)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids if self.vllm else ids[None])
        out = self.block(h)
        h = out[0] + out[1] if self.vllm else out
        y = self.proj(h)
        y = y[0] if self.vllm else y
        g = self.act(self.fused(y)) if self.vllm else self.act(self.a(y)) * self.b(y)
        return self.head(g)


#: A map aligning ``EngineLike("vllm")`` (dir1) with ``EngineLike("hf")`` (dir2).
ENGINE_MAP: dict[str, Any] = {
    "apply_to": "dir1",
    "squeeze_shapes": True,
    "path_rules": [
        {"module": "^block$", "sum": ["outputs/0", "outputs/1"], "to": "outputs"},
        {"module": "^proj$", "path": "outputs/0", "to": "outputs"},
        {"module": "^head$", "side": "dir2", "path": "outputs", "select": {"dim": -2, "index": -1}},
    ],
    "unaligned": [
        {"module": "^fused$", "side": "dir1", "reason": "a and b in one projection"},
        {"module": "^(a|b)$", "side": "dir2", "reason": "fused into one projection in dir1"},
        {"module": "^act$", "side": "both", "reason": "same name, different function"},
    ],
}


def engine_runs(out_dir: Path, **config: Any) -> tuple[Path, Path]:
    """Capture ``EngineLike("vllm")`` and ``EngineLike("hf")`` on the same tokens: (dir1, dir2)."""
    ids = torch.tensor([3, 1, 4, 1, 5])
    return (module_run(out_dir, "vllm", EngineLike("vllm"), ids, **config),
            module_run(out_dir, "hf", EngineLike("hf"), ids, **config))


# -- replay runs (the shape a capture with replay_from writes) -------------------------------------
def fake_replay(reference: Path, out_dir: Path, run_id: str, *, backend: str = "pt",
                scale: dict[str, float] | None = None, unreplayed: dict[str, str] | None = None,
                random: frozenset[str] = frozenset(), source: dict[str, str] | None = None) -> Path:
    """Write the replay run a capture with ``replay_from=reference`` gives on the reference's machine and dtype.

    Every call is fed the reference's recorded inputs, so its outputs are the reference's bit for
    bit, except where the call itself computes differently: the outputs of the modules in
    ``scale`` are multiplied by the factor (the error that call introduces). Calls of the modules
    in ``unreplayed`` were not replayed (the value is the reason; their outputs stay the
    reference's, so only the replay record says so); those in ``random`` drew random numbers.
    The manifest says ``replayed_from`` (``source``, by default the reference's path and run id)
    and each call's outputs carry the ``"replay"`` record.
    """
    import copy

    from ilstore.convert import replay_order
    from ilstore.manifest import new_manifest
    from ilstore.records import Record, iter_tensor_nodes, tensor_stats
    from ilstore.store.base import StepInfo

    scale, unreplayed = scale or {}, unreplayed or {}
    run_dir = out_dir / run_id
    chosen = ilstore.get_backend(backend)
    with ilstore.open_run(reference) as ref:
        config = dict((ref.manifest or {}).get("config", {}))
        manifest = new_manifest(chosen.name, {**config, "run_id": run_id, "backend": chosen.name})
        manifest["replayed_from"] = source or {"path": str(reference), "run_id": str(config.get("run_id"))}
        writer = chosen.writer(run_dir, {})
        writer.open(manifest)
        for step in ref.steps():
            calls, ends = ref.calls(step), ref.call_ends(step)
            start_at = {c: n for n, c in enumerate(calls)}
            end_at = {c: n for n, c in enumerate(ends)}
            for call, is_end in replay_order(calls, ends):
                kind = "outputs" if is_end else "inputs"
                structure = ref.structure(call, kind)
                if structure is None:
                    continue
                doc = copy.deepcopy(structure)
                factor = scale.get(call.module, 1.0) if is_end else 1.0
                tensors = {}
                for path, node in iter_tensor_nodes(doc):
                    for key in ref.locator_keys:
                        node.pop(key, None)
                    node.pop("same_as", None)
                    if node.get("stored", True) is False:
                        continue
                    node["stored"] = True
                    t = ref.load(call.tensor(kind, path)).clone()  # de-duplicated bodies come back shared
                    if factor != 1.0 and t.is_floating_point():
                        t = t * factor
                        node["stats"] = tensor_stats(t)
                    tensors[path] = t
                if is_end:
                    nested = any(start_at[o] > start_at[call] and end_at[o] < end_at[call] for o in calls)
                    reason = unreplayed.get(call.module)
                    doc["replay"] = {"replayed": reason is None, "replaced": [] if reason else ["0"], "kept": {},
                                     "reason": reason, "random": call.module in random, "container": nested}
                writer.write(Record(call, kind, doc, tensors))
            writer.end_step(StepInfo(step, calls, ends))
        writer.close()
    return run_dir


def two_rank_run(run_dir: Path, backend: str, delta: float, steps: int = 12, modules: int = 3) -> Path:
    """A 2-rank run written through ``backend``'s writer: ``steps`` steps of ``modules`` modules,
    each rank's module ``m`` taking ``full((4,), step + m)`` and returning it plus ``delta`` (no
    layout: replicated)."""
    from ilstore.keys import CallKey
    from ilstore.manifest import new_manifest
    from ilstore.records import TensorPolicy, build_record, finalize_stats
    from ilstore.store.base import StepInfo
    from ilstore.store.ranks import rank_run_dir, write_ranks_manifest

    for rank in (0, 1):
        writer = ilstore.get_backend(backend).writer(rank_run_dir(run_dir, rank, 2))
        writer.open(new_manifest(backend, {}, rank=rank, world_size=2))
        for step in range(steps):
            calls = []
            for m in range(modules):
                call = CallKey(rank, step, f"m{m}", 0)
                x = torch.full((4,), float(step + m))
                for kind, value in (("inputs", (x,)), ("outputs", x + delta)):
                    record = build_record(call, kind, value, TensorPolicy(pin_memory=False))
                    finalize_stats(record)
                    writer.write(record)
                calls.append(call)
            writer.end_step(StepInfo(step, calls, calls))
        writer.close()
    write_ranks_manifest(run_dir, backend=backend, world_size=2, config={})
    return run_dir
