"""Storage: the writer/reader interfaces, the backend registry and the built-in backends.

``pt`` (default, :mod:`.pt`), ``safetensors`` (:mod:`.safetensors`) and ``hdf5``
(:mod:`.hdf5`) are imported only when first used.
"""

from __future__ import annotations

from .base import StepInfo, StoreReader, StoreWriter
from .registry import Backend, backend_names, detect_backend, get_backend, open_run, register_backend

__all__ = ["StepInfo", "StoreReader", "StoreWriter", "Backend", "backend_names", "detect_backend",
           "get_backend", "open_run", "register_backend"]
