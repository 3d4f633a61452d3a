"""Names a package imports on first access (PEP 562), shared by ``ilstore``, ``ilstore.store``
and ``ilstore_compare``: each keeps torch (and h5py) out of start-ups that do not need them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Collection, Mapping
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(package: str, homes: Mapping[str, str], submodules: Collection[str] = ()
               ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's module ``__getattr__`` and ``__dir__``.

    Args:
        package: the package's ``__name__``.
        homes: public name -> the submodule (relative to ``package``) that defines it.
        submodules: submodules bound as attributes when first asked for.

    A name, once resolved, is bound in the package, so later lookups do not come back here.
    """

    def __getattr__(name: str) -> Any:
        if name in homes:
            value = getattr(importlib.import_module(f"{package}.{homes[name]}"), name)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *homes, *submodules})

    return __getattr__, __dir__
