"""How the size of each ``write`` call affects writing files on this machine.

Writes ``--size-mb`` of data as files of several sizes, each file either in one ``write`` call
or in 1 MiB calls, after a pause (``--pause`` seconds, so memory freed by the previous round
has time to be handed back by a VM that does so), and prints the median time per variant.
ilstore's pt writer writes tensor bytes in 1 MiB calls because of what this measured on the
project's VM (docs/performance.md, "This VM's memory").

Usage: python benchmarks/bench_write_size.py [--dir /tmp] [--size-mb 64] [--rounds 3] [--pause 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
FILE_SIZES = (512 * 1024, 2 * MiB, 8 * MiB, None)  # None: one file holding everything


def write_files(out: Path, data: memoryview, file_size: int, chunk: int) -> float:
    """Write ``data`` as files of ``file_size`` bytes, each in ``chunk``-byte calls; seconds."""
    t0 = time.perf_counter()
    for k, start in enumerate(range(0, data.nbytes, file_size)):
        piece = data[start:start + file_size]
        with open(out / f"f{k}", "wb") as fh:
            for offset in range(0, piece.nbytes, chunk):
                fh.write(piece[offset:offset + chunk])
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir); removed after")
    ap.add_argument("--size-mb", type=float, default=64, help="MB written per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pause", type=float, default=3.0, help="seconds to wait before each variant")
    args = ap.parse_args(argv)
    total = max(1, int(args.size_mb * 1e6))
    data = memoryview(os.urandom(total))
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="ilstore-bench-writes-"))
    rows: dict[str, list[float]] = {}
    try:
        for _ in range(args.rounds):
            for size in FILE_SIZES:
                file_size = size or total
                for chunk, how in ((file_size, "one call"), (MiB, "1 MiB calls")):
                    out = work / "out"
                    out.mkdir()
                    os.sync()
                    time.sleep(args.pause)
                    name = f"{'one file' if size is None else f'{file_size // 1024} KiB files'}, {how}"
                    rows.setdefault(name, []).append(write_files(out, data, file_size, chunk))
                    shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{total / 1e6:.0f} MB per variant, {args.rounds} rounds, {args.pause:g} s pause before each")
    print(f"{'variant':34} {'median s':>9} {'MB/s':>8}")
    for name, times in rows.items():
        median = statistics.median(times)
        print(f"{name:34} {median:9.3f} {total / 1e6 / median:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
