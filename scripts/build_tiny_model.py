"""Build a tiny model that real vLLM can serve on a CPU, with its own tokenizer (nothing downloaded).

Usage:
    python scripts/build_tiny_model.py DIR [--arch llama|qwen2|mixtral] [--seed 0]

Every architecture has 2 layers, hidden 128, 4 attention heads of head_dim 32, 2 KV heads and a
vocabulary of 1000, with weights drawn after ``torch.manual_seed(seed)`` and saved in float32
with ``save_pretrained``:

* ``llama`` (the default): ``LlamaForCausalLM``, intermediate size 256.
* ``qwen2``: ``Qwen2ForCausalLM``, whose q, k and v projections have biases. Hugging Face
  initialises biases to zero, which would hide them; they are redrawn (normal, std 0.02) so a
  run exercises them.
* ``mixtral``: ``MixtralForCausalLM``, a mixture of experts: 4 experts of intermediate size 128
  per layer, 2 chosen per token by the router.

head_dim is 32 because vLLM's CPU attention backend supports only head sizes 32, 64, 80, 96,
112, 128, ... (16 starts but fails at the first generate).

The tokenizer is a byte-level BPE trained with ``tokenizers`` on a few built-in sentences and
wrapped in ``PreTrainedTokenizerFast``; its special tokens get the ids the Llama config expects
(``<unk>`` 0, ``<s>`` 1 = bos, ``</s>`` 2 = eos). The same seed gives the same weights, so a
vLLM run and a Hugging Face run of the directory compute the same model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["build_tiny_model", "TINY_LLAMA", "ARCHS", "CORPUS"]

#: LlamaConfig fields of the tiny model (the other architectures start from these).
TINY_LLAMA: dict[str, Any] = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=1000, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
)

#: ``--arch`` → (transformers config class, model class, config fields).
ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", TINY_LLAMA),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**TINY_LLAMA, "use_sliding_window": False}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {**TINY_LLAMA, "intermediate_size": 128, "num_local_experts": 4, "num_experts_per_tok": 2}),
}

#: Training text of the tokenizer: enough distinct words to give a few hundred merges.
CORPUS = [
    "Hello, my name is Ada and I write software for a living.",
    "The capital of France is Paris; the capital of Italy is Rome.",
    "The future of machine learning is small models that run everywhere.",
    "An engineer compares two runs of a model that should agree and do not.",
    "Intermediate tensors show where the divergence between the runs starts.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Numbers like 1, 2, 3, 42 and 1000 appear in prompts as often as words.",
    "vLLM serves large language models with paged attention and continuous batching.",
]


def _train_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Special tokens first, so they get ids 0, 1, 2 (what the Llama config says).
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")


def build_tiny_model(out_dir: str | Path, seed: int = 0, arch: str = "llama") -> Path:
    """Write the tiny model and its tokenizer into ``out_dir`` and return the directory.

    Args:
        out_dir: target directory (created; existing files of the same names are replaced).
        seed: ``torch.manual_seed`` used before the weights are drawn.
        arch: ``llama``, ``qwen2`` or ``mixtral`` (see :data:`ARCHS`).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Example:
        >>> import tempfile
        >>> d = build_tiny_model(tempfile.mkdtemp())  # doctest: +SKIP
        >>> sorted(p.name for p in d.iterdir())[:2]  # doctest: +SKIP
        ['config.json', 'generation_config.json']
    """
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    config_cls, model_cls, fields = ARCHS[arch]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**fields))  # float32 by default
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):  # zero after init: redraw so the biases count
                param.normal_(std=0.02)
    model.save_pretrained(out)
    _train_tokenizer(TINY_LLAMA["vocab_size"]).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="directory to write the model and tokenizer into")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llama", help="model family (default llama)")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed before drawing weights (default 0)")
    args = parser.parse_args(argv)
    print(build_tiny_model(args.out_dir, args.seed, args.arch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
