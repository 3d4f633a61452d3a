"""The layouts of vLLM's tensor-parallel layers, for the logical view (``docs/parallel.md``).

When vLLM runs with ``tensor_parallel_size > 1``, the plug-in calls :func:`annotate_model` on
the loaded model before attaching the capture. It annotates (:func:`ilstore.layout.annotate`)
each module whose class (or a base class) vLLM defines as one of:

========================== ===================================================================
``ColumnParallelLinear``   output sharded along its last dimension (replicated with
                           ``gather_output``)
``MergedColumnParallelLinear``, ``QKVParallelLinear``
                           output made of blocks (gate and up; q, k and v), each sharded: the
                           blocks are this rank's ``output_partition_sizes``
``RowParallelLinear``      input sharded along its last dimension when ``input_is_parallel``;
                           output a partial sum unless ``reduce_results`` (then replicated)
``VocabParallelEmbedding`` output a partial sum unless ``reduce_results`` (then replicated)
``Attention``              query, key, value and output sharded by heads (last dimension)
``RotaryEmbeddingBase``    query and key, in and out, sharded by heads; positions replicated
``SiluAndMul``             input two blocks (gate, up) each sharded; output sharded
========================== ===================================================================

Everything else (norms, residual streams, the decoder layers, ``logits_processor``, whose
output vLLM gathers) is replicated, which needs no annotation. Classes are recognised by name
among vLLM's own (``vllm.*`` modules), so this module imports nothing from vLLM except the
tensor-parallel group, and a vLLM version that renames a class leaves its modules unannotated
(their tensors then fail the logical view's replica check, which names the module).

Not covered: K/V heads replicated over ranks (``num_kv_head_replicas > 1``, when the TP size
exceeds the number of KV heads) and layers of other parallel kinds (expert, pipeline, context).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch
from torch import nn

from ..layout import annotate, set_group

__all__ = ["annotate_model", "layer_rules"]

_log = logging.getLogger(__name__)

_SHARD = "... h[tp]"
_PARTIAL = "... h[tp:partial]"


def _vllm_classes(module: nn.Module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__ if c.__module__.startswith("vllm.")}


def _out(spec: str) -> dict[str, str]:
    # vLLM's linears return (output, bias) unless return_bias=False: cover both forms.
    return {"0": spec, "": spec}


def layer_rules(module: nn.Module) -> tuple[dict[str, str], dict[str, str]] | None:
    """``(inputs, outputs)`` dims rules of one vLLM module, None if it needs none (replicated)."""
    names = _vllm_classes(module)
    if not names:
        return None
    if "ColumnParallelLinear" in names:
        if getattr(module, "gather_output", False):
            return None
        if getattr(module, "num_kv_head_replicas", 1) > 1:
            _log.warning("ilstore: %s replicates K/V heads over ranks; its output is not annotated",
                         type(module).__name__)
            return None
        sizes = list(getattr(module, "output_partition_sizes", []) or [])
        spec = f"... h[tp:blocks={','.join(map(str, sizes))}]" if len(sizes) > 1 else _SHARD
        return {}, _out(spec)
    if "RowParallelLinear" in names:
        inputs = {"0": _SHARD} if getattr(module, "input_is_parallel", True) else {}
        outputs = {} if getattr(module, "reduce_results", True) else _out(_PARTIAL)
        return inputs, outputs
    if "VocabParallelEmbedding" in names and "ParallelLMHead" not in names:
        return ({}, {"": _PARTIAL}) if not getattr(module, "reduce_results", True) else None
    if "Attention" in names and hasattr(module, "num_kv_heads"):
        return {"0": _SHARD, "1": _SHARD, "2": _SHARD}, {"": _SHARD}
    if "RotaryEmbeddingBase" in names or "RotaryEmbedding" in names:
        return {"1": _SHARD, "2": _SHARD}, {"0": _SHARD, "1": _SHARD}
    if "SiluAndMul" in names:
        return {"0": "... h[tp:blocks=2]"}, {"": _SHARD}
    return None


def _tp_ranks() -> list[int] | None:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None  # one process: no tensor parallelism (and vLLM's groups may not exist)
    group: Any = importlib.import_module("vllm.distributed.parallel_state").get_tp_group()
    ranks = list(getattr(group, "ranks", []) or [])
    return ranks if len(ranks) > 1 else None


def annotate_model(model: nn.Module) -> int:
    """Annotate the tensor-parallel layers of a vLLM model; returns how many modules were annotated.

    Does nothing (returns 0) without tensor parallelism. The group ``tp`` of the dims strings is
    vLLM's tensor-parallel group (its global ranks).
    """
    ranks = _tp_ranks()
    if ranks is None:
        return 0
    set_group("tp", ranks)
    count = 0
    for _name, module in model.named_modules():
        rules = layer_rules(module)
        if rules is not None and (rules[0] or rules[1]):
            annotate(module, inputs=rules[0], outputs=rules[1])
            count += 1
    _log.info("ilstore: annotated the layouts of %d tensor-parallel module(s) (TP group %s)", count, ranks)
    return count
