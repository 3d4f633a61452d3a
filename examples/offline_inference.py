"""Generate a few tokens with a Hugging Face Llama while ilstore captures its modules.

Examples:
    python examples/offline_inference.py --intermediate-log-config '{"enabled": true}'
    python examples/offline_inference.py --intermediate-log-config-path cfg.json --max-new-tokens 4
    python examples/offline_inference.py --model ./my-local-llama --intermediate-log-config \\
        '{"module_call_match": "layers\\\\.0\\\\.", "log_step_ids": [0, 1], "backend": "safetensors"}'

Without ``--model`` a tiny LlamaForCausalLM is built from a small config with a fixed seed
(nothing is downloaded). Every forward of the model (one per generated token) is one step.
"""

from __future__ import annotations

import argparse
import sys

import torch

import ilstore
from ilstore.cli_args import add_intermediate_log_args, config_from_args
from ilstore.demo import DEMO_PROMPT, tiny_llama


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local Hugging Face model directory (default: built-in tiny Llama)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-new-tokens", type=int, default=3)
    add_intermediate_log_args(parser)
    args = parser.parse_args(argv)
    config = config_from_args(args, parser)
    dtype = getattr(torch, args.dtype)

    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, local_files_only=True).eval()
    else:
        model = tiny_llama(dtype)
    input_ids = torch.tensor(DEMO_PROMPT)

    cap = ilstore.capture(model, config) if config is not None else None
    try:
        with torch.no_grad():
            out = model.generate(input_ids, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                 do_sample=False,
                                 pad_token_id=0)
    finally:
        if cap is not None:
            cap.close()
    print("generated token ids:", out[0, input_ids.shape[1]:].tolist())
    if cap is not None and cap.run_dir is not None:
        with ilstore.open_run(cap.run_dir) as run:  # the steps log_step_ids kept, of those the model ran
            stored = len(run.steps())
        print(f"captured {stored} of {cap.step_index} step(s) into {cap.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
