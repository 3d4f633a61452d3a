"""``ilstore.convert.convert`` throughput and memory against a file-copy floor, in one process.

Workload: one run of about ``--size-mb`` MB (default 500: ~400 float32 tensors from 1 KiB to
64 MiB, shuffled), written through ``ilstore.capture`` (one module call per tensor, outputs
only) in every source backend the pairs need.

Rows, each a median over ``--rounds`` rounds, rounds interleaved (every row once per round), a
fresh destination directory each time (deleted after the round, untimed):
* ``copy floor <src>`` (THE floor for pairs from ``<src>``): ``shutil.copyfile`` of every file
  of the source run into a fresh directory (in-kernel copy: ``sendfile``/``copy_file_range``).
* ``read+write floor <src>``: the same files read into a user-space buffer and written back
  (16 MiB chunks), i.e. what any converter that sees the bytes must at least do.
* ``<src> -> <dst>``: ``ilstore.convert.convert(src, dst, to=<dst>)``.

Columns: median seconds; MB/s of tensor data (the run's payload, the same for every row); the
throughput ratio to the copy floor of the same source (floor seconds / row seconds; target
>= 0.5) and to its read+write floor; peak RSS growth during the call over the RSS before it,
sampled every 2 ms (whole resident set, and its anonymous part: resident minus file-backed
pages, e.g. memory-mapped safetensors shards); the output's size and file count.

By default the page cache is warm (the source was just written: reads come from memory, and
writes land in the page cache; nothing is fsynced). ``--cold`` evicts the source's files
(``posix_fadvise(DONTNEED)``) before each round of a row.

Usage:
    python benchmarks/bench_convert.py [--size-mb 500] [--rounds 3] [--pairs pt:safetensors,hdf5:pt,...]
        [--cold] [--tmp DIR] [--json FILE] [--profile N]
    python benchmarks/bench_convert.py --size-mb 50 --rounds 1        # a quick smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import (  # noqa: E402
    MiB,
    dir_size,
    drop_page_cache,
    files_under,
    loadavg,
    nbytes_of,
    read_all,
    release_memory,
    timed,
    workload,
    write_run,
)

BACKENDS = ("pt", "safetensors", "hdf5")


def copy_floor(src: Path, dst: Path) -> None:
    for f in files_under(src):
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)


def read_write_floor(src: Path, dst: Path) -> None:
    buf = bytearray(16 * MiB)
    view = memoryview(buf)
    for f in files_under(src):
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "rb", buffering=0) as fin, open(target, "wb", buffering=0) as fout:
            while n := fin.readinto(buf):
                fout.write(view[:n])


def run_convert(src: Path, dst: Path, *, to: str) -> None:
    from ilstore.convert import convert

    convert(src, dst, to=to, progress=False)


class Row:
    def __init__(self, name: str, fn: Callable[[Path], None], src: Path, source: str, kind: str) -> None:
        self.name, self.fn, self.src, self.source, self.kind = name, fn, src, source, kind
        self.times: list[float] = []
        self.rss: list[int] = []
        self.anon: list[int] = []
        self.out_bytes = self.out_files = 0

    def measure(self, out: Path, cold: bool, keep: bool) -> None:
        if out.exists():
            shutil.rmtree(out)
        release_memory()
        if cold:
            drop_page_cache(files_under(self.src))
        seconds, sampler, _ = timed(self.fn, out)
        self.times.append(seconds)
        self.rss.append(sampler.growth)
        self.anon.append(sampler.growth_anon)
        self.out_bytes, self.out_files = dir_size(out)
        if not keep:
            shutil.rmtree(out)

    def result(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "source": self.source, "seconds": statistics.median(self.times),
                "rss": statistics.median(self.rss), "rss_anon": statistics.median(self.anon), "rss_max": max(self.rss),
                "rss_anon_max": max(self.anon), "times": self.times, "out_bytes": self.out_bytes,
                "out_files": self.out_files}


def _parse_pairs(text: str | None) -> list[tuple[str, str]]:
    if not text:
        return list(itertools.permutations(BACKENDS, 2))
    pairs = []
    for item in text.split(","):
        src, sep, dst = item.partition(":")
        if not sep or not src or not dst:
            raise SystemExit(f"--pairs: expected SRC:DST items, got {item!r}")
        pairs.append((src, dst))
    return pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=500, help="MB (10^6 bytes) of tensor data in the run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", default=None, help="SRC:DST,... (default: every ordered pair of pt, safetensors, hdf5)")
    ap.add_argument("--cold", action="store_true", help="evict the source's files before each round of a row")
    ap.add_argument("--tmp", default=None, help="directory for the runs (default: a temp dir); removed after")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the rounds, cProfile one conversion per pair and print the top N functions")
    args = ap.parse_args(argv)
    pairs = _parse_pairs(args.pairs)
    sources = list(dict.fromkeys(src for src, _ in pairs))
    shapes = workload(args.size_mb)
    run_bytes = nbytes_of(shapes)
    largest = max(nbytes_of([s]) for s in shapes)
    load_before = loadavg()
    tmp = Path(tempfile.mkdtemp(dir=args.tmp, prefix="ilstore-bench-convert-"))
    try:
        print(f"building: {len(shapes)} float32 tensors, {run_bytes / 1e6:.1f} MB, largest {largest / MiB:.0f} MiB; "
              f"sources {', '.join(sources)} ...", flush=True)
        runs = {b: write_run(tmp / "src" / b, "run", b, shapes, "a") for b in sources}
        disk = {b: dir_size(p) for b, p in runs.items()}
        rows: list[Row] = []
        for b, src in runs.items():
            rows.append(Row(f"copy floor {b}", partial(copy_floor, src), src, b, "copy"))
            rows.append(Row(f"read+write floor {b}", partial(read_write_floor, src), src, b, "rw"))
        for s, d in pairs:
            rows.append(Row(f"{s} -> {d}", partial(run_convert, runs[s], to=d), runs[s], s, "convert"))
        read_all(f for p in runs.values() for f in files_under(p))
        (tmp / "out").mkdir()
        # Outputs are kept until the end where the disk has room: on ext4 mounted with online
        # discard (this project's VMs), creating files right after deleting many was measured
        # 4-20x slower per file (0.03 ms -> 0.2-0.6 ms), which would charge one row for the
        # previous row's deletion.
        keep = shutil.disk_usage(tmp).free > 1.3 * run_bytes * len(rows) * args.rounds + 2e9
        if not keep:
            print("(not enough free disk to keep every output: each is deleted right after its row)")
        for r in range(args.rounds):  # interleaved, so slow drifts of the machine hit every row alike
            for i, row in enumerate(rows):
                row.measure(tmp / "out" / f"{i}_{r}", args.cold, keep)
        out = tmp / "out" / "run"
        results = [row.result() for row in rows]
        profiles: dict[str, str] = {}
        if args.profile:
            for s, d in pairs:
                prof = cProfile.Profile()
                prof.enable()
                run_convert(runs[s], out, to=d)
                prof.disable()
                shutil.rmtree(out)
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.profile)
                profiles[f"{s} -> {d}"] = buf.getvalue()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = loadavg()

    floors = {r["source"]: r["seconds"] for r in results if r["kind"] == "copy"}
    rw_floors = {r["source"]: r["seconds"] for r in results if r["kind"] == "rw"}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs; "
          f"{args.rounds} round(s), medians; {len(shapes)} tensors, {run_bytes / 1e6:.1f} MB of tensor data, "
          f"largest tensor {largest / MiB:.0f} MiB")
    print("page cache: " + ("COLD source (evicted with posix_fadvise(DONTNEED) before each round)" if args.cold
                            else "WARM (the source was just written/read: reads come from memory; writes are "
                                 "not fsynced)"))
    print(f"loadavg before: {load_before}   after: {load_after}")
    for b, (nbytes, nfiles) in disk.items():
        print(f"  source {b}: {nbytes / 1e6:.1f} MB on disk in {nfiles} files")
    header = (f"{'row':28} {'s':>7} {'MB/s':>7} {'x copy':>7} {'x r+w':>7} {'x cp dst':>8} {'RSS+MB':>7} "
              f"{'anon+MB':>7} {'out MB':>7} {'files':>6}")
    print(header)
    print("-" * len(header))
    for r in results:
        r["mb_per_s"] = run_bytes / 1e6 / r["seconds"]
        r["ratio_to_copy"] = floors[r["source"]] / r["seconds"]
        r["ratio_to_read_write"] = rw_floors[r["source"]] / r["seconds"]
        dest = r["name"].split(" -> ")[1] if r["kind"] == "convert" else r["source"]
        r["ratio_to_copy_dest"] = floors[dest] / r["seconds"] if dest in floors else None
        dst_text = f"{r['ratio_to_copy_dest']:8.2f}" if r["ratio_to_copy_dest"] is not None else f"{'-':>8}"
        print(f"{r['name']:28} {r['seconds']:7.3f} {r['mb_per_s']:7.0f} {r['ratio_to_copy']:7.2f} "
              f"{r['ratio_to_read_write']:7.2f} {dst_text} "
              f"{r['rss'] / 1e6:7.0f} {r['rss_anon'] / 1e6:7.0f} {r['out_bytes'] / 1e6:7.1f} {r['out_files']:6d}")
    print("target: x copy >= 0.5 (throughput vs shutil.copyfile of the source run's files); x r+w: vs the "
          "read+write floor of the same source; x cp dst: vs copying a run of the target backend (the same bytes "
          "in the target's layout: its file count)")
    for name, text in profiles.items():
        print(f"\n== cProfile: {name} (tottime) ==\n{text}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "convert", "size_mb": args.size_mb, "rounds": args.rounds, "cold": args.cold,
            "tensors": len(shapes), "run_bytes": run_bytes, "largest_bytes": largest, "loadavg_before": load_before,
            "loadavg_after": load_after, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "sources": {k: {"bytes": v[0], "files": v[1]} for k, v in disk.items()}, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
