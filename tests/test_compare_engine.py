"""ilstore_compare.compare: pairing, verdicts, statuses, first divergence, filters, workers."""

from __future__ import annotations

import json
import math
import shutil
from itertools import product
from pathlib import Path

import pytest
import torch

from compare_helpers import BACKENDS, PERTURBED, Named, Toy, by_status, llama_run, module_run, need_backend
from ilstore.errors import CorruptFileError, IlstoreError, RunNotFoundError
from ilstore_compare import AmbiguousRunError, CompareError, NameMapError, compare
from ilstore_compare.report_json import report_dict


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("llama")
    return {"a": llama_run(out, "a"), "b": llama_run(out, "b"), "p": llama_run(out, "p", perturb=PERTURBED)}


@pytest.fixture(scope="module")
def backend_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    out = tmp_path_factory.mktemp("backends")
    made: dict[tuple[str, str], Path] = {}
    for backend in BACKENDS:
        try:
            need_backend(backend)
        except pytest.skip.Exception:
            continue
        for tag in ("x", "y"):
            made[(backend, tag)] = llama_run(out, f"{backend}-{tag}", backend=backend)
    return made


@pytest.mark.parametrize("b1,b2", list(product(BACKENDS, BACKENDS)))
def test_same_model_twice_matches_in_every_backend_pair(backend_runs: dict, b1: str, b2: str) -> None:
    need_backend(b1)
    need_backend(b2)
    result = compare(backend_runs[(b1, "x")], backend_runs[(b2, "y")])
    s = result.summary
    assert result.exit_code == 0 and result.verdict == "match", report_dict(result)["summary"]
    assert s.mismatched == 0 and s.only_in_dir1 == 0 and s.only_in_dir2 == 0 and s.compared == s.tensors > 100
    assert result.first_divergence is None
    assert (result.backend1, result.backend2) == (b1, b2)
    assert all(t.metrics is not None and t.metrics.max_abs_diff == 0 for t in result.tensors)
    assert compare(backend_runs[(b1, "x")], backend_runs[(b2, "y")], workers=2, exact=True).summary == s


def test_perturbation_is_found_where_it_is_introduced(runs: dict[str, Path]) -> None:
    result = compare(runs["a"], runs["p"])
    assert result.exit_code == 1 and result.verdict == "mismatch"
    first = result.first_divergence
    assert first is not None
    assert (first.step, first.module, first.call, first.rank, first.origin) == (0, PERTURBED, 0, 0, "introduced")
    assert first.input_rel_l2 == 0 and first.output_rel_l2 is not None and first.output_rel_l2 > 0
    # the perturbed call in each step is the only place error is introduced; every other differing call inherits
    differing = [c for c in result.calls if c.origin is not None]
    introduced = {(c.call.step, c.call.module) for c in differing if c.origin == "introduced"}
    assert introduced == {(0, PERTURBED), (1, PERTURBED)}
    inherited = {(c.call.step, c.call.module) for c in differing if c.origin == "inherited"}
    assert {(0, "model.layers.1.mlp"), (0, "model.layers.1"), (0, "model.norm"), (0, "lm_head"),
            (0, "model")} <= inherited
    assert [(d.step, d.module) for d in result.introduced] == [(0, PERTURBED), (1, PERTURBED)]
    # nothing computed before the perturbation differs
    before = {c.call.module for c in result.calls if c.call.step == 0 and c.order < next(
        x.order for x in result.calls if x.call.step == 0 and x.call.module == PERTURBED)}
    assert "model.layers.0.mlp.down_proj" in before
    assert all(c.verdict == "match" for c in result.calls if c.call.step == 0 and c.call.module in before)
    down = [t for t in result.tensors if t.key.module == PERTURBED and t.key.kind == "outputs" and t.key.step == 0]
    assert down[0].status == "mismatch" and down[0].metrics is not None
    assert math.isclose(down[0].metrics.max_abs_diff, 1e-3, rel_tol=1e-3)
    assert down[0].metrics.mismatched == down[0].metrics.numel


def test_workers_give_the_same_result(runs: dict[str, Path]) -> None:
    one = report_dict(compare(runs["a"], runs["p"], workers=1))
    two = report_dict(compare(runs["a"], runs["p"], workers=2))
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)


def test_progress_is_called_for_every_pair(runs: dict[str, Path]) -> None:
    seen: list[tuple[int, int]] = []
    result = compare(runs["a"], runs["b"], progress=lambda done, total: seen.append((done, total)), workers=2)
    assert len(seen) == len(result.tensors) and seen[-1] == (len(result.tensors), len(result.tensors))


def test_steps_and_modules_filter_both_sides(runs: dict[str, Path]) -> None:
    only1 = compare(runs["a"], runs["p"], steps=[1])
    assert only1.summary.steps == (1,) and {t.key.step for t in only1.tensors} == {1}
    assert only1.first_divergence is not None and only1.first_divergence.step == 1
    layer0 = compare(runs["a"], runs["p"], modules=r"layers\.0\.")
    assert {t.key.module for t in layer0.tensors} and all("layers.0." in t.key.module for t in layer0.tensors)
    assert layer0.exit_code == 0  # the perturbation is in layer 1
    several = compare(runs["a"], runs["p"], modules=[r"layers\.0\.mlp$", r"lm_head"])
    assert {t.key.module for t in several.tensors} == {"model.layers.0.mlp", "lm_head"}
    assert several.exit_code == 1


def test_empty_comparison_is_not_a_success(runs: dict[str, Path]) -> None:
    result = compare(runs["a"], runs["b"], modules="no_such_module")
    assert result.summary.tensors == 0 and result.verdict == "empty" and result.exit_code == 1
    assert compare(runs["a"], runs["b"], steps=[7]).exit_code == 1


def test_deleted_tensor_is_reported_one_sided(runs: dict[str, Path], tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(runs["b"], damaged)
    call_dir = damaged / "step_0" / "model.norm"
    doc = json.loads((call_dir / "outputs.json").read_text())
    (call_dir / "outputs.json").write_text(json.dumps({"type": "tuple", "items": [], "ilstore": doc["ilstore"]}))
    for f in call_dir.glob("outputs*.pt"):
        f.unlink()
    result = compare(runs["a"], damaged)
    assert result.exit_code == 1 and result.verdict == "incomplete"
    only = by_status(result, "only_in_dir1")
    assert [(t.key.step, t.key.module, t.key.kind) for t in only] == [(0, "model.norm", "outputs")]
    assert result.summary.only_in_dir1 == 1 and result.summary.mismatched == 0
    reverse = compare(damaged, runs["a"])
    assert [t.key.module for t in by_status(reverse, "only_in_dir2")] == ["model.norm"]


def test_module_missing_from_one_run_is_reported(runs: dict[str, Path], tmp_path: Path) -> None:
    partial = llama_run(tmp_path, "partial", module_call_match=["^model"])  # no lm_head
    result = compare(runs["a"], partial)
    assert result.exit_code == 1
    assert result.summary.calls_only_in_dir1 == 2  # lm_head in both steps
    assert {t.key.module for t in by_status(result, "only_in_dir1")} == {"lm_head"}


def test_integers_shapes_and_dtypes_are_reported(tmp_path: Path) -> None:
    run1 = module_run(tmp_path, "one", Toy(), torch.tensor([1, 2, 3]), torch.ones(2, 3), torch.full((4,), 0.1))
    run2 = module_run(tmp_path, "two", Toy(), torch.tensor([1, 2, 4]), torch.ones(3, 3),
                      torch.full((4,), 0.1, dtype=torch.float64))
    result = compare(run1, run2)
    assert result.exit_code == 1
    entries = {(t.key.module, t.key.kind, t.key.path): t for t in result.tensors}
    ints = entries[("ids", "outputs", ())]
    assert ints.status == "mismatch" and ints.metrics is not None
    assert (ints.metrics.mismatched, ints.metrics.max_abs_diff, ints.metrics.max_abs_diff_index) == (1, 1.0, (2,))
    shaped = entries[("shaped", "outputs", ())]
    assert shaped.status == "shape_mismatch" and (shaped.shape1, shaped.shape2) == ((2, 3), (3, 3))
    cast = entries[("cast", "outputs", ())]
    assert cast.dtype_mismatch and (cast.dtype1, cast.dtype2) == ("torch.float32", "torch.float64")
    assert cast.status == "match"  # compared upcast: float32(0.1) is 1.5e-9 from float64 0.1, within tolerance
    assert cast.metrics is not None and 0 < cast.metrics.max_abs_diff < 2e-9
    assert result.summary.dtype_mismatches == 2 and result.summary.shape_mismatches == 2  # inputs and outputs


def test_dtype_mismatch_within_tolerance_matches(tmp_path: Path) -> None:
    run1 = module_run(tmp_path, "one", Toy(), torch.tensor([1]), torch.ones(2), torch.full((4,), 0.5))
    run2 = module_run(tmp_path, "two", Toy(), torch.tensor([1]), torch.ones(2),
                      torch.full((4,), 0.5, dtype=torch.bfloat16))
    result = compare(run1, run2)
    cast = [t for t in result.tensors if t.key.module == "cast"]
    assert cast and all(t.status == "match" and t.dtype_mismatch for t in cast)
    assert result.exit_code == 0 and result.summary.dtype_mismatches == 2  # cast inputs and outputs


def test_exact_compares_bits(tmp_path: Path) -> None:
    x = torch.tensor([1.0, 0.0, 3.0])
    y = torch.tensor([1.0 + 2 ** -23, -0.0, 3.0])
    run1 = module_run(tmp_path, "one", Toy(), torch.tensor([1]), torch.ones(2), x)
    run2 = module_run(tmp_path, "two", Toy(), torch.tensor([1]), torch.ones(2), y)
    assert compare(run1, run2).exit_code == 0
    exact = compare(run1, run2, exact=True)
    assert exact.exit_code == 1
    cast = [t for t in exact.tensors if t.key.module == "cast" and t.key.kind == "outputs"][0]
    assert cast.metrics is not None and cast.metrics.mismatched == 2  # 1 ulp and the sign of zero
    assert compare(run1, run1, exact=True).exit_code == 0


def test_equal_nan(tmp_path: Path) -> None:
    x = torch.tensor([1.0, float("nan"), float("inf")])
    run1 = module_run(tmp_path, "one", Toy(), torch.tensor([1]), torch.ones(2), x)
    run2 = module_run(tmp_path, "two", Toy(), torch.tensor([1]), torch.ones(2), x.clone())
    default = compare(run1, run2)
    assert default.exit_code == 1
    cast = [t for t in default.tensors if t.key.module == "cast" and t.key.kind == "outputs"][0]
    assert cast.metrics is not None and cast.metrics.mismatched == 1 and cast.metrics.nan1 == cast.metrics.nan2 == 1
    assert cast.metrics.inf1 == cast.metrics.inf2 == 1
    assert compare(run1, run2, equal_nan=True).exit_code == 0
    moved = module_run(tmp_path, "moved", Toy(), torch.tensor([1]), torch.ones(2),
                       torch.tensor([float("nan"), 1.0, float("inf")]))
    assert compare(run1, moved, equal_nan=True).exit_code == 1


def test_stats_only_pairs_fail_closed_unless_allowed(runs: dict[str, Path], tmp_path: Path) -> None:
    stats = llama_run(tmp_path, "stats", mode="stats")
    result = compare(stats, runs["a"])
    assert result.summary.stats_only_matched == result.summary.tensors > 0
    assert result.verdict == "incomplete" and result.exit_code == 1
    assert all(t.note and "mode=stats" in t.note for t in result.tensors)
    assert compare(stats, runs["a"], allow_stats_only=True).exit_code == 0
    perturbed_stats = llama_run(tmp_path, "pstats", mode="stats", perturb=PERTURBED)
    diff = compare(perturbed_stats, stats, allow_stats_only=True)
    assert diff.exit_code == 1 and diff.summary.stats_only_mismatched > 0
    first = diff.first_divergence
    assert first is not None and (first.step, first.module, first.origin) == (0, PERTURBED, "introduced")
    bad = [t for t in diff.tensors if t.key.module == PERTURBED and t.key.kind == "outputs"][0]
    assert bad.status == "stats_only_mismatch" and {name for name, *_ in bad.stats_failed} >= {"mean"}


def test_max_tensor_size_pairs_compare_by_stats(runs: dict[str, Path], tmp_path: Path) -> None:
    small = llama_run(tmp_path, "small", max_tensor_size=100)
    result = compare(small, runs["a"], allow_stats_only=True)
    assert result.summary.stats_only_matched > 0 and result.summary.matched > 0 and result.exit_code == 0


def test_name_map_aligns_renamed_modules(tmp_path: Path) -> None:
    x = torch.ones(2, 4)
    run1 = module_run(tmp_path, "one", Named("attn"), x)
    run2 = module_run(tmp_path, "two", Named("self_attn"), x)
    plain = compare(run1, run2)
    assert plain.exit_code == 1 and plain.summary.only_in_dir1 == plain.summary.only_in_dir2 == 2
    mapped = compare(run1, run2, name_map={"rules": [["^self_attn$", "attn"]]})
    assert mapped.exit_code == 0 and mapped.summary.matched == 2
    assert all(t.renamed_from == "self_attn" and t.key.module == "attn" for t in mapped.tensors)
    reverse = compare(run1, run2, name_map={"apply_to": "dir1",
                                            "rules": [{"pattern": "attn", "replacement": "self_attn"}]})
    assert reverse.exit_code == 0 and {t.key.module for t in reverse.tensors} == {"self_attn"}


def test_name_map_collision_is_an_error(tmp_path: Path) -> None:
    run = module_run(tmp_path, "toy", Toy(), torch.tensor([1]), torch.ones(2), torch.ones(2))
    with pytest.raises(NameMapError, match="both"):
        compare(run, run, name_map={"rules": [["^(ids|cast)$", "x"]]})


def test_output_dir_with_one_run_is_used_and_several_are_an_error(tmp_path: Path) -> None:
    x = torch.ones(2, 4)
    single = tmp_path / "single"
    run = module_run(single, "only", Named("attn"), x)
    result = compare(single, run)
    assert result.exit_code == 0 and result.dir1 == str(run)
    module_run(single, "second", Named("attn"), x)
    with pytest.raises(AmbiguousRunError) as err:
        compare(single, run)
    assert "only" in str(err.value) and "second" in str(err.value)
    with pytest.raises(RunNotFoundError):
        compare(tmp_path / "missing", run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunNotFoundError):
        compare(tmp_path / "empty", run)


def test_truncated_tensor_file_raises_naming_it(runs: dict[str, Path], tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(runs["b"], damaged)
    victim = sorted((damaged / "step_0" / "model.layers.0.mlp").glob("outputs*.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:40])
    with pytest.raises(CorruptFileError, match=victim.name):
        compare(runs["a"], damaged)
    with pytest.raises(IlstoreError, match=victim.name):
        compare(damaged, runs["a"], workers=2)


@pytest.mark.parametrize("kwargs", [dict(rtol=-1.0), dict(atol=float("nan")), dict(workers=0), dict(steps=[-1]),
                                    dict(modules="(unclosed"), dict(modules="")])
def test_bad_options_raise(runs: dict[str, Path], kwargs: dict) -> None:
    with pytest.raises(CompareError):
        compare(runs["a"], runs["b"], **kwargs)


def test_heap_guard_trims_only_past_its_slack() -> None:
    """The compare hands freed heap memory back only when the process outgrew the slack, and only
    after large pairs (trimming costs page faults later)."""
    from ilstore_compare._heap import HeapGuard, _malloc_trim

    if _malloc_trim() is None or not Path("/proc/self/statm").exists():
        pytest.skip("needs glibc and /proc")
    guard = HeapGuard(slack=2**40)
    guard.after(2**30)
    assert guard.trims == 0  # within the slack
    eager = HeapGuard(slack=-1)
    eager.after(2**10)
    assert eager.trims == 0  # a small pair never trims
    eager.after(2**21)
    assert eager.trims == 1


def test_workers_keep_the_tensor_bytes_in_flight_within_the_largest_pair_plus_slack(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from ilstore_compare import engine

    mib = 2**20
    sizes = {"big1": 400 * mib, "big2": 400 * mib, "small1": 8 * mib, "small2": 8 * mib, "big3": 400 * mib}
    monkeypatch.setattr(engine, "_pair_bytes", lambda pair: sizes[pair])
    lock, running, peak = threading.Lock(), [0], [0]
    both_small = threading.Barrier(2, timeout=10)  # broken unless the two small pairs run at once

    def fn(pair: str) -> str:
        with lock:
            running[0] += sizes[pair]
            peak[0] = max(peak[0], running[0])
        if pair.startswith("small"):
            both_small.wait()
        with lock:
            running[0] -= sizes[pair]
        return pair.upper()

    order = ["big1", "big2", "small1", "small2", "big3"]
    assert list(engine._stream(order, fn, 2, None)) == [p.upper() for p in order]  # type: ignore[arg-type]
    assert peak[0] <= 400 * mib + engine._SLACK  # two big pairs never ran together


def test_a_pair_waiting_for_memory_does_not_hold_back_smaller_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """big2 cannot start beside big1; small1, behind it, runs beside big1 all the same (the
    barrier breaks unless both run at once), and results still come in input order."""
    import threading

    from ilstore_compare import engine

    mib = 2**20
    sizes = {"big1": 400 * mib, "big2": 400 * mib, "small1": 8 * mib, "small2": 8 * mib}
    monkeypatch.setattr(engine, "_pair_bytes", lambda pair: sizes[pair])
    lock, running, peak = threading.Lock(), [0], [0]
    together = threading.Barrier(2, timeout=10)

    def fn(pair: str) -> str:
        with lock:
            running[0] += sizes[pair]
            peak[0] = max(peak[0], running[0])
        if pair in ("big1", "small1"):
            together.wait()
        with lock:
            running[0] -= sizes[pair]
        return pair.upper()

    order = ["big1", "big2", "small1", "small2"]
    seen: list[tuple[int, int]] = []
    got = list(engine._stream(order, fn, 2, lambda done, total: seen.append((done, total))))  # type: ignore[arg-type]
    assert got == [p.upper() for p in order] and seen == [(i, 4) for i in range(1, 5)]
    assert peak[0] <= 400 * mib + engine._SLACK


def test_stream_error_stops_and_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    from ilstore_compare import engine

    monkeypatch.setattr(engine, "_pair_bytes", lambda pair: 1)
    started: list[int] = []

    def fn(pair: int) -> int:
        started.append(pair)
        if pair == 3:
            raise RuntimeError("bad pair")
        return pair

    out = []
    with pytest.raises(RuntimeError, match="bad pair"):
        for value in engine._stream(list(range(100)), fn, 2, None):  # type: ignore[arg-type]
            out.append(value)
    assert out == [0, 1, 2] and len(started) < 100


def test_small_pairs_run_in_batches_in_the_streaming_thread_beside_a_large_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With workers, neighbouring small pairs run together in the thread that streams the
    results (two threads cannot run their Python at once), while a large pair runs in a worker:
    the barrier breaks unless big1 and the batch behind it run at once. Results and progress
    still come in input order, and an error raises after the results before it."""
    import threading

    from ilstore_compare import engine

    mib = 2**20
    order = ["big1", *(f"s{i}" for i in range(100)), "big2", "s100"]
    sizes = {p: 400 * mib if p.startswith("big") else 1024 for p in order}
    monkeypatch.setattr(engine, "_pair_bytes", lambda pair: sizes[pair])
    assert engine._units(order) == [(0, 1, 400 * mib), (1, 1 + engine._BATCH_PAIRS, 1024),  # type: ignore[arg-type]
                                    (1 + engine._BATCH_PAIRS, 101, 1024), (101, 102, 400 * mib), (102, 103, 1024)]
    together = threading.Barrier(2, timeout=10)
    threads: dict[str, str] = {}

    def fn(pair: str) -> str:
        threads[pair] = threading.current_thread().name
        if pair in ("big1", "s0"):
            together.wait()
        return pair.upper()

    seen: list[tuple[int, int]] = []
    got = list(engine._stream(order, fn, 2, lambda done, total: seen.append((done, total))))  # type: ignore[arg-type]
    assert got == [p.upper() for p in order] and seen == [(i, len(order)) for i in range(1, len(order) + 1)]
    main = threading.current_thread().name
    assert {threads[p] for p in order if p.startswith("s")} == {main}
    assert threads["big1"] != main and threads["big2"] != main

    def failing(pair: str) -> str:
        if pair == "s3":
            raise RuntimeError("bad pair s3")
        return pair.upper()

    out: list[str] = []
    with pytest.raises(RuntimeError, match="bad pair s3"):
        for value in engine._stream(order, failing, 2, None):  # type: ignore[arg-type]
            out.append(value)
    assert out == ["BIG1", "S0", "S1", "S2"]
