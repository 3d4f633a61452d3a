"""A tiny Llama, tensor-parallel with ``parallelize_module`` (torchrun, gloo, CPU) or in one process.

Launched by tests/test_multirank.py:

    torchrun --nproc-per-node 2 tests/workers/tp_llama_worker.py OUT_DIR RUN_ID [--perturb-rank R]
    python tests/workers/tp_llama_worker.py OUT_DIR RUN_ID --single

Both build the same model (fixed seed). Under torchrun the attention projections and the MLP
are parallelised the usual way (q/k/v and gate/up column-wise, o and down row-wise); their
layouts come from the DTensor weights and inputs, and the two modules in between that have no
weights say theirs through ``ilstore.layout.annotate`` (the MLP's activation, the attention's
weights output). ``--perturb-rank R`` adds 1e-2 to column 3 of rank R's ``layers.0.mlp.gate_proj``
output shard, before the capture sees it.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import ilstore
from ilstore.layout import annotate

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, tie_word_embeddings=False)
STEPS = 2


def build_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**CONFIG)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


def parallelize(model: torch.nn.Module, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)
        # Modules without weights between the parallel ones: their tensors are sharded too.
        annotate(layer.mlp.act_fn, inputs="b t i[tp]", outputs="b t i[tp]")
        annotate(layer.self_attn, outputs={"1": "b n[tp] t s"})  # the attention weights, per local head


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("run_id")
    ap.add_argument("--perturb-rank", type=int, default=-1)
    ap.add_argument("--single", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = build_model()
    rank = 0
    if not args.single:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        parallelize(model, dist.get_world_size())
        if rank == args.perturb_rank:
            def bump(module: torch.nn.Module, inputs: object, out: torch.Tensor) -> torch.Tensor:
                out = out.clone()
                out[..., 3] += 1e-2
                return out
            model.model.layers[0].mlp.gate_proj.register_forward_hook(bump)
    config = {"output_dir": args.out_dir, "run_id": args.run_id, "log_step_ids": list(range(STEPS))}
    with torch.no_grad(), ilstore.capture(model, config):
        for step in range(STEPS):
            ids = (torch.arange(12).reshape(2, 6) * 7 + step) % CONFIG["vocab_size"]
            model(input_ids=ids, use_cache=False)
    if not args.single:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        print("done", os.getpid())


if __name__ == "__main__":
    main()
