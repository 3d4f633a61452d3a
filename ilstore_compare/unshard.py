"""``--unshard``: compare the logical runs that two runs' ranks computed, whatever their world sizes.

Each run is read through :class:`ilstore.unshard.LogicalReader` (every tensor assembled from
the ranks by its recorded layout; see ``docs/parallel.md``), so a TP=2 run pairs with a TP=1 run
tensor by tensor. The comparer opens runs by directory: each side gets a small view directory
(:func:`ilstore.unshard.write_view`, read by the ``unsharded`` backend) in a temporary directory
that lives as long as the comparison.
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
from pathlib import Path
from typing import Any

from ilstore.store.base import read_manifest
from ilstore.store.ranks import is_ranked

from .errors import OptionError
from .options import CompareOptions
from .pairing import resolve_run_dir
from .result import CompareResult

__all__ = ["compare_unsharded"]


def _describe(path: Path) -> tuple[str, str]:
    """(backend name, "N ranks") of a run, for the report's header and notes."""
    manifest = read_manifest(path) or {}
    ranks = manifest.get("ranks") if is_ranked(manifest) else None
    count = len(ranks) if isinstance(ranks, list) else 1
    return str(manifest.get("backend", "?")), f"{count} rank{'s' if count != 1 else ''}"


def compare_unsharded(dir1: str | Path, dir2: str | Path, options: CompareOptions | None = None, *,
                      replica_atol: float = 0.0, **kwargs: Any) -> CompareResult:
    """Compare the logical runs of ``dir1`` and ``dir2`` (dir2 is the reference).

    Args:
        dir1, dir2: run directories (or directories holding one run), any backend, any world size.
        options: as for :func:`ilstore_compare.compare`.
        replica_atol: largest absolute difference allowed between a replicated tensor's replicas
            (default 0: they must be equal); a disagreement is an unreadable tensor whose reason
            names the ranks (exit status 2).
        **kwargs: passed to :func:`ilstore_compare.compare` (``progress``, options by name).

    Returns:
        The result, naming the original directories; its notes say that both runs were unsharded.

    Raises:
        OptionError: ``replay`` or ``oracle`` given (convert the runs with ``--unshard`` first).

    Example:
        >>> compare_unsharded("runs/tp2", "runs/tp1", rtol=1e-4, atol=1e-5).exit_code  # doctest: +SKIP
        0
    """
    from ilstore.unshard import VIEW_BACKEND, write_view

    from .engine import CAPTURE_NOTE, compare

    _SAID = (f"dir1{CAPTURE_NOTE}", f"dir2{CAPTURE_NOTE}")  # the notes capture_notes puts first

    options = CompareOptions.create(options, **{k: kwargs.pop(k) for k in list(kwargs) if k != "progress"})
    for name in ("replay", "oracle"):
        if getattr(options, name) is not None:
            raise OptionError(name, "cannot be combined with --unshard (a replay pairs rank with rank); unshard the "
                              "runs first with `ilstore convert --unshard`")
    path1, path2 = resolve_run_dir(dir1), resolve_run_dir(dir2)
    (backend1, ranks1), (backend2, ranks2) = _describe(path1), _describe(path2)
    with tempfile.TemporaryDirectory(prefix="ilstore-unshard-") as tmp:
        view1 = write_view(Path(tmp) / "dir1", path1, replica_atol)
        view2 = write_view(Path(tmp) / "dir2", path2, replica_atol)
        result = compare(view1, view2, options, **kwargs)
    note = (f"--unshard: compared the logical runs: dir1's {ranks1} and dir2's {ranks2} assembled by their "
            f"recorded layouts (replicas {'equal' if replica_atol == 0 else f'within {replica_atol:g}'})")
    # The logical readers name the source runs in their errors; the result names them too.
    said = sum(1 for _ in itertools.takewhile(lambda n: n.startswith(_SAID), result.notes))
    notes = (*result.notes[:said], note, *result.notes[said:])  # after the runs' own warnings (capture_notes)
    return dataclasses.replace(result, dir1=str(path1), dir2=str(path2), notes=notes,
                               backend1=f"{backend1} ({VIEW_BACKEND})", backend2=f"{backend2} ({VIEW_BACKEND})")
