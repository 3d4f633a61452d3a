"""Greedy offline inference with vLLM's LLMEngine while ilstore captures intermediate tensors.

Takes every vLLM engine argument (``--model``, ``--dtype``, ``--tensor-parallel-size``, ...)
plus ilstore's ``--intermediate-log-config JSON`` / ``--intermediate-log-config-path FILE``.
The config is validated here (exit status 2 on a bad one) and handed to every vLLM process
through ``ILSTORE_CONFIG``, where the ilstore plug-in (entry point ``vllm.general_plugins``)
attaches capture to the model. One engine step (one ``execute_model`` call) is one ilstore step.

Examples:
    python examples/offline_inference/llm_engine_example.py --model ./tiny-llama \\
        --intermediate-log-config '{"enabled": true}'
    python examples/offline_inference/llm_engine_example.py --model ./tiny-llama \\
        --intermediate-log-config '{"enabled": true, "module_call_match": "layers\\\\.0\\\\."}'
    python examples/offline_inference/llm_engine_example.py --model ./tiny-llama \\
        --intermediate-log-config-path cfg.json

``--enforce-eager`` is on by default here because forward hooks do not fire inside compiled
code or CUDA graphs (``--no-enforce-eager`` runs compiled, and ilstore warns). On a CPU-only
machine the KV cache defaults to 256 MiB unless ``--kv-cache-memory-bytes`` or
``--gpu-memory-utilization`` is given; vLLM runs
float32 checkpoints in bfloat16 there unless given ``--dtype float32`` (see docs/vllm.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from vllm import EngineArgs, LLMEngine, SamplingParams
from vllm.platforms import current_platform
from vllm.utils.argparse_utils import FlexibleArgumentParser

from ilstore.cli_args import add_intermediate_log_args, config_from_args
from ilstore.config import ENV_VAR
from ilstore.manifest import MANIFEST_NAME

CPU_KV_CACHE_BYTES = 256 << 20

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "The future of machine learning is",
]


def parse_args(argv: list[str] | None = None) -> tuple[FlexibleArgumentParser, argparse.Namespace]:
    """vLLM's engine arguments, the generation options and ilstore's two config options."""
    parser = FlexibleArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser = EngineArgs.add_cli_args(parser)
    parser.set_defaults(enforce_eager=True)  # hooks only fire in eager mode
    group = parser.add_argument_group("generation")
    group.add_argument("--max-tokens", type=int, default=8, help="tokens to generate per prompt (default 8)")
    group.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                       help="a prompt (repeatable; default: three built-in prompts)")
    group.add_argument("--ignore-eos", action="store_true",
                       help="keep generating after the end-of-sequence token (a fixed number of steps)")
    add_intermediate_log_args(parser)
    args = parser.parse_args(argv)
    if (current_platform.is_cpu() and args.kv_cache_memory_bytes is None
            and args.gpu_memory_utilization == EngineArgs.gpu_memory_utilization):
        # Sized by neither option, vLLM's CPU backend reserves 92% of the memory node and refuses
        # to start when other processes hold part of it; a fixed KV cache suits an example.
        args.kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
    return parser, args


def generate(engine: LLMEngine, prompts: list[str], params: SamplingParams) -> dict[str, list[int]]:
    """Run every prompt to completion, one ``engine.step()`` at a time; return the token ids."""
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = list(output.outputs[0].token_ids)
    return {prompts[int(rid)]: done[rid] for rid in sorted(done, key=int)}


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    config = config_from_args(args, parser)  # exits with status 2 on a bad config
    if config is not None and config.enabled and (config.run_dir / MANIFEST_NAME).exists():
        parser.error(f"{config.run_dir} already holds a run; choose another run_id or output_dir")
    if config is not None:
        # Before the engine exists: vLLM loads its plug-ins (ours reads this variable) when the
        # EngineArgs below are built, and its engine processes inherit the environment. The
        # resolved config carries the run id, so every process writes into the same run.
        os.environ[ENV_VAR] = json.dumps(config.to_dict())
    engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    for prompt, tokens in generate(engine, args.prompts or PROMPTS, params).items():
        print(f"{prompt!r} -> token ids {tokens}")
    if config is not None and config.enabled:
        print(f"ilstore run: {config.run_dir}")
    return 0


if __name__ == "__main__":  # required: vLLM's engine processes are started with spawn
    sys.exit(main())
