"""JSON Schemas shipped with ilstore (config and compare report), installed as ``ilstore.schemas``.

The files live in the repository's top-level ``schemas/`` folder; ``pyproject.toml`` maps that
folder to the package ``ilstore.schemas``, so nothing named ``schemas`` is installed at the top level.

Load them with :func:`load`, which reads the packaged files through
``importlib.resources`` so it works from a wheel, an sdist or an editable install.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["load"]


@cache
def load(name: str) -> dict[str, Any]:
    """Return the parsed schema ``<name>.schema.json``.

    Example:
        >>> load("config")["$schema"]
        'https://json-schema.org/draft/2020-12/schema'
    """
    text = resources.files(__name__).joinpath(f"{name}.schema.json").read_text(encoding="utf-8")
    return json.loads(text)
