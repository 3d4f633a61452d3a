"""Capture cost against a raw-write floor, all measured in this one process.

Workload (issue 5): a transformers Llama (hidden 512, intermediate 1408, 8 layers, 8 heads,
vocab 8000, float32), batch 1 x 256 tokens (``--tokens``), ``use_cache=False``, every module's inputs and
outputs captured for one forward.

Rows, each a median over ``--rounds`` rounds (a fresh run directory per round):
* ``baseline``: the forward without hooks.
* ``clone-only``: hooks that clone every tensor, no disk.
* ``raw floor``: hooks + clone + one ``numpy.tofile`` per tensor (the cost of writing the bytes).
* ``raw floor, 1 MiB writes``: the same bytes written in 1 MiB ``write`` calls, as ilstore's pt
  writer does (on this project's VMs one large write was measured several times slower).
* ``naive torch.save``: one ``torch.save`` per tensor + a JSON per module (the earlier vLLM code).
* ``ilstore <backend> sync|async``: ``ilstore.capture`` with every module.
* ``ilstore pt stats``, ``match one module``, ``enabled false``; ``match one, set-up timed``: the same
  one-module capture with its creation inside the timed region (issue 13's one-module target).
* ``ilstore pt replay``: ``ilstore.capture`` with every module and ``replay_from`` a pt run of the
  same forward (written once before the rounds): every call reads the reference's inputs
  before it runs. Its ``replay/capture`` ratio (issue 14: at most 1.5) is paired with the
  ``ilstore pt async`` row, the capture of the same selection.

Columns: forward (producer-visible) time, total time including flush/close (medians, seconds),
each as a ratio to the baseline forward and to the raw floor's total; bytes and files written;
peak RSS growth over the process's RSS before the row (the kernel's high-water mark, reset
before the row: no sampling thread competes with the timed forward); ``steal%``: the share of
the CPUs' time the VM's host took while the row's rounds ran (``/proc/stat``; on this project's
VM it comes and goes, and a row measured while it is more than a few percent is slowed by the
host, not by its code). Ratios are paired:
the median over rounds of (this row / the reference row of the same round), so a slow drift of
a shared machine (its disk speed varied 2x between rounds here) cancels out.

Usage: python benchmarks/bench_capture.py [--rounds 7] [--backends pt,safetensors,hdf5] [--rows pt,stats] [--tmp DIR]
       [--delete-between-rounds] [--threads N] [--clock wall|cpu]

``--clock cpu`` times each row by the CPU time of the whole process (the model's threads and
ilstore's writer thread together: ``time.process_time``) instead of the wall clock: on a machine
shared with other work the wall clock of a multi-threaded forward swings many times over (the
model's OpenMP threads wait for each other whenever one is descheduled), its CPU time much
less. With ``--threads 1`` it reads as the CPU cost of each row.

Long-run mode (issue 13), a different workload, one run per backend and mode and directory:
       python benchmarks/bench_capture.py --steps 100000 [--modes stats,tensors] [--tmp /dev/shm,/var/tmp]
       [--no-compare [--second-run]] [--keep]
prints, per run, the forward time per step of the first and last 10 % of steps (and of each
tenth, with the slowest steps), ``close()`` time, peak RSS growth, the manifest's size,
``ilstore ls`` and one-step read times, and the compare throughput of two such runs, in process
and through ``ilstore-compare`` (see ``_long_run.py``). ``--keep`` leaves the runs in place (their
directory is printed) for timing other tools on them; by default they are deleted at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ilstore

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import PeakRss, Steal, dir_size, memory_note  # noqa: E402


def build_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=8000, max_position_embeddings=512, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _attach(model: torch.nn.Module, on_tensors: Callable[[str, str, list[torch.Tensor]], None]) -> list[Any]:
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue
        handles.append(mod.register_forward_pre_hook(
            lambda m, a, k, n=name: on_tensors(n, "inputs", _tensors(a) + _tensors(k)), with_kwargs=True))
        handles.append(mod.register_forward_hook(lambda m, a, o, n=name: on_tensors(n, "outputs", _tensors(o))))
    return handles


#: What the rows are timed with (``--clock``).
_clock: Callable[[], float] = time.perf_counter


class Row:
    """One configuration; ``measure`` runs one round of it (rounds of all rows are interleaved)."""

    def __init__(self, name: str, setup: Callable[[Path], Any], flush: Callable[[Any], None],
                 timed_setup: bool = False) -> None:
        self.name, self.setup, self.flush = name, setup, flush
        self.timed_setup = timed_setup  # the set-up (creating the capture) counts in both times
        self.fwd: list[float] = []
        self.total: list[float] = []
        self.rss: list[int] = []
        self.bytes = self.files = 0
        # async rows: rounds whose capture wrote records on the model's thread (lent) and rounds
        # where it then switched lending off (lent writes over their budget: snapshots from then on)
        self.lent_rounds = self.lending_off_rounds = 0
        self.steal = Steal()  # the host's share of the CPUs while this row's rounds ran

    def measure(self, r: int, tmp: Path, model: torch.nn.Module, ids: torch.Tensor) -> None:
        out = tmp / f"{self.name.replace(' ', '_')}_{r}"
        out.mkdir(parents=True)
        gc.collect()
        os.sync()  # earlier rows' dirty pages are written back now, not during this row's timing
        with PeakRss() as sampler, self.steal:
            t_setup = _clock()
            state = self.setup(out)
            t0 = t_setup if self.timed_setup else _clock()
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
            t1 = _clock()
            self.flush(state)
            t2 = _clock()
        self.fwd.append(t1 - t0)
        self.total.append(t2 - t0)
        self.rss.append(sampler.growth)
        self.bytes, self.files = dir_size(out)

    def result(self) -> dict[str, Any]:
        return {"name": self.name, "forward": statistics.median(self.fwd), "total": statistics.median(self.total),
                "bytes": self.bytes, "files": self.files, "rss": statistics.median(self.rss),
                "lent_rounds": self.lent_rounds, "lending_off_rounds": self.lending_off_rounds,
                "steal_percent": self.steal.percent}


def _fs_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts; "" if unknown)."""
    best, kind, where = "", "", str(path.resolve())
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = fields[1]
                if (where == mount or where.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                    best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


def _paired(values: list[float], reference: list[float]) -> float:
    """Median over rounds of ``values[r] / reference[r]``."""
    return statistics.median(v / ref for v, ref in zip(values, reference, strict=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--backends", default="pt,safetensors,hdf5")
    ap.add_argument("--rows", default="",
                    help="only the rows whose name contains one of these comma-separated words "
                         "(baseline and the raw floors always run)")
    ap.add_argument("--tmp", default=None, help="directory for the runs (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--delete-between-rounds", action="store_true",
                    help="delete the runs after each round even where the disk has room to keep them")
    ap.add_argument("--steps", type=int, default=0,
                    help="long-run mode: capture this many steps of the small long-run model instead")
    ap.add_argument("--modes", default="stats,tensors", help="long-run mode: capture modes")
    ap.add_argument("--no-compare", action="store_true", help="long-run mode: skip the second run and the compare")
    ap.add_argument("--second-run", action="store_true",
                    help="long-run mode: with --no-compare, still make the second run (a second sample)")
    ap.add_argument("--keep", action="store_true", help="long-run mode: keep the runs (their directory is printed)")
    ap.add_argument("--cli-max-rss-mb", type=float, default=8192,
                    help="long-run mode: kill an ilstore-compare CLI whose resident set passes this (0: no limit)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: one per core)")
    ap.add_argument("--tokens", type=int, default=256,
                    help="tokens per forward (default 256, the workload above; fewer for a quick smoke run)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time rows by the wall clock or by the process's CPU time (all its threads)")
    args = ap.parse_args(argv)
    if args.steps:
        return _long(args)
    global _clock
    _clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    note = memory_note(args.tmp)
    if note:
        print(note, flush=True)
    model = build_model()
    ids = torch.randint(0, 8000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    tmp = Path(tempfile.mkdtemp(dir=args.tmp, prefix="ilstore-bench-"))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)  # warm-up
    rows: list[Row] = []

    def hooks(fn: Callable[[Path], Callable[[str, str, list[torch.Tensor]], None]]) -> Callable[[Path], Any]:
        return lambda out: _attach(model, fn(out))

    def remove(handles: Any) -> None:
        for h in handles:
            h.remove()

    rows.append(Row("baseline", lambda out: None, lambda s: None))

    def clone_only(out: Path) -> Callable[..., None]:
        keep: list[torch.Tensor] = []
        return lambda n, k, ts: keep.extend(t.detach().clone() for t in ts)

    rows.append(Row("clone-only", hooks(clone_only), remove))

    def raw(out: Path) -> Callable[..., None]:
        counter = [0]

        def write(n: str, k: str, ts: list[torch.Tensor]) -> None:
            for t in ts:
                counter[0] += 1
                t.detach().clone().numpy().tofile(out / f"{counter[0]}.bin")
        return write

    rows.append(Row("raw floor", hooks(raw), remove))

    def raw_chunked(out: Path) -> Callable[..., None]:
        counter = [0]

        def write(n: str, k: str, ts: list[torch.Tensor]) -> None:
            for t in ts:
                counter[0] += 1
                view = t.detach().clone().numpy().data.cast("B")
                with open(out / f"{counter[0]}.bin", "wb") as fh:
                    for start in range(0, view.nbytes, 1 << 20):
                        fh.write(view[start:start + (1 << 20)])
        return write

    rows.append(Row("raw floor, 1 MiB writes", hooks(raw_chunked), remove))

    def naive(out: Path) -> Callable[..., None]:
        def write(n: str, k: str, ts: list[torch.Tensor]) -> None:
            d = out / n
            d.mkdir(exist_ok=True)
            meta = []
            for i, t in enumerate(ts):
                torch.save(t.detach().clone(), d / f"{k}_{i}_cpu.pt")
                meta.append({"type": "tensor", "shape": list(t.shape), "dtype": str(t.dtype), "numel": t.numel()})
            (d / f"{k}.json").write_text(json.dumps({"type": "tuple", "items": meta}))
        return write

    rows.append(Row("naive torch.save", hooks(naive), remove))

    def ilstore_row(label: str, timed_setup: bool = False, **cfg: Any) -> Row:
        def setup(out: Path) -> Any:
            return ilstore.capture(model, {"output_dir": str(out), "run_id": "run", **cfg})

        def close(cap: Any) -> None:
            sink = cap._sink  # (private: whether an async capture kept writing on the model's thread)
            if getattr(sink, "lent_records", 0):
                row.lent_rounds += 1
                row.lending_off_rounds += not sink.lending
            cap.close()

        row = Row(label, setup, close, timed_setup)
        return row

    for backend in [b for b in args.backends.split(",") if b]:
        for mode in ("sync", "async"):
            rows.append(ilstore_row(f"ilstore {backend} {mode}", backend=backend, async_writes=mode == "async"))
    for backend in [b for b in args.backends.split(",") if b]:
        rows.append(ilstore_row(f"ilstore {backend} stats", backend=backend, mode="stats"))
    rows.append(ilstore_row("ilstore match one module", module_call_match="^model\\.layers\\.3\\.mlp\\.down_proj$"))
    # issue 13's target for one module counts the capture's own set-up and close: this row times both
    rows.append(ilstore_row("ilstore match one, set-up timed", timed_setup=True,
                            module_call_match="^model\\.layers\\.3\\.mlp\\.down_proj$"))
    rows.append(ilstore_row("ilstore enabled false", enabled=False))
    reference = tmp / "replay_reference"
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(reference), "run_id": "ref"}):
        model(input_ids=ids, use_cache=False)
    rows.append(ilstore_row("ilstore pt replay", replay_from=str(reference / "ref")))
    wanted = [w for w in args.rows.split(",") if w]
    if wanted:
        rows = [r for r in rows
                if r.name == "baseline" or r.name.startswith("raw floor") or any(w in r.name for w in wanted)]
    # Rows are interleaved, so slow drifts of the machine hit every row alike, and the order
    # rotates each round. Runs are kept until the end where the disk has room: on ext4 mounted
    # with online discard (this project's VMs) creating files right after deleting many was
    # measured 4-20x slower per file (0.03 ms -> 0.2-0.6 ms), which would penalise whichever row
    # follows a deletion; without room, runs are deleted between rounds.
    keep = False if args.delete_between_rounds else None
    for r in range(args.rounds):
        for row in rows[r % len(rows):] + rows[:r % len(rows)]:
            row.measure(r, tmp, model, ids)
        if keep is None:
            per_round = sum(dir_size(sub)[0] for sub in tmp.iterdir() if sub != reference)
            in_memory = _fs_type(tmp) in ("tmpfs", "ramfs")  # deleting costs nothing there
            keep = not in_memory and shutil.disk_usage(tmp).free > 1.5 * per_round * args.rounds + 2e9
            if not keep and not in_memory:
                print("(not enough free space to keep every run: runs are deleted between rounds)")
        if not keep:
            for sub in list(tmp.iterdir()):
                if sub != reference:
                    shutil.rmtree(sub)
            os.sync()
    shutil.rmtree(tmp, ignore_errors=True)
    base_row, floor_row = rows[0], next(r for r in rows if r.name == "raw floor")
    results = []
    for row in rows:
        res = row.result()
        res["fwd/base"] = _paired(row.fwd, base_row.fwd)
        res["tot/base"] = _paired(row.total, base_row.fwd)
        res["tot/floor"] = _paired(row.total, floor_row.total)
        results.append(res)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds (medians; "
          f"ratios are medians of same-round ratios), {args.clock} clock")
    header = (f"{'row':31} {'forward s':>9} {'fwd/base':>8} {'total s':>8} {'tot/base':>8} {'tot/floor':>9} "
              f"{'MB':>7} {'files':>6} {'RSS+MB':>7} {'steal%':>6}")
    print(header)
    print("-" * len(header))
    for res in results:
        print(f"{res['name']:31} {res['forward']:9.3f} {res['fwd/base']:8.2f} {res['total']:8.3f} "
              f"{res['tot/base']:8.2f} {res['tot/floor']:9.2f} {res['bytes'] / 1e6:7.1f} {res['files']:6d} "
              f"{res['rss'] / 2**20:7.0f} {res['steal_percent']:6.1f}")
    lent = [res for res in results if res["lent_rounds"]]
    if lent:
        print("async rounds that wrote on the model's thread (lent) / of them, lending switched off: "
              + ", ".join(f"{res['name'].removeprefix('ilstore ')} {res['lent_rounds']}/{res['lending_off_rounds']}"
                          for res in lent))
    by_name = {row.name: row for row in rows}
    if "ilstore pt replay" in by_name and "ilstore pt async" in by_name:
        ratio = _paired(by_name["ilstore pt replay"].total, by_name["ilstore pt async"].total)
        print(f"replay/capture (ilstore pt replay total / ilstore pt async total, paired): {ratio:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _long(args: argparse.Namespace) -> int:
    """``--steps N``: the long-run rows, in each ``--tmp`` directory (comma-separated); runs kept until the end."""
    import _long_run

    rows: list[dict[str, Any]] = []
    for where in (args.tmp or tempfile.gettempdir()).split(","):
        tmp = Path(tempfile.mkdtemp(dir=where, prefix="ilstore-long-"))
        try:
            print(f"filesystem: {_fs_type(tmp) or '?'}")
            _long_run.main(args.steps, [b for b in args.backends.split(",") if b],
                           [m for m in args.modes.split(",") if m], tmp, with_compare=not args.no_compare,
                           json_rows=rows, cli_max_rss_mb=args.cli_max_rss_mb,
                           second_run=True if args.second_run else None)
        finally:
            if args.keep:
                print(f"runs kept in {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
            if args.json:  # also what was measured before a failure
                Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
