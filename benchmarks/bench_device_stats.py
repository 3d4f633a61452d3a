"""Statistics of device tensors (``mode: "stats"``): read back once per step against once per tensor.

Workload: a transformers Llama (hidden ``--hidden``, ``--layers`` layers, 8 heads, vocab 8000,
``--dtype``), ``use_cache=False``, every module captured in ``mode: "stats"``, on ``--device``,
at two shapes: a prefill of ``--tokens`` tokens and a single-token forward (a decode step's
shape: few elements per tensor, so launches and syncs dominate).

Rows, rounds interleaved (the order rotates each round), medians of ``--rounds`` forwards each:
* ``plain``: no capture (the reference of the ratios);
* ``per tensor``: statistics read back in each hook (``ILSTORE_DEVICE_STATS_BYTES=0``);
* ``per step``: statistics read back once per step (the default, :mod:`ilstore.device_stats`).

Columns: the forward's median time (a device synchronize closes each), its ratio to ``plain``,
and the synchronising operations one forward makes (CUDA only: ``torch.cuda.set_sync_debug_mode``).
With ``--device cpu`` CPU tensors are sent down the same path (a smoke test of the script; the
figures mean nothing there). Runs go to ``--tmp`` (default /dev/shm) and are deleted.

Usage: python benchmarks/bench_device_stats.py [--device cuda] [--layers 8] [--hidden 1024]
       [--tokens 512] [--dtype bfloat16] [--rounds 20] [--tmp DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def build_model(layers: int, hidden: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=8000, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _stash_bytes(value: str | None) -> Iterator[None]:
    old = os.environ.get("ILSTORE_DEVICE_STATS_BYTES")
    if value is None:
        os.environ.pop("ILSTORE_DEVICE_STATS_BYTES", None)
    else:
        os.environ["ILSTORE_DEVICE_STATS_BYTES"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ILSTORE_DEVICE_STATS_BYTES", None)
        else:
            os.environ["ILSTORE_DEVICE_STATS_BYTES"] = old


#: The rows: whether a capture runs, and ``ILSTORE_DEVICE_STATS_BYTES`` for it (None: the default).
ROWS: dict[str, tuple[bool, str | None]] = {"plain": (False, None), "per tensor": (True, "0"),
                                            "per step": (True, None)}


def _forward(model: torch.nn.Module, ids: torch.Tensor, device: str, tmp: Path, run_id: str,
             row: tuple[bool, str | None], count_syncs: bool = False) -> Any:
    """One forward of a row, under a capture of its own (made and closed untimed): its seconds,
    or with ``count_syncs`` the synchronising operations it made."""
    import ilstore

    cap = None
    if row[0]:
        with _stash_bytes(row[1]):
            cap = ilstore.capture(model, {"output_dir": str(tmp), "run_id": run_id.replace(" ", "_"),
                                          "mode": "stats", "async_writes": True})
    try:
        if count_syncs:
            if device != "cuda":
                model(input_ids=ids, use_cache=False)
                return None
            from ilstore.device_stats import count_cuda_syncs

            return count_cuda_syncs(lambda: model(input_ids=ids, use_cache=False))
        _sync(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _sync(device)
        return time.perf_counter() - start
    finally:
        if cap is not None:
            cap.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tmp", default="/dev/shm" if Path("/dev/shm").is_dir() else None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import ilstore.device_stats as device_stats

    if args.device == "cpu":  # a smoke run: CPU tensors down the device path
        device_stats.DEVICE_TYPES = frozenset({"cpu"})
    dtype = getattr(torch, args.dtype)
    model = build_model(args.layers, args.hidden, dtype, args.device)
    tmp = Path(tempfile.mkdtemp(dir=args.tmp, prefix="ilstore-bench-devstats-"))
    shapes = {"prefill": torch.randint(0, 8000, (1, args.tokens), device=args.device),
              "one token": torch.randint(0, 8000, (1, 1), device=args.device)}
    results: list[dict[str, Any]] = []
    try:
        with torch.no_grad():
            for shape, ids in shapes.items():
                times: dict[str, list[float]] = {name: [] for name in ROWS}
                syncs: dict[str, int | None] = {}
                names = list(ROWS)
                for name in names:  # warm-up, and the syncs of one forward
                    _forward(model, ids, args.device, tmp, f"{shape}-{name}-warm", ROWS[name])
                    syncs[name] = _forward(model, ids, args.device, tmp, f"{shape}-{name}-syncs", ROWS[name],
                                           count_syncs=True)
                for r in range(args.rounds):
                    for name in names[r % len(names):] + names[:r % len(names)]:
                        seconds = _forward(model, ids, args.device, tmp, f"{shape}-{name}-{r}", ROWS[name])
                        assert seconds is not None
                        times[name].append(seconds)
                base = statistics.median(times["plain"])
                for name in ROWS:
                    med = statistics.median(times[name])
                    results.append({"shape": shape, "row": name, "seconds": med, "ratio": med / base,
                                    "syncs": syncs[name]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"torch {torch.__version__}, device {args.device}, {args.layers} layers, hidden {args.hidden}, "
          f"{args.dtype}, {args.tokens}-token prefill and one token, {args.rounds} rounds (medians)")
    print(f"{'shape':10} {'row':11} {'forward ms':>10} {'x plain':>8} {'syncs':>6}")
    for res in results:
        syncs_text = "-" if res["syncs"] is None else str(res["syncs"])
        print(f"{res['shape']:10} {res['row']:11} {1e3 * res['seconds']:10.2f} {res['ratio']:8.2f} {syncs_text:>6}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
