"""Which module is wrong? The replay workflow end to end, on a tiny Llama (nothing downloaded).

1. capture a float32 run (the reference) and a bfloat16 run (the candidate);
2. capture the bfloat16 model again with ``replay_from`` the float32 run: every module call is
   fed the inputs float32 recorded for it, so its outputs differ from float32's only by the error
   that call itself introduces (its local error);
3. compare: propagated error (bf16 vs fp32) and local error (the replay vs fp32) side by side;
4. print the five calls with the largest local error.

Usage: python examples/replay_workflow.py [--output-dir DIR] [--backend pt|safetensors|hdf5]
The same comparison from the shell:
    ilstore-compare --dir1 DIR/bf16 --dir2 DIR/fp32 --replay DIR/bf16_replay
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import ilstore
from ilstore.demo import DEMO_PROMPT, tiny_llama
from ilstore_compare import compare


def run(output_dir: Path, run_id: str, dtype: torch.dtype, **config: Any) -> Path:
    """Two steps of the tiny Llama in ``dtype``: the prompt, then the prompt plus one token."""
    model = tiny_llama(dtype)
    ids = torch.tensor(DEMO_PROMPT)
    cfg = {"output_dir": str(output_dir), "run_id": run_id, "log_step_ids": [0, 1], **config}
    with torch.no_grad(), ilstore.capture(model, cfg) as cap:
        model(input_ids=ids, use_cache=False)
        model(input_ids=torch.cat([ids, torch.tensor([[17]])], dim=1), use_cache=False)
    assert cap.run_dir is not None
    return cap.run_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", type=Path, default=None, help="where the three runs go (default: a new temp dir)")
    ap.add_argument("--backend", default="pt")
    args = ap.parse_args(argv)
    out = args.output_dir or Path(tempfile.mkdtemp(prefix="ilstore-replay-"))

    fp32 = run(out, "fp32", torch.float32, backend=args.backend)
    bf16 = run(out, "bf16", torch.bfloat16, backend=args.backend)
    replay = run(out, "bf16_replay", torch.bfloat16, backend=args.backend, replay_from=str(fp32))

    result = compare(bf16, fp32, rtol=1e-2, atol=1e-2, replay=replay)
    guess = result.threshold_divergence
    print(f"runs in {out}")
    print("by the tolerance alone, the first divergence: "
          + ("none" if guess is None else f"step {guess.step} {guess.module}"))
    measured = result.first_divergence
    print("measured by replay, the first call whose own error crosses the tolerance: "
          + ("none" if measured is None else f"step {measured.step} {measured.module}"))
    assert result.local is not None
    print("the five calls with the largest local error:")
    for e in [e for e in result.local.errors if e.rel_l2 is not None][:5]:
        print(f"  rel-L2 {e.rel_l2:.3e}  max |diff| {e.max_abs_diff:.3e}  step {e.call.step} {e.call.module}"
              f"{' (container)' if e.container else ''}")
    for e in result.local.not_compared:
        print(f"  not measured: step {e.call.step} {e.call.module}: {e.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
