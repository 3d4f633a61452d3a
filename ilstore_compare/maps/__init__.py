"""The name maps shipped with ilstore-compare, and how one is chosen for two runs.

Each ``*.json`` file here is a map (format: :mod:`ilstore_compare.mapping`) named after its
file, e.g. ``llama_vllm_to_hf``. A shipped map declares which runs it is for
(``architectures`` and ``engines``), so the comparer picks it by itself when the runs'
manifests say so (:func:`pick_map`), and ``--map NAME`` loads one by name (:func:`resolve_map`).

Example:
    >>> "llama_vllm_to_hf" in shipped_maps()
    True
    >>> vllm = {"class": "vllm.model_executor.models.llama.LlamaForCausalLM", "architecture": "LlamaForCausalLM"}
    >>> hf = {"class": "transformers.models.llama.modeling_llama.LlamaForCausalLM",
    ...       "architecture": "LlamaForCausalLM"}
    >>> pick_map({"model": vllm}, {"model": hf}).name
    'llama_vllm_to_hf'
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import NameMapError
from ..mapping import NameMap, model_engine

__all__ = ["shipped_maps", "load_shipped", "resolve_map", "pick_map", "MapPick"]


@functools.cache
def shipped_maps() -> dict[str, NameMap]:
    """Every shipped map by name (the file name without ``.json``), validated, in name order.

    Raises:
        NameMapError: a shipped map is malformed (a packaging bug; the message names the file).
    """
    folder = resources.files(__name__)
    out: dict[str, NameMap] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            out[entry.name.removesuffix(".json")] = NameMap.load(str(entry))
    return out


def load_shipped(name: str) -> NameMap:
    """The shipped map called ``name`` (``.json`` may be included).

    Raises:
        NameMapError: no shipped map has that name (the message lists them, with a "did you mean").
    """
    maps = shipped_maps()
    key = name.removesuffix(".json")
    if key in maps:
        return maps[key]
    raise NameMapError(f"{name}: no such map file, and no shipped map of that name{_names_hint(key)}")


def resolve_map(value: NameMap | Mapping[str, Any] | str | Path | None) -> NameMap | None:
    """What ``--map`` (or ``name_map=``) means: a map, its dict form, a file, or a shipped map's name.

    A path that exists is read as a map file; otherwise a bare name (no directory part) is looked
    up among the shipped maps. None stays None.

    Raises:
        NameMapError: a malformed map, or a path that is neither a file nor a shipped map's name.
    """
    if value is None or isinstance(value, NameMap):
        return value
    if not isinstance(value, (str, Path)):
        return NameMap.from_dict(value)
    path = Path(value)
    if path.exists() or len(path.parts) != 1:
        if not path.exists():
            raise NameMapError(f"{path}: no such map file{_names_hint(path.stem)}")
        return NameMap.load(path)
    return load_shipped(str(value))


@dataclass(frozen=True)
class MapPick:
    """The outcome of :func:`pick_map`.

    Attributes:
        name: the shipped map chosen, or None.
        map: that map, or None.
        note: what was decided, for the report (None when there is nothing to say: neither
            run records its model, or both come from the same engine and no map applies).
    """

    name: str | None
    map: NameMap | None
    note: str | None


def pick_map(manifest1: Mapping[str, Any] | None, manifest2: Mapping[str, Any] | None) -> MapPick:
    """Choose the shipped map for two runs from their manifests' ``model`` entries.

    The rule: the shipped map whose ``architectures`` hold both runs' ``model.architecture`` and
    whose ``engines`` name dir1's and dir2's engines (:meth:`NameMap.applies_to`). Exactly one
    must apply; with several, none is used and the note lists them. A run captured before
    ilstore recorded the model gets no map. When a map applies with dir1 and dir2 swapped, the
    note says so.

    Args:
        manifest1: dir1's manifest (None: none).
        manifest2: dir2's manifest.

    Returns:
        A :class:`MapPick`; its ``map`` is None when no map applies.
    """
    model1, model2 = (m.get("model") if isinstance(m, Mapping) else None for m in (manifest1, manifest2))
    if not isinstance(model1, Mapping) or not isinstance(model2, Mapping):
        return MapPick(None, None, None)
    what = f"{_describe(model1)} (dir1) and {_describe(model2)} (dir2)"
    found = [name for name, m in shipped_maps().items() if m.applies_to(model1, model2)]
    if len(found) == 1:
        name = found[0]
        return MapPick(name, shipped_maps()[name], f"using the shipped map {name} for {what} (--map to choose "
                                                     "another, --no-auto-map for none)")
    if found:
        return MapPick(None, None, f"several shipped maps apply to {what} ({', '.join(found)}): none is used; "
                                   "choose one with --map")
    if model_engine(model1) == model_engine(model2):
        return MapPick(None, None, None)
    swapped = [name for name, m in shipped_maps().items() if m.applies_to(model2, model1)]
    hint = (f"; the shipped map {swapped[0]} applies with --dir1 and --dir2 swapped" if swapped
            else "; give one with --map FILE")
    return MapPick(None, None, f"no shipped map for {what}: module names and layouts are compared as they are{hint}")


def _describe(model: Mapping[str, Any]) -> str:
    return f"{model_engine(model) or '?'} {model.get('architecture', '?')}"


def _names_hint(name: str) -> str:
    names = list(shipped_maps())
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        return f"; did you mean the shipped map {close[0]!r}?"
    return f"; shipped maps: {', '.join(names)}" if names else ""
