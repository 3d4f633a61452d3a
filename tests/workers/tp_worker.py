"""A tensor-parallel MLP captured under torchrun (gloo, CPU); launched by tests/test_multirank.py.

Usage: torchrun --nproc-per-node 2 tests/workers/tp_worker.py OUT_DIR RESULT_JSON [--perturb-rank R]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from torch import nn

import ilstore


class ColumnParallelLinear(nn.Module):
    """Holds rows [r*n/ws, (r+1)*n/ws) of the full weight; returns its slice of the output features."""

    def __init__(self, full: nn.Linear, rank: int, world: int) -> None:
        super().__init__()
        n = full.out_features // world
        self.weight = nn.Parameter(full.weight[rank * n:(rank + 1) * n].detach().clone())
        self.bias = nn.Parameter(full.bias[rank * n:(rank + 1) * n].detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Holds columns of the full weight; partial products are summed with an all-reduce."""

    def __init__(self, full: nn.Linear, rank: int, world: int) -> None:
        super().__init__()
        n = full.in_features // world
        self.weight = nn.Parameter(full.weight[:, rank * n:(rank + 1) * n].detach().clone())
        self.bias = nn.Parameter(full.bias.detach().clone())
        self.rank = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight)
        dist.all_reduce(y)
        return y + self.bias


class TPMLP(nn.Module):
    def __init__(self, rank: int, world: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        up, down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.up = ColumnParallelLinear(up, rank, world)
        self.act = nn.ReLU()
        self.down = RowParallelLinear(down, rank, world)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("result")
    ap.add_argument("--perturb-rank", type=int, default=-1)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = TPMLP(rank, world)
    if rank == args.perturb_rank:
        model.up.register_forward_hook(lambda m, a, out: out + 1e-3)
    outputs = []
    with torch.no_grad(), ilstore.capture(model, {"output_dir": args.out_dir, "log_step_ids": [0, 1]}) as cap:
        for step in range(2):
            x = torch.arange(16.0).reshape(2, 8) / 10 + step
            outputs.append(model(x).tolist())
    if rank == 0:
        with open(args.result, "w") as fh:
            json.dump({"run_dir": str(cap.run_dir), "outputs": outputs}, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
