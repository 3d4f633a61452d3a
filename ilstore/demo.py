"""The built-in demo: a tiny Hugging Face Llama captured twice (float32 and bfloat16).

Nothing is downloaded: the model is built from a small ``LlamaConfig`` with a fixed seed.
``ilstore demo`` writes ``<output_dir>/fp32`` and ``<output_dir>/bf16``, two steps each
(a prompt, then the prompt plus the float32 run's next token), and ``<output_dir>/bf16_replay``:
the bfloat16 model again, every call fed the float32 run's inputs (``replay_from``). It shows
where the runs diverge by the tolerance alone, and the calls that introduce the most error,
measured by the replay (docs/replay.md).

Whatever cannot be written (a full disk) stops the demo with an :class:`~ilstore.errors.IlstoreError`
naming the file or run (the command prints it and exits 2): a failed capture is not compared, and
the reports are written beside their names and renamed into place, so none is left half written.
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import click
import torch

from .capture import capture
from .errors import IlstoreError
from .manifest import MANIFEST_NAME
from .summary import format_summary, summarize_run

__all__ = ["tiny_llama", "DEMO_PROMPT", "run_demo", "capture_demo_run"]

DEMO_PROMPT = [[1, 15, 42, 7, 99, 3, 64, 120, 5, 77, 31, 8]]


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A small ``LlamaForCausalLM`` (2 layers, hidden 64, head_dim 16) in eval mode.

    Args:
        dtype: parameter dtype.
        seed: ``torch.manual_seed`` used before building, so weights are reproducible.
        **overrides: ``LlamaConfig`` fields to change.
    """
    from .errors import require

    require("transformers", "the demo model (a tiny Hugging Face Llama)", "hf")
    from transformers import LlamaConfig, LlamaForCausalLM

    params: dict[str, Any] = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  tie_word_embeddings=False)
    params.update(overrides)
    config = LlamaConfig(**params)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model: torch.nn.Module = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def capture_demo_run(output_dir: Path, run_id: str, dtype: torch.dtype, backend: str = "pt",
                     prompt: list[list[int]] | None = None, next_token: int | None = None,
                     replay_from: Path | None = None) -> tuple[Path, int]:
    """Capture two forward steps of :func:`tiny_llama` in ``dtype``.

    Returns:
        ``(run_dir, next_token)``: step 1 uses ``next_token`` (or this run's own argmax).

    Raises:
        IlstoreError: the capture failed (a full disk...): the message names the run and why.
    """
    model = tiny_llama(dtype)
    ids = torch.tensor(prompt or DEMO_PROMPT)
    config: dict[str, Any] = {"output_dir": str(output_dir), "run_id": run_id, "log_step_ids": [0, 1],
                              "backend": backend}
    if replay_from is not None:
        config["replay_from"] = str(replay_from)
    with torch.no_grad(), capture(model, config) as cap:
        logits = model(input_ids=ids, use_cache=False).logits
        token = int(logits[0, -1].float().argmax()) if next_token is None else next_token
        model(input_ids=torch.cat([ids, torch.tensor([[token]])], dim=1), use_cache=False)
    run_dir = cap.run_dir if cap.run_dir is not None else output_dir / run_id
    if cap.error is not None:  # the capture stopped (and logged it); the model ran on, but the run is not whole
        reason = str(cap.error)
        where = reason if reason.startswith(str(run_dir)) else f"{run_dir}: {reason}"
        raise IlstoreError(f"{where} (capturing the demo's {run_id} run)")
    return run_dir, token


def _write_text(text: str, out: TextIO) -> None:
    out.write(text)


def run_demo(output_dir: Path, backend: str = "pt") -> int:
    """Capture float32 and bfloat16 runs of the tiny model, compare them, show where they diverge.

    The bfloat16 run is checked against the float32 reference with tolerances that bfloat16
    rounding alone would meet at the embeddings (rtol 1e-2, atol 1e-2), so the report shows
    where the error grows beyond rounding. Returns 0: differences are the expected outcome.

    Raises:
        IlstoreError: a run or report could not be written (the message names it).
    """
    from ilstore_compare import compare
    from ilstore_compare.cli import write_report_file
    from ilstore_compare.report_html import render_html
    from ilstore_compare.report_md import render_markdown

    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        for name in ("fp32", "bf16", "bf16_replay"):
            old = output_dir / name
            if (old / MANIFEST_NAME).is_file():  # only ever delete the demo's own earlier runs
                shutil.rmtree(old)
    except OSError as exc:
        raise IlstoreError(f"{exc.filename or output_dir}: cannot prepare the demo's directory: "
                           f"{exc.strerror or exc}") from None
    fp32, token = capture_demo_run(output_dir, "fp32", torch.float32, backend)
    bf16, _ = capture_demo_run(output_dir, "bf16", torch.bfloat16, backend, next_token=token)
    replay, _ = capture_demo_run(output_dir, "bf16_replay", torch.bfloat16, backend, next_token=token,
                                 replay_from=fp32)
    click.echo(f"captured float32 run:  {fp32}\ncaptured bfloat16 run: {bf16}\n"
               f"bfloat16 replayed on float32's inputs: {replay}\n")
    click.echo(format_summary(summarize_run(fp32)))
    click.echo("")
    result = compare(bf16, fp32, rtol=1e-2, atol=1e-2, replay=replay)
    md, html = output_dir / "report.md", output_dir / "report.html"
    for path, text in ((md, render_markdown(result, False)), (html, render_html(result, False))):
        write_report_file(path, partial(_write_text, text))
    s = result.summary
    click.echo(f"compare bf16 (dir1) against fp32 (dir2, reference), rtol 1e-2, atol 1e-2: {result.verdict}")
    click.echo(f"  {s.compared} tensors compared, {s.matched} matched, {s.mismatched} mismatched, "
               f"{s.only_in_dir1 + s.only_in_dir2} one-sided")
    guess = result.threshold_divergence
    if guess is None:
        click.echo("  by the tolerance alone: no divergence found")
    else:
        click.echo(f"  by the tolerance alone, the first divergence is step {guess.step}, {guess.module} "
                   f"call {guess.call} ({guess.origin})")
        for div in result.introduced[:5]:
            growth = "n/a" if div.growth is None else f"{div.growth:.3g}x"
            click.echo(f"    error 'introduced' at step {div.step} {div.module} call {div.call} (grows {growth})")
    measured = result.first_divergence
    click.echo("  measured by replay: " + ("no single call adds error beyond the tolerance; the difference "
                                           "accumulates over many calls" if measured is None else
                                           f"the first call whose own error crosses the tolerance is step "
                                           f"{measured.step}, {measured.module} call {measured.call}"))
    local = result.local
    if local is not None:
        click.echo("  the five calls with the largest local error (rel-L2 of its outputs, fed float32's inputs):")
        for e in [e for e in local.errors if e.rel_l2 is not None][:5]:
            kind = "container" if e.container else "leaf"
            click.echo(f"    {e.rel_l2:.3e}  step {e.call.step} {e.call.module} call {e.call.call} ({kind})")
        for e in local.not_compared[:5]:
            click.echo(f"    not measured: step {e.call.step} {e.call.module}: {e.reason}")
    click.echo(f"\nreports: {md}\n         {html}\n"
               f"(same as: ilstore-compare --dir1 {bf16} --dir2 {fp32} --replay {replay} --rtol 1e-2 --atol 1e-2)")
    return 0
