"""The ``ilstore`` command line (click). Commands only parse options and call plain functions.

Exit status: 0 success, 1 differences found (compare), 2 the user must fix something (bad
config, missing or corrupt run, bad option). Results go to stdout; logs and errors to stderr.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from tabulate import tabulate

from .config import load_config
from .errors import ConfigError, IlstoreError
from .keys import KINDS
from .store.registry import open_run

__all__ = ["cli", "main", "handle_errors", "human_bytes", "ls_run", "convert_run"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def handle_errors(fn: Callable[..., int | None]) -> Callable[..., None]:
    """Run a command body; an :class:`IlstoreError` becomes one message on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        ctx = click.get_current_context()
        try:
            code = fn(*args, **kwargs) or 0
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except IlstoreError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        ctx.exit(code)

    return wrapper


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.version_option(package_name="ilstore")
def cli(verbose: int, quiet: bool) -> None:
    """ilstore: capture, store, convert and compare intermediate tensors of PyTorch models."""
    _setup_logging(verbose, quiet)


@cli.command("validate-config", epilog="""\b
Examples:
  ilstore validate-config '{"module_call_match": "layers\\\\.0\\\\.mlp:1"}'
  ilstore validate-config cfg.json""")
@click.argument("config")
@handle_errors
def validate_config_cmd(config: str) -> int:
    """Validate CONFIG (JSON text or a file) and print the resolved config."""
    cfg = load_config(config)
    click.echo(json.dumps(cfg.to_dict(), indent=2))
    return 0


def ls_run(run_dir: Path, show_calls: bool = False, as_json: bool = False) -> int:
    """Print a run's steps with call/tensor counts and bytes; returns the exit status."""
    with open_run(run_dir) as run:
        steps = []
        for step in run.steps():
            calls = []
            for call in run.calls(step):
                tensors = stored = nbytes = 0
                for kind in KINDS:
                    for _key, node in run.tensor_nodes(call, kind):
                        tensors += 1
                        if node.get("stored", True):
                            stored += 1
                            nbytes += _node_bytes(node)
                calls.append({"module": call.module, "call": call.call, "tensors": tensors, "stored": stored,
                              "bytes": nbytes})
            steps.append({"step": step, "calls": calls,
                          "tensors": sum(c["tensors"] for c in calls), "stored": sum(c["stored"] for c in calls),
                          "bytes": sum(c["bytes"] for c in calls)})
        info = {"run_dir": str(run_dir), "backend": run.name, "status": run.status,
                "steps": steps, "incomplete_steps": run.incomplete_steps()}
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return 0
    click.echo(f"run {run_dir}\nbackend {info['backend']}, status {info['status']}, {len(steps)} step(s)")
    rows = [[s["step"], len(s["calls"]), s["tensors"], s["stored"], human_bytes(s["bytes"])] for s in steps]
    click.echo(tabulate(rows, headers=["step", "module calls", "tensors", "stored", "bytes"], tablefmt="simple"))
    if info["incomplete_steps"]:
        click.echo(f"incomplete step(s), cut before they finished: {info['incomplete_steps']}")
    if show_calls:
        for s in steps:
            click.echo(f"\nstep {s['step']}")
            rows = [[c["module"] + (f"#{c['call']}" if c["call"] else ""), c["tensors"], c["stored"],
                     human_bytes(c["bytes"])] for c in s["calls"]]
            click.echo(tabulate(rows, headers=["module call", "tensors", "stored", "bytes"], tablefmt="simple"))
    return 0


def _node_bytes(node: dict[str, Any]) -> int:
    import torch

    from .records import dtype_from_str

    try:
        itemsize = torch.empty((), dtype=dtype_from_str(str(node.get("dtype")))).element_size()
    except (ValueError, TypeError):
        return 0
    numel = node.get("numel")
    return int(numel) * itemsize if isinstance(numel, int) else 0


@cli.command("ls", epilog="""\b
Examples:
  ilstore ls /tmp/vllm_intermediates/<run_id>
  ilstore ls RUN --calls""")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--calls", "show_calls", is_flag=True, help="Also list every module call of every step.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def ls_cmd(run_dir: Path, show_calls: bool, as_json: bool) -> int:
    """List a run's steps, module calls, tensor counts and bytes, and its status."""
    return ls_run(run_dir, show_calls, as_json)


def _parse_steps(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        steps = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated step numbers such as 0,1; got {value!r}") from None
    if not steps or any(s < 0 for s in steps):
        raise click.BadParameter(f"expected comma-separated step numbers >= 0 such as 0,1; got {value!r}")
    return steps


def _parse_options(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any]:
    if value is None:
        return {}
    try:
        options = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}") from None
    if not isinstance(options, dict):
        raise click.BadParameter("expected a JSON object such as '{\"shard_size_mb\": 256}'")
    return options


def convert_run(src: Path, dst: Path, backend: str, steps: list[int] | None = None, overwrite: bool = False,
                options: dict[str, Any] | None = None) -> int:
    """Convert SRC into DST written by ``backend`` and print a one-line summary; returns 0."""
    from .convert import convert

    out = convert(src, dst, to=backend, steps=steps, overwrite=overwrite, options=options)
    with open_run(out) as run:
        click.echo(f"converted {src} -> {out} (backend {run.name}, {len(run.steps())} step(s), status {run.status})")
    return 0


@cli.command("convert", epilog="""\b
Examples:
  ilstore convert runs/fp32 runs/fp32-st --to safetensors
  ilstore convert runs/fp32 runs/fp32-h5 --to hdf5 --backend-options '{"compression": "gzip"}'
  ilstore convert runs/fp32-h5 runs/fp32-pt --to pt --steps 0,1 --overwrite""")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--to", "backend", required=True, help="Target backend: pt, safetensors, hdf5 or a plug-in name.")
@click.option("--steps", callback=_parse_steps, help="Only these steps, comma-separated (default: all).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it is an existing ilstore run.")
@click.option("--backend-options", "options", callback=_parse_options, metavar="JSON",
              help="Options of the target backend, e.g. '{\"shard_size_mb\": 256}'.")
@handle_errors
def convert_cmd(src: Path, dst: Path, backend: str, steps: list[int] | None, overwrite: bool,
                options: dict[str, Any]) -> int:
    """Rewrite the run SRC into a new run DST in another backend, bit-exactly.

    SRC may be any backend (also dumps without a manifest); it is never modified. DST must
    not exist unless --overwrite is given.
    """
    return convert_run(src, dst, backend, steps, overwrite, options)


@cli.command("demo")
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("demo_runs"), show_default=True,
              help="Where the two demo runs are written.")
@click.option("--backend", default="pt", show_default=True, help="Storage backend for the captures.")
@handle_errors
def demo_cmd(output_dir: Path, backend: str) -> int:
    """Capture the built-in tiny Llama in float32 and bfloat16, then compare them."""
    from .demo import run_demo

    return run_demo(output_dir, backend)


def _attach_compare() -> None:
    # ``ilstore compare`` is the same click command as ``ilstore-compare``.
    from ilstore_compare.cli import compare_cmd

    cli.add_command(compare_cmd, "compare")


_attach_compare()


def main() -> None:
    cli(prog_name="ilstore")
