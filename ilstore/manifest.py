"""The run manifest ``ilstore.json`` and atomic JSON writes.

A run directory's manifest records the format version, backend, resolved config, library
and torch versions, world size, the completed steps, the module call order of each step and
the run status (``running`` → ``complete``, or ``failed``). It is rewritten atomically
(temp file + ``os.replace``) at open, at every step end and at close, so a reader never sees a
half-written manifest and a killed run still lists every step completed before it died.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .keys import CallKey

__all__ = ["MANIFEST_NAME", "FORMAT_VERSION", "write_json_atomic", "new_manifest", "calls_to_json", "calls_from_json"]

MANIFEST_NAME = "ilstore.json"
FORMAT_VERSION = 1


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file in the same directory and a rename.

    Compact, from ``json.dumps``: only that one-shot form uses the C encoder (``json.dump`` to a
    file, or any ``indent``, runs the pure-Python one, ~6x slower). The manifest is rewritten at
    every step end and a safetensors step index lists every tensor: indenting them cost ~20 ms
    per step of the benchmark workload. ``python -m json.tool`` or ``ilstore ls`` pretty-print.
    """
    text = json.dumps(data, allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def new_manifest(backend: str, config: dict[str, Any], *, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """A fresh manifest for a run that is about to start."""
    return {
        "format": "ilstore",
        "format_version": FORMAT_VERSION,
        "backend": backend,
        "config": config,
        "ilstore_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "rank": rank,
        "world_size": world_size,
        "status": "running",
        "steps": [],
        "current_step": None,
        "calls": {},
        "call_ends": {},
    }


def calls_to_json(calls: Iterable[CallKey]) -> list[list[Any]]:
    return [[c.module, c.call] for c in calls]


def calls_from_json(data: Any, step: int, rank: int = 0) -> list[CallKey]:
    """Parse ``[[module, call], ...]``; raises ValueError on anything else."""
    if not isinstance(data, list):
        raise ValueError("expected a list of [module, call] pairs")
    out = []
    for item in data:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or not isinstance(item[1], int) or isinstance(item[1], bool) or item[1] < 0):
            raise ValueError(f"bad call entry {item!r}; expected [module name, call index]")
        out.append(CallKey(rank, step, item[0], item[1]))
    return out
