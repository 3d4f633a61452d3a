"""Capture a few steps, then SIGKILL ourselves in the middle of step KILL_STEP.

Usage: python kill_worker.py OUT_DIR BACKEND KILL_STEP
"""

from __future__ import annotations

import os
import signal
import sys

import torch

import ilstore
from ilstore.demo import DEMO_PROMPT, tiny_llama


def main() -> None:
    out_dir, backend, kill_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = tiny_llama()
    cap = ilstore.capture(model, {"output_dir": out_dir, "run_id": "run", "log_step_ids": [], "backend": backend})

    def die(module: torch.nn.Module, args: object, out: object) -> None:
        if cap.step_index == kill_step:
            cap.flush()  # what a slow process would have on disk by then
            os.kill(os.getpid(), signal.SIGKILL)

    model.model.layers[1].mlp.register_forward_hook(die)
    with torch.no_grad():
        for _ in range(kill_step + 2):
            model(input_ids=torch.tensor(DEMO_PROMPT), use_cache=False)
    raise SystemExit("not killed")


if __name__ == "__main__":
    main()
