"""A layer that all-reduces its submodule's output in place, captured under torchrun (gloo, CPU);
launched by tests/test_multirank.py. Collectives change a tensor in place without bumping its
version counter, so de-duplication by identity would store the layer's output as the partial sum.

Usage: torchrun --nproc-per-node 2 tests/workers/allreduce_worker.py OUT_DIR RESULT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import ilstore


class RowParallel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.local = nn.Linear(4, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.local(x)  # captured as local's output: this rank's partial sum
        dist.all_reduce(out)  # in place, the version counter unchanged
        return out  # captured as the layer's output: the full sum


def main() -> None:
    out_dir, result = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    model = nn.Sequential(RowParallel())
    x = torch.randn(2, 4)
    with torch.no_grad(), ilstore.capture(model, {"output_dir": out_dir, "run_id": "allreduce"}) as cap:
        y = model(x)
    with torch.no_grad():
        partial = model[0].local(x)
    dist.barrier()
    assert cap.run_dir is not None
    manifest = json.loads((Path(cap.run_dir) / f"rank_{rank}" / "ilstore.json").read_text())
    with ilstore.open_run(cap.run_dir) as run:
        key = next(k for k in run.keys(0) if k.rank == rank and k.module == "0" and k.kind == "outputs")
        found = {"rank": rank, "dedup": manifest["config"]["dedup"], "same_as": run.meta(key).get("same_as"),
                 "stored_is_the_output": torch.equal(run.load(key), y),
                 "output_differs_from_partial": not torch.equal(y, partial)}
    with open(f"{result}.{rank}", "w") as fh:
        json.dump(found, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
