"""Capture of a torch.compile'd model: the forward's cost with capture against the compiled forward without.

Workload: a transformers Llama (hidden 512, intermediate 1408, ``--layers`` layers, 8 heads,
vocab 8000, float32), batch 1 x 256 tokens, ``use_cache=False``, every module's inputs and
outputs captured, on ``--device`` (cpu or cuda).

Rows (each variant compiles afresh: ``torch._dynamo.reset()`` before it):
* ``eager``: the model without torch.compile and without capture.
* ``compiled``: ``torch.compile(model)`` without capture (the reference of the ratios).
* ``compiled + hooks <mode>``: the default capture, attached after ``torch.compile``: ilstore's
  hooks are opaque to dynamo, every hooked call is a graph break and runs eagerly.
* ``compiled + in_graph <mode>``: ``in_graph: true`` with ``torch.compile(model, fullgraph=True)``:
  the capture points are traced into the one graph.
``<mode>`` is ``tensors`` (every tensor stored, asynchronous writes) or ``stats``.

Columns: the first call (compilation included), the median forward of ``--iters`` further calls
(a CUDA synchronize closes each on cuda), its ratio to ``compiled``, the graph breaks dynamo
counted, and whether the model's output equals the compiled model's without capture bit for bit.
Runs go to ``--tmp`` (default /dev/shm: the CPU cost, not the disk's) and are deleted.

Usage: python benchmarks/bench_compiled.py [--device cpu|cuda] [--layers 8] [--iters 5] [--tmp DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch


def build_model(layers: int, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=layers, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=8000, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval().to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_variant(name: str, model: torch.nn.Module, ids: torch.Tensor, device: str, iters: int, tmp: Path,
                compiled: bool, capture: dict[str, Any] | None) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    import ilstore

    torch._dynamo.reset()
    counters.clear()
    fn: Any = model
    if compiled:
        fn = torch.compile(model, fullgraph=bool(capture and capture.get("in_graph")))
    cap = None
    if capture is not None:
        cap = ilstore.capture(fn, {"output_dir": str(tmp), "run_id": name.replace(" ", "_").replace("+", "p"),
                                   "log_step_ids": [], **capture})
    times = []
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            out = fn(input_ids=ids, use_cache=False).logits
            _sync(device)
            first = time.perf_counter() - t0
            for _ in range(iters):
                t0 = time.perf_counter()
                out = fn(input_ids=ids, use_cache=False).logits
                _sync(device)
                times.append(time.perf_counter() - t0)
    finally:
        if cap is not None:
            t0 = time.perf_counter()
            cap.close()
            close = time.perf_counter() - t0
            shutil.rmtree(tmp / cap.config.run_id, ignore_errors=True)
    breaks = sum(counters["graph_break"].values())
    return {"row": name, "first_s": first, "forward_s": statistics.median(times), "graph_breaks": breaks,
            "close_s": close if cap is not None else 0.0, "output": out.detach().cpu()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--tmp", default="/dev/shm" if Path("/dev/shm").is_dir() else None)
    ap.add_argument("--modes", default="tensors,stats")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = args.device
    model = build_model(args.layers, device)
    ids = torch.randint(0, 8000, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(device)
    tmp = Path(tempfile.mkdtemp(prefix="bench_compiled_", dir=args.tmp))
    variants: list[tuple[str, bool, dict[str, Any] | None]] = [("eager", False, None), ("compiled", True, None)]
    for mode in args.modes.split(","):
        variants.append((f"compiled + hooks {mode}", True, {"mode": mode}))
        variants.append((f"compiled + in_graph {mode}", True, {"mode": mode, "in_graph": True}))
    rows = []
    try:
        for name, compiled, capture in variants:
            rows.append(run_variant(name, model, ids, device, args.iters, tmp, compiled, capture))
            print(f"  {name}: first {rows[-1]['first_s']:.2f} s, forward {rows[-1]['forward_s'] * 1e3:.1f} ms",
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref = next(r for r in rows if r["row"] == "compiled")
    print(f"\ndevice {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), torch "
          f"{torch.__version__}, Llama {args.layers} layers, 1 x {args.tokens} tokens, median of {args.iters}")
    print(f"{'row':30} {'first s':>8} {'forward ms':>11} {'/compiled':>10} {'breaks':>7} {'close s':>8} "
          f"{'out == compiled':>16}")
    for r in rows:
        same = torch.equal(r["output"], ref["output"])
        r["vs_compiled"] = r["forward_s"] / ref["forward_s"]
        r["bitwise_equal_to_compiled"] = same
        print(f"{r['row']:30} {r['first_s']:8.2f} {r['forward_s'] * 1e3:11.2f} {r['vs_compiled']:10.2f} "
              f"{r['graph_breaks']:7d} {r['close_s']:8.2f} {str(same):>16}")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "output"} for r in rows],
                                              indent=1))


if __name__ == "__main__":
    main()
