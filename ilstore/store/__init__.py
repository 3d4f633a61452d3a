"""Storage: the writer/reader interfaces, the backend registry and the built-in backends.

``pt`` (default, :mod:`.pt`), ``safetensors`` (:mod:`.safetensors`) and ``hdf5``
(:mod:`.hdf5`) are imported only when first used. The names below are imported on first
access too (PEP 562), so a module that needs only the registry's table of built-in backends
(the config's validation) does not import torch with :mod:`.base`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

if TYPE_CHECKING:
    from .base import StepInfo, StoreReader, StoreWriter
    from .registry import Backend, backend_names, detect_backend, get_backend, open_run, register_backend

__all__ = ["StepInfo", "StoreReader", "StoreWriter", "Backend", "backend_names", "detect_backend",
           "get_backend", "open_run", "register_backend"]

__getattr__, __dir__ = lazy_names(__name__, {name: "base" if name in ("StepInfo", "StoreReader", "StoreWriter")
                                              else "registry" for name in __all__})
