"""Replay (``replay_from``): selected calls get the reference's recorded inputs; metadata says what happened."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ilstore
from ilstore.demo import DEMO_PROMPT, tiny_llama
from ilstore.errors import ConfigError, RunNotFoundError
from ilstore.records import iter_tensor_nodes
from support import VLLM_RUN, fixture_inputs, fixture_model

BACKENDS = ["pt", "safetensors", "hdf5"]
PERTURBED = "model.layers.0.mlp.down_proj"


def _llama_run(out: Path, run_id: str, *, prompts: list[list[list[int]]] | None = None,
               perturb: str | None = None, dtype: torch.dtype = torch.float32,
               **cfg: Any) -> tuple[Path, list[torch.Tensor]]:
    model = tiny_llama().to(dtype)
    if perturb is not None:
        model.get_submodule(perturb).register_forward_hook(lambda m, a, o: o * (1 + 1e-3))
    logits = []
    config = {"output_dir": str(out), "run_id": run_id, "log_step_ids": [], **cfg}
    with torch.no_grad(), ilstore.capture(model, config) as cap:
        for ids in prompts or [DEMO_PROMPT]:
            logits.append(model(input_ids=torch.tensor(ids), use_cache=False).logits)
    assert cap.run_dir is not None
    return cap.run_dir, logits


def _replay_info(run_dir: Path) -> dict[tuple[int, str, int], dict[str, Any]]:
    out = {}
    with ilstore.open_run(run_dir) as run:
        for step in run.steps():
            for call in run.calls(step):
                structure = run.structure(call, "outputs")
                out[(step, call.module, call.call)] = structure["replay"]
    return out


def _local_rel_l2(replay: Path, ref: Path) -> dict[tuple[int, str, int], float]:
    """Output rel-L2 of every call, replay vs reference (computed here, independent of the comparer)."""
    out = {}
    with ilstore.open_run(replay) as a, ilstore.open_run(ref) as b:
        for step in a.steps():
            for call in a.calls(step):
                num = den = 0.0
                for path, _ in iter_tensor_nodes(a.structure(call, "outputs")):
                    key = call.tensor("outputs", path)
                    x, y = a.load(key).double(), b.load(key).double()
                    num += float(((x - y) ** 2).sum())
                    den += float((y ** 2).sum())
                out[(step, call.module, call.call)] = (num / den) ** 0.5 if den else num ** 0.5
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_replay_of_the_same_model_adds_no_error_in_any_reference_backend(tmp_path: Path, backend: str) -> None:
    ref, ref_logits = _llama_run(tmp_path, "ref", backend=backend)
    rep, rep_logits = _llama_run(tmp_path, "rep", replay_from=str(ref))
    assert torch.equal(rep_logits[0], ref_logits[0])
    manifest = json.loads((rep / "ilstore.json").read_text())
    assert manifest["replayed_from"] == {"path": str(ref), "run_id": "ref"}
    infos = _replay_info(rep)
    assert infos and all(i["replayed"] and i["reason"] is None and not i["kept"] for i in infos.values())
    assert set(_local_rel_l2(rep, ref).values()) == {0.0}


def test_the_perturbed_leaf_is_the_only_leaf_with_local_error(tmp_path: Path) -> None:
    ref, _ = _llama_run(tmp_path, "ref")
    rep, _ = _llama_run(tmp_path, "rep", perturb=PERTURBED, replay_from=str(tmp_path))  # output_dir with one run
    infos = _replay_info(rep)
    errors = _local_rel_l2(rep, ref)
    leaves = {k: e for k, e in errors.items() if not infos[k]["container"]}
    assert leaves[(0, PERTURBED, 0)] == pytest.approx(1e-3, rel=1e-3)
    assert {k for k, e in leaves.items() if e != 0.0} == {(0, PERTURBED, 0)}
    # Containers carry the error of what runs after their last replayed child: here the
    # perturbed projection's output flows through its MLP and its decoder layer only.
    carrying = {k[1] for k, e in errors.items() if infos[k]["container"] and e != 0.0}
    assert carrying == {"model.layers.0.mlp", "model.layers.0"}
    assert infos[(0, "model.layers.0", 0)]["container"] and not infos[(0, "model.layers.0.mlp.up_proj", 0)]["container"]


def test_inputs_are_cast_to_the_live_dtype(tmp_path: Path) -> None:
    ref, _ = _llama_run(tmp_path, "ref")
    rep, _ = _llama_run(tmp_path, "rep", dtype=torch.bfloat16, replay_from=str(ref))
    with ilstore.open_run(rep) as run, ilstore.open_run(ref) as reference:
        key = ilstore.TensorKey(0, "model.layers.1.mlp.down_proj", 0, "inputs", ("0",))
        fed = run.load(key)
        assert fed.dtype == torch.bfloat16
        assert torch.equal(fed, reference.load(key).to(torch.bfloat16))
    infos = _replay_info(rep)
    assert all(i["replayed"] or i["reason"] for i in infos.values())
    assert infos[(0, "model.layers.1.mlp.down_proj", 0)]["replayed"]


def test_a_longer_prompt_and_an_extra_step_are_reported_per_call(tmp_path: Path) -> None:
    ref, _ = _llama_run(tmp_path, "ref")
    longer = [DEMO_PROMPT[0] + [17]]
    rep, logits = _llama_run(tmp_path, "rep", prompts=[longer, DEMO_PROMPT], replay_from=str(ref))
    assert logits[0].shape[1] == len(longer[0])  # the model ran on its live inputs
    infos = _replay_info(rep)
    step0 = {k: v for k, v in infos.items() if k[0] == 0}
    norm = step0[(0, "model.layers.0.input_layernorm", 0)]
    assert not norm["replayed"] and "shape differs" in norm["reason"]
    n = len(DEMO_PROMPT[0])
    assert norm["kept"]["0"] == f"shape differs: live [1, {n + 1}, 64], reference [1, {n}, 64]"
    step1 = [v for k, v in infos.items() if k[0] == 1]
    assert step1 and all(not v["replayed"] and "step 1 is not in the reference" in v["reason"] for v in step1)


def test_a_stats_reference_and_a_size_limited_reference_say_why(tmp_path: Path) -> None:
    stats, _ = _llama_run(tmp_path, "stats", mode="stats")
    small, _ = _llama_run(tmp_path, "small", max_tensor_size=600)
    rep1, _ = _llama_run(tmp_path, "rep1", replay_from=str(stats))
    rep2, _ = _llama_run(tmp_path, "rep2", replay_from=str(small))
    key = (0, "model.layers.0.mlp.down_proj", 0)
    assert _replay_info(rep1)[key]["reason"] == "input 0 kept live: the reference kept only statistics (mode=stats)"
    info = _replay_info(rep2)
    assert "the reference skipped the body (numel 1536 > max_tensor_size 600)" in info[key]["reason"]
    assert info[(0, "model.embed_tokens", 0)]["replayed"]  # 8 token ids fit under the limit


def test_replay_from_the_earlier_vllm_dump(tmp_path: Path) -> None:
    model = fixture_model()
    cfg = {"output_dir": str(tmp_path), "run_id": "rep", "log_step_ids": [0, 1], "replay_from": str(VLLM_RUN)}
    with torch.no_grad(), ilstore.capture(model, cfg) as cap:
        for ids in fixture_inputs():
            model(input_ids=ids, use_cache=False)
    infos = _replay_info(cap.run_dir)
    attn = infos[(0, "model.layers.0.self_attn", 0)]
    assert not attn["replayed"] and not attn["replaced"]
    assert set(attn["kept"]) >= {"hidden_states"}
    assert all(v == "keyword input not in the reference (it recorded no keyword inputs)" for v in attn["kept"].values())
    assert "hidden_states kept live: keyword input not in the reference" in attn["reason"]
    for name in ("model.layers.0.mlp", "model.layers.1.mlp.down_proj", "model.layers.0.input_layernorm",
                 "model.layers.1.self_attn.q_proj", "lm_head"):
        assert infos[(1, name, 0)]["replayed"], name
    # The positional inputs it kept are fed even when a keyword input stays live.
    layer = infos[(0, "model.layers.1", 0)]
    assert layer["replaced"] == ["0"] and not layer["replayed"]
    # Every leaf that takes positional inputs adds no error on the machine that wrote the dump...
    # or the difference is the dump's own (it was written by the same model): compare the fed input.
    with ilstore.open_run(cap.run_dir) as run, ilstore.open_run(VLLM_RUN) as dump:
        key = ilstore.TensorKey(1, "model.layers.1.mlp", 0, "inputs", ("0",))
        assert torch.equal(run.load(key), dump.load(key))


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return self.inner([x, x * 2], extra={"y": x + 1, "n": 3}, scale=scale)


class Inner(nn.Module):
    def forward(self, pair: list[torch.Tensor], extra: dict[str, Any], scale: float) -> torch.Tensor:
        return (pair[0] + pair[1] * extra["y"]) * scale + extra["n"]


def test_nested_positional_and_keyword_tensors_are_fed_and_plain_values_stay_live(tmp_path: Path) -> None:
    x = torch.arange(6.0).reshape(2, 3)
    model = Nested()
    with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "ref"}) as cap:
        expected = model(x, 1.0)
    with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "rep", "replay_from": str(cap.run_dir)}) as rep:
        got = model(x + 100, 1.0)  # every tensor input of the inner call comes from the reference
    assert torch.equal(got, expected)
    info = _replay_info(rep.run_dir)[(0, "inner", 0)]
    assert info["replayed"] and sorted(info["replaced"]) == ["0.0", "0.1", "extra.y"]


class KeyedSum(nn.Module):
    def forward(self, d: dict[Any, torch.Tensor]) -> torch.Tensor:
        return d[1] * 10 + d["1"]


class Keyed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = KeyedSum()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.inner({1: a, "1": b})


class _Keywords(nn.Module):
    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return args[0] + kwargs["0"] * 10


class _PassesKeywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Keywords()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.inner(a, **{"0": b})


@pytest.mark.parametrize(("model_class", "replaced"), [(Keyed, ["0.1", "0.1~2"]), (_PassesKeywords, ["0", "0~2"])])
def test_inputs_recorded_under_other_names_are_fed_their_own_tensors(tmp_path: Path, model_class: type[nn.Module],
                                                                     replaced: list[str]) -> None:
    """``{1: a, "1": b}`` (the second item recorded as ``1~2``, records._walk) and ``**{"0": b}``
    beside a first positional argument (``0~2``, records.kwarg_names): replay walks the live inputs
    under the same names, so each is fed its own reference tensor (it fed both one tensor)."""
    model = model_class()
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "ref"}) as cap:
        expected = model(a, b)
    with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "rep", "replay_from": str(cap.run_dir)}) as rep:
        got = model(a + 100, b - 100)
    assert torch.equal(got, expected)
    info = _replay_info(rep.run_dir)[(0, "inner", 0)]
    assert info["replayed"] and sorted(info["replaced"]) == replaced


def test_a_call_that_draws_random_numbers_says_so(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 4))
    x = torch.ones(2, 4)
    with torch.no_grad(), ilstore.capture(model.eval(), {"output_dir": str(tmp_path), "run_id": "ref"}) as ref:
        model(x)
    for mode, rid in ((True, "train"), (False, "eval")):
        model.train(mode)
        with torch.no_grad(), ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": rid,
                                                      "replay_from": str(ref.run_dir)}) as cap:
            model(x)
        info = _replay_info(cap.run_dir)
        assert info[(0, "1", 0)]["random"] is mode
        assert not info[(0, "0", 0)]["random"] and not info[(0, "2", 0)]["random"]
        if mode:
            assert "drew random numbers" in info[(0, "1", 0)]["reason"]


def test_bad_replay_from_fails_before_anything_is_written(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(RunNotFoundError, match="replay_from: .*missing"):
        ilstore.capture(nn.Sequential(model), {"output_dir": str(tmp_path / "out"),
                                               "replay_from": str(tmp_path / "missing")})
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="replay_from: a replay run measures each call's outputs"):
        ilstore.load_config({"replay_from": str(tmp_path), "log_outputs": False})


def test_without_replay_from_the_hooks_return_nothing(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    cap = ilstore.capture(model, {"output_dir": str(tmp_path)})
    assert cap._pre("0", None, model[0], (torch.ones(1, 3),), {}) is None  # noqa: SLF001 - the hook itself
    cap.close()


class Bump(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.in_place = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.add_(1) if self.in_place else x + 1


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Bump(), nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


def test_calls_fed_the_same_reference_tensor_share_it_unless_one_modified_it(tmp_path: Path) -> None:
    model = Pair()
    x = torch.zeros(3)
    with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "ref"}) as ref:
        model(x.clone())
    with ilstore.open_run(ref.run_dir) as run:  # the reference saw one tensor passed twice
        assert run.meta(ilstore.TensorKey(0, "b", 0, "inputs", ("0",)))["same_as"] == "r0/s0/a/0/inputs/0"
    model.a.in_place = True  # now a modifies what it is fed
    with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "rep", "replay_from": str(ref.run_dir)}) as rep:
        a_out, b_out = model(x + 5)
    assert torch.equal(a_out, torch.ones(3)) and torch.equal(b_out, torch.zeros(3))  # b got the reference's zeros
    info = _replay_info(rep.run_dir)
    assert info[(0, "a", 0)]["replayed"] and info[(0, "b", 0)]["replayed"]


def test_replayed_inputs_keep_the_reference_statistics_and_sharing(tmp_path: Path) -> None:
    ref, _ = _llama_run(tmp_path, "ref")
    rep, _ = _llama_run(tmp_path, "rep", replay_from=str(ref))
    with ilstore.open_run(ref) as a, ilstore.open_run(rep) as b:
        inputs = [k for k in b.keys(0) if k.kind == "inputs" and b.meta(k)["stored"]]
        assert inputs and all(b.meta(k)["stats"] == a.meta(k)["stats"] for k in inputs)
        # q, k and v projections were fed one tensor in the reference: one read, one body here too
        k_in = b.meta(ilstore.TensorKey(0, "model.layers.0.self_attn.k_proj", 0, "inputs", ("0",)))
        assert k_in.get("same_as") is not None


def test_the_report_on_a_replay_from_the_earlier_vllm_dump_lists_the_calls_it_could_not_feed(tmp_path: Path) -> None:
    from ilstore_compare import compare

    model = fixture_model()
    cfg = {"output_dir": str(tmp_path), "run_id": "rep", "log_step_ids": [0, 1], "replay_from": str(VLLM_RUN)}
    with torch.no_grad(), ilstore.capture(model, cfg) as cap:
        for ids in fixture_inputs():
            model(input_ids=ids, use_cache=False)
    result = compare(cap.run_dir, VLLM_RUN)
    local = result.local
    assert local is not None and local.source == "dir1"
    missing = {(e.call.step, e.call.module) for e in local.not_compared}
    assert missing and all("keyword input not in the reference" in (e.reason or "") for e in local.not_compared)
    assert {m for _, m in missing} >= {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    measured = [e for e in local.errors if e.compared]
    assert {e.call.module for e in measured} >= {"model.layers.0.mlp.down_proj", "lm_head", "model.norm"}
    assert result.exit_code == 1  # calls not replayed: fail closed


class SparseUser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = SparseInner()

    def forward(self, s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return self.inner(s, q)


class SparseInner(nn.Module):
    def forward(self, s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return s.to_dense() * 2 + q.dequantize()


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled:UserWarning")
@pytest.mark.parametrize("backend", ["pt", "hdf5"])
def test_sparse_and_quantized_inputs_are_fed_rebuilt(tmp_path: Path, backend: str) -> None:
    dense = torch.tensor([[0.0, 1.5], [2.0, 0.0]])
    q = torch.quantize_per_tensor(torch.tensor([[0.5, 1.0], [1.5, 2.0]]), 0.5, 1, torch.qint8)
    model = SparseUser()
    with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "ref", "backend": backend}) as ref:
        expected = model(dense.to_sparse(), q)
    other = torch.quantize_per_tensor(torch.zeros(2, 2), 0.5, 1, torch.qint8)
    with ilstore.capture(model, {"output_dir": str(tmp_path), "run_id": "rep", "replay_from": str(ref.run_dir)}) as rep:
        got = model(torch.zeros(2, 2).to_sparse(), other)
    assert torch.equal(got, expected)
    info = _replay_info(rep.run_dir)[(0, "inner", 0)]
    assert info["replayed"] and sorted(info["replaced"]) == ["0", "1"]
