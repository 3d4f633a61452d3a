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
"""

from __future__ import annotations

from ._version import __version__
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
