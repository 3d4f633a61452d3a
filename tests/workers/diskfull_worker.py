"""Capture with a file-size limit (RLIMIT_FSIZE): writes fail mid-run like a full disk.

Usage: python diskfull_worker.py OUT_DIR ON_ERROR BACKEND ASYNC [continue]  -> prints a JSON summary

With ``continue`` an error a forward raises is caught and the loop goes on to the next input
(``raised`` then lists every one), and the capture is closed after the loop.
"""

from __future__ import annotations

import json
import logging
import resource
import signal
import sys

import torch

import ilstore

LIMIT = 256 * 1024


def main() -> int:
    out_dir, on_error, backend, async_writes = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
    inputs = [torch.randn(4, 64), torch.randn(4, 64), torch.randn(2048, 64), torch.randn(4, 64)]  # step 2: 512 KB
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))
    got, raised = [], None
    cap = ilstore.capture(model, {"output_dir": out_dir, "run_id": "run", "log_step_ids": [], "backend": backend,
                                  "on_error": on_error, "async_writes": async_writes})
    if sys.argv[5:] == ["continue"]:
        errors = []
        with torch.no_grad():
            for x in inputs:
                try:
                    got.append(model(x))
                except ilstore.IlstoreError as exc:
                    errors.append(str(exc))
        cap.close()
        print(json.dumps({"n_outputs": len(got), "error": None if cap.error is None else str(cap.error),
                          "raised": errors, "hooks_left": bool(model[0]._forward_hooks)}))
        return 0
    try:
        with torch.no_grad():
            for x in inputs:
                got.append(model(x))
        cap.close()
    except ilstore.IlstoreError as exc:
        raised = str(exc)
    same = len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    print(json.dumps({"same": same,
                      "n_outputs": len(got), "error": None if cap.error is None else str(cap.error),
                      "raised": raised, "hooks_left": bool(model[0]._forward_hooks)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
