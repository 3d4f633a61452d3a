"""ilstore: intermediate tensor logging for PyTorch.

Capture the inputs and outputs of ``nn.Module`` calls, store them through a pluggable
backend (``pt``, ``safetensors``, ``hdf5``), convert between backends and compare runs.

Example:
    >>> import ilstore, torch, tempfile
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> with ilstore.capture(model, {"output_dir": tempfile.mkdtemp()}) as cap:
    ...     _ = model(torch.ones(1, 4))
    >>> with ilstore.open_run(cap.run_dir) as run:
    ...     [k.display() for k in run.keys(0)]
    ['step 0 0 inputs[0]', 'step 0 0 outputs']

The names below are imported on first use (PEP 562), so ``import ilstore`` does not import
torch: ``ilstore ls`` of a long run reads JSON only, and importing torch would be most of its time.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from ._lazy import lazy_names
from ._version import __version__

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from .capture import Capture, IlstoreWarning, capture
    from .config import Config, load_config
    from .engine_capture import EngineCapture
    from .errors import (
        BackendError,
        ConfigError,
        CorruptFileError,
        IlstoreError,
        RunNotFoundError,
        StoreError,
        UnsafePathError,
    )
    from .keys import CallKey, TensorKey
    from .store import StoreReader, StoreWriter, get_backend, open_run, register_backend

__all__ = [
    "__version__", "capture", "Capture", "EngineCapture", "IlstoreWarning", "Config", "load_config", "open_run",
    "get_backend", "register_backend", "StoreReader", "StoreWriter", "CallKey", "TensorKey", "IlstoreError",
    "ConfigError", "BackendError", "StoreError", "RunNotFoundError", "CorruptFileError", "UnsafePathError",
]

#: Public name -> the submodule that defines it.
_LAZY = {
    "capture": "capture", "Capture": "capture", "IlstoreWarning": "capture", "EngineCapture": "engine_capture",
    "Config": "config", "load_config": "config", "CallKey": "keys", "TensorKey": "keys",
    "StoreReader": "store", "StoreWriter": "store", "get_backend": "store", "open_run": "store",
    "register_backend": "store", **{name: "errors" for name in __all__ if name.endswith("Error")},
}
#: Submodules that importing the package used to import (and so bind) as a side effect.
_SUBMODULES = frozenset({"config", "engine_capture", "errors", "keys", "manifest", "pipeline", "records", "schemas",
                         "store"})

__getattr__, __dir__ = lazy_names(__name__, _LAZY, _SUBMODULES)


class _Package(types.ModuleType):
    """This package's module type: the function ``ilstore.capture`` keeps its name.

    Importing a submodule binds it to its package's attribute of the same name; the submodule
    ``ilstore.capture``, imported lazily by whatever needs it first, would replace the function.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return  # the submodule stays in sys.modules; the attribute is the public name
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
