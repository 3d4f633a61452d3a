"""The ``ilstore`` command line (click). Commands only parse options and call plain functions.

Exit status: 0 success, 1 differences found (compare), 2 the user must fix something (bad
config, missing or corrupt run, bad option). Results go to stdout; logs and errors to stderr.

Each command imports what it needs when it runs: ``ilstore ls`` of a run with a step journal
reads JSON only and never imports torch (its start-up would be most of the command's time).
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

from .errors import ConfigError, IlstoreError
from .summary import format_summary, human_bytes, summarize_run

__all__ = ["cli", "main", "handle_errors", "human_bytes", "ls_run", "convert_run"]


def handle_errors(fn: Callable[..., int | None]) -> Callable[..., None]:
    """Run a command body; an :class:`IlstoreError` or :class:`OSError` becomes one message on stderr and exit 2."""

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
        except OSError as exc:  # the system refused (a full disk, no permission) where no message names the file better
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        ctx.exit(code)

    return wrapper


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _load_compare() -> click.Command:
    # ``ilstore compare`` is the same click command as ``ilstore-compare``.
    from ilstore_compare.cli import compare_cmd

    return compare_cmd


class _LazyGroup(click.Group):
    """A command group some of whose commands are imported only when used (run, or listed in --help).

    So ``import ilstore.cli`` (and every other command) never imports the comparer.
    """

    def __init__(self, *args: Any, lazy_commands: dict[str, Callable[[], click.Command]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        load = self.lazy_commands.get(cmd_name)
        if load is not None:
            self.add_command(load(), cmd_name)
            del self.lazy_commands[cmd_name]
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, lazy_commands={"compare": _load_compare},
             context_settings={"help_option_names": ["-h", "--help"]})
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
    from .config import load_config

    cfg = load_config(config)
    click.echo(json.dumps(cfg.to_dict(), indent=2))
    return 0


def ls_run(run_dir: Path, show_calls: bool = False, as_json: bool = False) -> int:
    """Print a run's steps with call/tensor counts and bytes; returns the exit status.

    ``run_dir`` is a run, or an ``output_dir`` holding one run (as ``ilstore-compare`` takes them:
    :func:`~ilstore.store.registry.find_run`; one holding several is an error that lists them).
    Only ``show_calls`` reads every structure of the run (the per-call counts, also in the
    JSON); otherwise the step journal's totals suffice, however long the run, and a run in a
    built-in backend is listed without importing torch (:func:`~ilstore.summary.summarize_run`).
    """
    from .store.registry import find_run

    summary = summarize_run(find_run(run_dir), calls=show_calls)
    click.echo(json.dumps(summary.to_dict(), indent=1) if as_json else format_summary(summary, show_calls=show_calls))
    return 0


@cli.command("ls", epilog="""\b
Examples:
  ilstore ls /tmp/vllm_intermediates/<run_id>
  ilstore ls RUN --calls""")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--calls", "show_calls", is_flag=True,
              help="Also list every module call of every step (reads the whole run).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (per-call counts with --calls).")
@handle_errors
def ls_cmd(run_dir: Path, show_calls: bool, as_json: bool) -> int:
    """List a run's steps, module calls, tensor counts and bytes, and its status.

    RUN_DIR is a run, or a capture's output_dir holding one run.

    Three or more consecutive steps with the same counts share one row (e.g. 1-99999).
    """
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
                options: dict[str, Any] | None = None, unshard: bool = False) -> int:
    """Convert SRC into DST written by ``backend`` and print a one-line summary; returns 0."""
    from .convert import convert
    from .store.registry import open_run

    out = convert(src, dst, to=backend, steps=steps, overwrite=overwrite, options=options, unshard=unshard)
    with open_run(out) as run:
        click.echo(f"converted {src} -> {out} (backend {run.name}, {len(run.steps())} step(s), status {run.status})")
    return 0


@cli.command("convert", epilog="""\b
Examples:
  ilstore convert runs/fp32 runs/fp32-st --to safetensors
  ilstore convert runs/fp32 runs/fp32-h5 --to hdf5 --backend-options '{"compression": "gzip"}'
  ilstore convert runs/fp32-h5 runs/fp32-pt --to pt --steps 0,1 --overwrite
  ilstore convert runs/tp2 runs/tp2-logical --to pt --unshard""")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--to", "backend", required=True, help="Target backend: pt, safetensors, hdf5 or a plug-in name.")
@click.option("--steps", callback=_parse_steps, help="Only these steps, comma-separated (default: all).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it is an existing ilstore run.")
@click.option("--backend-options", "options", callback=_parse_options, metavar="JSON",
              help="Options of the target backend, e.g. '{\"shard_size_mb\": 256}'.")
@click.option("--unshard", is_flag=True,
              help="Write the logical single-rank run of a multi-rank SRC: each tensor assembled from the ranks by "
                   "its recorded layout (docs/parallel.md).")
@handle_errors
def convert_cmd(src: Path, dst: Path, backend: str, steps: list[int] | None, overwrite: bool,
                options: dict[str, Any], unshard: bool) -> int:
    """Rewrite the run SRC into a new run DST in another backend, bit-exactly.

    SRC may be any backend (also dumps without a manifest); it is never modified. DST must
    not exist unless --overwrite is given. With --unshard, DST is the logical run SRC's ranks
    computed together (docs/parallel.md); replicas that disagree stop it (exit status 2).
    """
    return convert_run(src, dst, backend, steps, overwrite, options, unshard)


@cli.command("demo")
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("demo_runs"), show_default=True,
              help="Where the two demo runs are written.")
@click.option("--backend", default="pt", show_default=True, help="Storage backend for the captures.")
@handle_errors
def demo_cmd(output_dir: Path, backend: str) -> int:
    """Capture the built-in tiny Llama in float32 and bfloat16, then compare them."""
    from .demo import run_demo

    return run_demo(output_dir, backend)


def main() -> None:
    cli(prog_name="ilstore")
