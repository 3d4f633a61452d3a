"""The ``ilstore-compare`` command (click). It only parses options and calls :func:`run`.

Exit status: 0 every tensor compared and matched; 1 differences, one-sided tensors, stats-only
pairs (unless ``--allow-stats-only``), tensors the map declares unaligned (unless
``--allow-unaligned``), calls a replay could not replay or measure, or an empty comparison; 2 a
usage or input error (missing or ambiguous run directory, unreadable manifest, journal or index,
bad map file, bad option, a ``--replay``/``--oracle`` run not replayed from the run it must be):
no report. A tensor file that cannot be read (missing, truncated, corrupt) does not stop the
comparison: the report lists it, everything else is compared, and the exit status is 2, whatever
else was found. With ``--oracle`` the oracle verdict decides between 0 and 1: 1 when a call is
flagged or could not be evaluated. The report goes to stdout or ``--output``; errors (one line
per unreadable tensor too) and the progress bar go to stderr.
"""

from __future__ import annotations

import errno
import functools
import importlib
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from ilstore.errors import AmbiguousRunError as CoreAmbiguousRunError
from ilstore.errors import IlstoreError
from ilstore.manifest import process_umask, read_manifest
from ilstore.store.registry import find_run_early

from .errors import AmbiguousRunError, OptionError
from .options import CompareOptions
from .selection import parse_step_selection

if TYPE_CHECKING:
    from .result import CompareResult

# The engine and the report renderers (torch and all) are imported when a comparison runs, so
# `ilstore-compare --help` and option errors answer without importing torch.

__all__ = ["compare_cmd", "main", "run", "RENDERERS", "FLAGS", "write_report_file"]

#: Report format → renderer ``(result, verbose) -> text``.
def _renderer(module: str, name: str) -> Callable[[CompareResult, bool], str]:
    def render(result: CompareResult, verbose: bool) -> str:
        fn: Callable[[CompareResult, bool], str] = getattr(importlib.import_module(f"{__package__}.{module}"), name)
        return fn(result, verbose)

    render.__name__ = name
    return render


RENDERERS: dict[str, Callable[[CompareResult, bool], str]] = {
    "md": _renderer("report_md", "render_markdown"), "json": _renderer("report_json", "render_json"),
    "html": _renderer("report_html", "render_html")}
_EXTENSIONS = {".md": "md", ".markdown": "md", ".json": "json", ".html": "html", ".htm": "html"}

#: :class:`CompareOptions` field → the flag that sets it (the one place the two namings meet).
FLAGS = {"rtol": "--rtol", "atol": "--atol", "steps": "--steps", "required_steps": "--steps", "modules": "--modules",
         "exact": "--exact",
         "equal_nan": "--equal-nan", "allow_stats_only": "--allow-stats-only", "name_map": "--map",
         "squeeze_shapes": "--squeeze-shapes", "auto_map": "--no-auto-map", "allow_unaligned": "--allow-unaligned",
         "workers": "--workers", "replay": "--replay", "oracle": "--oracle", "oracle_factor": "--oracle-factor",
         "align_tokens": "--align-tokens"}


def report_format(fmt: str | None, output: Path | None) -> str:
    """``--format`` if given, else from ``--output``'s extension, else markdown."""
    if fmt:
        return fmt
    if output is not None:
        return _EXTENSIONS.get(output.suffix.lower(), "md")
    return "md"


class _ProgressBar:
    """A tqdm bar on stderr, created on the first update (when the total is known); a long
    comparison's total is an estimate until its last window of steps is planned (:mod:`.engine`),
    so the bar follows the total it is given."""

    def __init__(self) -> None:
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=sys.stderr, unit="tensor", desc="comparing", leave=False)
        elif self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run(dir1: Path, dir2: Path, options: CompareOptions, *, output: Path | None = None, fmt: str | None = None,
        verbose: bool = False, unshard: bool = False) -> int:
    """Compare, render and write the report; returns the exit status (0, 1, or 2 when a tensor file
    could not be read: the report lists it and the rest is compared, ``keep_going``).

    Args:
        dir1: the run to check.
        dir2: the reference run.
        options: what to compare and how.
        output: write the report here (default: stdout).
        fmt: report format (default: from ``output``'s extension, else markdown).
        verbose: list every tensor in the report.
        unshard: compare the logical runs (tensors assembled from every rank, :mod:`.unshard`).

    Raises:
        IlstoreError: bad input (the CLI turns it into exit status 2).
    """
    for run_dir in (dir1, dir2):  # the commonest mistakes, answered before torch is imported: a missing
        try:  # path, a file, an empty directory, an output_dir of several runs
            find_run_early(run_dir)
        except CoreAmbiguousRunError as exc:
            raise AmbiguousRunError(exc.directory, exc.runs) from None
    for given in (dir1, dir2, options.replay, options.oracle):
        if given is not None and Path(given).is_dir():
            read_manifest(Path(given))  # a corrupt or newer manifest: named before torch is imported
    if output is not None:
        _check_output(output)
    from .engine import compare

    if output is not None:  # (finding a run named by its output_dir may import the backends)
        _check_output_outside_runs(output, {"dir1": dir1, "dir2": dir2, "--replay": options.replay,
                                            "--oracle": options.oracle})

    fmt = report_format(fmt, output)
    options = CompareOptions.create(options, keep_going=True)
    bar = _ProgressBar() if sys.stderr.isatty() else None
    try:
        if unshard:  # --unshard
            from .unshard import compare_unsharded

            result = compare_unsharded(dir1, dir2, options, progress=bar)
        else:
            result = compare(dir1, dir2, options, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    _say_unreadable(result)
    _write_report(result, fmt, verbose, output)
    if output is not None:
        s = result.summary
        extra = ""
        if result.local is not None:
            extra = f", {len(result.local.not_compared)} call(s) not replayed or measured"
        if result.oracle is not None:
            extra = (f", oracle: {len(result.oracle.flagged)} call(s) flagged, {len(result.oracle.not_evaluated)} "
                     "not evaluated")
        if result.unreadable:
            extra += f", {len(result.unreadable)} unreadable"
        click.echo(f"{result.verdict}: {s.compared} compared, {s.matched} matched, {s.mismatched} mismatched, "
                   f"{s.only_in_dir1} only in dir1, {s.only_in_dir2} only in dir2, {s.unaligned} declared unaligned"
                   f"{extra}; {fmt} report written to {output}")
    return result.exit_code


def _write_report(result: CompareResult, fmt: str, verbose: bool, output: Path | None) -> None:
    """Write the report to ``output`` (default: stdout), through :func:`write_report_file`.

    The JSON report is streamed (:func:`.report_json.write_json`: memory bounded whatever the
    run's length); the others are rendered, then written.
    """
    if fmt == "json":
        from .report_json import write_json

        def write(out: TextIO) -> None:
            write_json(result, out)
    else:
        text = RENDERERS[fmt](result, verbose)

        def write(out: TextIO) -> None:
            out.write(text)
    if output is None:
        if fmt == "json":
            write(sys.stdout)
            sys.stdout.flush()
        else:
            click.echo(text, nl=False)
        return
    write_report_file(output, write)


def write_report_file(output: Path, write: Callable[[TextIO], None]) -> None:
    """Write a report file: ``write`` gets the open file (UTF-8 text).

    The file is written beside its final name and renamed into place, so a failure midway (disk
    full) leaves no half report (and an earlier report of that name as it was, its mode kept); a
    path that is not a plain regular file (a symbolic link, ``/dev/stdout``, a pipe, a file with
    hard links) is written directly. Missing parent directories are made.

    Raises:
        IlstoreError: the file could not be written (``PATH: cannot write the report: reason``).
    """
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        try:
            was = os.lstat(output)
        except FileNotFoundError:
            was = None
        if was is not None and (not stat.S_ISREG(was.st_mode) or was.st_nlink > 1):
            # a link (written through, as before), a pipe, /dev/stdout, a file with other names
            with open(output, "w", encoding="utf-8") as out:
                write(out)
            return
        fd, part_name = tempfile.mkstemp(prefix=_part_prefix(output), suffix=".part", dir=output.parent)
        part = Path(part_name)
        try:
            with open(fd, "w", encoding="utf-8") as out:
                write(out)
            os.chmod(part, stat.S_IMODE(was.st_mode) if was is not None else 0o666 & ~process_umask())
            os.replace(part, output)
        finally:
            part.unlink(missing_ok=True)
    except OSError as exc:
        raise IlstoreError(f"{output}: cannot write the report: {exc.strerror or exc}") from None


def _check_output_outside_runs(output: Path, runs: dict[str, Path | str | None]) -> None:
    """Refuse a report path inside one of the runs read (followed through links): writing there
    could replace one of the run's own files (its manifest, a tensor's JSON) or add a stray one.
    A run named by its ``output_dir`` counts as the one run inside it; a path that names no run
    is left to the comparison to refuse.

    Raises:
        IlstoreError: naming ``output`` and the run.
    """
    from ilstore.store.registry import find_run

    target = os.path.realpath(output)
    for name, given in runs.items():
        if given is None:
            continue
        try:
            run_dir = find_run(given)
        except (IlstoreError, OSError):
            continue
        root = os.path.realpath(run_dir)
        if os.path.commonpath([target, root]) == root:
            raise IlstoreError(f"{output}: inside the run {name} ({run_dir}): the report could overwrite the "
                               "run's own files; write it elsewhere")


def _check_output(output: Path) -> None:
    """Fail before comparing, not after, when the report could not be written to ``output``, along
    the same ways :func:`_write_report` takes: a plain file (or a new one) is written beside its
    name and renamed, so a file is created and removed in its directory, or in the nearest of its
    parents that exists where the report will make the rest (nothing is made before comparing); a
    path written directly (a symbolic link, a pipe, ``/dev/stdout``, a file with hard links) is
    opened for appending and closed (an existing file: nothing changes), its target's directory
    probed when a link names a file not yet there.

    Raises:
        IlstoreError: naming ``output`` and why.
    """
    try:
        if output.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        try:
            was = os.lstat(output)
        except FileNotFoundError:
            was = None
        if was is not None and (not stat.S_ISREG(was.st_mode) or was.st_nlink > 1):
            if output.is_file():
                os.close(os.open(output, os.O_WRONLY | os.O_APPEND))
                return
            if output.exists():  # a pipe, a device: opening one for writing could block
                if not os.access(output, os.W_OK):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
                return
            probe = Path(os.path.realpath(output)).parent  # a link to a file not yet there: open creates it
        else:  # the report's directory is made when the report is written: probe the nearest that exists
            probe = output.parent
            while not os.path.lexists(probe) and probe != probe.parent:
                probe = probe.parent
            if not probe.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        with tempfile.NamedTemporaryFile(prefix=_part_prefix(output), suffix=".part", dir=probe):
            pass
    except OSError as exc:
        raise IlstoreError(f"{output}: cannot write the report: {exc.strerror or exc}") from None


def _part_prefix(output: Path) -> str:
    """The temporary report's name prefix: a hidden name from the report's own cut to 100 bytes,
    so the temporary name fits where the report's name does (255 bytes). Works on the name's bytes
    as the file system holds them, so a name that is not UTF-8 (surrogate escapes) is kept too."""
    return "." + os.fsdecode(os.fsencode(output.name)[:100]) + "."


#: Unreadable tensors named on stderr (the report lists them all).
_SAY_AT_MOST = 20


def _say_unreadable(result: CompareResult) -> None:
    """One line per unreadable tensor on stderr, so a log shows why the exit status is 2."""
    lost = result.unreadable
    for u in lost[:_SAY_AT_MOST]:
        click.echo(f"error: {u.text()} ({u.key.display()}; not compared)", err=True)
    if len(lost) > _SAY_AT_MOST:
        click.echo(f"error: … and {len(lost) - _SAY_AT_MOST} more unreadable tensor(s); the report lists them all",
                   err=True)


def _exit_codes(fn: Callable[..., int]) -> Callable[..., None]:
    """An :class:`IlstoreError` becomes one message on stderr and exit status 2 (an option named by its flag)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        ctx = click.get_current_context()
        try:
            code = fn(*args, **kwargs)
        except OptionError as exc:
            click.echo(f"error: {FLAGS.get(exc.option, exc.option)}: {exc.detail}", err=True)
            ctx.exit(2)
        except IlstoreError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        ctx.exit(code)

    return wrapper


def _build_kernel(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """--build-kernel: compile the metrics kernel into the cache, print its path, exit (0; 2 without a compiler)."""
    if not value or ctx.resilient_parsing:
        return
    from . import _kernel

    try:
        path = _kernel.build()
    except RuntimeError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(2)
    click.echo(str(path))
    ctx.exit(0)


_EPILOG = """\b
Examples:
  ilstore-compare --dir1 runs/bf16 --dir2 runs/fp32 --rtol 1e-2 --atol 1e-3
  ilstore-compare --dir1 A --dir2 B --steps 0 --modules 'layers\\.0\\.,lm_head' --verbose
  ilstore-compare --dir1 A --dir2 B --output report.html
  ilstore-compare --dir1 A --dir2 B --exact --format json > report.json
  ilstore-compare --dir1 vllm_run --dir2 hf_run --rtol 1e-4 --atol 1e-5 --allow-unaligned
  ilstore-compare --dir1 vllm_run --dir2 hf_run --map llama_vllm_to_hf
  ilstore-compare --dir1 vllm_3_prompts --dir2 hf_padded_batch --align-tokens --allow-unaligned
  ilstore-compare --dir1 A --dir2 B --squeeze-shapes
  ilstore-compare --dir1 runs/bf16 --dir2 runs/fp32 --replay runs/bf16_on_fp32_inputs
  ilstore-compare --dir1 cand_on_fp64 --dir2 ref_on_fp64 --oracle runs/fp64 --oracle-factor 2
  ilstore-compare --dir1 runs/tp2 --dir2 runs/tp1 --unshard --rtol 1e-4 --atol 1e-6

\b
Exit status: 0 everything compared and matched; 1 differences, tensors in one run only,
stats-only pairs (unless --allow-stats-only), tensors the map declares unaligned (unless
--allow-unaligned), calls a replay could not replay or measure, or nothing compared;
tokens --align-tokens could not align (unless --allow-unaligned);
with --oracle, 1 when a call is flagged or could not be evaluated; 2 usage or input error
(including a --replay or --oracle run not replayed from the run it must be), or a tensor
file that could not be read: the report lists it, the rest is compared (2 wins over 1).
Without --map, a shipped map declared for the two runs' models and engines (vLLM vs Hugging
Face Llama, Qwen2, Mixtral) is used by itself; the report's notes say which.
See docs/compare.md for the report, the metrics, replay and the map file format."""


@click.command("compare", epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"],
                                                            "max_content_width": 100})
@click.option("--build-kernel", is_flag=True, expose_value=False, is_eager=True, callback=_build_kernel,
              help="Compile the fused metrics kernel into ~/.cache/ilstore ($ILSTORE_CACHE_DIR) now, print its "
                   "path and exit (for set-up scripts: the first comparison otherwise compiles it, ~1 s).")
@click.option("--dir1", required=True, type=click.Path(path_type=Path),
              help="Run to check (a run directory, or an output_dir holding exactly one run).")
@click.option("--dir2", required=True, type=click.Path(path_type=Path), help="Reference run (same forms).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report here (format from the extension: .md, .json, .html); default stdout.")
@click.option("--rtol", type=click.FloatRange(min=0), default=1e-5, show_default=True,
              help="Relative tolerance: |a-b| <= atol + rtol*|b|, b from dir2.")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-8, show_default=True, help="Absolute tolerance.")
@click.option("--steps", help="Steps to compare: '0,1' or '0-3' (default: all). A step listed by itself that "
                             "neither run has fails the comparison (exit 1); a range only selects.")
@click.option("--modules", multiple=True,
              help="Comma-separated regexes (re.search on module names); repeatable. Default: all modules.")
@click.option("--verbose", is_flag=True, help="List every tensor in the report, matches included.")
@click.option("--format", "fmt", type=click.Choice(sorted(RENDERERS)), default=None,
              help="Report format [default: from --output's extension, else md].")
@click.option("--exact", is_flag=True, help="Bitwise comparison instead of tolerances.")
@click.option("--equal-nan", is_flag=True, help="NaN in the same place on both sides counts as equal.")
@click.option("--map", "map_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE|NAME",
              help="JSON map aligning the runs: module renames, tensor path rules, declared unaligned tensors "
                   "(see docs/compare.md); a file, or the name of a shipped map (e.g. llama_vllm_to_hf). "
                   "[default: the shipped map declared for the runs' models, if any]")
@click.option("--no-auto-map", "no_auto_map", is_flag=True,
              help="Without --map, use no map (not the shipped map the runs' manifests would pick).")
@click.option("--squeeze-shapes/--no-squeeze-shapes", default=None,
              help="Compare shapes that differ only by size-1 dimensions ([T,H] vs [1,T,H]) after squeezing "
                   "[default: as the map says, else off].")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Tensor pairs compared in parallel.")
@click.option("--allow-stats-only", is_flag=True,
              help="Let pairs compared only by statistics (bodies not stored) count as matched for the exit status.")
@click.option("--allow-unaligned", is_flag=True,
              help="Let tensors the map declares unaligned (and, with --align-tokens, tokens that could not be "
                   "aligned) not count against the exit status.")
@click.option("--align-tokens", is_flag=True,
              help="Runs that batch differently (vLLM's packed tokens vs Hugging Face's padded batch or one prompt "
                   "at a time): match requests by token ids and compare the common tokens, one step per request "
                   "and step (see docs/parallel.md).")
@click.option("--replay", "replay", type=click.Path(path_type=Path),
              help="A replay of dir2 (captured with replay_from=dir2): add each call's local error, measured, beside "
                   "the propagated error.")
@click.option("--oracle", "oracle", type=click.Path(path_type=Path),
              help="Oracle run (e.g. float64) that dir1 and dir2 were both replayed from: flag the calls whose "
                   "local error in dir1 exceeds --oracle-factor times dir2's.")
@click.option("--oracle-factor", "oracle_factor", type=float, default=None,
              help="K of the oracle verdict (> 0)  [default: 2]")
@click.option("--unshard", is_flag=True,
              help="Compare logical tensors: each run's tensors assembled from all its ranks by their recorded "
                   "layouts, so runs of different world sizes (TP=2 vs TP=1) pair up (docs/parallel.md).")
@_exit_codes
def compare_cmd(dir1: Path, dir2: Path, output: Path | None, rtol: float, atol: float, steps: str | None,
                modules: tuple[str, ...], verbose: bool, fmt: str | None, exact: bool, equal_nan: bool,
                map_file: Path | None, no_auto_map: bool, squeeze_shapes: bool | None, workers: int, align_tokens: bool,
                allow_stats_only: bool, allow_unaligned: bool, replay: Path | None, oracle: Path | None,
                oracle_factor: float | None, unshard: bool) -> int:
    """Compare two ilstore runs (any backends) tensor by tensor; dir2 is the reference.

    Reports which tensors differ and by how much, and the first module call (in execution
    order) whose outputs differ, with whether it introduced or inherited the error. With a
    replay (dir1 itself, or --replay), the error each call introduces, measured; with --oracle,
    which calls are worse than a correct reference.
    """
    selected, asked = parse_step_selection(steps) if steps is not None else (None, None)
    options = CompareOptions(rtol=rtol, atol=atol, steps=selected, required_steps=asked,
                             modules=modules or None, exact=exact,
                             equal_nan=equal_nan, allow_stats_only=allow_stats_only,
                             name_map=map_file, auto_map=not no_auto_map,
                             squeeze_shapes=squeeze_shapes, allow_unaligned=allow_unaligned, workers=workers,
                             align_tokens=align_tokens,
                             replay=replay, oracle=oracle, oracle_factor=oracle_factor)
    return run(dir1, dir2, options, output=output, fmt=fmt, verbose=verbose, unshard=unshard)


#: glibc's ``mallopt`` parameter for the size from which ``malloc`` maps memory of its own.
_M_MMAP_THRESHOLD = -3
#: Blocks from this size on (every tensor body but the small ones) are mapped on their own.
_MMAP_THRESHOLD = 1 << 20


def _own_mappings_for_large_blocks() -> None:
    """Have glibc map every block of :data:`_MMAP_THRESHOLD` bytes or more on its own, so that
    the memory of a freed tensor goes back to the system at once.

    By default glibc raises that threshold up to 32 MiB as large blocks are freed, and then
    serves tensors from its heaps; with ``--workers`` each thread has a heap of its own, and
    freed tensor memory stayed resident there (two 200 MB hdf5 runs, 16 MiB largest tensor:
    peak RSS 339 MB with two workers, and 70 MB still held after the comparison; 322 MB with
    this). A fixed threshold also turns that raising off. Only the command does this, for its
    own process; nothing happens off glibc.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


def main() -> None:
    """Entry point of the ``ilstore-compare`` console script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if sys.platform.startswith("linux"):
        _own_mappings_for_large_blocks()
    compare_cmd(prog_name="ilstore-compare")
