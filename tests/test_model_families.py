"""Models in the wild (issue 15): tiny random Hugging Face models of every common family.

Each family is built from a config with a fixed seed (nothing is downloaded) and run the way its
users run it: ``generate()`` with the KV cache on (greedy, 2 new tokens, the logits kept) for the
generative models, a plain forward for the encoder-only and vision ones. Every module is captured
(``log_step_ids: []``) and each family is checked for:

* capture on vs off: bitwise-equal outputs (generated ids and every step's logits);
* the same capture written by ``pt``, ``safetensors`` and ``hdf5``: an exact compare matches;
* ``ilstore.convert.convert`` round-trips through every backend (exact compare with the source;
  the bfloat16 run too, in the slow tier);
* bfloat16 vs float32: the compare finds a first divergence; for the encoder-decoder models its
  step holds the encoder's calls (``generate()`` runs the encoder itself, outside a root forward;
  docs/capture.md, "Calls outside a root forward") and the divergence starts in the encoder.

Families: GPT-2, Llama, Qwen2, Gemma-2, Mixtral (MoE), Mamba (state space); T5, BART, Whisper and a
vision encoder-decoder (ViT + GPT-2) with ``generate()``; BERT, ViT and CLIP with one forward. The
captures are made once per family (module-scoped fixture) and shared by the checks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ilstore
from ilstore.convert import convert
from ilstore.keys import CallKey
from ilstore_compare import compare

transformers = pytest.importorskip("transformers")

BACKENDS = ("pt", "safetensors", "hdf5")
NEW_TOKENS = 2
#: bf16 vs fp32: bfloat16 rounding (2**-8 relative) passes the rtol; the atol stays below the tiny
#: activations of a randomly initialised GPT-2 (weights of std 0.02), which an atol of 1e-2 would hide.
RTOL, ATOL = 1e-2, 1e-4


@dataclass(frozen=True)
class Family:
    """A tiny model of one family and how it is run.

    Attributes:
        name: the test id.
        build: returns the float32 model in eval mode, weights from a fixed seed.
        inputs: the keyword inputs (fixed values).
        generate: run ``generate()`` (else one forward).
        encoder: the encoder's module name for encoder-decoder models (else None).
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    generate: bool
    encoder: str | None = None


def _seeded(cls: Any, config: Any) -> nn.Module:
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model: nn.Module = cls(config)
    return model.eval()


def _ids() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 64, 120]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _decoder_common() -> dict[str, Any]:
    return dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return _seeded(transformers.GPT2LMHeadModel, cfg)


def _llama() -> nn.Module:
    return _seeded(transformers.LlamaForCausalLM, transformers.LlamaConfig(**_decoder_common()))


def _qwen2() -> nn.Module:
    return _seeded(transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**_decoder_common()))


def _gemma2() -> nn.Module:
    cfg = transformers.Gemma2Config(**_decoder_common(), head_dim=8, sliding_window=4)
    return _seeded(transformers.Gemma2ForCausalLM, cfg)


def _mixtral() -> nn.Module:
    cfg = transformers.MixtralConfig(**_decoder_common(), num_local_experts=4, num_experts_per_tok=2)
    return _seeded(transformers.MixtralForCausalLM, cfg)


def _mamba() -> nn.Module:
    cfg = transformers.MambaConfig(vocab_size=128, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                   conv_kernel=4, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return _seeded(transformers.MambaForCausalLM, cfg)


def _t5() -> nn.Module:
    cfg = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return _seeded(transformers.T5ForConditionalGeneration, cfg)


def _bart() -> nn.Module:
    cfg = transformers.BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64, bos_token_id=0, pad_token_id=1,
                                  eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
                                  forced_eos_token_id=None)
    return _seeded(transformers.BartForConditionalGeneration, cfg)


def _whisper() -> nn.Module:
    cfg = transformers.WhisperConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
                                     max_target_positions=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                     decoder_start_token_id=0, begin_suppress_tokens=None, suppress_tokens=None)
    return _seeded(transformers.WhisperForConditionalGeneration, cfg)


def _mel() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_features": torch.randn(1, 8, 32, generator=g)}  # 8 mel bins, 2 * max_source_positions frames


def _vision_encoder_decoder() -> nn.Module:
    vit = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64)
    gpt2 = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                   eos_token_id=1, pad_token_id=1, add_cross_attention=True, is_decoder=True)
    cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, gpt2)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 0, 1, 1
    return _seeded(transformers.VisionEncoderDecoderModel, cfg)


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    return _seeded(transformers.BertForMaskedLM, cfg)


def _bert_inputs() -> dict[str, torch.Tensor]:
    inputs = _ids()
    return {**inputs, "token_type_ids": torch.zeros_like(inputs["input_ids"])}


def _vit() -> nn.Module:
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, num_labels=5)
    return _seeded(transformers.ViTForImageClassification, cfg)


def _pixels() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def _clip() -> nn.Module:
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    return _seeded(transformers.CLIPModel, cfg)


def _clip_inputs() -> dict[str, torch.Tensor]:
    return {**_ids(), **_pixels()}


FAMILIES = [
    Family("gpt2", _gpt2, _ids, generate=True),
    Family("llama", _llama, _ids, generate=True),
    Family("qwen2", _qwen2, _ids, generate=True),
    Family("gemma2", _gemma2, _ids, generate=True),
    Family("mixtral", _mixtral, _ids, generate=True),
    Family("mamba", _mamba, _ids, generate=True),
    Family("t5", _t5, _ids, generate=True, encoder="encoder"),
    Family("bart", _bart, _ids, generate=True, encoder="model.encoder"),
    Family("whisper", _whisper, _mel, generate=True, encoder="model.encoder"),
    Family("vision-encoder-decoder", _vision_encoder_decoder, _pixels, generate=True, encoder="encoder"),
    Family("bert", _bert, _bert_inputs, generate=False),
    Family("vit", _vit, _pixels, generate=False),
    Family("clip", _clip, _clip_inputs, generate=False),
]


def _run(family: Family, model: Any) -> list[torch.Tensor]:  # Any: a PreTrainedModel (generate)
    """Run the model as its users do; returns every output tensor (ids, then each step's logits)."""
    dtype = next(model.parameters()).dtype  # float inputs (pixels, audio features) in the model's dtype
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in family.inputs().items()}
    with torch.no_grad():
        if family.generate:
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, use_cache=True, return_dict_in_generate=True,
                                 output_logits=True)
            return [out.sequences, *out.logits]
        out = model(**inputs)
        return [v for v in out.values() if isinstance(v, torch.Tensor)]


def _capture(family: Family, model: nn.Module, out_dir: Path, run_id: str,
             backend: str) -> tuple[Path, list[torch.Tensor]]:
    cfg = {"output_dir": str(out_dir), "run_id": run_id, "backend": backend, "log_step_ids": []}
    with ilstore.capture(model, cfg) as cap:
        outputs = _run(family, model)
    assert cap.run_dir is not None
    return cap.run_dir, outputs


@dataclass(frozen=True)
class Captured:
    """One family's runs: float32 in every backend (and the outputs each gave), bfloat16 in ``pt``."""

    family: Family
    plain: list[torch.Tensor]
    runs: dict[str, Path]
    outputs: dict[str, list[torch.Tensor]]
    bf16: Path
    out_dir: Path


@pytest.fixture(scope="module", params=FAMILIES, ids=[f.name for f in FAMILIES])
def captured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Captured]:
    family: Family = request.param
    out_dir = tmp_path_factory.mktemp(family.name)
    model = family.build()
    plain = _run(family, model)
    runs, outputs = {}, {}
    for backend in BACKENDS:
        runs[backend], outputs[backend] = _capture(family, model, out_dir, f"fp32-{backend}", backend)
    bf16, _ = _capture(family, family.build().to(torch.bfloat16), out_dir, "bf16", "pt")
    yield Captured(family, plain, runs, outputs, bf16, out_dir)


def _in_encoder(family: Family, module: str) -> bool:
    assert family.encoder is not None
    return module == family.encoder or module.startswith(family.encoder + ".")


def _within_encoder_call(run: Any, call: CallKey, encoder: str) -> bool:
    """Whether ``call`` runs inside the step's first call of ``encoder`` (a shared embedding the
    encoder calls counts; the decoder's call of it does not)."""
    starts, ends = run.calls(call.step), run.call_ends(call.step)
    enc = next(c for c in starts if c.module == encoder)
    return call == enc or (starts.index(call) > starts.index(enc) and ends.index(call) < ends.index(enc))


def _assert_exact_match(a: Path, b: Path) -> None:
    result = compare(a, b, exact=True)
    s = result.summary
    assert (result.verdict, result.exit_code) == ("match", 0), (a.name, b.name, s)
    assert s.compared > 0 and s.compared == s.matched == s.tensors, s


def test_capture_on_vs_off_is_bitwise_equal(captured: Captured) -> None:
    for backend, outputs in captured.outputs.items():
        assert len(outputs) == len(captured.plain), backend
        for got, want in zip(outputs, captured.plain, strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want), backend
    family = captured.family
    with ilstore.open_run(captured.runs["pt"]) as run:
        modules = {s: [c.module for c in run.calls(s)] for s in run.steps()}
    assert sorted(modules) == list(range(NEW_TOKENS if family.generate else 1))
    assert all(modules.values())
    if family.encoder is not None:  # generate() runs the encoder once, before the first decoder forward
        in_encoder = {s: [_in_encoder(family, m) for m in ms] for s, ms in modules.items()}
        assert in_encoder[0][0] and not all(in_encoder[0]), modules[0]
        assert not any(any(flags) for s, flags in in_encoder.items() if s > 0)


@pytest.mark.parametrize("backend", ["safetensors", "hdf5"])
def test_backends_compare_equal(captured: Captured, backend: str) -> None:
    _assert_exact_match(captured.runs[backend], captured.runs["pt"])


@pytest.mark.parametrize("dtype", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_convert_round_trips(captured: Captured, dtype: str) -> None:
    # pt -> safetensors -> hdf5 -> pt: every backend read and written once; the end is the start, bit for bit
    # (one compare at the end: compares dominate this file's time). bfloat16 has no numpy dtype (hdf5).
    start = captured.runs["pt"] if dtype == "fp32" else captured.bf16
    run = start
    for to in ("safetensors", "hdf5", "pt"):
        run = convert(run, captured.out_dir / f"{run.name}-to-{to}", to=to, progress=False)
    with ilstore.open_run(run) as converted:
        assert (converted.manifest or {}).get("backend") == "pt"
    _assert_exact_match(run, start)


def test_bf16_vs_fp32_finds_the_first_divergence(captured: Captured) -> None:
    family = captured.family
    result = compare(captured.bf16, captured.runs["pt"], rtol=RTOL, atol=ATOL)
    assert result.exit_code == 1
    div = result.first_divergence or result.threshold_divergence
    assert div is not None
    if family.encoder is None:
        return
    with ilstore.open_run(captured.runs["pt"]) as run:
        modules = [c.module for c in run.calls(div.step)]
        assert any(_in_encoder(family, m) for m in modules), modules
        # the error starts in the encoder (or the embedding it calls), not in the decoder's cross-attention
        assert _within_encoder_call(run, CallKey(div.rank, div.step, div.module, div.call), family.encoder), div
