"""Replay provenance: which run a replay was fed from, and whether it is the one it is compared with.

A replay run's manifest (every rank's, in a multi-rank run) records ``"replayed_from": {"path",
"run_id"}``. The comparer reads it to decide where local errors come from (:func:`find_sources`):
dir1 itself when it is a replay of dir2, the ``--replay`` run (which must be a replay of dir2),
or, with ``--oracle``, nothing here: dir1 and dir2 must both be replays of the oracle. A replay
that names another run is a user error (:class:`~.errors.OptionError`, exit status 2), checked
before anything is compared.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

from ilstore.errors import IlstoreError
from ilstore.store.base import StoreReader
from ilstore.store.registry import open_run

from .errors import CompareError, OptionError
from .options import CompareOptions
from .pairing import resolve_run_dir

__all__ = ["replayed_from", "run_ids", "run_id_of", "is_replay_of", "check_replay", "Sources", "open_option_run",
           "find_sources"]


def replayed_from(reader: StoreReader, label: str) -> dict[str, str] | None:
    """What the run's manifest(s) record as ``replayed_from`` (``path``, ``run_id``); None if not a replay.

    A multi-rank run records it in every rank's manifest; they must agree.

    Raises:
        CompareError: the ranks disagree (some replayed, others not, or from different runs).
    """
    found: dict[str, dict[str, str] | None] = {}
    manifests = [(".", reader.manifest)]
    manifests += [(name, part.manifest) for name, part in reader.parts() if part is not reader]
    for name, manifest in manifests:
        if manifest is None or manifest.get("layout") == "ranks" and "replayed_from" not in manifest:
            continue  # a dump without a manifest, or a multi-rank top that leaves it to the ranks
        source = manifest.get("replayed_from")
        found[name] = ({"path": str(source.get("path", "")), "run_id": str(source.get("run_id", ""))}
                       if isinstance(source, Mapping) else None)
    distinct = {(s["path"], s["run_id"]) if s else None for s in found.values()}
    if len(distinct) > 1:
        listing = "; ".join(f"{name}: {s['run_id'] + ' at ' + s['path'] if s else 'not a replay'}"
                            for name, s in found.items())
        raise CompareError(f"{reader.run_dir} ({label}): its parts disagree about replayed_from ({listing}); "
                           "a replay run must be replayed from one run on every rank")
    return next(iter(found.values()), None)


def run_ids(reader: StoreReader) -> set[str]:
    """The names a run goes by: the manifest's ``run_id`` (top level or config) and its directory's name."""
    ids = {reader.run_dir.name}
    manifest = reader.manifest or {}
    for value in (manifest.get("run_id"), (manifest.get("config") or {}).get("run_id")):
        if isinstance(value, str) and value:
            ids.add(value)
    return ids


def _same_dir(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError, ValueError):
        return False


def is_replay_of(source: Mapping[str, str], reference: StoreReader) -> bool:
    """Whether a ``replayed_from`` record names ``reference``.

    A replay records its reference's absolute path: while a directory is still there, the path
    decides (another run with the same run id, elsewhere, is another run: its local errors would
    be measured against the wrong inputs). A path that is gone (the runs were moved, or copied to
    another machine) or relative (a replay written before ilstore recorded absolute paths, relative
    to a working directory not known here) leaves it to the run id, else to the path as given.
    """
    run_id, path = source.get("run_id") or "", source.get("path") or ""
    if path and os.path.isabs(path) and os.path.isdir(path):
        # replay_from may have named an output_dir holding the one run
        return _same_dir(path, reference.run_dir) or _same_dir(path, reference.run_dir.parent)
    if run_id:
        return run_id in run_ids(reference)
    return bool(path) and (_same_dir(path, reference.run_dir) or _same_dir(path, reference.run_dir.parent))


def _describe(source: Mapping[str, str]) -> str:
    return f"run {source.get('run_id') or '(no run id)'} ({source.get('path') or 'no path recorded'})"


def run_id_of(reader: StoreReader) -> str:
    """The run's id: the manifest's ``run_id`` (top level, else config), else its directory's name."""
    manifest = reader.manifest or {}
    for value in (manifest.get("run_id"), (manifest.get("config") or {}).get("run_id")):
        if isinstance(value, str) and value:
            return value
    return reader.run_dir.name


def check_replay(option: str, replay: StoreReader, ref_flag: str, reference: StoreReader) -> dict[str, str]:
    """``replay``'s ``replayed_from``, after checking that it names ``reference``.

    Args:
        option: the option that named ``replay`` (``replay``, ``oracle``...), for the message.
        replay: the replay run.
        ref_flag: how the message names the reference (``--dir2``, ``--oracle``).
        reference: the run it must have been replayed from.

    Raises:
        OptionError: ``replay`` is not a replay run, or was replayed from another run (the
            message names both).
    """
    source = replayed_from(replay, option)
    if source is None:
        raise OptionError(option, f"{replay.run_dir} is not a replay run (its manifest has no replayed_from); "
                          f"capture it with replay_from set to the {ref_flag} run")
    if not is_replay_of(source, reference):
        raise OptionError(option, f"{replay.run_dir} was replayed from {_describe(source)}, but {ref_flag} "
                          f"{reference.run_dir} is run {run_id_of(reference)}; pass the run it was replayed "
                          f"from as {ref_flag}, or a replay of {ref_flag}")
    return source


# -- where the local errors come from ----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sources:
    """What :func:`find_sources` found, once the runs' provenance is checked.

    Attributes:
        local_run: the replay of dir2 whose local errors the report shows (dir1 itself, or
            ``--replay``); None without one.
        local_source: ``dir1`` or ``replay``.
        replayed_from: ``local_run``'s ``replayed_from`` record.
        oracle_id: the oracle's run id (``--oracle``).
        notes: remarks for the report.
    """

    local_run: StoreReader | None = None
    local_source: str = ""
    replayed_from: dict[str, str] = dataclasses.field(default_factory=dict)
    oracle_id: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def open_option_run(stack: ExitStack, options: CompareOptions, option: str) -> StoreReader | None:
    """Open the run an option (``replay``, ``oracle``) names, closed with ``stack``; None when not given.

    Raises:
        OptionError: the run is missing, ambiguous or unreadable (named by the option).
    """
    value = getattr(options, option)
    if value is None:
        return None
    try:
        return stack.enter_context(open_run(resolve_run_dir(value)))
    except OptionError:
        raise
    except IlstoreError as exc:
        raise OptionError(option, str(exc)) from None


def find_sources(r1: StoreReader, r2: StoreReader, replay: StoreReader | None,
                 oracle: StoreReader | None) -> Sources:
    """Where the local errors come from, after checking every replay's provenance.

    Raises:
        OptionError: ``--replay`` is not a replay of dir2, or dir1 or dir2 is not a replay of
            ``--oracle`` (the message names both runs).
        CompareError: a multi-rank replay whose ranks disagree about ``replayed_from``.
    """
    if oracle is not None:
        check_replay("oracle", r1, "--oracle", oracle)
        check_replay("oracle", r2, "--oracle", oracle)
        return Sources(oracle_id=run_id_of(oracle))
    if replay is not None:
        return Sources(replay, "replay", check_replay("replay", replay, "--dir2", r2))
    source = replayed_from(r1, "dir1")
    if source is None:
        return Sources()
    if is_replay_of(source, r2):
        return Sources(r1, "dir1", source)
    return Sources(notes=[f"dir1 is a replay of {_describe(source)}, not of dir2: no local error is reported "
                          "(compare it with the run it was replayed from)"])
