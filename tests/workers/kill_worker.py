"""Capture steps, then SIGKILL ourselves in the middle of step KILL_STEP.

Usage: python kill_worker.py OUT_DIR BACKEND KILL_STEP [MODEL [starved]]

MODEL ``llama`` (the default): the tiny demo Llama, every step logged
(``log_step_ids: []``). MODEL ``small``: two Linear layers, every step logged, for runs killed
after thousands of steps. ``starved``: ``mode: "stats"``, a writer thread that never runs (as
on a busy machine, at nice 19) and no flush before the kill: what is on disk is what the
capture's own bounds made the model's thread write.
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
    which = sys.argv[4] if len(sys.argv) > 4 else "llama"
    starved = sys.argv[5:] == ["starved"]
    if starved:
        from ilstore import pipeline

        pipeline.ThreadedSink._start_thread = lambda self: None  # type: ignore[method-assign]
    model: torch.nn.Module
    if which == "small":
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        x = torch.randn(1, 8)
        last: torch.nn.Module = model[1]

        def forward() -> None:
            model(x)
    else:
        model = tiny_llama()
        last = model.model.layers[1].mlp

        def forward() -> None:
            model(input_ids=torch.tensor(DEMO_PROMPT), use_cache=False)
    cap = ilstore.capture(model, {"output_dir": out_dir, "run_id": "run", "log_step_ids": [], "backend": backend,
                                  "mode": "stats" if starved else "tensors"})

    def die(module: torch.nn.Module, args: object, out: object) -> None:
        if cap.step_index == kill_step:
            if not starved:
                cap.flush()  # what a slow process would have on disk by then
            os.kill(os.getpid(), signal.SIGKILL)

    last.register_forward_hook(die)
    with torch.no_grad():
        for _ in range(kill_step + 2):
            forward()
    raise SystemExit("not killed")


if __name__ == "__main__":
    main()
